"""The drift monitor on a real registry, store and engine (no Ray): probe sets, engine scores equal
to the pure functions on materialized logits, scans of unscored versions, policy actions landing in
the registry (rollback restores the previous version for serving), the publication gate, reports and
the CLI's errors.

The base is a tiny random Llama (vocab 264 with fleet's byte-level tokenizer, hidden 64, 2 layers)
whose output layer is scaled up so that its next-token distributions are peaked like a trained
model's (top-1 agreement then means something).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from _tiny import one_thread, random_lora, tiny_llama

from fleet.config import load_config
from fleet.divergence import probes as probe_sets
from fleet.divergence._logits import TopKCache, function_metrics, log_probs, nll_shift
from fleet.divergence.monitor import publication_gate, scan, scan_after_training, unfreeze
from fleet.errors import ConflictError, NotFoundError, ValidationError
from fleet.handles import Fleet
from fleet.registry import PublishRequest
from fleet.types import AdapterState, DriftState

SHAPE = dict(vocab=264, hidden=64, layers=2, heads=2, intermediate=128)
LOOSE = {"max_kl": 50.0, "max_rel_weight_norm": 50.0, "min_top1_agreement": 0.0, "max_general_dnll": 50.0}

_thread = pytest.fixture(autouse=True)(one_thread)


def save_base(d: Path) -> Path:
    from fleet.base import build_tokenizer

    model = tiny_llama(**SHAPE, seed=1)
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)  # peaked distributions, like a trained model's
    model.save_pretrained(d)
    build_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_base(tmp_path_factory.mktemp("drift-base") / "base")


def make_fleet(tmp_path: Path, base_dir: Path, caps: dict | None = None, **divergence) -> Fleet:
    caps = caps or {}
    raw = {
        "data_dir": str(tmp_path / "data"),
        "base": {"path": str(base_dir), "device": "cpu"},
        "tiers": {t: {"drift": {**LOOSE, **caps.get(t, {})}} for t in ("company", "team", "individual")},
        "divergence": {"batch_models": 2, **divergence},
    }
    cfg = load_config(overrides=raw, env={})
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    fl = Fleet(cfg)
    return fl


def add(fl: Fleet, *ids: str) -> None:
    for t in ids:
        fl.add_tenant(t)


def publish(fl: Fleet, model_id: str, *, std: float = 0.02, seed: int = 0, zero: bool = False):
    """A random rank-4 adapter published as the model's new active version."""
    model = tiny_llama(**SHAPE, seed=1)
    w = random_lora(model, rank=4, alpha=8.0, seed=seed, std=std)
    if zero:
        w.tensors.update({k: torch.zeros_like(v) for k, v in w.tensors.items() if "lora_B" in k})
    config_b, weights_b = w.to_bytes()
    staged = fl.store.stage(model_id, config_b, weights_b)
    (v,) = fl.registry.publish_versions(
        fl.store,
        [PublishRequest(model_id=model_id, staged=staged, rank=4, alpha=8.0, base_model=fl.cfg.base.name)],
    )
    return v, w


@pytest.fixture
def fleet(tmp_path, base_dir):
    fl = make_fleet(tmp_path, base_dir)
    yield fl
    fl.close()


