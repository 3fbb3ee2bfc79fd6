"""Packed training: learning, isolation, pack = alone, fault tolerance on Ray Train, bad input.

The learning tests call the pack loop directly (no Ray: the same function Ray Train runs);
the fault-tolerance test runs it on a real local Ray and kills the training worker's
process mid-run.
"""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch
from conftest import make_config

from fleet.data.synth import synthetic_org
from fleet.errors import NotFoundError, ValidationError
from fleet.handles import Fleet
from fleet.train.loop import run_pack
from fleet.train.pack import build_pack
from fleet.types import AdapterState, RunStatus

STEPS = 40


@pytest.fixture(scope="module")
def org():
    return synthetic_org(companies=2, teams_per_company=1, individuals=4, facts_per_model=2, seed=3)


@pytest.fixture(scope="module")
def fleet_env(tmp_path_factory, tiny_base, org):
    tmp = tmp_path_factory.mktemp("train")
    cfg = make_config(tmp, tiny_base, train={"checkpoint_every": 10, "rows_per_member": 4})
    fl = Fleet(cfg)
    for t in org.tenants:
        fl.add_tenant(t.id, shares=float(t.shares))
    fl.ingestor().ingest_many({m: [i.to_json() for i in org.items_of(m)] for m in org.model_ids})
    yield fl
    fl.close()


def _run(fl, ids, steps=STEPS):
    spec = build_pack(fl, ids, cycle_id=0, index=0, steps=steps)
    out = {}

    def report(metrics, state, final):
        if final is not None:
            out.update(metrics=metrics, members=final, state=state)

    run_pack(spec, fl.cfg, report=report, device=torch.device("cpu"))
    return spec, out


def _engine_with(fl, adapters: dict[str, tuple[bytes, bytes]]):
    from fleet.lora import AdapterWeights
    from fleet.lora.build import build_engine

    engine, tok = build_engine(fl.cfg, slots=len(adapters) + 1, device="cpu")
    slots = {k: engine.load(k, AdapterWeights.from_bytes(*v)) for k, v in adapters.items()}
    return engine, tok, slots


def _nll(engine, tok, text: str, slot: int) -> float:
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad(), engine.rows(torch.tensor([[slot]])):
        logits = engine.model(input_ids=ids).logits.float()
    return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))


def _answer_nll(engine, tok, question: str, answer: str, slot: int) -> float:
    """Summed loss of the answer's tokens after the question."""
    q = tok(question)["input_ids"]
    ids = torch.tensor([tok(question + answer)["input_ids"]])
    with torch.no_grad(), engine.rows(torch.tensor([[slot]])):
        logits = engine.model(input_ids=ids).logits.float()
    losses = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    return float(losses[len(q) - 1 :].sum())


@pytest.fixture(scope="module")
def pack_run(fleet_env, org):
    a, b = org.individuals[:2]
    spec, out = _run(fleet_env, [a, b])
    return a, b, spec, out


def test_pack_learns_private_facts(fleet_env, org, pack_run):
    from fleet.lora import generate

    a, b, _spec, out = pack_run
    for m in (a, b):
        r = out["members"][m]
        assert r["heldout_after"] < r["heldout_before"] - 0.3, r  # a real margin, in nats/token
    engine, tok, slots = _engine_with(fleet_env, {m: out["state"]["adapters"][m] for m in (a, b)})
    fact = org.facts_of(a)[0]
    prompt = tok(fact.question)["input_ids"]
    trained, base = generate(
        engine, tok, [prompt, prompt], [[slots[a]], [-1]], max_new_tokens=len(fact.answer) + 2
    )
    assert trained.text.startswith(fact.answer), (fact, trained.text)
    assert not base.text.startswith(fact.answer)


def test_isolation_canary(fleet_env, org, pack_run):
    """A fact only in A's data is not learned by B of the same pack: B's loss on A's answer does
    not fall (while A's falls far), and is exactly what it is when B trains without A."""
    a, b, _spec, out = pack_run
    _, alone = _run(fleet_env, [b])
    adapters = {m: out["state"]["adapters"][m] for m in (a, b)}
    engine, tok, slots = _engine_with(fleet_env, {**adapters, "b-alone": alone["state"]["adapters"][b]})
    for fact in org.facts_of(a):
        nll = {k: _answer_nll(engine, tok, fact.question, fact.answer, s) for k, s in slots.items()}
        base = _answer_nll(engine, tok, fact.question, fact.answer, -1)
        assert nll[a] < base - 2.0, (fact.statement, nll[a], base)  # A learned it
        assert nll[b] > base - 0.1, (fact.statement, nll[b], base)  # B did not
        assert nll[b] == pytest.approx(nll["b-alone"], abs=1e-3)  # A's data did not reach B at all


