"""Benchmark: the multi-adapter LoRA engine against the base model alone and against PEFT.

Tiny Llama (vocab 512, hidden 256, 4 layers, 4 heads, intermediate 688), r=8 on all 7 linear
modules, float32 on CPU. Every case is timed in this one process, in interleaved rounds (each
round runs every variant once), and figures are medians over rounds, because the machine is
shared and noisy. "Base" is the faster of the two ways to run the plain model: Hugging Face's
forward with its DynamicCache (on an unwrapped copy) and fleet's own decode path with no
adapter rows. Run: ``.venv/bin/python bench/lora_engine.py [--peft-adapters N] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers
from peft import PeftModel
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from _tiny import tiny_llama  # noqa: E402

from fleet.lora import AdapterWeights, LoraEngine  # noqa: E402
from fleet.lora._llama import KVCache, decode_step, prefill  # noqa: E402

RANK, ALPHA, PROMPT = 8, 16.0, 32
DECODE_B, PREFILL_B, PREFILL_T = 256, 64, 128


def random_adapter(template: AdapterWeights, seed: int) -> AdapterWeights:
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.02 for k, v in template.tensors.items()}
    return AdapterWeights(RANK, ALPHA, False, template.target_modules, tensors)


def timed(fn, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step."""
    t, c = time.perf_counter(), time.process_time()
    fn(steps)
    return (time.perf_counter() - t) / steps, (time.process_time() - c) / steps


# ---------------------------------------------------------------------- decode
class FleetDecode:
    """fleet's decode path: prefill once, then time decode steps from the same cache state."""

    def __init__(self, engine: LoraEngine, ids: torch.Tensor, slots) -> None:
        self.engine, self.plan = engine, engine.plan(slots)
        n = ids.shape[0]
        self.cache = KVCache(engine.model, dtype=torch.float32, device=torch.device("cpu"))
        self.cache.ensure(n, PROMPT + 64)
        with torch.inference_mode(), engine.rows(self.plan):
            logits = prefill(engine.model, ids, torch.full((n,), PROMPT), self.cache)
        self.tokens = logits.argmax(-1)

    def __call__(self, steps: int) -> None:
        with torch.inference_mode(), self.engine.rows(self.plan):
            self.cache.lengths[: self.cache.n] = PROMPT
            self.cache.host_lengths[:] = [PROMPT] * self.cache.n
            for _ in range(steps):
                self.tokens = decode_step(self.engine.model, self.tokens, self.cache).argmax(-1)


class HFDecode:
    """Hugging Face forward with DynamicCache (optionally PEFT's adapter_names), cropped back each run."""

    def __init__(self, model, ids: torch.Tensor, **kwargs) -> None:
        self.model, self.kwargs = model, kwargs
        with torch.inference_mode():
            self.cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, cache=self.cache, use_cache=True, **kwargs)
        self.tokens = out.logits[:, -1].argmax(-1, keepdim=True)

    def __call__(self, steps: int) -> None:
        with torch.inference_mode():
            extra = self.cache.get_seq_length() - PROMPT
            if extra:
                self.cache.crop(-extra)
            for _ in range(steps):
                out = self.model(input_ids=self.tokens, cache=self.cache, use_cache=True, **self.kwargs)
                self.tokens = out.logits[:, -1].argmax(-1, keepdim=True)


# ---------------------------------------------------------------------- prefill
def fleet_prefill(engine: LoraEngine, ids: torch.Tensor, slots):
    """fleet's prefill into a cache allocated once, as a serving batch reuses its cache."""
    plan = engine.plan(slots)
    lengths = torch.full((ids.shape[0],), ids.shape[1])
    cache = KVCache(engine.model, dtype=torch.float32, device=torch.device("cpu"))
    cache.ensure(ids.shape[0], ids.shape[1])

    def run(steps: int) -> None:
        with torch.inference_mode(), engine.rows(plan):
            for _ in range(steps):
                cache.n, cache.host_lengths = 0, []
                prefill(engine.model, ids, lengths, cache)

    return run


