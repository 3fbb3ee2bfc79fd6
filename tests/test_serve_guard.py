"""What one tenant can take from the others, part by part, without Ray: the batcher's admission
(round-robin per company, in-flight caps, scoring in the same queue, cancelled requests leaving at
once), failures confined to their own row, the adapter cache's per-company share, key checks
that spare the registry, and registry or store trouble answered without a 500.

Real parts throughout (tiny base, engine, SQLite registry, local store). Where a fault must be
injected it is a real one: a token id the embedding cannot index, an adapter unloaded under a
live row, a store object replaced by a directory, a registry file overwritten with garbage.
"""

from __future__ import annotations

import asyncio

import pytest
import torch
from _tiny import one_thread
from sqlalchemy import event
from test_serve_parts import ORG, make_world, stack_entries

from fleet.errors import AuthError, OverloadedError, RateLimitError, UnavailableError
from fleet.lora import generate, prompt_logprobs
from fleet.registry import Registry
from fleet.serve.batcher import Done, Failed, Job, Scored, Token
from fleet.serve.cache import _company
from fleet.serve.replica import ModelServer
from fleet.serve.runtime import encode_prompt
from fleet.serve.tenancy import RateLimiter, Tenancy
from fleet.serve.text import TextStream

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("serve-guard"), adapter_slots=8)


def server_with(world, **serve) -> ModelServer:
    args = world.args()
    args["config_json"]["serve"].update(serve)
    return ModelServer(args)


def run(coro):
    return asyncio.run(coro)


async def finish(job: Job):
    """Every event of a job up to its last: (tokens, last event)."""
    tokens = []
    while True:
        ev = await job.events.get()
        if isinstance(ev, Token):
            tokens.append(ev.token_id)
        else:
            return tokens, ev


# ---------------------------------------------------------------------- admission
def test_waiting_requests_are_taken_round_robin_across_companies(world):
    server = server_with(world, max_batch_size=1, batch_wait_ms=0)
    tok = server.tokenizer
    ids = encode_prompt(tok, "turn")

    async def go():
        # Queued before the loop runs once: six of acme's, then one of globex's.
        hog = [server.batcher.submit(Job(ids, [-1], 2, company="acme")) for _ in range(6)]
        other = server.batcher.submit(Job(ids, [-1], 2, company="globex"))
        await asyncio.gather(*(finish(j) for j in [*hog, other]))
        return sorted([*hog, other], key=lambda j: j.first_token_at)

    order = run(go())
    assert [j.company for j in order][:3] == ["acme", "globex", "acme"]  # second, not seventh


def test_one_company_holds_at_most_its_share_of_the_batch_while_another_waits(world):
    server = server_with(world, max_batch_size=4, company_batch_share=0.5, batch_wait_ms=0)
    ids = encode_prompt(server.tokenizer, "share")
    b = server.batcher
    # The rows each company holds at every decode step, read as the step starts (the event loop
    # waits on the step then, so the running set is still): sampling from a coroutine instead
    # would miss whole phases on a busy machine.
    steps: list[tuple[int, int]] = []
    engine_step = b._engine_step

    def recorded(admit, score, cancels):
        rows = [j.company for j in b._running.values()]
        steps.append((rows.count("acme"), rows.count("globex")))
        return engine_step(admit, score, cancels)

    b._engine_step = recorded

    async def go():
        # Alone, acme fills the batch: no row stays idle for nobody.
        hog = [b.submit(Job(ids, [-1], 40, company="acme")) for _ in range(6)]
        await asyncio.gather(*(j.events.get() for j in hog[:4]))
        alone = b.running
        # globex arrives: it gets the rows acme's finishing requests leave, acme is held to 2.
        other = [b.submit(Job(ids, [-1], 40, company="globex")) for _ in range(3)]
        ends = await asyncio.gather(*(finish(j) for j in [*hog, *other]))
        return alone, [type(last) for _, last in ends]

    alone, ends = run(go())
    assert alone == 4 and ends == [Done] * 9
    both = [s for s in steps if s[0] and s[1]]  # steps both companies shared
    assert both and max(g for _, g in both) == 2  # globex gets its share, no more while acme runs
    assert all(a <= 2 for a, _ in both)  # acme, once globex runs, never holds more than its share
    assert max(a for a, _ in steps) == 4  # while alone it held the whole batch


