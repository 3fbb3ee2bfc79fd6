"""One tenant against the others, live: real local Ray + Serve (started once for this module), a tiny
base, a SQLite registry, raw sockets where a client must misbehave, and the official ``openai``
client where a well-behaved one asks.

The application here is configured small (64 KiB bodies, one request in flight for ``hogco``, a
key-check budget of five per address) so that every limit is reached in a few requests.
"""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai
import pytest
import ray
from _tiny import one_thread
from conftest import free_port
from ray import serve
from test_serve_parts import make_world

from fleet.serve.app import start
from fleet.serve.ingress import SERVED_BY

pytestmark = [pytest.mark.ray, pytest.mark.slow]
_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)
BODY_LIMIT = 65_536


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    world = make_world(
        tmp_path_factory.mktemp("serve-abuse"),
        port=free_port(),
        max_body_bytes=BODY_LIMIT,
        company_inflight_limits={"hogco": 1},
        preauth_rps=0.2,
        preauth_burst=5,
    )
    world.fleet.add_tenant("hogco")
    world.keys["hogco"] = world.fleet.registry.create_key("hogco")
    world.publish(["globex"], seed=500)  # globex v2 active, v1 retired
    for model, version in (("globex", 2), ("acme/ops/kim", 1)):
        obj = world.object_path(model, version)
        obj.unlink()
        obj.mkdir()  # the store fails to read it (a directory): trouble, not a missing object
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    try:
        url = start(world.cfg)
        yield world, url
    finally:
        serve.shutdown()
        ray.shutdown()


def client(app, company: str = "acme") -> openai.OpenAI:
    world, url = app
    return openai.OpenAI(base_url=f"{url}/v1", api_key=world.keys[company], max_retries=0, timeout=60)


def raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=60)


def head(path: str, key: str, extra: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    ).encode()


def status_of(sock: socket.socket) -> tuple[int, bytes]:
    """The status and the whole response (headers and a Content-Length body)."""
    data = b""
    while True:
        part = sock.recv(65536)
        data += part
        headers, sep, body = data.partition(b"\r\n\r\n")
        length = [
            int(h.split(b":")[1]) for h in headers.split(b"\r\n") if h.lower().startswith(b"content-length:")
        ]
        if not part or (sep and length and len(body) >= length[0]):
            return int(data.split(b" ", 2)[1]), data


def test_a_huge_declared_body_is_refused_before_it_is_sent(app):
    world, url = app
    with raw(url) as sock:
        sock.sendall(head("/v1/completions", world.keys["acme"], "Content-Length: 300000000\r\n"))
        status, data = status_of(sock)  # not one byte of the body was sent: a reader would wait forever
    assert status == 413 and b"request_too_large" in data


def test_a_chunked_body_is_refused_once_it_passes_the_limit(app):
    world, url = app
    with raw(url) as sock:
        sock.sendall(head("/v1/completions", world.keys["acme"], "Transfer-Encoding: chunked\r\n"))
        chunk = b"x" * 16384
        try:
            for _ in range(BODY_LIMIT // len(chunk) + 2):
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server may answer and close while we are still sending
            pass
        status, data = status_of(sock)
    assert status == 413


def test_healthz_answers_while_a_body_is_still_arriving(app):
    world, url = app
    body = json.dumps({"model": "acme", "prompt": "y" * 50_000, "max_tokens": 1}).encode()
    with raw(url) as sock:
        sock.sendall(head("/v1/completions", world.keys["acme"], f"Content-Length: {len(body)}\r\n"))
        sock.sendall(body[:1000])  # the rest comes later
        assert httpx.get(f"{url}/healthz", timeout=60).json()["status"] == "ok"
        sock.sendall(body[1000:])
        status, data = status_of(sock)
    assert status == 413 and b"context_length_exceeded" in data  # decided without tokenizing 50,000 chars


def test_token_id_lists_are_bounded_by_the_context(app):
    with pytest.raises(openai.APIStatusError) as err:
        client(app).completions.create(model="acme", prompt=[1] * 5000, max_tokens=1)
    assert err.value.status_code == 413 and err.value.code == "context_length_exceeded"


def test_a_company_over_its_in_flight_limit_gets_429_with_retry_after(app):
    world, url = app

    async def burst():
        hog = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=world.keys["hogco"], max_retries=0, timeout=60)
        calls = [
            hog.completions.create(model="hogco", prompt=f"hog {i}", max_tokens=40, temperature=0)
            for i in range(6)
        ]
        return await asyncio.gather(*calls, return_exceptions=True)

    limited: list[openai.RateLimitError] = []
    for _ in range(5):  # six at once against a limit of one: some overlap (bounded retries, no timing)
        outs = asyncio.run(burst())
        limited = [o for o in outs if isinstance(o, openai.RateLimitError)]
        assert all(not isinstance(o, Exception) or isinstance(o, openai.RateLimitError) for o in outs), outs
        if limited and len(limited) < len(outs):
            break
    assert limited, "no request of the six ever overlapped another"
    assert int(limited[0].response.headers["retry-after"]) >= 1
    assert limited[0].body["type"] == "rate_limit_error"
    assert client(app).completions.create(model="acme", prompt="others", max_tokens=2).choices  # unaffected


def test_scoring_uses_the_positions_asked_and_answers_like_generation(app):
    out = client(app).completions.create(
        model="acme/search/dana", prompt="score it", max_tokens=3, logprobs=2
    )
    lp = out.choices[0].logprobs
    eos = out.choices[0].finish_reason == "stop"
    assert (
        len(lp.tokens) == out.usage.completion_tokens - eos
    )  # the completion's tokens only, not the prompt's
    assert all(len(top) <= 2 for top in lp.top_logprobs)


def test_store_trouble_serves_the_previous_version_or_a_503_never_a_500(app):
    raw_resp = client(app, "globex").completions.with_raw_response.create(
        model="globex", prompt="x", max_tokens=2
    )
    assert raw_resp.headers[SERVED_BY] == "globex@v1"  # v2 cannot be read: v1 answers
    with pytest.raises(openai.InternalServerError) as err:  # kim's only version cannot be read
        client(app).completions.create(model="acme/ops/kim", prompt="x", max_tokens=2)
    assert err.value.status_code == 503 and err.value.body["type"] == "server_error"


def test_a_flood_of_bad_keys_from_one_address_is_limited_and_good_keys_go_on(app):
    world, url = app
    good = client(app, "globex")
    assert good.models.list().data  # seen valid: vouched for from now on
    statuses = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for i in range(12):
            key = f"fleet_{i:012x}_" + "A" * 43  # well formed, unknown
            r = http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
    refused = statuses.index(429)  # the address's budget (five, less what earlier tests spent)
    assert 1 <= refused <= 5 and set(statuses[:refused]) == {401} and set(statuses[refused:]) == {429}
    assert [m.id for m in good.models.list().data]  # the good key from the same address still works