# ---------------------------------------------------------------------- probe sets
def test_probe_set_is_made_once_with_the_base_cache_and_versioned_on_change(fleet, base_dir):
    from fleet.base import load_base

    probe = probe_sets.ensure(fleet)
    assert probe.name == "fleet-tiny-llama-probes-v1"
    assert probe.ids_PT.shape == (16, 64) and probe.general == 8
    row = fleet.registry.get_probe_set(probe.name)
    assert row["meta"]["fingerprint"] == probe.fingerprint and row["meta"]["top_k"] == 32
    # the cache is the base's own top-k + exact tail mass on the rows
    model, _ = load_base(base_dir, device="cpu")
    with torch.no_grad():
        ref = TopKCache.from_logits(model(input_ids=probe.ids_PT).logits, 32, probe.targets_PT)
    torch.testing.assert_close(probe.cache.logp_BTK, ref.logp_BTK, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(probe.cache.tail_logp_BT, ref.tail_logp_BT, atol=1e-4, rtol=1e-4)
    assert torch.equal(probe.cache.idx_BTK[..., 0], ref.idx_BTK[..., 0])
    # read back from the store, not rebuilt
    again = probe_sets.ensure(fleet)
    assert again.name == probe.name and torch.equal(again.ids_PT, probe.ids_PT)
    assert len(fleet.registry.list_probe_sets()) == 1
    # other settings: a new version; the old one stays usable by name
    fleet.cfg.divergence.top_k = 8
    v2 = probe_sets.ensure(fleet)
    assert v2.name == "fleet-tiny-llama-probes-v2" and v2.cache.k == 8
    assert probe_sets.ensure(fleet, name=probe.name).cache.k == 32


def test_corrupt_probe_object_is_refused(fleet):
    from fleet.errors import IntegrityError

    probe = probe_sets.ensure(fleet)
    row = fleet.registry.get_probe_set(probe.name)
    key = fleet.store.key_of(row["uri"])
    data = bytearray(fleet.store.get_blob(key))
    data[-1] ^= 0xFF
    fleet.store.put_blob(key, bytes(data))
    with pytest.raises(IntegrityError, match="corrupt"):
        probe_sets.ensure(fleet)


# ---------------------------------------------------------------------- engine scores == pure functions
def _materialized(base_dir: Path, adapters) -> torch.nn.Module:
    """The base with Σ s·B·A added into its weights: the stack as a plain model."""
    from fleet.base import load_base

    model, _ = load_base(base_dir, device="cpu")
    model = copy.deepcopy(model)
    with torch.no_grad():
        for w in adapters:
            for name, (A, B) in w.modules().items():
                model.get_submodule(name).weight += w.scale * (B.double() @ A.double()).float()
    return model


def test_engine_scores_equal_the_pure_functions_on_materialized_logits(fleet, base_dir):
    from fleet.divergence._basenorms import base_norms
    from fleet.divergence.scoring import FunctionScorer, ScoreItem
    from fleet.lora.build import build_engine

    add(fleet, "acme", "acme/search", "acme/search/dana", "acme/search/eve", "beta")
    ws = {}
    for i, m in enumerate(["acme", "acme/search", "acme/search/dana", "acme/search/eve", "beta"]):
        ws[m] = publish(fleet, m, std=0.03, seed=i, zero=(m == "beta"))[1]
    probe = probe_sets.ensure(fleet)
    engine, _ = build_engine(fleet.cfg, slots=12, ranks=[4], device="cpu")
    keys = {m: f"{m}@v1" for m in ws}
    items = [
        ScoreItem(
            "acme/search/dana", 1, "individual", (keys["acme"], keys["acme/search"], keys["acme/search/dana"])
        ),
        ScoreItem(
            "acme/search/eve", 1, "individual", (keys["acme"], keys["acme/search"], keys["acme/search/eve"])
        ),
        ScoreItem("acme/search", 1, "team", (keys["acme"], keys["acme/search"])),
        ScoreItem("beta", 1, "company", (keys["beta"],)),
    ]
    norms = base_norms(fleet)
    scorer = FunctionScorer(engine, probe, lambda k: ws[k.split("@")[0]], batch_models=2, base_norms=norms)
    scores = {s.model_id: s for s in scorer.score(items)}
    # 4 versions + 2 distinct parents (the team's stack once for both siblings, acme's), 2 per forward
    assert scorer.stacks_run == 6 and scorer.forwards == 3

    g, mask = probe.general_rows, probe.mask_PT
    lineage = {"acme/search/dana": ["acme", "acme/search", "acme/search/dana"],
               "acme/search/eve": ["acme", "acme/search", "acme/search/eve"],
               "acme/search": ["acme", "acme/search"], "beta": ["beta"]}  # fmt: skip
    w0 = torch.tensor(list(norms.values()), dtype=torch.float64).square().sum().sqrt()
    for mid, levels in lineage.items():
        with torch.no_grad():
            lp = log_probs(_materialized(base_dir, [ws[x] for x in levels])(input_ids=probe.ids_PT).logits)[
                None
            ]
        fm = function_metrics(lp, probe.cache, mask)
        _, dnll = nll_shift(lp[:, g], probe.targets_PT[g], probe.nll_mask_GT, probe.general_cache())
        s = scores[mid]
        close = lambda a, b: pytest.approx(float(b), rel=2e-3, abs=2e-5) == a  # noqa: E731
        assert close(s.base["kl"], fm.kl[0]) and close(s.base["kl_upper"], fm.kl_upper[0])
        assert close(s.base["tv"], fm.tv[0]) and close(s.base["top1"], fm.top1_agreement[0])
        assert close(s.base["dnll"], dnll[0])
        # weight space: the stack's ‖ΣΔW‖ and the own adapter's ‖ΔW‖, relative to ‖W₀‖ over modules
        stack = {n: sum(ws[x].scale * (ws[x].modules()[n][1].double() @ ws[x].modules()[n][0].double()) for x in levels)
                 for n in norms}  # fmt: skip
        fro = torch.stack([d.norm() for d in stack.values()]).square().sum().sqrt()
        assert s.base["rel_weight_norm"] == pytest.approx(float(fro / w0), rel=1e-5)
        own = ws[levels[-1]]
        own_fro = torch.stack(
            [(own.scale * (B.double() @ A.double())).norm() for A, B in own.modules().values()]
        )
        assert s.own_rel_weight_norm == pytest.approx(float(own_fro.square().sum().sqrt() / w0), rel=1e-5)
        if len(levels) == 1:
            assert s.parent is None
            continue
        with torch.no_grad():
            ref = log_probs(
                _materialized(base_dir, [ws[x] for x in levels[:-1]])(input_ids=probe.ids_PT).logits
            )[None]
        pm = function_metrics(lp, ref, mask)
        _, p_dnll = nll_shift(lp[:, g], probe.targets_PT[g], probe.nll_mask_GT, ref[:, g])
        assert close(s.parent["kl"], pm.kl[0]) and close(s.parent["tv"], pm.tv[0])
        assert close(s.parent["top1"], pm.top1_agreement[0]) and close(s.parent["dnll"], p_dnll[0])
        assert s.parent["kl"] > 1e-4  # the own adapter moved the model away from its parent
    # a zero adapter is the base: KL 0 and full agreement
    assert scores["beta"].base["kl"] < 1e-5 and scores["beta"].base["top1"] == 1.0
    assert scores["beta"].own_rel_weight_norm == 0.0


def test_packed_probe_rows_equal_the_models_own_forward_row_by_row(fleet, base_dir, monkeypatch):
    """The Llama fast path (a stack's probe rows as one engine row, attention per probe row) gives the
    logits of the engine's plain forward over one row per probe row, mixed stacks in one batch."""
    from fleet.divergence import _forward
    from fleet.lora.build import build_engine

    engine, _ = build_engine(fleet.cfg, slots=4, ranks=[4], device="cpu")
    model = tiny_llama(**SHAPE, seed=1)
    s = [engine.load(f"a{i}", random_lora(model, rank=4, seed=20 + i, std=0.05)) for i in range(3)]
    slots = [[s[0], s[1], s[2]], [s[0], -1, -1], [-1, -1, -1], [s[2], s[1], -1]]
    ids = torch.randint(0, 264, (5, 24), generator=torch.Generator().manual_seed(0))
    assert _forward.packable(engine.model)
    with torch.inference_mode():
        packed = _forward.stacked_logits(engine, slots, ids)
        monkeypatch.setattr(_forward, "packable", lambda model: False)
        plain = _forward.stacked_logits(engine, slots, ids)
    assert packed.shape == plain.shape == (4, 5, 24, 264)
    torch.testing.assert_close(packed, plain, atol=2e-4, rtol=1e-4)


# ---------------------------------------------------------------------- scans
def test_scan_scores_only_unscored_versions_and_records_both_relations(fleet):
    add(fleet, "acme", "acme/search", "acme/search/dana", "beta")
    for i, m in enumerate(["acme", "acme/search", "acme/search/dana", "beta"]):
        publish(fleet, m, seed=i)
    res = scan(fleet)
    assert res.probe_set == "fleet-tiny-llama-probes-v1" and res.counts["scored"] == 4
    samples = fleet.registry.drift_samples()
    rel = {(s["model_id"], s["relation"]) for s in samples}
    assert rel == {("acme", "base"), ("beta", "base"), ("acme/search", "base"), ("acme/search", "parent"),
                   ("acme/search/dana", "base"), ("acme/search/dana", "parent")}  # fmt: skip
    assert all(s["probe_set"] == res.probe_set and s["kl"] is not None for s in samples)
    assert scan(fleet).counts["scored"] == 0  # nothing new
    publish(fleet, "acme/search/dana", seed=9)
    again = scan(fleet, ["acme/search/dana", "beta"])
    assert [(v["model_id"], v["version"]) for v in again.versions] == [("acme/search/dana", 2)]
    assert fleet.registry.unscored_versions(res.probe_set) == []


def test_scan_refuses_unknown_models_and_models_without_versions(fleet):
    add(fleet, "acme", "acme/search")
    with pytest.raises(NotFoundError, match="unknown model"):
        scan(fleet, ["nope"])
    with pytest.raises(ValidationError, match="without any version"):
        scan(fleet, ["acme/search"])
    with pytest.raises(NotFoundError, match="no probe set 'acme-probes-v9'"):
        scan(fleet, probe_set="acme-probes-v9")
    # a model on another base is not this configuration's to score
    fleet.registry.add_tenant("gamma", base_model="other-base", rank=4, alpha=8.0)
    publish(fleet, "gamma")
    with pytest.raises(ValidationError, match="another base"):
        scan(fleet, ["gamma"])
    assert scan(fleet).counts["scored"] == 0


def test_policy_actions_land_in_the_registry_and_rollback_restores_the_previous_version(tmp_path, base_dir):
    fl = make_fleet(tmp_path, base_dir, caps={"individual": {"max_kl": 0.5}, "company": {"max_kl": 0.5}},
                    freeze_after=5)  # fmt: skip
    add(fl, "acme", "acme/search", "acme/search/dana", "beta")
    publish(fl, "acme", seed=1)
    publish(fl, "acme/search", seed=2)
    publish(fl, "acme/search/dana", seed=3)
    assert scan(fl).counts == {"scored": 3, "warned": 0, "frozen": 0, "rolled_back": 0}
    # a runaway v2 of dana: over the individual KL cap → rolled back to v1, which serves again
    publish(fl, "acme/search/dana", std=0.6, seed=4)
    assert fl.registry.active_stack("acme/search/dana").served_by == "acme/search/dana@v2"
    res = scan(fl)
    assert res.counts["rolled_back"] == 1 and res.versions[0]["kl"] > 0.5
    assert fl.registry.active_stack("acme/search/dana").served_by == "acme/search/dana@v1"
    v2 = fl.registry.get_version("acme/search/dana", 2)
    assert (
        v2.state is AdapterState.RETIRED and v2.rolled_back_at is not None and "drift rollback" in v2.reason
    )
    model = fl.registry.get_model("acme/search/dana")
    assert model.drift_state is DriftState.WARNED
    (act,) = fl.registry.drift_actions(model_id="acme/search/dana")
    assert (
        act["action"] == "rollback" and act["version"] == 2 and "serving acme/search/dana@v1" in act["reason"]
    )
    assert {s["version"] for s in fl.registry.drift_samples(model_id="acme/search/dana")} == {1, 2}
    # a runaway company with nothing to roll back to: frozen, and the scheduler's state says so
    publish(fl, "beta", std=0.6, seed=5)
    res = scan(fl)
    assert res.counts["frozen"] == 1
    beta = fl.registry.get_model("beta")
    assert beta.drift_state is DriftState.FROZEN and not beta.drift_state.trains
    assert [a["action"] for a in fl.registry.drift_actions(model_id="beta")] == ["freeze"]
    unfreeze(fl, "beta", "reviewed")
    assert fl.registry.get_model("beta").drift_state is DriftState.OK
    with pytest.raises(ConflictError, match="not frozen"):
        unfreeze(fl, "beta")
    fl.close()


def test_population_outlier_is_warned(tmp_path, base_dir):
    fl = make_fleet(tmp_path, base_dir, min_population=4, population_sigma=1.5)
    team = [f"acme/search/u{i}" for i in range(4)]
    add(fl, "acme", "acme/search", *team)
    for i, m in enumerate(team):
        publish(fl, m, std=0.3 if i == 3 else 0.01, seed=10 + i)
    res = scan(fl)
    assert res.counts["warned"] == 1
    assert fl.registry.get_model(team[3]).drift_state is DriftState.WARNED
    (act,) = fl.registry.drift_actions(model_id=team[3])
    assert act["action"] == "warn" and "σ of 4 accepted" in act["reason"]
    assert all(fl.registry.get_model(m).drift_state is DriftState.OK for m in team[:3])
    fl.close()


# ---------------------------------------------------------------------- the gate and the cycle hook
def test_publication_gate_rejects_a_candidate_over_the_cap_and_freezes_after_strikes(tmp_path, base_dir):
    fl = make_fleet(tmp_path, base_dir, caps={"individual": {"max_rel_weight_norm": 0.5}}, freeze_after=2)
    add(fl, "acme", "acme/search", "acme/search/dana")
    gate = publication_gate(fl)
    member = SimpleNamespace(model_id="acme/search/dana", tier="individual")
    model = tiny_llama(**SHAPE, seed=1)
    small, big = random_lora(model, rank=4, std=0.01, seed=1), random_lora(model, rank=4, std=1.0, seed=2)
    ok, why = gate(member, {"kl_base": 0.1, "top1_base": 0.9}, small)
    assert ok and why.startswith("drift:")
    ok, why = gate(member, {"kl_base": 0.1, "top1_base": 0.9}, big)
    assert not ok and "rel_weight_norm" in why and "max_rel_weight_norm 0.5" in why
    # the base norms were computed once and kept in the store under the base's fingerprint
    from fleet.base import base_fingerprint

    assert fl.store.has_blob(f"drift.base-norms/{base_fingerprint(base_dir)}.json")
    acts = fl.registry.drift_actions(model_id="acme/search/dana")
    assert [a["action"] for a in acts] == ["reject"] and acts[0]["version"] is None
    assert fl.registry.drift_status(["acme/search/dana"])["acme/search/dana"].strikes == 1
    # training metrics count too: KL measured by training over the cap
    ok, why = gate(member, {"kl_base": 99.0, "top1_base": 0.9}, small)
    assert not ok and "kl 99" in why
    assert fl.registry.get_model("acme/search/dana").drift_state is DriftState.FROZEN
    assert [a["action"] for a in fl.registry.drift_actions(model_id="acme/search/dana")] == [
        "freeze",
        "reject",
        "reject",
    ]
    fl.close()


def test_scan_after_training_scores_what_the_cycle_published(fleet):
    from fleet.train.launch import MemberOutcome, PackOutcome
    from fleet.types import RunStatus

    add(fleet, "acme", "acme/search", "beta")
    v_acme, _ = publish(fleet, "acme", seed=1)
    v_team, _ = publish(fleet, "acme/search", seed=2)
    outcomes = [PackOutcome("pack-1-0", 1, RunStatus.SUCCEEDED, 1.0, members=[
        MemberOutcome("acme", "company", True, v_acme.version, "ok", {}),
        MemberOutcome("acme/search", "team", True, v_team.version, "ok", {}),
        MemberOutcome("beta", "company", False, None, "held-out loss did not improve", {}),
    ])]  # fmt: skip
    counts = scan_after_training(fleet, 1, outcomes)
    assert counts == {"scored": 2, "warned": 0, "frozen": 0, "rolled_back": 0}
    assert {s["model_id"] for s in fleet.registry.drift_samples()} == {"acme", "acme/search"}
    assert scan_after_training(fleet, 2, []) == {"scored": 0, "warned": 0, "frozen": 0, "rolled_back": 0}


# ---------------------------------------------------------------------- report and CLI
def test_report_json_and_png(tmp_path, base_dir):
    from rich.console import Console

    from fleet.divergence.report import build_report, plot_report, render_report

    fl = make_fleet(tmp_path, base_dir, caps={"individual": {"max_kl": 0.5}})
    add(fl, "acme", "acme/search", "acme/search/dana", "acme/search/eve")
    for i, m in enumerate(["acme", "acme/search", "acme/search/dana", "acme/search/eve"]):
        publish(fl, m, seed=i)
    scan(fl)
    publish(fl, "acme/search/eve", std=0.6, seed=7)
    scan(fl)
    rep = build_report(fl)
    json.dumps(rep)  # plain data
    assert (
        rep["probe_set"]["name"] == "fleet-tiny-llama-probes-v1" and rep["samples"] == 9
    )  # 7, then eve v2 twice
    assert (
        rep["current"]["individual"]["models"] == 2
        and rep["current"]["individual"]["metrics"]["kl"]["cap"] == 0.5
    )
    assert set(rep["over_time"]["individual"]) == {"base", "parent"}
    assert rep["over_time"]["team"]["base"]["kl"][0]["count"] == 1
    assert rep["actions"][0]["action"] == "rollback" and rep["actions"][0]["model_id"] == "acme/search/eve"
    sev = [w["severity"] for w in rep["worst"]]
    assert sev == sorted(sev, reverse=True) and len(rep["worst"]) == 4
    png = plot_report(rep, tmp_path / "out" / "drift.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    console = Console(record=True, width=200)
    render_report(rep, console)
    text = console.export_text()
    assert "worst offenders" in text and "rollback" in text and "acme/search/eve" in text
    fl.close()


def _cli(tmp_path: Path, *args: str) -> int:
    from fleet.cli import main

    return main(["--config", str(tmp_path / "fleet.yaml"), *args])


def test_cli_scan_report_and_errors(tmp_path, base_dir, capsys):
    fl = make_fleet(tmp_path, base_dir)
    add(fl, "acme", "acme/search")
    publish(fl, "acme", seed=1)
    fl.close()
    assert _cli(tmp_path, "drift", "scan", "--models", "nope") == 2
    assert "unknown model" in capsys.readouterr().err
    assert _cli(tmp_path, "drift", "scan", "--models", "Bad_Id") == 2
    assert _cli(tmp_path, "drift", "scan", "--models", "acme/search") == 2
    assert "without any version" in capsys.readouterr().err
    assert _cli(tmp_path, "drift", "scan", "--probe-set", "missing-v1") == 2
    assert "no probe set 'missing-v1'" in capsys.readouterr().err
    assert _cli(tmp_path, "drift", "scan", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["counts"]["scored"] == 1 and out["versions"][0]["model_id"] == "acme"
    assert _cli(tmp_path, "drift", "report", "--json", "--plot", str(tmp_path / "r.png")) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["samples"] == 1 and Path(rep["plot"]).is_file()
    assert _cli(tmp_path, "drift", "report", "--plot", "/proc/nope/r.png") == 2
    assert "cannot write the plot" in capsys.readouterr().err
    assert _cli(tmp_path, "drift", "unfreeze", "acme") == 2
    assert _cli(tmp_path, "drift", "watch", "--every", "soon") == 2
    assert "interval 'soon'" in capsys.readouterr().err


# ---------------------------------------------------------------------- the registry's drift queries
def test_drift_queries_on_sqlite_and_postgresql(registry, tmp_path):
    from fleet.store import LocalStore
    from fleet.types import DriftAction

    store = LocalStore(tmp_path / "adapters")
    registry.add_tenants(
        [("acme", 1.0), ("acme/search", 1.0), ("beta", 1.0)], base_model="b", rank=4, alpha=8.0
    )

    def pub(m, payload=b"w"):
        staged = store.stage(m, b"{}", payload + m.encode())
        req = PublishRequest(model_id=m, staged=staged, rank=4, alpha=8.0, base_model="b")
        return registry.publish_versions(store, [req])[0]

    pub("acme")
    pub("acme/search")
    pub("acme", b"v2")
    assert registry.version_counts(["acme", "acme/search", "beta"]) == {
        "acme": 2,
        "acme/search": 1,
        "beta": 0,
    }
    row = registry.add_probe_set(
        "b-probes-v1", base_model="b", uri="file:///x", sha256="0" * 64, meta={"k": 1}
    )
    assert registry.get_probe_set("b-probes-v1")["meta"] == {"k": 1} and row["name"] == "b-probes-v1"
    with pytest.raises(ConflictError):
        registry.add_probe_set("b-probes-v1", base_model="b", uri="file:///x", sha256="0" * 64, meta={})
    assert registry.unscored_versions("b-probes-v1") == [("acme", 2, "company"), ("acme/search", 1, "team")]
    registry.add_divergence_samples([
        {"model_id": "acme", "version": 2, "tier": "company", "relation": "base", "probe_set": "b-probes-v1",
         "kl": 0.5, "tv": 0.1, "top1": 0.9, "dnll": 0.01, "rel_weight_norm": 0.2},
        {"model_id": "acme", "version": 1, "tier": "company", "relation": "base", "probe_set": "b-probes-v1",
         "kl": 9.0, "tv": 0.1, "top1": 0.9, "dnll": 0.01, "rel_weight_norm": 0.2},
    ])  # fmt: skip
    assert registry.unscored_versions("b-probes-v1") == [("acme/search", 1, "team")]
    assert registry.unscored_versions("b-probes-v1", ["acme"]) == []
    (acc,) = registry.accepted_samples("b-probes-v1")  # the active version's only
    assert (acc["model_id"], acc["version"], acc["kl"]) == ("acme", 2, 0.5)
    st = registry.drift_status(["acme", "acme/search"])
    assert st["acme"].has_previous and not st["acme/search"].has_previous and st["acme"].active_version == 2
    registry.apply_drift(
        "acme", state=DriftState.WARNED, strikes=2, actions=[(DriftAction.WARN.value, 2, "why")]
    )
    st = registry.drift_status(["acme"])["acme"]
    assert (st.state, st.strikes) == (DriftState.WARNED, 2)
    assert registry.drift_state_counts()["company"] == {"ok": 1, "warned": 1, "frozen": 0}
    assert [a["reason"] for a in registry.drift_actions(model_id="acme")] == ["why"]
    entries = registry.version_entries([("acme", 1), ("acme/search", 1)])
    assert entries[("acme", 1)].key == "acme@v1" and entries[("acme/search", 1)].rank == 4
    with pytest.raises(NotFoundError):
        registry.version_entries([("acme", 7)])
    assert [s["version"] for s in registry.drift_samples(model_id="acme")] == [2, 1]
