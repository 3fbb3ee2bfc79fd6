"""The closed-loop streaming clients of the serving benchmarks (``serve.py``, ``serve_vs_vllm.py``).

Each client sends one streaming completion after another (greedy, ``max_tokens`` new tokens),
picking its model with Zipf popularity (s = 1) and a prompt of 3 to 8 words from its own seeded
generator, so two servers measured with the same seed see the same requests. Latency is to the
last byte, TTFT to the first chunk with text; tokens are the usage the server reports.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np

WORDS = "fleet model adapter serve batch token tenant company team person stack slot cache ray".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zipf_order(models: list[str], seed: int) -> tuple[list[str], np.ndarray]:
    """Models in popularity order (shuffled, so popularity is independent of the tree) and their probabilities."""
    ranks = np.arange(1, len(models) + 1, dtype=float)
    weights = 1.0 / ranks  # Zipf, s = 1: over 500 models the most popular gets 1/H(500) ≈ 15% of requests
    order = list(models)
    random.Random(seed).shuffle(order)
    return order, weights / weights.sum()


def prompt_words(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))


@dataclass
class Load:
    """What the clients measured in one window."""

    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    ok: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, other: Load) -> None:
        self.latencies += other.latencies
        self.ttfts += other.ttfts
        self.tokens += other.tokens
        self.ok += other.ok
        self.seconds += other.seconds
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v

    @property
    def requests(self) -> int:
        return self.ok + sum(self.errors.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def errors_5xx(self) -> int:
        return sum(v for k, v in self.errors.items() if k >= 500)


async def one_request(
    http: httpx.AsyncClient, key: str, model: str, prompt: str, max_tokens: int, load: Load
) -> None:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, tokens, status = None, 0, 200
    try:
        async with http.stream(
            "POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            if r.status_code != 200:
                await r.aread()
                status = r.status_code
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        status = 500 if event["error"]["type"] == "server_error" else 503
                        break
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    elif event["choices"] and event["choices"][0]["text"] and ttft is None:
                        ttft = time.perf_counter() - t0
    except httpx.HTTPError:
        status = 599  # connection-level failure
    if status == 200:
        load.ok += 1
        load.tokens += tokens
        load.latencies.append(time.perf_counter() - t0)
        if ttft is not None:
            load.ttfts.append(ttft)
    else:
        load.errors[status] = load.errors.get(status, 0) + 1


async def run_load(
    url: str,
    models: list[str],
    key_of: Callable[[str], str],
    *,
    clients: int,
    seconds: float,
    max_tokens: int,
    seed: int,
    name_of: Callable[[str], str] = lambda m: m,
) -> Load:
    """``clients`` concurrent clients, each sending one request after another for ``seconds``.

    ``key_of(model)``: the API key to send; ``name_of(model)``: the ``model`` field to send (a
    server may name the same model differently).
    """
    order, probs = zipf_order(models, seed)
    load = Load()
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = np.random.default_rng(seed * 1000 + i)
        words = random.Random(seed * 1000 + i)
        while time.perf_counter() < deadline:
            model = order[int(rng.choice(len(order), p=probs))]
            prompt = prompt_words(words)
            await one_request(http, key_of(model), name_of(model), prompt, max_tokens, load)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    load.seconds = time.perf_counter() - t0
    return load


def sample_requests(models: list[str], *, clients: int, per_client: int, seed: int) -> list[tuple[str, str]]:
    """The (model, prompt) sequence ``run_load`` draws, client by client, interleaved."""
    order, probs = zipf_order(models, seed)
    streams = []
    for i in range(clients):
        rng = np.random.default_rng(seed * 1000 + i)
        words = random.Random(seed * 1000 + i)
        streams.append(
            [(order[int(rng.choice(len(order), p=probs))], prompt_words(words)) for _ in range(per_client)]
        )
    return [streams[i][k] for k in range(per_client) for i in range(clients)]


class EngineAlone:
    """The engine in this process, one thread, with every adapter of ``models`` loaded: what it
    decodes alone over the same kind of traffic as the clients send (their Zipf draw of models
    and prompts), ``rows`` requests in flight, each joining (prefilled together with the others
    joining at that step) as another leaves."""

    def __init__(self, cfg, models: list[str]) -> None:  # cfg: fleet.config.FleetConfig
        from fleet.lora import AdapterWeights
        from fleet.registry import Registry
        from fleet.serve.runtime import build_runtime
        from fleet.store import open_store

        self.rt = build_runtime(cfg, slots=len(models) + 8)
        engine = self.rt.engine
        registry, store = Registry.open(cfg, migrate=False), open_store(cfg)
        self.slots: dict[str, list[int]] = {}
        for m, stack in registry.active_stacks(models).items():
            row = []
            for e in stack.entries:
                if engine.slot(e.key) is None:
                    files = store.read_version(e.uri, e.sha256)
                    engine.load(e.key, AdapterWeights.from_bytes(files.config, files.weights))
                row.append(engine.slot(e.key))
            self.slots[m] = row or [-1]
        registry.close()
        self.models = models

    def tokens_per_s(self, *, rows: int, seconds: float, max_tokens: int, seed: int) -> float:
        import torch

        from fleet.base.tokenizer import stop_token_ids
        from fleet.lora import DecodeBatch
        from fleet.serve.runtime import encode_prompt

        tok = self.rt.tokenizer
        draws = sample_requests(self.models, clients=rows, per_client=400, seed=seed)
        todo = [(m, encode_prompt(tok, pr)) for m, pr in draws]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in the replica (Ray gives an actor with num_cpus=1 one thread)
        try:
            batch = DecodeBatch(self.rt.engine, None, eos_token_id=list(stop_token_ids(tok)) or None)
            n, tokens = 0, 0
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                joining = []
                while batch.active + len(joining) < rows:
                    m, ids = todo[n % len(todo)]
                    joining.append((n, ids, self.slots[m], max_tokens))
                    n += 1
                if joining:
                    batch.add_many(joining)
                for out in batch.step():
                    tokens += 1
                    if out.finished:
                        batch.results.pop(out.request_id)
            return tokens / (time.perf_counter() - t0)
        finally:
            torch.set_num_threads(threads)
