"""Serving's parts without Ray: the continuous batcher, the adapter cache (LRU, pins, fallbacks),
tenancy (keys, rate limits, stack cache) and the wire format, on a tiny real base, a SQLite
registry and a local store. ``make_world`` is shared with the live-app tests (test_serve_app.py).
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from _tiny import one_thread, tiny_llama

from fleet.base.tokenizer import build_tokenizer
from fleet.config import FleetConfig, load_config
from fleet.errors import AuthError, OverloadedError, RateLimitError, ValidationError
from fleet.handles import Fleet
from fleet.lora import generate
from fleet.serve import protocol as p
from fleet.serve.batcher import Done, Job, Token
from fleet.serve.cache import Lease
from fleet.serve.messages import ReplicaRequest, StreamDelta, StreamEnd, StreamStart
from fleet.serve.replica import ModelServer
from fleet.serve.runtime import build_runtime, encode_prompt
from fleet.serve.sample import publish_random
from fleet.serve.tenancy import RateLimiter, Tenancy
from fleet.store import WEIGHTS_FILE

ORG = [
    "acme", "acme/search", "acme/search/dana", "acme/search/lee", "acme/ops", "acme/ops/kim",
    "globex", "globex/labs", "baseco", "slowco",
]  # fmt: skip
ADAPTED = ["acme", "acme/search", "acme/search/dana", "acme/ops/kim", "globex", "globex/labs"]
CONTEXT = 256


@dataclass
class World:
    cfg: FleetConfig
    fleet: Fleet
    base: object  # the plain base model (shapes for new adapters)
    keys: dict[str, str]  # company → API key

    def args(self) -> dict:
        return {"config_json": self.cfg.model_dump(mode="json")}

    def object_path(self, model_id: str, version: int) -> Path:
        uri = self.fleet.registry.get_version(model_id, version).uri
        return Path(unquote(urlparse(uri).path)) / WEIGHTS_FILE

    def publish(self, model_ids: list[str], seed: int) -> None:
        publish_random(
            self.fleet.registry, self.fleet.store, self.base, model_ids, base_model=self.cfg.base.name,
            rank=self.cfg.lora.rank, alpha=self.cfg.lora.alpha, target_modules=self.cfg.lora.target_modules,
            seed=seed,
        )  # fmt: skip


def make_world(root: Path, **serve: object) -> World:
    """A tiny base, an organisation (some models with adapters, some without), API keys."""
    overrides = {
        "data_dir": str(root / "data"),
        "lora": {"rank": 4, "alpha": 8.0},
        "serve": {"adapter_slots": 16, "max_new_tokens": 48, "stack_cache_s": 0.0, **serve},
    }
    cfg = load_config(overrides=overrides, env={})
    base = tiny_llama(vocab=264, hidden=64, layers=2, heads=2, intermediate=128, max_positions=CONTEXT)
    cfg.base_path.mkdir(parents=True)
    base.save_pretrained(cfg.base_path)
    build_tokenizer().save_pretrained(cfg.base_path)
    fl = Fleet(cfg)
    for tenant in ORG:
        fl.add_tenant(tenant)
    world = World(cfg, fl, base, {})
    world.publish(ADAPTED, seed=0)
    world.keys = {c: fl.registry.create_key(c) for c in ("acme", "globex", "baseco", "slowco")}
    return world


_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("serve-parts"), adapter_slots=4)


@pytest.fixture
def server(world) -> ModelServer:
    return ModelServer(world.args())


def run(coro):
    return asyncio.run(coro)


def stack_entries(world: World, model_id: str):
    return list(world.fleet.registry.active_stack(model_id).entries)


# ---------------------------------------------------------------------- batcher
async def _collect(job: Job) -> tuple[list[int], Done]:
    tokens = []
    while True:
        event = await job.events.get()
        if isinstance(event, Done):
            return tokens, event
        assert isinstance(event, Token), event
        tokens.append(event.token_id)


def test_rows_of_different_stacks_decode_together_and_each_equals_its_solo_generation(server, world):
    tok = server.tokenizer
    models = ["acme/search/dana", "acme/search/lee", "acme/ops/kim", "baseco", "acme"]
    prompts = ["Hello there", "a", "Some longer prompt text", "zz", "Hello there"]
    lengths = [12, 5, 9, 7, 3]

    async def go():
        leases = [await server.cache.acquire(stack_entries(world, m)) for m in models]
        jobs = [
            server.batcher.submit(Job(encode_prompt(tok, pr), lease.slots_L, n))
            for pr, lease, n in zip(prompts, leases, lengths, strict=True)
        ]
        outs = await asyncio.gather(*(_collect(j) for j in jobs))
        solo = [
            await server.batcher.run_engine(
                lambda pr=pr, lease=lease, n=n: generate(
                    server.engine, tok, [pr], [lease.slots_L], max_new_tokens=n
                )[0]
            )
            for pr, lease, n in zip(prompts, leases, lengths, strict=True)
        ]
        for lease in leases:
            server.cache.release(lease)
        return outs, solo, server.batcher.max_rows_seen

    outs, solo, rows = run(go())
    assert rows == len(models)  # they really shared steps
    for (_, done), alone in zip(outs, solo, strict=True):
        assert done.generation.token_ids == alone.token_ids
        assert (
            tok.decode(done.generation.token_ids) == alone.text
        )  # text is the request's job, not the engine's
    texts = {tok.decode(done.generation.token_ids) for _, done in outs[:3]}
    assert len(texts) == 3  # different stacks answer differently


def test_a_long_request_never_holds_short_ones_back(server, world):
    tok = server.tokenizer

    async def go():
        lease = await server.cache.acquire(stack_entries(world, "acme/search/dana"))
        long = server.batcher.submit(Job(encode_prompt(tok, "long"), lease.slots_L, 40))
        first = await long.events.get()
        assert isinstance(first, Token)
        shorts = [server.batcher.submit(Job(encode_prompt(tok, f"s{i}"), lease.slots_L, 3)) for i in range(3)]
        for short in shorts:
            _, done = await _collect(short)
            assert done.completion_tokens <= 3
        long_still_running = not long.removed
        _, done = await _collect(long)
        server.cache.release(lease)
        return long_still_running, done

    long_still_running, done = run(go())
    assert long_still_running
    assert done.generation.finish_reason == "length" or done.completion_tokens < 40


def test_a_cancelled_row_leaves_at_the_next_step_and_then_frees_its_adapters(server, world):
    tok = server.tokenizer

    async def go():
        lease = await server.cache.acquire(stack_entries(world, "acme/ops/kim"))
        job = server.batcher.submit(Job(encode_prompt(tok, "cancel me"), lease.slots_L, 40))
        await job.events.get()
        released = asyncio.Event()
        server.batcher.cancel(job)
        job.when_removed(lambda: (server.cache.release(lease), released.set()))
        pinned_while_running = server.cache.pinned("acme/ops/kim@v1")
        await asyncio.wait_for(released.wait(), 30)
        return pinned_while_running, server.cache.pinned("acme/ops/kim@v1"), server.batcher.running

    pinned_while_running, pinned_after, running = run(go())
    assert pinned_while_running == 1 and pinned_after == 0 and running == 0


def test_a_full_queue_answers_overloaded_and_bad_requests_fail_alone(world):
    args = world.args()
    args["config_json"]["serve"]["max_queue"] = 2
    server = ModelServer(args)
    tok = server.tokenizer

    async def go():
        a = server.batcher.submit(Job(encode_prompt(tok, "a"), [-1], 4))
        b = server.batcher.submit(Job(encode_prompt(tok, "b"), [-1], 4))
        with pytest.raises(OverloadedError):
            server.batcher.submit(Job(encode_prompt(tok, "c"), [-1], 4))
        with pytest.raises(ValidationError, match="exceeds the context"):
            server.batcher.submit(Job(encode_prompt(tok, "d"), [-1], CONTEXT))
        return [await _collect(a), await _collect(b)]

    done = run(go())
    assert all(d.completion_tokens >= 1 for _, d in done)


# ---------------------------------------------------------------------- adapter cache
def test_shared_company_adapter_loads_once_and_lru_evicts_only_unpinned(server, world):
    cache = server.cache  # 4 slots

    async def go():
        a = await cache.acquire(stack_entries(world, "acme/search/dana"))  # acme, search, dana
        b = await cache.acquire(stack_entries(world, "acme/ops/kim"))  # acme shared, kim new
        assert cache.stats.loads == 4 and cache.stats.hits == 1
        assert a.slots[0] == b.slots[0]  # one slot for the company adapter
        cache.wait_s = 0.3
        with pytest.raises(OverloadedError):  # globex + globex/labs need 2 slots; every slot is pinned
            await cache.acquire(stack_entries(world, "globex/labs"))
        cache.release(a)
        c = await cache.acquire(stack_entries(world, "globex/labs"))  # evicts search and dana (unpinned)
        resident = set(cache.resident())
        cache.release(b)
        cache.release(c)
        return resident

    resident = run(go())
    assert resident == {"acme@v1", "acme/ops/kim@v1", "globex@v1", "globex/labs@v1"}
    assert cache.stats.evictions == 2


def test_under_churn_every_held_lease_keeps_its_adapters_in_its_slots(server, world):
    """Many requests over overlapping stacks on 4 slots: loads, evictions and waits interleave."""
    import random

    models = ["acme/search/dana", "acme/ops/kim", "globex/labs", "acme/search/lee", "acme", "baseco"]
    stacks = {m: stack_entries(world, m) for m in models}
    engine = server.engine

    def holds(lease) -> bool:
        return all(engine.slot(e.key) == s for e, s in zip(lease.entries, lease.slots, strict=True))

    async def client(i: int) -> int:
        rng, held = random.Random(i), 0
        for _ in range(30):
            lease = await server.cache.acquire(stacks[rng.choice(models)])
            assert holds(lease)
            await asyncio.sleep(rng.random() * 0.005)
            assert holds(lease)  # nothing evicted or reloaded it while pinned
            server.cache.release(lease)
            held += 1
        return held

    async def go():
        return await asyncio.gather(*(client(i) for i in range(10)))

    assert sum(run(go())) == 300
    st = server.cache.stats
    assert st.evictions > 0 and st.loads == st.misses
    assert not server.cache._installing and not server.cache._pins  # every pin released


def test_concurrent_requests_for_a_missing_adapter_read_it_once(server, world):
    reads = []
    fetch = server.cache._fetch_sync

    def counting_fetch(entry):
        reads.append(entry.key)
        return fetch(entry)

    server.cache._fetch_sync = counting_fetch

    async def go():
        leases = await asyncio.gather(
            *(server.cache.acquire(stack_entries(world, "acme/search/dana")) for _ in range(8))
        )
        for lease in leases:
            server.cache.release(lease)
        return leases

    leases = run(go())
    assert sorted(reads) == sorted({"acme@v1", "acme/search@v1", "acme/search/dana@v1"})
    assert len({lease.slots for lease in leases}) == 1


def test_a_corrupt_version_is_never_served_the_previous_one_stands_in(tmp_path):
    world = make_world(tmp_path, adapter_slots=8)
    world.publish(["acme/search"], seed=50)  # acme/search v2 (active), v1 retired
    path = world.object_path("acme/search", 2)
    path.write_bytes(path.read_bytes()[:-16] + b"\0" * 16)
    server = ModelServer(world.args())

    async def go():
        first = await server.cache.acquire(stack_entries(world, "acme/search/dana"))
        second = await server.cache.acquire(stack_entries(world, "acme/search/dana"))
        return first, second

    first, second = run(go())
    assert [e.key for e in first.entries] == ["acme@v1", "acme/search@v1", "acme/search/dana@v1"]
    assert first.fallbacks == ("acme/search@v2",) and second.fallbacks == ("acme/search@v2",)
    assert server.cache.stats.failed_loads == {"corrupt": 1}  # remembered: not read again
    assert "acme/search@v2" not in server.engine.keys()


def test_a_missing_object_without_earlier_versions_drops_to_the_ancestors(tmp_path):
    world = make_world(tmp_path, adapter_slots=8)
    shutil.rmtree(world.object_path("acme/search/dana", 1).parent)
    server = ModelServer(world.args())
    lease = run(server.cache.acquire(stack_entries(world, "acme/search/dana")))
    assert lease.served_by == "acme/search@v1"
    assert server.cache.stats.failed_loads == {"missing": 1}


def test_the_server_answers_with_the_stack_that_actually_served(tmp_path):
    world = make_world(tmp_path, adapter_slots=8)
    shutil.rmtree(world.object_path("acme/ops/kim", 1).parent)
    server = ModelServer(world.args())
    tok = server.tokenizer
    req = ReplicaRequest.of(stack_entries(world, "acme/ops/kim"), encode_prompt(tok, "Hi"), 6)

    async def go():
        return await server.generate(req), [c async for c in server.stream(req)]

    out, chunks = run(go())
    assert out.served_by == "acme@v1" and out.fallbacks == 1
    assert chunks[0] == StreamStart("acme@v1", 1)
    assert isinstance(chunks[-1], StreamEnd) and all(isinstance(c, StreamDelta) for c in chunks[1:-1])
    assert "".join(c.text for c in chunks[1:]) == out.text
    ref = ModelServer(world.args())  # the company's adapter alone
    solo = run(ref.generate(replace(req, entries=tuple(stack_entries(world, "acme")))))
    assert solo.text == out.text


# ---------------------------------------------------------------------- tenancy and protocol
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rate_limiter_refills_bursts_and_honours_per_company_rates():
    clock = Clock()
    rl = RateLimiter(10.0, 5, {"slow": 0.5}, clock=clock)
    for _ in range(5):
        rl.check("acme")
    with pytest.raises(RateLimitError) as err:
        rl.check("acme")
    assert err.value.context["retry_after"] == pytest.approx(0.1)
    clock.t += 0.1
    rl.check("acme")
    rl.check("slow")  # burst of max(1, 5 * 0.5 / 10) = 1
    with pytest.raises(RateLimitError):
        rl.check("slow")
    clock.t += 2.0
    rl.check("slow")
    rl.check("other")  # companies do not share buckets


def test_tenancy_hides_foreign_and_unknown_models_alike_and_caches_stacks(world):
    clock = Clock()
    tenancy = Tenancy(world.fleet.registry, cache_s=5.0, clock=clock)

    async def go():
        assert await tenancy.company(f"Bearer {world.keys['acme']}") == "acme"
        for bad in (None, "Bearer", "Basic abc", "Bearer fleet_nope_nope"):
            with pytest.raises(AuthError):
                await tenancy.company(bad)
        messages = set()
        for model in ("globex/labs", "acme/nobody", "Not An Id", "acme/a/b/c"):
            with pytest.raises(p.ModelNotFoundError) as err:
                await tenancy.stack("acme", model)
            messages.add(err.value.message.replace(model, "<m>"))
        assert len(messages) == 1
        before = await tenancy.stack("acme", "acme/ops/kim")
        world.publish(["acme/ops/kim"], seed=70)  # v2 becomes active
        cached = await tenancy.stack("acme", "acme/ops/kim")
        clock.t += 5.1
        fresh = await tenancy.stack("acme", "acme/ops/kim")
        return before, cached, fresh

    before, cached, fresh = run(go())
    assert before.served_by == cached.served_by == "acme/ops/kim@v1"
    assert fresh.served_by == "acme/ops/kim@v2" and fresh.key != before.key


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{", None),
        (b"[1, 2]", None),
        (b'{"prompt": "x"}', "model"),
        (b'{"model": "acme", "prompt": "x", "temperature": 3}', "temperature"),
        (b'{"model": "acme", "prompt": "x", "n": 2}', "n"),
        (b'{"model": "acme", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', "stop"),
        (b'{"model": "acme", "prompt": "x", "logprobs": 6}', "logprobs"),
        (b'{"model": "acme", "prompt": "x", "stream": true, "logprobs": 1}', "logprobs"),
        (b'{"model": "acme", "prompt": "x", "presence_penalty": 1}', "presence_penalty"),
    ],
)
def test_malformed_completion_bodies_are_400s_naming_the_field(body, param):
    with pytest.raises(ValidationError) as err:
        p.parse(p.CompletionRequest, body).checked()
    status, shape = p.error_of(err.value)
    assert status == 400 and shape["error"]["type"] == "invalid_request_error"
    assert shape["error"]["param"] == param


def test_prompt_forms_and_chat_roles():
    req = p.parse(p.CompletionRequest, b'{"model": "acme", "prompt": [[1, 2, 3]], "unknown_field": 1}')
    assert req.single_prompt() == [1, 2, 3]
    with pytest.raises(ValidationError):
        p.parse(p.CompletionRequest, b'{"model": "acme", "prompt": ["a", "b"]}').single_prompt()
    chat = p.parse(
        p.ChatRequest,
        b'{"model": "acme", "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]},'
        b' {"role": "user", "content": "hi"}]}',
    )
    assert chat.template_messages() == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]


def test_runtime_refuses_prompt_ids_outside_the_vocabulary(world):
    rt = build_runtime(world.cfg, slots=4)
    assert rt.context_limit == CONTEXT
    with pytest.raises(ValidationError, match="outside the vocabulary"):
        encode_prompt(rt.tokenizer, [1, 2, 10_000])


def test_lease_of_the_bare_base_uses_no_slot():
    assert Lease((), ()).slots_L == [-1] and Lease((), ()).served_by == "base"


def test_a_stream_resumed_from_any_point_finishes_exactly_like_the_original(server, world):
    """What the ingress does when a replica dies mid-stream: resume from the tokens and text sent so far."""
    tok = server.tokenizer
    server.stream_messages_per_s = 1e9  # a delta per token: a resume point after each
    base_req = ReplicaRequest.of(
        stack_entries(world, "acme/search/dana"), encode_prompt(tok, "Resume me"), 24
    )

    async def chunks(req):
        return [c async for c in server.stream(req)]

    async def go():
        plain = await chunks(base_req)
        text = "".join(c.text for c in plain[1:])
        # A stop string from the middle of the completion: resumes land before, inside and after it.
        stop = [text[10:12]] if len(text) >= 12 else []
        req = replace(base_req, stop=tuple(stop))
        whole = await chunks(req)
        out = await server.generate(req)
        results = []
        ids, sent = [], ""
        for c in whole[1:-1]:
            ids, sent = ids + list(c.ids), sent + c.text
            resumed = await chunks(req.resumed(ids, sent))
            results.append((sent + "".join(c.text for c in resumed[1:]), resumed[-1]))
        return whole, out, results

    whole, out, results = run(go())
    full = "".join(c.text for c in whole[1:])
    assert full == out.text and whole[-1].finish_reason == out.finish_reason == "stop"
    assert len(results) >= 5
    for text, last in results:
        assert text == full
        assert last.finish_reason == out.finish_reason
        assert last.completion_tokens == out.completion_tokens


def test_deployment_arguments_carry_no_secret_and_replicas_read_it_from_their_environment(monkeypatch):
    """The dashboard shows deployments' arguments: the registry password (and an endpoint's
    credentials) never travel in them; a replica takes them from its environment."""
    import json

    from fleet.serve.app import application_args
    from fleet.serve.runtime import config_from_args

    url = "postgresql://fleet:S3cret-pw@db.internal:5432/fleet"
    cfg = load_config(
        overrides={"registry": {"url": url}, "store": {"endpoint_url": "http://key:hunter2@minio:9000"}},
        env={},
    )
    args = application_args(cfg)
    assert "S3cret-pw" not in json.dumps(args) and "hunter2" not in json.dumps(args)
    assert args["config_json"]["registry"]["url"] == "postgresql://fleet@db.internal:5432/fleet"
    assert config_from_args(args).registry.url == "postgresql://fleet@db.internal:5432/fleet"  # PGPASSWORD
    monkeypatch.setenv("FLEET_DB_URL", url)
    assert config_from_args(args).registry.url == url
    assert cfg.registry.url == url  # the operator's own config is untouched
