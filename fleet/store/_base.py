"""The adapter store's contract, shared by the local and S3 back ends.

Layout: ``<model id>/v<n>/adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's
directory format). A new version is first written under ``.staging/<token>/`` and moved to
its final key by :meth:`AdapterStore.commit`, which the registry calls inside the
publication transaction: a version is visible only once that transaction commits.

Every read verifies the sha256 the registry recorded for the version, which covers both files
(:func:`version_digest`): an edited ``adapter_config.json`` (its ``lora_alpha``, rank or
``use_rslora`` change every answer) is refused like corrupt weights. Versions published before
the config was covered were registered with the weights' sha256 alone and are verified on that.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass

from fleet.errors import IntegrityError, ValidationError
from fleet.types import validate_id

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FILES = (CONFIG_FILE, WEIGHTS_FILE)
_BLOB_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*")


@dataclass(frozen=True)
class Staged:
    """A version written to a temporary key, waiting for the registry to publish it."""

    model_id: str
    token: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: float  # seconds since the epoch: when it was written or moved to this key


@dataclass(frozen=True)
class AdapterFiles:
    """The two files of a PEFT LoRA directory, verified."""

    config: bytes
    weights: bytes


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version_digest(config: bytes, weights: bytes) -> str:
    """The sha256 a version is registered with, over both of its files: what
    ``sha256sum adapter_config.json adapter_model.safetensors | sha256sum`` prints in its directory."""
    listing = f"{sha256_hex(config)}  {CONFIG_FILE}\n{sha256_hex(weights)}  {WEIGHTS_FILE}\n"
    return sha256_hex(listing.encode())


def version_dir(model_id: str, version: int) -> str:
    """The store prefix of a version's files: ``acme/search/v3``."""
    validate_id(model_id)
    if not isinstance(version, int) or version < 1:
        raise ValidationError(f"version must be a positive integer, got {version!r}")
    return f"{model_id}/v{version}"


def check_blob_key(key: str) -> str:
    """Keys for auxiliary objects (checkpoints, probe caches): plain relative paths only."""
    if not isinstance(key, str) or not _BLOB_KEY.fullmatch(key) or ".." in key.split("/"):
        raise ValidationError(f"object key {key!r} must be a relative path of [A-Za-z0-9._-] segments")
    return key


class AdapterStore(ABC):
    """Where adapter versions and auxiliary objects live."""

    uri: str

    # -- adapter versions -------------------------------------------------------------------
    def stage(self, model_id: str, config: bytes, weights: bytes) -> Staged:
        validate_id(model_id)
        token = uuid.uuid4().hex
        self._write_many(f".staging/{token}", {CONFIG_FILE: config, WEIGHTS_FILE: weights})
        return Staged(
            model_id=model_id,
            token=token,
            sha256=version_digest(config, weights),
            size_bytes=len(config) + len(weights),
        )

    def commit(self, staged: Staged, version: int) -> str:
        """Move a staged version to ``<model>/v<n>/`` and return its URI (called by the registry)."""
        final = version_dir(staged.model_id, version)
        self._move_dir(f".staging/{staged.token}", final)
        return self.uri_of(final)

    def discard(self, staged: Staged) -> None:
        self._delete_dir(f".staging/{staged.token}")

    def read_version(self, uri: str, sha256: str) -> AdapterFiles:
        """Read a version's files, verifying them against the registry's sha256 (IntegrityError
        on mismatch). A version registered before the config was covered matches its weights'."""
        key = self.key_of(uri)
        files = self._read_many(key, FILES)
        got = version_digest(files[CONFIG_FILE], files[WEIGHTS_FILE])
        if got != sha256 and sha256_hex(files[WEIGHTS_FILE]) != sha256:
            raise IntegrityError(
                f"adapter object {uri} is corrupt: the sha256 of {CONFIG_FILE} and {WEIGHTS_FILE} "
                f"({got[:12]}…) does not match the registry's {sha256[:12]}…; it will not be loaded",
                uri=uri,
            )
        return AdapterFiles(config=files[CONFIG_FILE], weights=files[WEIGHTS_FILE])

    # -- auxiliary objects (checkpoints, probe-set caches) ----------------------------------------
    def put_blob(self, key: str, data: bytes) -> str:
        self._write_many_flat({check_blob_key(key): data})
        return self.uri_of(key)

    def get_blob(self, key: str) -> bytes:
        return self._read_flat(check_blob_key(key))

    def has_blob(self, key: str) -> bool:
        return self._exists(check_blob_key(key))

    # -- URIs ------------------------------------------------------------------------------
    @abstractmethod
    def uri_of(self, key: str) -> str: ...

    @abstractmethod
    def key_of(self, uri: str) -> str:
        """The key of a URI under this store (refuses URIs elsewhere)."""

    # -- back-end primitives ----------------------------------------------------------------
    @abstractmethod
    def _write_many(self, prefix: str, files: dict[str, bytes]) -> None: ...

    @abstractmethod
    def _write_many_flat(self, objects: dict[str, bytes]) -> None: ...

    @abstractmethod
    def _read_many(self, prefix: str, names: tuple[str, ...]) -> dict[str, bytes]: ...

    @abstractmethod
    def _read_flat(self, key: str) -> bytes: ...

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _move_dir(self, src: str, dst: str) -> None: ...

    @abstractmethod
    def _delete_dir(self, prefix: str) -> None: ...

    @abstractmethod
    def _list_objects(self) -> list[StoredObject]:
        """Every object in the store (what garbage collection looks at)."""
