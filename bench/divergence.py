"""Divergence at fleet scale: weight-space drift of 100,000 adapters, function-space drift of 1,000 models.

Weight space: 100,000 rank-8 adapters on the tiny base's shapes (hidden 256, intermediate 688,
4 layers × q,k,v,o,gate,up,down = 28 modules) go through ``weight_metrics`` in chunks, with base
norms, exactly as the monitor would feed them: ‖ΔW‖_F, σ_max, stable rank and ‖ΔW‖/‖W₀‖ per module
and per model. The factors are drawn once for a pool of chunks and reused (100,000 adapters are
62 GB of float32; in service they stream from the adapter store, which is not what this measures);
each chunk is larger than the CPU caches, so every pass reads its factors from memory.

Wall time on the shared development machine depends on what else runs there, so the CPU time of
the run is reported too: CPU seconds / 2 workers is the wall time of a dedicated 2-core machine.

Baselines, same process, one thread each, CPU time, against fleet's path on one thread:
materializing ΔW = s·B·A and taking its Frobenius norm and top singular value
(``torch.linalg.svdvals``), and the same Gram matrices followed by LAPACK's batched eigen-solver
(``eigvalsh``) instead of fleet's squaring bracket. Accuracy is checked against float64 SVDs of
materialized deltas.

Function space: 1,000 individual models (10 companies × 10 teams × 10 people, rank 8 at every level)
scored on the default probe set (16 prompts × 64 tokens, the base's top-32 cache) against the base
and against their team's stack, by the monitor's scorer through the engine (``batch_models`` stacks
per forward, parents run once) and by PEFT one model at a time (its stack as one LoRA; parents kept
for siblings, as the scorer does). PEFT is timed on 40 of the models (whole teams, half before and
half after the engine run) and extrapolated linearly; its scores are checked against the engine's.
Both paths run on one torch thread (steadier on a shared machine), wall and CPU time reported. ``--only weight|function`` runs one case (figures merge into the
JSON).
"""

from __future__ import annotations

import copy
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import console, peak_rss_mib, table, write_results  # noqa: E402

from fleet.divergence.metrics import (  # noqa: E402
    LoraBatch,
    cached_base_norms,
    relative_metrics,
    weight_metrics,
    weight_metrics_chunks,
)

HIDDEN, INTERMEDIATE, LAYERS, RANK, ALPHA = 256, 688, 4, 8, 16.0
ADAPTERS = 100_000
CHUNK = 1_000  # models per weight_metrics call (~625 MB of float32 factors)
POOL = 2  # distinct chunks drawn; each pass reuses one
WORKERS = 2  # one chunk per core, single-threaded kernels (see weight_metrics_chunks)
TARGET_S = 10.0
FN_THREADS = 1  # both paths single-threaded: on a shared machine OpenMP barriers stall (see the weight case)
SHAPES = {  # module → (d_in, d_out)
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTERMEDIATE),
    "mlp.up_proj": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}
MODULES = {f"model.layers.{i}.{m}": s for i in range(LAYERS) for m, s in SHAPES.items()}


def base_state_dict(g: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        f"{m}.weight": torch.randn(d_out, d_in, generator=g) * 0.02 for m, (d_in, d_out) in MODULES.items()
    }


def adapter_chunk(g: torch.Generator, n: int, rank: int = RANK) -> dict[str, LoraBatch]:
    """n trained-looking adapters: A as PEFT initialises it, B small and dense; B stored r-major."""
    out = {}
    for name, (d_in, d_out) in MODULES.items():
        bound = d_in**-0.5
        A = torch.empty(n, rank, d_in).uniform_(-bound, bound, generator=g)
        B = (torch.randn(n, rank, d_out, generator=g) * 0.01).mT
        out[name] = LoraBatch.of(A, B, ALPHA / rank)
    return out


def slice_chunk(chunk: dict[str, LoraBatch], n: int) -> dict[str, LoraBatch]:
    return {k: LoraBatch(v.A_NRI[:n], v.B_NOR[:n], v.scale_N[:n]) for k, v in chunk.items()}


