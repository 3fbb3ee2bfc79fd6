"""Packed training: what one pack of many models costs against one model at a time.

1. tokens/s of one packed step over 32 members ÷ tokens/s of a single-adapter step at the
   same total batch (same rows, same lengths) — forward, backward, per-member clip and AdamW;
2. peak RSS of a 32-member pack ÷ a 1-member pack (each in its own process);
3. wall time to train 8 models: one packed Ray Train run vs 8 single-model Ray Train runs
   (same steps, launched together, as many at once as the CPUs allow), in one process.

The base is the tiny base's architecture with random weights (speed does not depend on the
weights; building the real base would only add a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import console, table, write_results  # noqa: E402

ROWS, ROW_LEN, RANK = 4, 64, 8


def random_base(path: Path) -> Path:
    from transformers import LlamaForCausalLM

    from fleet.base.pretrain import model_config
    from fleet.base.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(tok))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def step_setup(members: int, rows_each: int, *, base: Path | None = None, row_len: int = ROW_LEN):
    """A pack of ``members`` fresh rank-8 adapters on ``base`` (default: this run's base) and one
    step's rows: ``rows_each`` random rows of ``row_len`` tokens per member."""
    from transformers import AutoModelForCausalLM

    from fleet.lora import DEFAULT_TARGET_MODULES, AdapterWeights, LoraEngine, SlotAdamW

    model = AutoModelForCausalLM.from_pretrained(base or BASE).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    engine = LoraEngine(model, target_modules=DEFAULT_TARGET_MODULES, max_slots=members, max_rank=RANK)
    keys = [f"m{i}@train" for i in range(members)]
    for i, k in enumerate(keys):
        w = AdapterWeights.fresh(model, rank=RANK, alpha=16, target_modules=DEFAULT_TARGET_MODULES, seed=i)
        for name, t in w.tensors.items():
            if "lora_B" in name:
                t.normal_(0, 0.01)
        engine.load(k, w, trainable=True)
    opt = SlotAdamW(engine, keys)
    opt.set_lr({k: 1e-3 for k in keys})
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (members * rows_each, row_len), generator=g)
    member = torch.arange(members).repeat_interleave(rows_each)
    slots = torch.tensor([[engine.slot(keys[m])] for m in member.tolist()])
    return engine, model, opt, keys, ids, member, slots


def one_step(engine, model, opt, keys, ids, member, slots) -> None:
    with engine.rows(slots):
        logits = model(input_ids=ids).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none"
        ).mean(1)
        loss_M = torch.zeros(len(keys)).index_add(0, member, nll)
        loss_M.sum().backward()
    opt.clip_({k: 1.0 for k in keys})
    opt.step()
    opt.zero_grad()