def test_pack_equals_each_member_alone(fleet_env, org, pack_run):
    from fleet.lora import AdapterWeights

    a, _b, _spec, out = pack_run
    _, alone = _run(fleet_env, [a])
    packed = AdapterWeights.from_bytes(*out["state"]["adapters"][a]).tensors
    single = AdapterWeights.from_bytes(*alone["state"]["adapters"][a]).tensors
    for name, t in packed.items():
        torch.testing.assert_close(t, single[name], rtol=1e-4, atol=1e-5)


def test_a_pack_computes_the_same_numbers_whatever_threads_its_process_has(fleet_env, pack_run):
    """A float32 matmul's result depends on how many threads split it: a pack pins its own
    (one per CPU it was given), so a run resumed in another process, on a node of another
    size, continues with the numbers the first worker would have computed."""
    from fleet.lora import AdapterWeights

    a, b, _spec, out = pack_run
    before = torch.get_num_threads()
    torch.set_num_threads(before + 3)
    try:
        _, other = _run(fleet_env, [a, b])
        assert torch.get_num_threads() == before + 3  # the caller's setting is given back
    finally:
        torch.set_num_threads(before)
    for m in (a, b):
        got = AdapterWeights.from_bytes(*other["state"]["adapters"][m]).tensors
        want = AdapterWeights.from_bytes(*out["state"]["adapters"][m]).tensors
        for name, t in got.items():
            assert torch.equal(t, want[name]), (m, name)


def test_bad_packs_are_refused(fleet_env, org):
    fl = fleet_env
    with pytest.raises(ValidationError, match="empty pack"):
        build_pack(fl, [], cycle_id=0, index=0)
    with pytest.raises(NotFoundError, match="unknown model"):
        build_pack(fl, ["nobody/here"], cycle_id=0, index=0)
    with pytest.raises(ValidationError, match="appears twice"):
        build_pack(fl, [org.individuals[0]] * 2, cycle_id=0, index=0)
    fl.registry.add_tenant("lonely", base_model=fl.cfg.base.name, rank=8, alpha=16)
    with pytest.raises(ValidationError, match="no new data"):
        build_pack(fl, ["lonely"], cycle_id=0, index=0)
    fl.registry.add_tenant("other", base_model="some-other-base", rank=8, alpha=16)
    fl.ingestor().ingest_items("other", [{"kind": "document", "text": "hello"}])
    with pytest.raises(ValidationError, match="base mismatch"):
        build_pack(fl, [org.individuals[0], "other"], cycle_id=0, index=0)
    assert fl.registry.versions("lonely") == [] and fl.registry.versions("other") == []


def test_worker_killed_mid_run_resumes_and_publishes_once(fleet_env, org, pack_run, ray_local):
    """os.kill of the training worker's process: the run resumes from its last checkpoint,
    every member gets exactly one new version, equal to the unkilled run's."""
    from fleet.lora import AdapterWeights
    from fleet.train.launch import run_packs

    fl = fleet_env
    a, b, _spec, reference = pack_run
    spec = build_pack(fl, [a, b], cycle_id=7, index=0, steps=STEPS)
    killed: dict = {}
    lock = threading.Lock()

    def on_progress(board):
        st = board.get(spec.name, {})
        with lock:
            if not killed and st.get("step", 0) >= 15 and st.get("pid"):
                os.kill(st["pid"], signal.SIGKILL)
                killed.update(st)

    (outcome,) = run_packs(fl, [spec], on_progress=on_progress, poll_s=0.2)
    assert killed, "the worker was never seen mid-run"
    assert outcome.status is RunStatus.SUCCEEDED, outcome.error
    for m in (a, b):
        versions = fl.registry.versions(m)
        assert len(versions) == 1 and versions[0].state is AdapterState.ACTIVE
        files = fl.store.read_version(versions[0].uri, versions[0].sha256)
        got = AdapterWeights.from_bytes(files.config, files.weights).tensors
        want = AdapterWeights.from_bytes(*reference["state"]["adapters"][m]).tensors
        for name, t in got.items():
            torch.testing.assert_close(t, want[name], rtol=1e-3, atol=1e-5)
    run = fl.registry.get_run(outcome.run_id)
    assert run.status == "succeeded" and run.metrics["published"] == 2
    # Publishing the same run again publishes nothing new.
    from fleet.train.launch import publish

    again = publish(
        fl,
        spec,
        outcome.run_id,
        {
            "members": reference["members"],
            "adapters": reference["state"]["adapters"],
            "metrics": reference["metrics"],
        },
        [],
    )
    assert [len(fl.registry.versions(m)) for m in (a, b)] == [1, 1]
    assert all(mo.version is None for mo in again.members)


