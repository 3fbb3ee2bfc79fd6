"""Adapter store: put (stage + commit, as publication does) and verified get of a rank-8
adapter of the tiny base (all 7 linear modules × 4 layers, float32), on the local store
and on S3 (moto's stand-alone server on 127.0.0.1, a real HTTP server)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import boto3  # noqa: E402
import torch  # noqa: E402
from _common import console, percentile, table, write_results  # noqa: E402
from safetensors.torch import save  # noqa: E402

from fleet.config import StoreConfig  # noqa: E402
from fleet.store import open_store_uri  # noqa: E402

HIDDEN, INTER, LAYERS, RANK = 256, 688, 4, 8
SHAPES = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, HIDDEN),
    "v_proj": (HIDDEN, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (HIDDEN, INTER),
    "up_proj": (HIDDEN, INTER),
    "down_proj": (INTER, HIDDEN),
}


def adapter_bytes() -> tuple[bytes, bytes]:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(LAYERS):
        for mod, (d_in, d_out) in SHAPES.items():
            part = "self_attn" if mod.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            base = f"base_model.model.model.layers.{layer}.{part}.{mod}"
            tensors[f"{base}.lora_A.weight"] = torch.randn(RANK, d_in, generator=g)
            tensors[f"{base}.lora_B.weight"] = torch.randn(d_out, RANK, generator=g)
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": list(SHAPES)}
    return json.dumps(config).encode(), save(tensors)


def measure(store, n: int) -> tuple[list[float], list[float]]:
    config, weights = adapter_bytes()
    puts, gets = [], []
    for i in range(n):
        t = time.perf_counter()
        staged = store.stage(f"bench/m{i % 50}", config, weights)
        uri = store.commit(staged, 1 + i // 50)
        puts.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        store.read_version(uri, staged.sha256)
        gets.append((time.perf_counter() - t) * 1000)
    return puts, gets


def main(n: int = 200) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-store-"))
    local = open_store_uri((tmp / "adapters").as_uri())
    lp, lg = measure(local, n)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="x",
        ).create_bucket(Bucket=bucket)
        import os

        os.environ.setdefault("AWS_ACCESS_KEY_ID", "x")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "x")
        s3 = open_store_uri(f"s3://{bucket}/adapters", StoreConfig(endpoint_url=endpoint))
        sp, sg = measure(s3, n)
    finally:
        proc.terminate()
    size_kib = sum(len(b) for b in adapter_bytes()) / 1024
    f = {
        "adapter_kib": round(size_kib, 1),
        "local_put_p50_ms": round(percentile(lp, 50), 3),
        "local_put_p99_ms": round(percentile(lp, 99), 3),
        "local_get_p50_ms": round(percentile(lg, 50), 3),
        "local_get_p99_ms": round(percentile(lg, 99), 3),
        "s3_put_p50_ms": round(percentile(sp, 50), 3),
        "s3_put_p99_ms": round(percentile(sp, 99), 3),
        "s3_get_p50_ms": round(percentile(sg, 50), 3),
        "s3_get_p99_ms": round(percentile(sg, 99), 3),
    }
    table(
        f"adapter store, rank-8 tiny-base adapter ({size_kib:.0f} KiB), {n} versions",
        [
            ("local put p50 / p99", f"{f['local_put_p50_ms']:.2f} / {f['local_put_p99_ms']:.2f} ms", ""),
            (
                "local get p50 / p99 (sha256 verified)",
                f"{f['local_get_p50_ms']:.2f} / {f['local_get_p99_ms']:.2f} ms",
                "",
            ),
            ("S3 put p50 / p99", f"{f['s3_put_p50_ms']:.2f} / {f['s3_put_p99_ms']:.2f} ms", ""),
            (
                "S3 get p50 / p99 (sha256 verified)",
                f"{f['s3_get_p50_ms']:.2f} / {f['s3_get_p99_ms']:.2f} ms",
                "",
            ),
        ],
    )
    console.print(f"wrote {write_results('store', f)}")


if __name__ == "__main__":
    main()
