"""The local adapter store (``file://``): a directory tree, atomic renames, fsync."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

from fleet.errors import NotFoundError, ValidationError
from fleet.store._base import AdapterStore, StoredObject


class LocalStore(AdapterStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = self.root.as_uri()

    def uri_of(self, key: str) -> str:
        return (self.root / key).as_uri()

    def key_of(self, uri: str) -> str:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise ValidationError(f"{uri!r} is not a file:// URI of the local store at {self.root}")
        path = Path(unquote(parsed.path)).resolve()
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            raise ValidationError(f"{uri!r} lies outside the adapter store {self.root}") from None

    def _path(self, key: str) -> Path:
        return self.root / key

    @staticmethod
    def _write_file(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _write_many(self, prefix: str, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            self._write_file(self._path(prefix) / name, data)

    def _write_many_flat(self, objects: dict[str, bytes]) -> None:
        for key, data in objects.items():
            self._write_file(self._path(key), data)

    def _read_many(self, prefix: str, names: tuple[str, ...]) -> dict[str, bytes]:
        return {n: self._read_flat(f"{prefix}/{n}") for n in names}

    def _read_flat(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"object {self.uri_of(key)} does not exist in the adapter store") from None

    def _exists(self, key: str) -> bool:
        return self._path(key).exists()

    def _move_dir(self, src: str, dst: str) -> None:
        s, d = self._path(src), self._path(dst)
        if not s.is_dir():
            raise NotFoundError(
                f"staged object {self.uri_of(src)} does not exist (already published or discarded)"
            )
        d.parent.mkdir(parents=True, exist_ok=True)
        if d.exists():  # left behind by a publication whose transaction rolled back
            shutil.rmtree(d)
        os.rename(s, d)
        os.utime(d)  # when it became this version (what garbage collection's grace period counts from)
        fd = os.open(d.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _delete_dir(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def _list_objects(self) -> list[StoredObject]:
        out = []
        for dirpath, _dirs, files in os.walk(self.root):
            moved = os.stat(dirpath).st_mtime  # a commit renames the directory and touches it
            for name in files:
                st = os.stat(os.path.join(dirpath, name))
                key = os.path.relpath(os.path.join(dirpath, name), self.root)
                out.append(StoredObject(key, st.st_size, max(st.st_mtime, moved)))
        return out
