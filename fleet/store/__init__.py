"""The adapter store: local directory (``file://``) or S3 (``s3://bucket/prefix``).

store = open_store(cfg)
staged = store.stage("acme/search", config_json, safetensors_bytes)
registry.publish_versions(store, [PublishRequest(..., staged=staged)])   # commits v<n>
files = store.read_version(version.uri, version.sha256)                  # verified
"""

from __future__ import annotations

from urllib.parse import unquote, urlparse

from fleet.config import FleetConfig, StoreConfig, store_uri_problem
from fleet.errors import ConfigError
from fleet.store._base import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    AdapterFiles,
    AdapterStore,
    Staged,
    sha256_hex,
    version_digest,
)
from fleet.store.gc import find_garbage, remove
from fleet.store.local import LocalStore

__all__ = [
    "find_garbage",
    "remove",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "AdapterFiles",
    "AdapterStore",
    "LocalStore",
    "Staged",
    "open_store",
    "open_store_uri",
    "sha256_hex",
    "version_digest",
]


def open_store_uri(uri: str, cfg: StoreConfig | None = None) -> AdapterStore:
    problem = store_uri_problem(uri)
    if problem:
        raise ConfigError(problem)
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return LocalStore(unquote(parsed.path))
    from fleet.store.s3 import S3Store

    return S3Store(uri, cfg)


def open_store(cfg: FleetConfig) -> AdapterStore:
    return open_store_uri(cfg.store_uri, cfg.store)