def hf_prefill(model, ids: torch.Tensor, rows=None):
    def run(steps: int) -> None:
        with torch.inference_mode():
            for _ in range(steps):
                if rows is None:
                    model(input_ids=ids, use_cache=True)
                else:
                    with rows():
                        model(input_ids=ids, use_cache=True)

    return run


def rounds(
    variants: dict, n_rounds: int, steps: int, *, warm: bool = False
) -> tuple[dict[str, float], dict[str, float]]:
    """Median (wall, CPU) seconds per step of each variant over interleaved rounds.

    ``warm``: one untimed step before each timed run, so that no variant pays for the CPU caches
    the previous one evicted (PEFT's 256 adapters sweep them on every step).
    """
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn(1)  # warm-up
    for _ in range(n_rounds):
        for name, fn in variants.items():
            if warm:
                fn(1)
            w, c = timed(fn, steps)
            wall[name].append(w)
            cpu[name].append(c)
    med = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
    return med(wall), med(cpu)


# ---------------------------------------------------------------------- loading
def load_store(n: int, template: AdapterWeights) -> dict:
    """Write n PEFT directories in the store layout, then time read + sha256 check + load into slots."""
    with tempfile.TemporaryDirectory() as root:
        expected: dict[str, str] = {}
        for i in range(n):
            model_id = f"acme{i // 100}/team{i // 10 % 10}/user{i}"
            config, weights = random_adapter(template, 10_000 + i).to_bytes()
            d = Path(root) / model_id / "v1"
            d.mkdir(parents=True)
            (d / "adapter_config.json").write_bytes(config)
            (d / "adapter_model.safetensors").write_bytes(weights)
            expected[model_id] = hashlib.sha256(weights).hexdigest()  # what the registry records
        engine = LoraEngine(tiny_llama(), max_slots=n, max_rank=RANK)
        t = time.perf_counter()
        for model_id, sha in expected.items():
            d = Path(root) / model_id / "v1"
            weights = (d / "adapter_model.safetensors").read_bytes()
            if hashlib.sha256(weights).hexdigest() != sha:
                raise RuntimeError(f"sha256 mismatch for {model_id}")
            config = (d / "adapter_config.json").read_bytes()
            engine.load(f"{model_id}@v1", AdapterWeights.from_bytes(config, weights))
        seconds = time.perf_counter() - t
        assert engine.free_slots == 0
        return {"load_1000_adapters_s": seconds, "load_adapters_n": n}


def peft_with_adapters(plain, adapters: list[AdapterWeights], n_official: int = 16):
    """A PeftModel holding every adapter, for PEFT's mixed-batch (``adapter_names``) decode.

    The first ``n_official`` go through ``load_adapter`` and are timed. That call walks every module
    of the growing model (O(n) each, O(n²) in all: 51 s for 256 where the issue measured it, 387 s
    here under load), so the rest are added through each LoRA layer's ``update_layer``, which is
    where PEFT's loader ends up, and the result is checked against the engine before timing.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        for i, a in enumerate(adapters[:n_official]):
            a.to_peft_dir(f"{tmp}/a{i}")
            if i == 0:
                pm = PeftModel.from_pretrained(copy.deepcopy(plain), f"{tmp}/a0", adapter_name="a0")
            else:
                pm.load_adapter(f"{tmp}/a{i}", adapter_name=f"a{i}")
        official_s = time.perf_counter() - t
    layers = {
        n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, LoraLayer)
    }
    for i in range(n_official, len(adapters)):
        a = adapters[i]
        config = LoraConfig(
            r=a.rank, lora_alpha=a.alpha, target_modules=a.target_modules, init_lora_weights=False
        )
        pm.peft_config[f"a{i}"] = config
        for name, (A, B) in a.modules().items():
            layer = layers[name]
            layer.update_layer(f"a{i}", a.rank, a.alpha, config=config)
            with torch.no_grad():
                layer.lora_A[f"a{i}"].weight.copy_(A)
                layer.lora_B[f"a{i}"].weight.copy_(B)
    return pm.eval(), official_s, min(n_official, len(adapters))


def check_peft_matches_engine(pm, engine: LoraEngine, ids: torch.Tensor, n: int) -> None:
    """Rows spread over the PEFT adapters (both loading paths) agree with the engine's output."""
    picks = [round(i * (n - 1) / (len(ids) - 1)) for i in range(len(ids))]
    with torch.inference_mode():
        ref = pm(input_ids=ids, adapter_names=[f"a{i}" for i in picks]).logits
        with engine.rows([[engine.slot(f"a{i}")] for i in picks]):
            out = engine.model(input_ids=ids).logits
    err = float((out - ref).abs().max() / ref.abs().max())
    if err > 1e-5:
        raise RuntimeError(f"PEFT baseline disagrees with the engine (relative error {err:.1e})")


