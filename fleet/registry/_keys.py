"""API keys: scoped to a company, stored as sha256 only.

A key is ``fleet_<prefix>_<secret>``; the prefix finds the row, the digest of the whole
key is compared in constant time. Keys carry 256 bits of randomness, so a fast hash is
enough: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

from sqlalchemy import select, update

from fleet.errors import AuthError, NotFoundError, ValidationError
from fleet.registry._core import RegistryCore
from fleet.registry.schema import ApiKey, Tenant
from fleet.types import Level, level_of, validate_id

KEYS = ApiKey.__table__
TENANTS = Tenant.__table__


# What create_key makes: 12 hex digits of prefix, 43 URL-safe characters of secret (32 bytes).
KEY_PATTERN = re.compile(r"fleet_([0-9a-f]{12})_[A-Za-z0-9_-]{43}")


def well_formed_key(key: str | None) -> bool:
    """Whether ``key`` has the shape of a fleet key (checked before any database lookup)."""
    return bool(key) and KEY_PATTERN.fullmatch(key) is not None


def key_prefix(key: str) -> str:
    """The lookup prefix of a well-formed key."""
    return key.split("_", 2)[1]


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeysMixin(RegistryCore):
    def create_key(self, company_id: str, *, name: str | None = None) -> str:
        """Create a key for a company; the plaintext is returned once and never stored."""
        validate_id(company_id)
        if level_of(company_id) is not Level.COMPANY:
            raise ValidationError(
                f"API keys belong to companies; {company_id!r} is a {level_of(company_id).value}"
            )
        prefix = secrets.token_hex(6)
        key = f"fleet_{prefix}_{secrets.token_urlsafe(32)}"
        with self.tx() as conn:
            if conn.execute(select(TENANTS.c.id).where(TENANTS.c.id == company_id)).first() is None:
                raise NotFoundError(
                    f"unknown company {company_id!r}; create it with `fleet tenants add {company_id}`"
                )
            conn.execute(
                KEYS.insert().values(
                    company_id=company_id,
                    prefix=prefix,
                    key_sha256=_digest(key),
                    name=name,
                    created_at=self.now(),
                )
            )
        return key

    def authenticate(self, key: str | None) -> str:
        """The company a key belongs to; AuthError for a missing, malformed, unknown or revoked key."""
        if not key:
            raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
        # ``reason`` (not shown to callers) lets the serving layer cache refusals by prefix or key.
        if not well_formed_key(key):
            raise AuthError("invalid API key", reason="malformed")
        with self.read() as conn:
            row = conn.execute(select(KEYS).where(KEYS.c.prefix == key_prefix(key))).first()
        if row is None:
            raise AuthError("invalid API key", reason="unknown_prefix")
        if row.revoked_at is not None or not hmac.compare_digest(row.key_sha256, _digest(key)):
            raise AuthError("invalid API key", reason="refused")
        return row.company_id

    def revoke_key(self, prefix: str) -> None:
        with self.tx() as conn:
            res = conn.execute(update(KEYS).where(KEYS.c.prefix == prefix).values(revoked_at=self.now()))
            if res.rowcount == 0:
                raise NotFoundError(f"no API key with prefix {prefix!r}")

    def list_keys(self, company_id: str | None = None) -> list[dict]:
        stmt = select(KEYS.c.prefix, KEYS.c.company_id, KEYS.c.name, KEYS.c.created_at, KEYS.c.revoked_at)
        if company_id:
            stmt = stmt.where(KEYS.c.company_id == validate_id(company_id))
        with self.read() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt.order_by(KEYS.c.created_at))]
