"""API keys: made, listed, revoked and checked; stored only as hashes."""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from . import auth, storage
from .errors import BadRequest, Conflict, NotFound

if TYPE_CHECKING:
    from .storage import MetadataStore, Row

_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class KeyInfo:
    name: str
    scope: str


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiKeys:
    """The Registry's key operations (a mixin: it needs only the metadata store)."""

    db: MetadataStore

    async def create_key(self, name: str, scope: str) -> str:
        if not _KEY_NAME.fullmatch(name):
            raise BadRequest("A key name is 1-64 characters: letters, digits, '.', '_' or '-'.")
        if scope not in auth.SCOPES:
            raise BadRequest(f"A key's scope is one of {', '.join(auth.SCOPES)}.")
        key = auth.new_key()
        try:
            await self.db.insert_key({"name": name, "key_hash": auth.hash_key(key), "prefix": key[:8],
                                      "scope": scope, "created_at": utc_now()})
        except storage.Conflict:
            raise Conflict(f"An active key named '{name}' already exists; revoke it or pick another name.") from None
        return key

    async def list_keys(self) -> list[Row]:
        return await self.db.list_keys()

    async def revoke_key(self, name: str) -> None:
        if not await self.db.revoke_key(name, utc_now()):
            raise NotFound(f"No active key named '{name}'.")

    async def first_admin_key(self) -> str | None:
        """On a registry with no active key, make one admin key (returned once); otherwise None."""
        if await self.db.count_active_keys() > 0:
            return None
        try:
            return await self.create_key("admin", "admin")
        except Conflict:  # another server on the same database made it at the same moment
            return None

    async def authenticate(self, key: str) -> KeyInfo | None:
        if not key.startswith(auth.KEY_PREFIX) or len(key) > 128:
            return None
        digest = auth.hash_key(key)
        row = await self.db.find_key(digest)
        if row is None or not hmac.compare_digest(row["key_hash"], digest):
            return None
        return KeyInfo(row["name"], row["scope"])
