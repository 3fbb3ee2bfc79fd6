"""The command line as operators meet it: bad input is one line and exit code 2, user text is
printed as it is (never read as markup), secrets never appear, commands that store are
idempotent and those that remove are dry runs unless told otherwise."""

from __future__ import annotations

import os
import time

import pytest
import yaml

from fleet.cli import main
from fleet.registry import PublishRequest, Registry

SECRET = "S3cret-pw"


def _runner(tmp_path, registry_url, tiny_base, capsys, monkeypatch):
    from fleet.cli import _common as _cli_common

    monkeypatch.setattr(_cli_common.console, "width", 500)  # long URIs on one line
    conf = tmp_path / "fleet.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "data_dir": str(tmp_path / "data"),
                "registry": {"url": registry_url},
                "base": {"path": str(tiny_base)},
            }
        )
    )

    def go(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["--config", str(conf), *args])
        out, err = capsys.readouterr()
        return code, out, err

    go.registry_url = registry_url
    go.data = tmp_path / "data"
    return go


@pytest.fixture
def run(tmp_path, tiny_base, capsys, monkeypatch):
    """``fleet --config <tmp fleet.yaml> ARGS`` → (exit code, stdout, stderr), on SQLite."""
    return _runner(tmp_path, f"sqlite:///{tmp_path / 'fleet.db'}", tiny_base, capsys, monkeypatch)


@pytest.fixture
def run_db(tmp_path, registry_url, tiny_base, capsys, monkeypatch):
    """The same on each database (SQLite, PostgreSQL), for commands whose outcome is stored."""
    return _runner(tmp_path, registry_url, tiny_base, capsys, monkeypatch)


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_ids_exit_2_with_one_line_and_the_rule_intact(run):
    assert run("tenants", "add", "acme")[0] == 0
    code, _, err = run("tenants", "add", "a/b/c/d")
    assert code == 2 and "has 4 segments; at most 3" in _one_error_line(err)
    code, _, err = run("tenants", "add", "acme/../../etc")
    assert code == 2 and "has 4 segments" in _one_error_line(err)
    code, _, err = run("tenants", "add", "acme/..")
    # Rich used to eat "[a-z0-9][a-z0-9-]" as markup, leaving "must match {0,62}".
    assert code == 2 and "segment '..' must match [a-z0-9][a-z0-9-]{0,62}" in _one_error_line(err)
    for args in (
        ("train", "acme/x/y/z", "--steps", "1"),
        ("ingest", "a/b/c/d", "missing.jsonl"),
        ("keys", "create", "--company", "Acme!"),
        ("generate", "acme/../x", "--prompt", "hi"),
        ("adapters", "export", "a/b/c/d", "out"),
    ):
        code, _, err = run(*args)
        assert code == 2, (args, err)
        _one_error_line(err)


def test_user_text_is_printed_as_it_is(run):
    """A '[/]' in a key name or a prompt is text, not markup (it used to crash the CLI)."""
    assert run("tenants", "add", "acme")[0] == 0
    assert run("keys", "create", "--company", "acme", "--name", "[/] [bold]ops[/bold]")[0] == 0
    code, out, _ = run("keys", "list")
    assert code == 0 and "[/] [bold]ops[/bold]" in out
    code, out, err = run("generate", "acme", "--prompt", "[/] [red]x", "--max-tokens", "2")
    assert code == 0, err
    assert out.startswith("base [/] [red]x")


def test_config_errors_never_show_the_database_password(run, monkeypatch):
    monkeypatch.setenv("FLEET_DB_URL", f"mysql://fleet:{SECRET}@db.internal/fleet")
    code, out, err = run("status")
    line = _one_error_line(err)
    assert code == 2 and SECRET not in out + err
    assert "mysql://fleet:***@db.internal/fleet" in line and "only SQLite and PostgreSQL" in line