def step_ratio(
    reps: int, *, members: int = 32, rows: int = ROWS, base: Path | None = None, row_len: int = ROW_LEN
) -> dict[str, float]:
    """Tokens/s of one packed step over ``members`` ÷ one single-adapter step on the same rows."""
    packed = step_setup(members, rows, base=base, row_len=row_len)
    single = step_setup(1, members * rows, base=base, row_len=row_len)
    for s in (packed, single):
        one_step(*s)  # warm
    tp, ts = [], []
    for _ in range(reps):  # interleaved, so that load on the machine hits both alike
        t = time.perf_counter()
        one_step(*packed)
        tp.append(time.perf_counter() - t)
        t = time.perf_counter()
        one_step(*single)
        ts.append(time.perf_counter() - t)
    tokens = members * rows * row_len
    best_p, best_s = sorted(tp)[len(tp) // 2], sorted(ts)[len(ts) // 2]
    return {
        "packed_tokens_per_s": tokens / best_p,
        "single_tokens_per_s": tokens / best_s,
        "packed_step_ratio_vs_single": best_s / best_p,
    }


def rss_child(members: int, rows: int = ROWS, row_len: int = ROW_LEN) -> float:
    import resource

    s = step_setup(members, rows, row_len=row_len)
    for _ in range(3):
        one_step(*s)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_ratio(
    members: int = 32, *, base: Path | None = None, rows: int = ROWS, row_len: int = ROW_LEN
) -> dict[str, float]:
    """Peak RSS of a ``members`` pack ÷ a 1-member pack, each trained 3 steps in its own process."""
    out = {}
    for k in (1, members):
        cmd = [sys.executable, __file__, "--rss-child", str(k), "--base", str(base or BASE)]
        cmd += ["--rows", str(rows), "--row-len", str(row_len)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[k] = float(res.stdout.strip().splitlines()[-1])
    return {
        "peak_rss_1_mib": out[1],
        f"peak_rss_{members}_mib": out[members],
        f"peak_rss_ratio_{members}_vs_1": out[members] / out[1],
    }


def ray_wall(steps: int) -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import ray

    from fleet.config import load_config
    from fleet.data.synth import synthetic_org
    from fleet.handles import Fleet
    from fleet.train.launch import run_packs
    from fleet.train.pack import build_pack

    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-train-"))
    cfg = load_config(overrides={"data_dir": str(tmp / "data"), "base": {"path": str(BASE)}}, env={})
    fl = Fleet(cfg)
    org = synthetic_org(companies=1, teams_per_company=1, individuals=8, seed=1)
    for t in org.tenants:
        fl.add_tenant(t.id)
    fl.ingestor().ingest_many({m: [i.to_json() for i in org.items_of(m)] for m in org.model_ids})
    models = list(org.individuals)
    from fleet._ray import ray_env

    os.environ.update(ray_env(cfg))  # as fleet runs Ray (Train V2, the controller's poll interval)
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": ray_env(cfg)},
    )
    # Both sides pinned to the same data before either runs.
    # Both sides use the whole machine: the pack one worker with every CPU, the single runs one
    # CPU each, as many at once as there are CPUs (the strongest baseline for separate runs).
    cpus = float(os.cpu_count() or 1)
    pack = build_pack(fl, models, cycle_id=1, index=0, steps=steps, resources={"CPU": cpus})
    singles = [
        build_pack(fl, [m], cycle_id=2, index=i, steps=steps, resources={"CPU": 1.0})
        for i, m in enumerate(models)
    ]
    t = time.perf_counter()
    (o,) = run_packs(fl, [pack])
    packed = time.perf_counter() - t
    assert not o.error, o.error
    t = time.perf_counter()
    outs = run_packs(fl, singles)
    separate = time.perf_counter() - t
    assert not any(x.error for x in outs)
    ray.shutdown()
    return {
        "ray_wall_packed_s": packed,
        "ray_wall_8_runs_s": separate,
        "ray_wall_speedup_packed_vs_8_runs": separate / packed,
    }


def main() -> None:
    global BASE
    ap = argparse.ArgumentParser()
    ap.add_argument("--rss-child", type=int)
    ap.add_argument("--base")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=ROWS, help="(--rss-child) rows per member")
    ap.add_argument("--row-len", type=int, default=ROW_LEN, help="(--rss-child) tokens per row")
    args = ap.parse_args()
    torch.set_num_threads(1)  # fair on a shared 2-core machine: both sides get one core
    if args.rss_child:
        BASE = Path(args.base)
        print(rss_child(args.rss_child, args.rows, args.row_len))
        return
    BASE = random_base(Path(tempfile.mkdtemp(prefix="fleet-bench-base-")) / "base")
    f = {**step_ratio(args.reps), **rss_ratio(), **ray_wall(args.steps)}
    f = {k: round(v, 4) for k, v in f.items()}
    table(
        "packed training (tiny base, r=8)",
        [
            (
                "packed step (32 members) ÷ single-adapter step, tokens/s",
                f"{f['packed_step_ratio_vs_single']:.2f}×",
                "≥ 0.8",
            ),
            ("peak RSS, 32-member pack ÷ 1-member pack", f"{f['peak_rss_ratio_32_vs_1']:.2f}×", "≤ 1.3"),
            (
                "8 models: 8 Ray Train runs ÷ one packed run, wall",
                f"{f['ray_wall_speedup_packed_vs_8_runs']:.1f}×",
                "≥ 5",
            ),
        ],
    )
    console.print(json.dumps(f))
    console.print(f"wrote {write_results('packed_training', f)}")


BASE: Path = Path()

if __name__ == "__main__":
    main()