def test_a_company_over_its_in_flight_limit_gets_a_429_with_a_retry_estimate(world):
    server = server_with(world, max_inflight_per_company=2, company_inflight_limits={"globex": 1})
    ids = encode_prompt(server.tokenizer, "cap")

    async def go():
        a = [server.batcher.submit(Job(ids, [-1], 8, company="acme")) for _ in range(2)]
        with pytest.raises(RateLimitError) as err:
            server.batcher.submit(Job(ids, [-1], 8, company="acme"))
        server.batcher.submit(Job(ids, [-1], 8, company="globex"))  # others are not affected
        with pytest.raises(RateLimitError):
            server.batcher.submit(Job(ids, [-1], 8, company="globex"))
        await asyncio.gather(*(finish(j) for j in a))
        after = server.batcher.submit(Job(ids, [-1], 2, company="acme"))  # room again
        await finish(after)
        return err.value

    err = run(go())
    assert err.http_status == 429 and err.context["retry_after"] > 0


def test_a_cancelled_waiting_request_leaves_the_queue_at_once(world):
    server = server_with(world, max_batch_size=1, max_queue=3, batch_wait_ms=0)
    ids = encode_prompt(server.tokenizer, "wait")

    async def go():
        running = server.batcher.submit(Job(ids, [-1], 30, company="acme"))
        await running.events.get()  # it holds the only row
        waiting = [server.batcher.submit(Job(ids, [-1], 2, company="acme")) for _ in range(2)]
        with pytest.raises(OverloadedError):
            server.batcher.submit(Job(ids, [-1], 2, company="globex"))
        server.batcher.cancel(waiting[1])
        state = (waiting[1].removed, server.batcher.load, server.batcher.inflight("acme"))
        late = server.batcher.submit(Job(ids, [-1], 2, company="globex"))  # its place is free now
        await asyncio.gather(finish(running), finish(waiting[0]), finish(late))
        return state

    removed, load, inflight = run(go())
    assert removed and load == 2 and inflight == 2


def test_scoring_waits_in_the_same_bounded_queue(world):
    server = server_with(world, max_queue=2)
    ids = encode_prompt(server.tokenizer, "score me please")

    async def go():
        jobs = [
            server.batcher.submit(Job(ids, [-1], 0, company="acme", score_from=0, top_k=2)) for _ in range(2)
        ]
        with pytest.raises(OverloadedError):
            server.batcher.submit(Job(ids, [-1], 0, company="globex", score_from=0, top_k=2))
        with pytest.raises(OverloadedError):
            server.batcher.submit(Job(ids, [-1], 4, company="globex"))
        return [await finish(j) for j in jobs]

    for _, last in run(go()):
        assert isinstance(last, Scored) and len(last.rows) == len(ids)
    assert server.batcher.scored == 2


def test_log_probs_are_computed_only_at_the_positions_asked(world):
    server = server_with(world)
    engine = server.engine
    ids = encode_prompt(server.tokenizer, "a prompt of some length to score")
    rows_seen: list[int] = []
    hook = engine.model.lm_head.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[0]))
    try:
        full = prompt_logprobs(engine, [ids], [[-1]], top_k=3)[0]
        rows_seen.clear()
        tail = prompt_logprobs(engine, [ids], [[-1]], top_k=1, start=[len(ids) - 3])[0]
    finally:
        hook.remove()
    assert sum(rows_seen) == 3  # the LM head ran on three positions, not on the whole prompt
    assert [r["token_id"] for r in tail] == ids[-3:]
    for got, want in zip(tail, full[-3:], strict=True):
        assert got["logprob"] == pytest.approx(want["logprob"], abs=1e-5)
        assert len(got["top"]) == 1 and got["top"][0] == pytest.approx(want["top"][0])