def _peft_dir(tiny_base, path, seed: int):
    from fleet.config import FleetConfig
    from fleet.lora import AdapterWeights
    from fleet.lora.interop import _meta_model

    model = _meta_model(FleetConfig(base={"path": str(tiny_base)}))
    return AdapterWeights.fresh(model, rank=4, alpha=8, seed=seed).to_peft_dir(path)


def test_importing_the_same_adapter_twice_stores_it_once(run_db, tiny_base, tmp_path):
    run = run_db
    assert run("tenants", "add", "acme")[0] == 0
    first, second = _peft_dir(tiny_base, tmp_path / "p1", 1), _peft_dir(tiny_base, tmp_path / "p2", 2)
    assert run("adapters", "import", "acme", str(first))[0] == 0
    code, out, _ = run("adapters", "import", "acme", str(first))
    assert code == 0 and "holds the same adapter as acme@v1: nothing stored" in out
    assert run("adapters", "import", "acme", str(second))[0] == 0
    code, out, _ = run("adapters", "import", "acme", str(first))  # back to the first: v1 again, no v3
    assert code == 0 and "acme@v1 is active" in out
    reg = Registry.open_url(run.registry_url)
    try:
        assert [(v.version, v.state.value) for v in reg.versions("acme")] == [(1, "active"), (2, "retired")]
    finally:
        reg.close()


def _age(path, seconds: float) -> None:
    """Backdate a directory tree, as if written ``seconds`` ago."""
    then = time.time() - seconds
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            os.utime(os.path.join(dirpath, name), (then, then))
        os.utime(dirpath, (then, then))


def test_store_gc_is_a_dry_run_unless_told_to_delete(run_db):
    run = run_db
    from fleet.store import LocalStore

    assert run("tenants", "add", "acme")[0] == 0
    store = LocalStore(run.data / "adapters")
    reg = Registry.open_url(run.registry_url)
    try:
        (v1,) = reg.publish_versions(
            store, [PublishRequest("acme", store.stage("acme", b"{}", b"w1"), 8, 16.0, "b")]
        )
        store.commit(store.stage("acme", b"{}", b"w2"), 2)  # a publication whose transaction rolled back
        staged = store.stage("acme", b"{}", b"w3")  # one that failed before it was committed
        code, out, _ = run("store", "gc")
        assert code == 0 and "nothing to remove" in out  # younger than the 24 h grace period
        _age(store.root, 2 * 86400)
        code, out, _ = run("store", "gc")
        assert code == 0 and "would remove" in out and "add --delete" in out
        assert f"{store.uri}/acme/v2" in out and f".staging/{staged.token}" in out and "acme/v1 " not in out
        assert (store.root / "acme" / "v2").is_dir() and (store.root / ".staging" / staged.token).is_dir()
        code, out, _ = run("store", "gc", "--delete", "--older-than", "1h")
        assert code == 0 and "2 directories removed" in out
        assert (
            not (store.root / "acme" / "v2").exists()
            and not (store.root / ".staging" / staged.token).exists()
        )
        assert store.read_version(v1.uri, v1.sha256).weights == b"w1"
    finally:
        reg.close()


def test_demo_keys_are_revoked_and_never_pile_up(registry):
    """Each `fleet demo` used to leave one more never-revoked key per company."""
    from fleet.demo import DEMO_KEY_NAME, demo_keys

    registry.add_tenants([("acme", 1.0), ("beta", 1.0)], base_model="b", rank=8, alpha=16)
    mine = registry.create_key("acme", name="ops")
    registry.create_key("acme", name=DEMO_KEY_NAME)  # left by a demo that was killed
    for _ in range(2):
        with demo_keys(registry, ["acme", "beta", "acme"]) as keys:
            assert sorted(keys) == ["acme", "beta"]
            assert [registry.authenticate(keys[c]) for c in ("acme", "beta")] == ["acme", "beta"]
    live = [k for k in registry.list_keys() if not k["revoked_at"]]
    assert [(k["company_id"], k["name"]) for k in live] == [("acme", "ops")]
    assert registry.authenticate(mine) == "acme"