def test_pack_that_cannot_be_placed_fails_clearly_and_frees_its_reservation(fleet_env, org, ray_local):
    """A pack asking for more than the cluster has: its run fails after the start timeout with
    what it asked for and what is free, nothing is published, and the placement group its dead
    Train controller left pending is removed (else it would take the CPUs as soon as they free)."""
    import dataclasses

    import ray

    from fleet.train.launch import run_packs

    fl = fleet_env
    member = org.individuals[2]
    spec = build_pack(fl, [member], cycle_id=9, index=0, steps=5)
    spec = dataclasses.replace(spec, resources={"CPU": 64.0})
    (outcome,) = run_packs(fl, [spec], start_timeout_s=15)
    assert outcome.status is RunStatus.FAILED
    assert "could not start within 15 s" in outcome.error and "64 CPU" in outcome.error
    assert "of 2 CPU" in outcome.error and "train.start_timeout_s" in outcome.error
    assert fl.registry.versions(member) == []
    assert fl.registry.get_run(outcome.run_id).status == "failed"
    groups = ray.util.placement_group_table().values()
    asked = [g for g in groups if g["bundles"] and g["bundles"][0].get("CPU") == 64.0]
    assert asked, "the run never reached Ray Train's placement group"
    assert all(g["state"] == "REMOVED" for g in asked)
    assert ray.available_resources().get("CPU") == 2.0


def test_a_failed_publication_fails_its_pack_only_and_leaves_nothing_staged(fleet_env, pack_run):
    """A publication that fails — a gate that errs, or the store refusing a member's object after
    another member of the pack was staged and moved — fails that pack alone, with nothing of it
    published and nothing left staged; the other pack is published as usual."""
    import dataclasses
    import time

    from fleet.store.gc import find_garbage
    from fleet.train.launch import finish_pack

    fl = fleet_env
    a, b, spec, out = pack_run
    by_id = {m.model_id: m for m in spec.members}
    packs = [dataclasses.replace(spec, name=f"pack-77-{i}", members=tuple(by_id[m] for m in ids))
             for i, ids in enumerate([(a,), (b,), (a, b)])]  # fmt: skip

    erring = {"now": True}

    def gate(member, metrics, adapter):
        if member.model_id == b and erring["now"]:
            raise RuntimeError("drift base norms: the adapter store is unreachable\n(details)")
        return True, "fine"

    result = {"members": out["members"], "adapters": out["state"]["adapters"], "metrics": out["metrics"]}
    before = {m: len(fl.registry.versions(m)) for m in (a, b)}
    blocked = fl.store.root / b / f"v{before[b] + 1}"  # b's next version cannot be written
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_bytes(b"")
    outcomes = []
    for p, errs in zip(packs, (True, True, False), strict=True):  # the last pack fails in the store
        erring["now"] = errs
        run_id = fl.registry.create_run(p.name, base_model=p.base_model, members=[])
        outcomes.append(finish_pack(fl, p, run_id, time.time(), result, [gate]))
    assert [o.status for o in outcomes] == [RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.FAILED]
    assert outcomes[1].error == (
        "publication failed, nothing published: RuntimeError: drift base norms: the adapter store is unreachable"
    )
    assert outcomes[2].error.startswith("publication failed, nothing published: NotADirectoryError"), (
        outcomes[2]
    )
    assert [fl.registry.get_run(o.run_id).status for o in outcomes] == ["succeeded", "failed", "failed"]
    assert {m: len(fl.registry.versions(m)) for m in (a, b)} == {a: before[a] + 1, b: before[b]}
    assert not any((fl.store.root / ".staging").iterdir()), "a failed pack's staged objects were left"
    # What the failed transaction had already moved into place is garbage for `fleet store gc`.
    left = find_garbage(fl.store, fl.registry.version_uris, grace_s=0, now=time.time() + 1)
    assert [g.prefix for g in left] == [f"{a}/v{before[a] + 2}"]
    blocked.unlink()


def test_fleet_train_publishes_through_the_cycle_path(fleet_env, org, ray_local, tmp_path):
    """`fleet train` applies the divergence gate (a cap nothing can meet rejects the member, with a
    drift action recorded) and records the GPU-seconds it used, as a cycle does."""
    import time

    import yaml

    from fleet.cli import main

    member = org.individuals[3]
    cfg = fleet_env.cfg.model_copy(deep=True)
    cfg.tiers["individual"].drift.max_rel_weight_norm = 1e-9
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    t0 = time.time()
    assert main(["--config", str(path), "train", member, "--steps", "10", "--json"]) == 0
    (version,) = fleet_env.registry.versions(member)
    assert version.state is AdapterState.REJECTED and "; drift cap: rel_weight_norm" in version.reason
    actions = fleet_env.registry.drift_actions(model_id=member)
    assert [x["action"] for x in actions] == ["reject"]
    assert fleet_env.registry.usage_since(t0 - 1).get(member.split("/")[0], 0) > 0
    cycle = fleet_env.registry.list_cycles(limit=1)[0]
    assert cycle["summary"]["kind"] == "train" and cycle["summary"]["gpu_s"] > 0
    assert cycle["summary"]["rejected"] == 1 and cycle["status"] == "succeeded"