# ---------------------------------------------------------------------- failures stay in their row
def test_a_row_whose_prefill_fails_fails_alone_with_a_message_naming_nobody(world):
    server = server_with(world)
    tok = server.tokenizer
    good = encode_prompt(tok, "fine prompt")
    entries = stack_entries(world, "globex/labs")

    async def go():
        lease = await server.cache.acquire(entries)
        a = server.batcher.submit(Job(good, lease.slots_L, 6, company="globex"))
        bad = server.batcher.submit(Job([1, 2, 10_000], [-1], 6, company="acme"))  # no such embedding row
        b = server.batcher.submit(Job(good, [-1], 6, company="baseco"))
        out = [await finish(j) for j in (a, bad, b)]
        solo = await server.batcher.run_engine(
            lambda: generate(server.engine, None, [good], [lease.slots_L], max_new_tokens=6)[0]
        )
        server.cache.release(lease)
        return out, solo

    (a, bad, b), solo = run(go())
    assert isinstance(a[1], Done) and a[1].generation.token_ids == solo.token_ids
    assert isinstance(b[1], Done)
    assert isinstance(bad[1], Failed) and bad[1].error.http_status == 503
    message = bad[1].error.message
    assert "incident" in message and not any(m in message for m in ORG) and "slot" not in message


def test_a_decode_step_that_fails_is_rebuilt_and_only_the_broken_row_fails(world):
    server = server_with(world, batch_wait_ms=0)
    tok = server.tokenizer
    prompts = {"acme/search/dana": "one", "globex/labs": "two", "acme/ops/kim": "three"}

    async def go():
        leases = {m: await server.cache.acquire(stack_entries(world, m)) for m in prompts}
        jobs = {
            m: server.batcher.submit(
                Job(encode_prompt(tok, pr), leases[m].slots_L, 12, company=m.split("/")[0])
            )
            for m, pr in prompts.items()
        }
        for job in jobs.values():
            assert isinstance(await job.events.get(), Token)
        # globex/labs' own adapter leaves the engine under its live row: the next forward fails.
        await server.batcher.run_engine(server.engine.unload, "globex/labs@v1")
        out = {m: await finish(j) for m, j in jobs.items()}
        return leases, out

    leases, out = run(go())
    assert isinstance(out["globex/labs"][1], Failed)
    assert "globex" not in out["globex/labs"][1].error.message
    ref = server_with(world)  # the others, alone, on a fresh replica
    for m in ("acme/search/dana", "acme/ops/kim"):
        done = out[m][1]
        assert isinstance(done, Done)
        lease = run(ref.cache.acquire(stack_entries(world, m)))
        alone = generate(
            ref.engine, None, [encode_prompt(tok, prompts[m])], [lease.slots_L], max_new_tokens=12
        )[0]
        assert done.generation.token_ids == alone.token_ids


# ---------------------------------------------------------------------- adapter cache share
def test_one_company_cycling_its_models_cannot_evict_the_others(tmp_path):
    world = make_world(tmp_path, adapter_slots=8)
    many = [f"acme/t{i}" for i in range(10)]
    for m in many:
        world.fleet.add_tenant(m)
    world.publish(many, seed=900)
    server = ModelServer(world.args())
    cache = server.cache

    async def go():
        for m in ("globex/labs", "acme"):
            cache.release(await cache.acquire(stack_entries(world, m)))
        for _ in range(3):  # acme churns through ten team adapters on eight slots
            for m in many:
                cache.release(await cache.acquire(stack_entries(world, m)))
        return cache.resident()

    resident = run(go())
    assert {"globex@v1", "globex/labs@v1"} <= set(resident)
    assert sum(_company(k) == "acme" for k in resident) == 6 and cache.stats.evictions > 0


# ---------------------------------------------------------------------- keys and the registry
def _counting(registry: Registry) -> list[str]:
    """Key lookups the registry runs (queries of the api_keys table), as they happen."""
    statements: list[str] = []
    event.listen(
        registry.engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *rest: (
            statements.append(statement) if "api_keys" in statement else None
        ),
    )
    return statements


