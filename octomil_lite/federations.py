"""Federations, minimal: one registry is one organisation, so a federation is a named group of its models.

Invitations, members and cross-organisation analytics need the hosted platform and answer 501.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from . import storage
from .errors import NotFound
from .schemas import CreateFederation, Federation
from .storage import MetadataStore, Row

HOSTED_ONLY = ("{what} needs the hosted Octomil platform: octomil-lite is one organisation's registry, with "
               "no other organisations to invite, join or analyse across.")


def _federation(row: Row) -> Federation:
    return Federation(id=row["id"], name=row["name"], description=row["description"], org_id=row["org_id"],
                      created_at=row["created_at"])


class Federations:
    def __init__(self, db: MetadataStore, now: Callable[[], str]):
        self.db = db
        self.now = now

    async def row(self, ref: str) -> Row:
        """A federation by id or name."""
        row = await self.db.get_federation(ref) if len(ref) <= 200 else None
        row = row or (await self.db.get_federation(name=ref) if len(ref) <= 200 else None)
        if row is None:
            raise NotFound(f"No federation with id or name '{ref[:100]}'.")
        return row

    async def list(self, name: str | None) -> list[Federation]:
        # org_id is recorded but not a filter: every federation here belongs to this registry's one organisation.
        return [_federation(r) for r in await self.db.list_federations(name)]

    async def create(self, req: CreateFederation) -> tuple[Federation, bool]:
        """Create a federation; one of the same name is returned instead (created False)."""
        if existing := await self.db.get_federation(name=req.name):
            return _federation(existing), False
        row = {"id": str(uuid.uuid4()), "name": req.name, "description": req.description, "org_id": req.org_id,
               "created_at": self.now()}
        try:
            await self.db.insert_federation(row)
        except storage.Conflict:  # created at the same moment by another request
            existing = await self.db.get_federation(name=req.name)
            assert existing is not None
            return _federation(existing), False
        return _federation(row), True

    async def get(self, ref: str) -> Federation:
        return _federation(await self.row(ref))

    async def attach(self, ref: str, model: Row) -> bool:
        federation = await self.row(ref)
        return await self.db.attach_model(federation["seq"], model["seq"], self.now())

    async def models(self, ref: str) -> list[Row]:
        federation = await self.row(ref)
        return await self.db.federation_models(federation["seq"])