def ratios(d: dict, p: dict, pre: dict) -> dict[str, float]:
    """The issue's four speed ratios from per-step times (one clock: wall or CPU)."""
    base_decode = min(d["hf_base"], d["fleet_base"])
    return {
        "decode_distinct_ratio_vs_base": base_decode / d["fleet_distinct"],
        "decode_distinct_ratio_vs_peft": p["peft_distinct"] / p["fleet_distinct"],
        "decode_stacked_ratio_vs_base": base_decode / d["fleet_stacked"],
        "prefill_ratio_vs_base": min(pre["hf_base"], pre["fleet_base"])
        / min(pre["fleet_distinct"], pre["hf_engine_distinct"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peft-adapters", type=int, default=DECODE_B, help="adapters given to PEFT (≤ 256)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads. 1 by default: on a shared 2-core machine a 2-thread OpenMP region stalls "
        "whenever another process holds the second core, which swamps what is being measured",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora_engine.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    console = Console()
    load_before = os.getloadavg()

    base = tiny_llama()
    plain = copy.deepcopy(base)  # unwrapped: the base model alone, and PEFT's base
    n_adapters = DECODE_B + 16 + 4
    engine = LoraEngine(base, max_slots=n_adapters, max_rank=RANK)
    template = AdapterWeights.fresh(plain, rank=RANK, alpha=ALPHA, seed=0)
    adapters = [random_adapter(template, i) for i in range(n_adapters)]
    for i, a in enumerate(adapters):
        engine.load(f"a{i}", a)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (DECODE_B, PROMPT), generator=g)
    distinct = [[i] for i in range(DECODE_B)]
    stacked = [[DECODE_B + 16 + i % 4, DECODE_B + i % 16, i] for i in range(DECODE_B)]
    console.print("decode: preparing caches ...")
    decode = {
        "hf_base": HFDecode(plain, ids),
        "fleet_base": FleetDecode(engine, ids, [[-1]] * DECODE_B),
        "fleet_distinct": FleetDecode(engine, ids, distinct),
        "fleet_stacked": FleetDecode(engine, ids, stacked),
    }
    d, d_cpu = rounds(decode, args.rounds, steps=8, warm=True)

    n_peft = min(args.peft_adapters, DECODE_B)
    console.print(f"PEFT: adding {n_peft} adapters ...")
    pm, peft_load_s, n_official = peft_with_adapters(plain, adapters[:n_peft])
    check_peft_matches_engine(pm, engine, ids[:8, :4], n_peft)
    names = [f"a{i % n_peft}" for i in range(DECODE_B)]
    peft_decode = HFDecode(pm, ids, adapter_names=names)
    # PEFT steps take ~20x longer: fewer of them, timed in the same rounds as fleet's own.
    p, p_cpu = rounds(
        {"peft_distinct": peft_decode, "fleet_distinct": decode["fleet_distinct"]}, 3, 2, warm=True
    )
    del pm, peft_decode

    console.print("prefill ...")
    pids = torch.randint(3, 512, (PREFILL_B, PREFILL_T), generator=g)
    pslots = [[i] for i in range(PREFILL_B)]
    pre_variants = {
        "hf_base": hf_prefill(plain, pids),
        "fleet_base": fleet_prefill(engine, pids, [[-1]] * PREFILL_B),
        "fleet_distinct": fleet_prefill(engine, pids, pslots),
        "hf_engine_distinct": hf_prefill(engine.model, pids, rows=functools.partial(engine.rows, pslots)),
    }
    pre, pre_cpu = rounds(pre_variants, args.rounds, steps=1)
    del engine, base, decode, pre_variants

    console.print("loading 1,000 adapters from a local store ...")
    load = load_store(1000, template)

    tok = lambda s, b: b / s  # noqa: E731  tokens per second of one decode step (or one prefill)
    results = {
        **ratios(d, p, pre),
        "load_1000_adapters_s": load["load_1000_adapters_s"],
        "peft_adapters": n_peft,
        "peft_load_adapter_s": {"adapters": n_official, "seconds": peft_load_s},
        "decode_tokens_per_s": {
            **{k: tok(v, DECODE_B) for k, v in d.items()},
            "peft_distinct": tok(p["peft_distinct"], DECODE_B),
            "fleet_distinct_in_peft_rounds": tok(p["fleet_distinct"], DECODE_B),
        },
        "prefill_tokens_per_s": {k: tok(v, PREFILL_B * PREFILL_T) for k, v in pre.items()},
        # The same ratios from process CPU time (single thread: time spent computing, not waiting for
        # a core other processes hold); a steadier figure on a shared machine.
        "cpu_time_ratios": ratios(d_cpu, p_cpu, pre_cpu),
        "setup": {
            "model": "tiny Llama vocab 512, hidden 256, 4 layers, 4 heads, intermediate 688, float32",
            "rank": RANK,
            "targets": "q,k,v,o,gate,up,down",
            "decode": f"batch {DECODE_B}, prompt {PROMPT}, 8 steps per round, {args.rounds} rounds",
            "prefill": f"batch {PREFILL_B} x {PREFILL_T} tokens",
            "timing": "wall clock, median over interleaved rounds; base = faster of HF+DynamicCache and fleet's path",
            "device": "cpu",
            "threads": torch.get_num_threads(),
            # Other work on the machine while this ran (1-minute load average, before and after).
            "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "cpu_count": os.cpu_count(),
        },
        "versions": {
            "torch": torch.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
        },
    }

    table = Table(
        title=f"fleet LoRA engine (tiny Llama, r=8, all 7 linear modules, CPU, {args.threads} thread)"
    )
    for col in ("case", "wall clock", "CPU time", "target"):
        table.add_column(col, justify="left" if col == "case" else "right")
    cpu = results["cpu_time_ratios"]
    for key, label, target, fmt in (
        ("decode_distinct_ratio_vs_base", "decode b256, 256 distinct: × base", "≥ 0.60", "{:.2f}"),
        (
            "decode_distinct_ratio_vs_peft",
            f"decode b256, 256 distinct: × PEFT ({n_peft} adapters)",
            "≥ 10",
            "{:.1f}",
        ),
        ("decode_stacked_ratio_vs_base", "decode b256, 3-level stacks: × base", "≥ 0.45", "{:.2f}"),
        ("prefill_ratio_vs_base", "prefill 64×128, 64 distinct: × base", "≥ 0.85", "{:.2f}"),
    ):
        table.add_row(label, fmt.format(results[key]), fmt.format(cpu[key]), target)
    table.add_row(
        "load 1,000 adapters (read+sha256+slot)", f"{results['load_1000_adapters_s']:.2f} s", "", "≤ 5 s"
    )
    table.add_row(f"PEFT: load_adapter × {n_official}", f"{peft_load_s:.1f} s", "", "")
    for name, tps in results["decode_tokens_per_s"].items():
        table.add_row(f"decode tokens/s: {name}", f"{tps:,.0f}", "", "")
    for name, tps in results["prefill_tokens_per_s"].items():
        table.add_row(f"prefill tokens/s: {name}", f"{tps:,.0f}", "", "")
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
