"""The abusive company of ``serve.py``'s abuse run, in a process of its own (``run_abuser``).

Four kinds of traffic at once, for as long as asked:

- bodies of 64 MiB (``Content-Length`` declared, sent in 1 MiB chunks), two at a time;
- 300 scoring requests in flight (``echo`` + ``logprobs: 5``, ``max_tokens: 0``, ~200 tokens);
- 64 long streams in flight (``max_tokens`` at the serving ceiling, read to the end);
- a flood of well-formed unknown API keys (8 at a time).

A refused request (429, 503) is retried after its ``Retry-After`` (up to 60 s), as the official
clients do; everything else is retried at once. The process runs at nice 19: its own client work stands
for other machines and should take as little as possible from the service it attacks.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter

import httpx

CHUNK = 1 << 20


async def _pause(r: httpx.Response | None) -> None:
    if r is not None and r.status_code in (429, 503):
        await asyncio.sleep(min(60.0, float(r.headers.get("retry-after", "1"))))


async def _huge(http: httpx.AsyncClient, key: str, model: str, stop_at: float, seen: Counter) -> None:
    async def body():
        yield json.dumps({"model": model, "max_tokens": 1, "prompt": ""})[:-2].encode()  # ... "prompt": "
        for _ in range(64):
            yield b"x" * CHUNK
        yield b'"}'

    size = len(json.dumps({"model": model, "max_tokens": 1, "prompt": ""})) + 64 * CHUNK
    while time.time() < stop_at:
        try:
            r = await http.post(
                "/v1/completions",
                content=body(),
                headers={"Authorization": f"Bearer {key}", "Content-Length": str(size)},
            )
            seen[f"huge {r.status_code}"] += 1
        except Exception:  # the server answered 413 and closed while the body was still going out
            seen["huge refused mid-body"] += 1


async def _score(
    http: httpx.AsyncClient, key: str, model: str, stop_at: float, seen: Counter, i: int
) -> None:
    rng = random.Random(i)
    while time.time() < stop_at:
        prompt = " ".join(rng.choice(["score", "this", "long", "prompt", "of", "words"]) for _ in range(40))
        body = {"model": model, "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 5}
        r = None
        try:
            r = await http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            seen[f"score {r.status_code}"] += 1
        except httpx.HTTPError:
            seen["score error"] += 1
        await _pause(r)


async def _stream(
    http: httpx.AsyncClient, key: str, model: str, max_tokens: int, stop_at: float, seen: Counter
) -> None:
    body = {"model": model, "prompt": "go on and on", "max_tokens": max_tokens, "stream": True}
    while time.time() < stop_at:
        status = None
        try:
            async with http.stream(
                "POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            ) as r:
                status = r.status_code
                async for _ in r.aiter_bytes():
                    pass
            seen[f"stream {status}"] += 1
        except httpx.HTTPError:
            seen["stream error"] += 1
            r = None
        await _pause(r if status in (429, 503) else None)


async def _bad_keys(http: httpx.AsyncClient, stop_at: float, seen: Counter, i: int) -> None:
    rng = random.Random(1000 + i)
    while time.time() < stop_at:
        key = f"fleet_{rng.getrandbits(48):012x}_" + "".join(rng.choice("ABCDEFGH") for _ in range(43))
        r = None
        try:
            r = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            seen[f"badkey {r.status_code}"] += 1
        except httpx.HTTPError:
            seen["badkey error"] += 1
        await _pause(r)


async def _abuse(url: str, key: str, models: list[str], max_tokens: int, stop_at: float) -> dict:
    seen: Counter = Counter()
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        tasks = [_huge(http, key, models[0], stop_at, seen) for _ in range(2)]
        tasks += [_score(http, key, models[i % len(models)], stop_at, seen, i) for i in range(300)]
        tasks += [_stream(http, key, models[i % len(models)], max_tokens, stop_at, seen) for i in range(64)]
        tasks += [_bad_keys(http, stop_at, seen, i) for i in range(8)]
        await asyncio.gather(*tasks)
    return dict(seen)


def run_abuser(url: str, key: str, models: list[str], max_tokens: int, seconds: float, out) -> None:
    """Process entry point: say "started" on ``out``, abuse for ``seconds``, then put what the
    server answered on ``out``."""
    os.nice(19)
    out.put("started")
    out.put(asyncio.run(_abuse(url, key, models, max_tokens, time.time() + seconds)))
