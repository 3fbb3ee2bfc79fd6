"""Garbage collection of the adapter store: objects no version row references.

A publication that failed after its objects were written leaves them behind: a staged version
under ``.staging/<token>/``, or a version directory ``<model>/v<n>/`` whose registry transaction
rolled back. Nothing else removes them. :func:`find_garbage` lists such directories that are
older than a grace period (a publication in progress writes its objects before its row commits,
so anything younger may still become a version); :func:`remove` deletes them.

Only the two shapes above are ever touched: auxiliary objects (``drift.*`` caches, probe sets)
and anything else in the bucket are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fleet.errors import ConflictError, FleetError
from fleet.store._base import FILES, AdapterStore
from fleet.types import validate_id

STAGING = ".staging"
_VERSION_DIR = re.compile(r"v[1-9][0-9]*")


@dataclass(frozen=True)
class Garbage:
    """One directory of objects that no version row references."""

    prefix: str  # ".staging/<token>" or "<model>/v<n>"
    uri: str
    kind: str  # "staging" or "unreferenced version"
    objects: int
    bytes: int
    age_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def version_prefix(key: str) -> tuple[str, str] | None:
    """``(prefix, kind)`` of a key that belongs to a staged or published version, else None."""
    parts = key.split("/")
    if len(parts) == 3 and parts[0] == STAGING and parts[2] in FILES:
        return f"{STAGING}/{parts[1]}", "staging"
    if len(parts) >= 3 and parts[-1] in FILES and _VERSION_DIR.fullmatch(parts[-2]):
        model_id = "/".join(parts[:-2])
        try:
            validate_id(model_id)
        except FleetError:
            return None
        return f"{model_id}/{parts[-2]}", "unreferenced version"
    return None


def find_garbage(
    store: AdapterStore, version_uris: Callable[[], Iterable[str]], *, grace_s: float, now: float
) -> list[Garbage]:
    """Version directories and staged objects that no row references, untouched for ``grace_s``.

    ``version_uris()`` reads the ``uri`` of every version row the registry holds, in any state. It is
    called after the store has been listed, so that a version committed in between is not garbage.
    """
    objects = store._list_objects()
    referenced = _keys_in(store, version_uris())
    dirs: dict[str, dict[str, Any]] = {}
    for obj in objects:
        found = version_prefix(obj.key)
        if found is None:
            continue
        prefix, kind = found
        d = dirs.setdefault(prefix, {"kind": kind, "objects": 0, "bytes": 0, "modified": 0.0})
        d["objects"] += 1
        d["bytes"] += obj.size
        d["modified"] = max(d["modified"], obj.modified)
    if not referenced and any(d["kind"] != "staging" for d in dirs.values()):
        raise ConflictError(
            f"the registry has no adapter versions, yet {store.uri} holds some: is this the registry "
            "of this store (registry.url / $FLEET_DB_URL)? Nothing was removed"
        )
    out = []
    for prefix, d in sorted(dirs.items()):
        age = now - d["modified"]
        if prefix in referenced or age < grace_s:
            continue
        out.append(Garbage(prefix, store.uri_of(prefix), d["kind"], d["objects"], d["bytes"], round(age, 1)))
    return out


def _keys_in(store: AdapterStore, uris: Iterable[str]) -> set[str]:
    keys = set()
    for uri in uris:
        try:
            keys.add(store.key_of(uri))
        except FleetError:
            raise ConflictError(
                f"the registry has a version at {uri}, outside the adapter store {store.uri}: this is "
                "not the store of this registry (check store.uri / $FLEET_STORE_URI); nothing was removed"
            ) from None
    return keys


def remove(store: AdapterStore, garbage: Sequence[Garbage]) -> int:
    """Delete the listed directories; returns the bytes freed."""
    for g in garbage:
        store._delete_dir(g.prefix)
    return sum(g.bytes for g in garbage)
