"""Learning value: the demo organisation, trained by two cycles, evaluated by ``fleet eval``.

Runs ``fleet demo`` end to end in a fresh data directory (base build, organisation, ingest,
two cycles as Ray jobs, serving, eval, drift report) and records its eval figures and its wall
time: recall of private facts from the question alone (trained vs base vs base with the source
document in the prompt), prompt tokens per answered question (in context vs trained),
cross-team leakage and forgetting (ΔNLL on general text).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, table, write_results  # noqa: E402

KEYS = (
    "recall_trained",
    "recall_base",
    "recall_in_context",
    "prompt_token_ratio_in_context_vs_trained",
    "leak_rate",
    "general_dnll_nats",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", help="data directory (default: a fresh temporary one)")
    args = ap.parse_args()

    from fleet.config import load_config
    from fleet.demo import run_demo

    data = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="fleet-eval-")) / "data"
    cfg = load_config(overrides={"data_dir": str(data)}, env={})
    t0 = time.perf_counter()
    out = run_demo(cfg, console=console)
    wall = time.perf_counter() - t0
    res = out["eval"]
    figures = {k: res[k] for k in KEYS}
    figures.update(
        models=res.get("models"),
        facts=res.get("facts"),
        demo_wall_s=round(wall, 1),
        cycles=len(out.get("cycles", [])),
    )
    table(
        "fleet eval on the demo organisation (2 cycles)",
        [
            ("recall, trained (question alone)", f"{res['recall_trained']:.3f}", "≫ base"),
            ("recall, base (question alone)", f"{res['recall_base']:.3f}", ""),
            ("recall, base + source in prompt", f"{res['recall_in_context']:.3f}", ""),
            (
                "prompt tokens in context ÷ trained",
                f"{res['prompt_token_ratio_in_context_vs_trained']:.2f}×",
                "> 1",
            ),
            ("cross-team leak rate", f"{res['leak_rate']:.3f}", "≈ 0"),
            ("ΔNLL on general text, nats/token", f"{res['general_dnll_nats']:.3f}", "small"),
            ("demo wall time", f"{wall:.0f} s", "< 300 s"),
        ],
    )
    console.print(f"wrote {write_results('eval', figures)}")


if __name__ == "__main__":
    main()
