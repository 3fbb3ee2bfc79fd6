"""Adapter store: local directory and S3 (moto's stand-alone server over HTTP)."""

from __future__ import annotations

import pytest

from fleet.config import StoreConfig
from fleet.errors import (
    ConfigError,
    IntegrityError,
    InvalidIdError,
    NotFoundError,
    UnavailableError,
    ValidationError,
)
from fleet.registry import PublishRequest, Registry
from fleet.store import LocalStore, open_store_uri


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
    with pytest.raises(IntegrityError, match="acme/v1/adapter_model.safetensors is corrupt"):
        store.read_version(uri, staged.sha256)


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