def weight_case(
    pool: list[dict[str, LoraBatch]], base_norms: dict[str, float]
) -> tuple[float, float, torch.Tensor]:
    """Wall and CPU seconds (all threads) for ADAPTERS adapters, and every model's relative norm.

    The CPU figure is what a dedicated machine needs: on the shared development box other jobs take
    cores away, so wall time there overstates it; CPU seconds / WORKERS is the dedicated wall time.
    """
    rel = torch.empty(ADAPTERS, dtype=torch.float64)
    weight_metrics(slice_chunk(pool[0], 64), base_norms)  # warm-up
    chunks = (pool[i % POOL] for i in range(ADAPTERS // CHUNK))
    cpu0, t0 = _cpu_s(), time.perf_counter()
    for i, wm in enumerate(weight_metrics_chunks(chunks, base_norms, workers=WORKERS)):
        rel[i * CHUNK : (i + 1) * CHUNK] = wm.rel_fro_N  # kept, as the monitor would
    return time.perf_counter() - t0, _cpu_s() - cpu0, rel


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def materialized_baseline(chunk: dict[str, LoraBatch], n: int) -> float:
    """Per-adapter CPU µs: form ΔW, then its Frobenius norm and σ_max by SVD (no relative norms even)."""
    sub = slice_chunk(chunk, n)
    t0 = time.process_time()
    for lv in sub.values():
        W = lv.scale_N[:, None, None].float() * (lv.B_NOR @ lv.A_NRI)
        torch.linalg.matrix_norm(W)
        torch.linalg.svdvals(W)[:, 0]
    return (time.process_time() - t0) / n * 1e6


def one_thread_comparison(
    chunk: dict[str, LoraBatch], base_norms: dict[str, float], rounds: int = 3
) -> tuple[float, float]:
    """Per-adapter CPU µs on one thread of fleet's path and of Gram + LAPACK ``eigvalsh``.

    Rounds alternate and the best of each counts: on a shared machine CPU time is steadier than
    wall time, and interleaving gives both the same neighbours.
    """
    from fleet.divergence._weights import stack_grams

    def eigh_path() -> None:
        for lv in chunk.values():
            GA, GB = stack_grams(lv)
            (GA * GB).sum((-2, -1))
            L = torch.linalg.cholesky_ex(GA).L  # symmetric core Lᵀ G_B L, same eigenvalues as G_B G_A
            torch.linalg.eigvalsh(L.mT @ GB @ L)[:, -1]

    ours, eigh = [], []
    for _ in range(rounds):
        for out, fn in ((ours, lambda: weight_metrics(chunk, base_norms)), (eigh, eigh_path)):
            t0 = time.process_time()
            fn()
            out.append((time.process_time() - t0) / CHUNK * 1e6)
    return min(ours), min(eigh)


def accuracy(chunk: dict[str, LoraBatch], n: int) -> tuple[float, float]:
    """Largest relative error of ‖ΔW‖_F and σ_max against float64 SVDs of the materialized deltas."""
    sub = slice_chunk(chunk, n)
    wm = weight_metrics(sub)
    fro_err = spec_err = 0.0
    for j, lv in enumerate(sub.values()):
        sv = torch.linalg.svdvals(lv.materialize())
        fro_err = max(fro_err, float(((wm.fro_NM[:, j] - sv.square().sum(-1).sqrt()) / sv[:, 0]).abs().max()))
        spec_err = max(spec_err, float(((wm.spectral_NM[:, j] - sv[:, 0]) / sv[:, 0]).abs().max()))
    return fro_err, spec_err


def relative_case(g: torch.Generator, n: int) -> float:
    """Per-model µs of distance/cosine of n individual stacks (company + team + own) to their team's stack."""
    company, team, own = adapter_chunk(g, n), adapter_chunk(g, n), adapter_chunk(g, n)
    child = {m: [company[m], team[m], own[m]] for m in MODULES}
    parent = {m: [company[m], team[m]] for m in MODULES}
    t0 = time.perf_counter()
    relative_metrics(child, parent)
    return (time.perf_counter() - t0) / n * 1e6


# -- function space ------------------------------------------------------------------------------
COMPANIES, TEAMS, PEOPLE = 10, 10, 10  # 1,000 individuals under 100 teams under 10 companies
FN_RANK = 8
PEFT_TEAMS = 2  # PEFT times whole teams (parents amortised as in the full run), before and after


def function_fleet():
    """The tiny base (random weights, output layer scaled to peaked distributions), the probe set of
    the default settings (16 prompts × 64 tokens, base cache top-32) and 1,110 adapters."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _tiny import random_lora, tiny_llama

    from fleet.base import build_tokenizer
    from fleet.config import DivergenceConfig
    from fleet.divergence.probes import build, wanted_meta

    base = tiny_llama(vocab=264, seed=0)  # the tiny base's shapes: hidden 256, 4 layers, intermediate 688
    with torch.no_grad():
        base.lm_head.weight.mul_(60.0)
    div = DivergenceConfig()
    want = wanted_meta(div, "bench", 264)
    probe = build(base, build_tokenizer(), name="bench-probes-v1", base_model="bench", want=want, div=div)
    adapters, items = {}, []
    for c in range(COMPANIES):
        adapters[f"c{c}"] = random_lora(base, rank=FN_RANK, seed=c, std=0.02)
        for t in range(TEAMS):
            team = f"c{c}/t{t}"
            adapters[team] = random_lora(base, rank=FN_RANK, seed=1000 + 100 * c + t, std=0.02)
            for p in range(PEOPLE):
                who = f"{team}/p{p}"
                adapters[who] = random_lora(
                    base, rank=FN_RANK, seed=100_000 + 1000 * c + 10 * t + p, std=0.02
                )
                items.append((who, (f"c{c}", team, who)))
    return base, probe, adapters, items, div


def engine_scores(base, probe, adapters, items, batch_models: int):
    """fleet's path: the monitor's scorer over the engine, every version in ``items`` (function space)."""
    from fleet.divergence.scoring import FunctionScorer, ScoreItem
    from fleet.lora import LoraEngine

    chunk = max(4 * batch_models, 16)
    engine = LoraEngine(copy.deepcopy(base), max_slots=3 * chunk, max_rank=FN_RANK)
    scorer = FunctionScorer(
        engine, probe, adapters.__getitem__, batch_models=batch_models, weight_space=False
    )
    work = [ScoreItem(m, 1, "individual", levels) for m, levels in items]
    t0, c0 = time.perf_counter(), time.process_time()
    scores = scorer.score(work)
    return time.perf_counter() - t0, time.process_time() - c0, scores, scorer


class PeftScorer:
    """The baseline: each model scored alone with PEFT. Its stack goes in as one LoRA (rank 24, the
    exported form PEFT and vLLM take), one forward over the probe rows, the same metric functions;
    its parent stack likewise, computed once per parent and kept while its siblings follow (the
    same reuse fleet's scorer has), then the adapters are deleted."""

    def __init__(self, base, probe, adapters) -> None:
        from peft import LoraConfig, get_peft_model

        self.probe, self.adapters = probe, adapters
        first = adapters[next(iter(adapters))]
        cfg = LoraConfig(r=1, lora_alpha=1, target_modules=first.target_modules, init_lora_weights=False)
        self.model = get_peft_model(copy.deepcopy(base), cfg, adapter_name="idle").eval()
        self.parent_key, self.parent_lp = None, None

    def _logp(self, levels) -> torch.Tensor:
        from peft import LoraConfig, set_peft_model_state_dict

        from fleet.divergence._logits import log_probs
        from fleet.lora import AdapterWeights

        w = AdapterWeights.stack([self.adapters[k] for k in levels])
        cfg = LoraConfig(
            r=w.rank, lora_alpha=w.alpha, target_modules=w.target_modules, init_lora_weights=False
        )
        self.model.add_adapter("m", cfg)
        set_peft_model_state_dict(self.model, w.tensors, adapter_name="m")
        self.model.set_adapter("m")
        with torch.inference_mode():
            lp = log_probs(self.model(input_ids=self.probe.ids_PT).logits)
        self.model.set_adapter("idle")
        self.model.delete_adapter("m")
        return lp

    def score(self, levels) -> dict[str, float]:
        from fleet.divergence._logits import function_metrics, nll_shift

        probe, g = self.probe, self.probe.general_rows
        lp = self._logp(levels)[None]
        if self.parent_key != levels[:-1]:
            self.parent_key, self.parent_lp = levels[:-1], self._logp(levels[:-1])[None]
        with torch.inference_mode():
            fm = function_metrics(lp, probe.cache, probe.mask_PT)
            _, dnll = nll_shift(lp[:, g], probe.targets_PT[g], probe.nll_mask_GT, probe.general_cache())
            pm = function_metrics(lp, self.parent_lp, probe.mask_PT)
            _, p_dnll = nll_shift(lp[:, g], probe.targets_PT[g], probe.nll_mask_GT, self.parent_lp[:, g])
        return {"kl": float(fm.kl[0]), "top1": float(fm.top1_agreement[0]), "dnll": float(dnll[0]),
                "parent_kl": float(pm.kl[0]), "parent_dnll": float(p_dnll[0])}  # fmt: skip


def peft_scores(peft: PeftScorer, items) -> tuple[float, float, dict[str, dict[str, float]]]:
    out = {}
    t0, c0 = time.perf_counter(), time.process_time()
    for m, levels in items:
        out[m] = peft.score(levels)
    return time.perf_counter() - t0, time.process_time() - c0, out


def function_case() -> tuple[dict[str, object], list[tuple[str, str, str]]]:
    """Function-space metrics for 1,000 models, engine-batched vs PEFT one at a time (same process).

    PEFT is timed on whole teams (2 before the engine run, 2 after, so both see the same load) and
    extrapolated linearly to 1,000 models; its scores are checked against the engine's.
    """
    import logging
    import warnings

    warnings.filterwarnings("ignore", module="peft")
    logging.getLogger("peft").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    torch.set_num_threads(FN_THREADS)
    try:
        base, probe, adapters, items, div = function_fleet()
        team_size = PEOPLE
        early = items[: PEFT_TEAMS * team_size]
        late = items[-PEFT_TEAMS * team_size :]
        peft = PeftScorer(base, probe, adapters)
        peft.score(items[0][1])  # warm-up
        peft.parent_key = None
        pw1, pc1, ps1 = peft_scores(peft, early)
        engine_s, engine_cpu, scores, scorer = engine_scores(base, probe, adapters, items, div.batch_models)
        peft.parent_key = None
        pw2, pc2, ps2 = peft_scores(peft, late)
    finally:
        torch.set_num_threads(threads)
    n_peft = len(early) + len(late)
    peft_per_model, peft_cpu_per_model = (pw1 + pw2) / n_peft, (pc1 + pc2) / n_peft
    by = {s.model_id: s for s in scores}
    err = 0.0
    for m, ref in {**ps1, **ps2}.items():
        s = by[m]
        for got, want in (
            (s.base["kl"], ref["kl"]),
            (s.parent["kl"], ref["parent_kl"]),
            (s.base["dnll"], ref["dnll"]),
        ):
            err = max(err, abs(got - want) / max(abs(want), 1e-3))
    if err > 1e-2:
        raise RuntimeError(f"PEFT baseline disagrees with the engine scores (relative error {err:.1e})")
    n = len(items)
    peft_1000 = peft_per_model * n
    figures = {
        "function_1000_models_s": round(engine_s, 2),
        "function_1000_models_cpu_s": round(engine_cpu, 2),
        "function_speedup_vs_peft": round(peft_1000 / engine_s, 2),
        "function_speedup_vs_peft_cpu_time": round(peft_cpu_per_model * n / engine_cpu, 2),
        "function_peft_per_model_ms": round(peft_per_model * 1e3, 1),
        "function_engine_per_model_ms": round(engine_s / n * 1e3, 1),
        "function_peft_models_timed": n_peft,
        "function_peft_1000_models_s_extrapolated": round(peft_1000, 1),
        "function_forwards": scorer.forwards,
        "function_stacks_run": scorer.stacks_run,
        "function_batch_models": div.batch_models,
        "function_threads": FN_THREADS,
        "function_max_rel_err_vs_peft": err,
        "function_probe": {
            "prompts": probe.prompts,
            "tokens": probe.tokens,
            "top_k": probe.cache.k,
            "tail_mass_mean": round(float(probe.meta["tail_mass_mean"]), 4),
        },  # fmt: skip
    }
    rows = [
        (
            f"function-space, {n:,} models × {probe.prompts}×{probe.tokens} probe (engine)",
            f"{engine_s:.1f} s",
            "",
        ),
        (
            f"  {scorer.stacks_run} stacks ({n} + {scorer.stacks_run - n} parents) in {scorer.forwards} forwards",
            f"{engine_s / n * 1e3:.0f} ms/model",
            "",
        ),  # fmt: skip
        (
            f"  PEFT one at a time ({n_peft} timed, ×{n / n_peft:.0f} extrapolated)",
            f"{peft_1000:.1f} s",
            f"{peft_per_model * 1e3:.0f} ms/model",
        ),  # fmt: skip
        (
            "  speedup vs PEFT, wall / CPU time",
            f"{peft_1000 / engine_s:.2f}× / {peft_cpu_per_model * n / engine_cpu:.2f}×",
            "≥ 10×",
        ),
        ("  max rel. error of KL/ΔNLL vs PEFT", f"{err:.1e}", ""),
    ]
    return figures, rows


def weight_figures() -> tuple[dict[str, object], list[tuple[str, str, str]]]:
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    norms = cached_base_norms("bench-tiny", base_state_dict(g), list(MODULES))
    base_norms_ms = (time.perf_counter() - t0) * 1e3
    pool = [adapter_chunk(g, CHUNK) for _ in range(POOL)]

    weight_s, weight_cpu_s, rel = weight_case(pool, norms)
    per_adapter_us = weight_s / ADAPTERS * 1e6
    ours_1t_us, eigh_us = one_thread_comparison(pool[1], norms)
    naive_us = materialized_baseline(pool[0], 10)
    fro_err, spec_err = accuracy(pool[0], 50)
    relative_us = relative_case(g, 500)
    assert torch.isfinite(rel).all() and (rel > 0).all()
    del pool
    figures: dict[str, object] = {
        "weight_100k_s": round(weight_s, 3),
        "weight_100k_cpu_s": round(weight_cpu_s, 3),
        "weight_100k_dedicated_s_estimate": round(weight_cpu_s / WORKERS, 3),
        "weight_per_adapter_us": round(per_adapter_us, 2),
        "weight_single_thread_per_adapter_us": round(ours_1t_us, 2),
        "weight_materialized_per_adapter_us": round(naive_us, 1),
        "weight_speedup_vs_materialized": round(naive_us / ours_1t_us, 1),
        "weight_gram_eigh_per_adapter_us": round(eigh_us, 2),
        "weight_speedup_vs_gram_eigh": round(eigh_us / ours_1t_us, 2),
        "weight_max_rel_err_fro": fro_err,
        "weight_max_rel_err_spectral": spec_err,
        "relative_stack_per_model_us": round(relative_us, 2),
        "base_norms_ms": round(base_norms_ms, 2),
        "weight_chunk": CHUNK,
        "weight_modules": len(MODULES),
        "weight_workers": WORKERS,
        "weight_peak_rss_mib": round(peak_rss_mib(), 1),
    }
    rows = [
        ("weight-space, 100,000 adapters × 28 modules (r=8)", f"{weight_s:.2f} s", f"≤ {TARGET_S:.0f} s"),
        (f"  per adapter ({WORKERS} workers)", f"{per_adapter_us:.1f} µs", ""),
        (
            f"  CPU time (all threads); / {WORKERS} = dedicated {WORKERS}-core wall",
            f"{weight_cpu_s:.2f} s → {weight_cpu_s / WORKERS:.2f} s",
            f"≤ {TARGET_S:.0f} s",
        ),
        ("  one thread, CPU time: fleet", f"{ours_1t_us:.1f} µs", ""),
        (
            "  one thread: materialize ΔW + SVD",
            f"{naive_us:.0f} µs ({naive_us / ours_1t_us:.0f}× slower)",
            "",
        ),
        ("  one thread: Gram + LAPACK eigvalsh", f"{eigh_us:.1f} µs ({eigh_us / ours_1t_us:.2f}× fleet)", ""),
        ("  max rel. error ‖ΔW‖_F / σ_max vs float64 SVD", f"{fro_err:.1e} / {spec_err:.1e}", ""),
        ("parent-relative, 3-level stack vs 2-level parent, per model", f"{relative_us:.1f} µs", ""),
        ("base module norms (once per base)", f"{base_norms_ms:.1f} ms", ""),
    ]

    return figures, rows


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--only", choices=("weight", "function"), help="run one case (figures merge into the JSON)"
    )
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # the weight case parallelises over chunks instead (WORKERS threads)
    load = os.getloadavg()[0]
    console.print(
        f"[bold]divergence[/] · torch {torch.__version__} · {WORKERS} workers × 1 thread · "
        f"{os.cpu_count()} CPUs · load average {load:.2f} before start"
    )
    figures: dict[str, object] = {}
    rows: list[tuple[str, str, str]] = []
    if args.only != "function":
        f, r = weight_figures()
        figures |= f | {"load_average_at_start": round(load, 2)}
        rows += r
    if args.only != "weight":
        f, r = function_case()
        figures |= f | {"function_load_average_at_start": round(load, 2)}
        rows += r
    table("divergence", rows)
    path = write_results("divergence", figures)
    console.print(f"wrote {path} (load average now {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
