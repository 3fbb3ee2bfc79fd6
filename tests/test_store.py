"""Adapter store: local directory and S3 (moto's stand-alone server over HTTP)."""

from __future__ import annotations

import time

import pytest

from fleet.config import StoreConfig, load_config
from fleet.errors import (
    ConfigError,
    ConflictError,
    IntegrityError,
    InvalidIdError,
    NotFoundError,
    UnavailableError,
    ValidationError,
)
from fleet.registry import PublishRequest, Registry
from fleet.store import LocalStore, open_store_uri, sha256_hex


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "adapters")
    uri = request.getfixturevalue("s3_uri")
    endpoint = request.getfixturevalue("s3_endpoint")
    # a small multipart threshold so that the multipart path runs too
    return open_store_uri(
        uri, StoreConfig(endpoint_url=endpoint, multipart_threshold_mb=5, multipart_chunk_mb=5)
    )


def test_stage_commit_read_verify(store):
    weights = bytes(range(256)) * 64
    staged = store.stage("acme/search", b'{"r": 8}', weights)
    uri = store.commit(staged, 3)
    assert uri.endswith("acme/search/v3")
    files = store.read_version(uri, staged.sha256)
    assert files.weights == weights and files.config == b'{"r": 8}'
    with pytest.raises(NotFoundError):
        store.commit(staged, 4)  # a staged object is published once
    with pytest.raises(IntegrityError, match="corrupt"):
        store.read_version(uri, "0" * 64)


def test_corrupted_object_is_detected(store):
    staged = store.stage("acme", b"{}", b"good weights")
    uri = store.commit(staged, 1)
    key = store.key_of(uri)
    store._write_many(key, {"adapter_model.safetensors": b"evil weights"})
    with pytest.raises(IntegrityError, match="acme/v1 is corrupt"):
        store.read_version(uri, staged.sha256)


def test_an_edited_config_is_refused_like_corrupt_weights(store):
    """The registered sha256 covers adapter_config.json too: its lora_alpha scales every answer."""
    config = b'{"peft_type": "LORA", "r": 8, "lora_alpha": 16}'
    staged = store.stage("acme", config, b"weights")
    uri = store.commit(staged, 1)
    assert store.read_version(uri, staged.sha256).config == config
    store._write_many(store.key_of(uri), {"adapter_config.json": config.replace(b"16", b"64")})
    with pytest.raises(IntegrityError, match="adapter_config.json and adapter_model.safetensors"):
        store.read_version(uri, staged.sha256)


def test_versions_registered_by_their_weights_alone_still_load(store):
    """Versions published before the config was covered carry the weights' sha256: they load."""
    staged = store.stage("acme", b"{}", b"old weights")
    uri = store.commit(staged, 1)
    assert store.read_version(uri, sha256_hex(b"old weights")).weights == b"old weights"
    with pytest.raises(IntegrityError):
        store.read_version(uri, sha256_hex(b"other weights"))


def test_large_object_multipart(store):
    big = b"x" * (6 * 1024 * 1024 + 17)
    staged = store.stage("acme", b"{}", big)
    uri = store.commit(staged, 1)
    assert store.read_version(uri, staged.sha256).weights == big


def test_paths_never_escape(store):
    for bad in ["../x", "a/../../b", "/etc"]:
        with pytest.raises(InvalidIdError):
            store.stage(bad, b"{}", b"")
    for bad in ["../secret", "a/../../b", "/abs", ""]:
        with pytest.raises(ValidationError):
            store.put_blob(bad, b"")
    with pytest.raises(ValidationError, match="outside the adapter store"):
        store.read_version(
            "file:///etc/passwd" if isinstance(store, LocalStore) else "s3://other/x", "0" * 64
        )
    with pytest.raises(NotFoundError):
        store.get_blob("no/such/key")


def test_blobs(store):
    store.put_blob("probes/tiny/v1.bin", b"abc")
    assert store.has_blob("probes/tiny/v1.bin") and store.get_blob("probes/tiny/v1.bin") == b"abc"
    assert not store.has_blob("probes/tiny/v2.bin")


def test_discard(store):
    staged = store.stage("acme", b"{}", b"w")
    store.discard(staged)
    with pytest.raises(NotFoundError):
        store.commit(staged, 1)


def test_publication_through_registry_on_s3(s3_uri, s3_endpoint, tmp_path):
    store = open_store_uri(s3_uri, StoreConfig(endpoint_url=s3_endpoint))
    reg = Registry.open_url(f"sqlite:///{tmp_path / 'r.db'}")
    reg.add_tenant("acme", base_model="tiny", rank=8, alpha=16)
    staged = store.stage("acme", b"{}", b"weights")
    (v,) = reg.publish_versions(store, [PublishRequest("acme", staged, 8, 16.0, "tiny")])
    stack = reg.active_stack("acme")
    assert stack.entries[0].uri == v.uri == f"{s3_uri}/acme/v1"
    assert store.read_version(stack.entries[0].uri, stack.entries[0].sha256).weights == b"weights"