def test_bad_keys_cost_the_registry_once_at_most_and_each_address_has_a_budget(world):
    registry = Registry.open(world.cfg, migrate=False)
    sql = _counting(registry)
    clock = [1000.0]
    tenancy = Tenancy(
        registry, cache_s=1.0, bad_key_s=10.0, preauth=RateLimiter(1.0, 4, clock=lambda: clock[0]),
        clock=lambda: clock[0],
    )  # fmt: skip
    good = world.keys["acme"]
    unknown = "fleet_" + "0" * 12 + "_" + "A" * 43  # well formed, no such prefix

    async def go():
        assert await tenancy.company(f"Bearer {good}", "10.0.0.1") == "acme"
        before = len(sql)
        for malformed in ("fleet_x_y", "x" * 5000, good + "!"):
            with pytest.raises(AuthError):
                await tenancy.company(f"Bearer {malformed}", "10.0.0.9")
        malformed_sql = len(sql) - before
        with pytest.raises(AuthError):
            await tenancy.company(f"Bearer {unknown}", "10.0.0.9")
        with pytest.raises(RateLimitError) as err:  # the address spent its four checks
            await tenancy.company(f"Bearer {unknown}", "10.0.0.9")
        with pytest.raises(AuthError):  # another address: the prefix is remembered, no lookup
            await tenancy.company(f"Bearer {unknown}", "10.0.0.2")
        lookups = len(sql) - before
        clock[0] += 1.5  # the good key's entry is stale now; it is vouched for, not charged
        assert await tenancy.company(f"Bearer {good}", "10.0.0.9") == "acme"
        return malformed_sql, lookups, err.value

    malformed_sql, lookups, err = run(go())
    assert malformed_sql == 0 and lookups == 1
    assert err.context["retry_after"] > 0


def test_a_registry_outage_is_a_503_or_the_last_answer_seen_never_a_crash(tmp_path):
    world = make_world(tmp_path)
    registry = Registry.open(world.cfg, migrate=False)
    tenancy = Tenancy(registry, cache_s=0.0)
    tenancy._stacks.retain = tenancy._keys.retain = 300.0  # cache_s 0: nothing fresh, but kept for an outage
    key = world.keys["acme"]

    async def go():
        seen = await tenancy.stack("acme", "acme/search/dana")
        assert await tenancy.company(f"Bearer {key}") == "acme"
        registry.close()
        db = world.cfg.data_path / "fleet.db"
        for path in db.parent.glob("fleet.db*"):
            path.unlink()
        db.write_bytes(b"this is not a database" * 100)
        stale = await tenancy.stack("acme", "acme/search/dana")  # the last answer seen
        company = await tenancy.company(f"Bearer {key}")
        with pytest.raises(UnavailableError) as err:
            await tenancy.stack("acme", "acme/ops/kim")  # never seen: a 503
        with pytest.raises(UnavailableError):
            await tenancy.models("acme")
        return seen, stale, company, err.value

    seen, stale, company, err = run(go())
    assert stale == seen and company == "acme" and err.http_status == 503


def test_a_store_that_cannot_be_read_gets_the_previous_version_or_a_503(tmp_path):
    world = make_world(tmp_path)
    world.publish(["acme/search"], seed=60)  # v2 active over v1
    for model, version in (("acme/search", 2), ("acme/ops/kim", 1)):
        obj = world.object_path(model, version)
        obj.unlink()
        obj.mkdir()  # reading it is an IsADirectoryError: the store's trouble, not a missing object
    server = ModelServer(world.args())

    async def go():
        lease = await server.cache.acquire(stack_entries(world, "acme/search/dana"))
        with pytest.raises(UnavailableError) as err:
            await server.cache.acquire(stack_entries(world, "acme/ops/kim"))
        return lease, err.value

    lease, err = run(go())
    assert [e.key for e in lease.entries] == ["acme@v1", "acme/search@v1", "acme/search/dana@v1"]
    assert err.http_status == 503 and server.cache.stats.failed_loads["unavailable"] == 2


# ---------------------------------------------------------------------- text off the engine thread
@pytest.mark.parametrize("stop", [[], ["ab"], ["\u00e9t"]])
def test_incremental_text_equals_decoding_the_whole_completion(world, stop):
    tok = make_tok(world)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        ids = torch.randint(0, len(tok), (40,), generator=g).tolist()
        stream = TextStream(tok, stop)
        sent = ""
        for t in ids:
            stream.add([t])
            sent += stream.sendable()
            if stream.stopped:
                break
        final = stream.finish()
        full = tok.decode(stream.ids)
        hits = [i for i in (full.find(s) for s in stop) if i >= 0]
        assert final == (full[: min(hits)] if hits else full)
        assert final.startswith(sent)
        assert sent + stream.rest() == final


def make_tok(world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(world.cfg.base_path))
