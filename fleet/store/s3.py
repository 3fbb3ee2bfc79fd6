"""The S3 adapter store (``s3://bucket/prefix``) through boto3.

Any S3-compatible endpoint works (``store.endpoint_url``). Requests retry with exponential
backoff (botocore's standard mode); large objects go up in parts; an endpoint that stays
unreachable raises UnavailableError naming it.
"""

from __future__ import annotations

import io
from urllib.parse import urlparse

from fleet.config import StoreConfig
from fleet.errors import NotFoundError, UnavailableError, ValidationError
from fleet.store._base import AdapterStore, StoredObject


class S3Store(AdapterStore):
    def __init__(self, uri: str, cfg: StoreConfig | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        cfg = cfg or StoreConfig()
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValidationError(f"store URI {uri!r} must look like s3://bucket/prefix")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint = cfg.endpoint_url or "AWS S3"
        self.client = boto3.client(
            "s3",
            endpoint_url=cfg.endpoint_url,
            region_name=cfg.region,
            config=Config(
                retries={"max_attempts": cfg.max_attempts, "mode": "standard"},
                connect_timeout=cfg.connect_timeout_s,
                read_timeout=max(10.0, cfg.connect_timeout_s * 4),
                s3={"addressing_style": "path"} if cfg.endpoint_url else None,
            ),
        )
        mb = 1024 * 1024
        self.transfer = TransferConfig(
            multipart_threshold=cfg.multipart_threshold_mb * mb,
            multipart_chunksize=cfg.multipart_chunk_mb * mb,
        )

    # -- URIs ------------------------------------------------------------------------------
    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_of(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full(key)}"

    def key_of(self, uri: str) -> str:
        root = f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}"
        if not uri.startswith(root):
            raise ValidationError(f"{uri!r} lies outside the adapter store {self.uri}")
        return uri[len(root) :]

    # -- error mapping ---------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        from botocore.exceptions import ClientError, ConnectionError, EndpointConnectionError

        try:
            return fn(*args, **kwargs)
        except (EndpointConnectionError, ConnectionError) as exc:
            raise UnavailableError(
                f"adapter store {self.uri} at {self.endpoint} is unreachable ({what}): {exc}"
            ) from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFoundError(f"object {what} does not exist in the adapter store {self.uri}") from None
            if code == "NoSuchBucket":
                raise UnavailableError(f"bucket {self.bucket!r} does not exist at {self.endpoint}") from None
            raise UnavailableError(
                f"adapter store {self.uri} at {self.endpoint} failed ({what}): {exc}"
            ) from None

    # -- primitives --------------------------------------------------------------------------
    def _put(self, key: str, data: bytes) -> None:
        full = self._full(key)
        self._call(
            self.uri_of(key),
            self.client.upload_fileobj,
            io.BytesIO(data),
            self.bucket,
            full,
            Config=self.transfer,
        )

    def _write_many(self, prefix: str, files: dict[str, bytes]) -> None:
        for name, data in files.items():
            self._put(f"{prefix}/{name}", data)

    def _write_many_flat(self, objects: dict[str, bytes]) -> None:
        for key, data in objects.items():
            self._put(key, data)

    def _read_flat(self, key: str) -> bytes:
        buf = io.BytesIO()
        self._call(
            self.uri_of(key),
            self.client.download_fileobj,
            self.bucket,
            self._full(key),
            buf,
            Config=self.transfer,
        )
        return buf.getvalue()

    def _read_many(self, prefix: str, names: tuple[str, ...]) -> dict[str, bytes]:
        return {n: self._read_flat(f"{prefix}/{n}") for n in names}

    def _exists(self, key: str) -> bool:
        try:
            self._call(self.uri_of(key), self.client.head_object, Bucket=self.bucket, Key=self._full(key))
            return True
        except NotFoundError:
            return False

    def _list(self, prefix: str) -> list[str]:
        return [o["Key"] for o in self._pages(self._full(prefix) + "/")]

    def _pages(self, full_prefix: str) -> list[dict]:
        objects: list[dict] = []
        token = None
        while True:
            kw = {"Bucket": self.bucket, "Prefix": full_prefix}
            if token:
                kw["ContinuationToken"] = token
            page = self._call(f"s3://{self.bucket}/{full_prefix}", self.client.list_objects_v2, **kw)
            objects += page.get("Contents", [])
            if not page.get("IsTruncated"):
                return objects
            token = page["NextContinuationToken"]

    def _list_objects(self) -> list[StoredObject]:
        root = f"{self.prefix}/" if self.prefix else ""
        return [
            StoredObject(o["Key"][len(root) :], int(o["Size"]), o["LastModified"].timestamp())
            for o in self._pages(root)
        ]

    def _move_dir(self, src: str, dst: str) -> None:
        # S3 has no rename: copy each object to its final key, then drop the staging copy.
        objects = self._list(src)
        if not objects:
            raise NotFoundError(
                f"staged object {self.uri_of(src)} does not exist (already published or discarded)"
            )
        src_full = self._full(src)
        for key in objects:
            rel = key[len(src_full) + 1 :]
            self._call(
                self.uri_of(f"{dst}/{rel}"),
                self.client.copy,
                {"Bucket": self.bucket, "Key": key},
                self.bucket,
                self._full(f"{dst}/{rel}"),
                Config=self.transfer,
            )
        self._delete_keys(objects)

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self._call("delete", self.client.delete_objects, Bucket=self.bucket, Delete={"Objects": batch})

    def _delete_dir(self, prefix: str) -> None:
        keys = self._list(prefix)
        if keys:
            self._delete_keys(keys)