def test_unreachable_s3_names_the_endpoint():
    store = open_store_uri(
        "s3://bucket/p", StoreConfig(endpoint_url="http://127.0.0.1:1", max_attempts=2, connect_timeout_s=0.5)
    )
    with pytest.raises(UnavailableError, match=r"http://127\.0\.0\.1:1.*unreachable"):
        store.stage("acme", b"{}", b"w")


def test_missing_bucket(s3_endpoint):
    store = open_store_uri("s3://no-such-bucket/p", StoreConfig(endpoint_url=s3_endpoint, max_attempts=1))
    with pytest.raises(UnavailableError, match="bucket 'no-such-bucket' does not exist"):
        store.stage("acme", b"{}", b"w")


def test_bad_uri():
    with pytest.raises(ConfigError):
        open_store_uri("ftp://x/y")


@pytest.mark.parametrize("uri", ["file://./x", "file://adapters", "file:adapters", "file://host/srv/x"])
def test_file_uris_with_a_host_or_a_relative_path_are_refused(uri, tmp_path):
    """file://./x would be /x and file://adapters the root: refused, with the form to use."""
    with pytest.raises(ConfigError, match=r"file:///absolute/path"):
        open_store_uri(uri)
    with pytest.raises(ConfigError, match=r"store\.uri: .*file:///absolute/path"):
        load_config(env={"FLEET_STORE_URI": uri, "FLEET_DATA_DIR": str(tmp_path)})


def test_file_uri_of_localhost_is_the_absolute_path(tmp_path):
    store = open_store_uri(f"file://localhost{tmp_path}/adapters")
    assert store.root == (tmp_path / "adapters").resolve()


# -- garbage collection ----------------------------------------------------------------------


def _leftovers(store, reg):
    """v1 published; what failed publications leave (a committed v2 whose row never came, a staged
    object); and auxiliary objects gc must never touch."""
    reg.add_tenant("acme", base_model="tiny", rank=8, alpha=16)
    (v1,) = reg.publish_versions(
        store, [PublishRequest("acme", store.stage("acme", b"{}", b"w1"), 8, 16.0, "tiny")]
    )
    store.commit(store.stage("acme", b"{}", b"w2"), 2)
    staged = store.stage("acme", b"{}", b"w3")
    store.put_blob("drift.base-norms/abc.json", b"{}")
    store.put_blob("probes/tiny/v1.bin", b"abc")
    return v1, staged


def test_gc_removes_only_unreferenced_versions_and_staging_after_the_grace_period(store, tmp_path):
    from fleet.store.gc import find_garbage, remove

    reg = Registry.open_url(f"sqlite:///{tmp_path / 'r.db'}")
    v1, staged = _leftovers(store, reg)
    now = time.time()
    assert find_garbage(store, reg.version_uris, grace_s=3600, now=now) == []  # all younger than the grace
    later = find_garbage(store, reg.version_uris, grace_s=3600, now=now + 7200)
    assert {(g.prefix, g.kind, g.objects) for g in later} == {
        ("acme/v2", "unreferenced version", 2),
        (f".staging/{staged.token}", "staging", 2),
    }
    assert remove(store, later) == sum(g.bytes for g in later) > 0
    assert find_garbage(store, reg.version_uris, grace_s=0, now=now + 7200) == []
    assert store.read_version(v1.uri, v1.sha256).weights == b"w1"
    assert store.get_blob("drift.base-norms/abc.json") == b"{}" and store.has_blob("probes/tiny/v1.bin")
    with pytest.raises(NotFoundError):
        store.commit(staged, 3)


def test_gc_refuses_a_registry_that_is_not_the_stores(store, tmp_path):
    from fleet.store.gc import find_garbage

    reg = Registry.open_url(f"sqlite:///{tmp_path / 'r.db'}")
    _leftovers(store, reg)
    empty = Registry.open_url(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(ConflictError, match="has no adapter versions"):
        find_garbage(store, empty.version_uris, grace_s=0, now=time.time() + 60)
    elsewhere = LocalStore(tmp_path / "elsewhere")
    with pytest.raises(ConflictError, match="outside the adapter store"):
        find_garbage(elsewhere, lambda: reg.version_uris(), grace_s=0, now=time.time())
    assert store.get_blob("drift.base-norms/abc.json") == b"{}"
