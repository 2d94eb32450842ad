"""Objects as a real API server keeps them: what it stamps on create, how it lists them, and
how ownerReferences take children away with their owner.

On create: the namespace from the URL, a name from `generateName`, uid, creationTimestamp,
resourceVersion and generation 1. Lists honour equality label selectors. Deleting an owner
deletes its children, as the garbage collector would.
"""

from __future__ import annotations

import datetime
import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import attrs
import kmock
from kmock._internal import enums

from .discovery import Discovery


@attrs.define(kw_only=True)
class ObjectStore(Discovery):
    """Create, list and garbage collection with a real API server's metadata."""

    _versions: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)

    async def _serve_list(self, request: kmock.Request) -> Any:
        """kmock's list, narrowed by an equality-based `labelSelector` (a=b,c=d)."""
        listing = await super()._serve_list(request)
        selector = request.params.get("labelSelector")
        if selector:
            wanted = dict(term.split("=", 1) for term in selector.split(","))
            listing["items"] = [
                item
                for item in listing["items"]
                if wanted.items() <= (item.get("metadata", {}).get("labels") or {}).items()
            ]
        return listing

    def _find(self, request: kmock.Request, name: str | None) -> Any:
        for key in self.objects:
            res, ns, obj_name = key
            if res == request.resource and ns == request.namespace and obj_name == name:
                return key if not self.objects[key].deleted else None
        return None

    def _stamp(self, obj: dict[str, Any], request: kmock.Request) -> dict[str, Any]:
        meta = obj.setdefault("metadata", {})
        if request.namespace:
            meta["namespace"] = request.namespace
        if "name" not in meta and "generateName" in meta:
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
        meta["resourceVersion"] = str(next(self._versions))
        meta["generation"] = 1
        return obj

    def _on_create(self, request: kmock.Request, obj: dict[str, Any]) -> kmock.Request:
        obj = self._stamp(self._admit(request, obj), request)
        if obj.get("kind") == "CustomResourceDefinition":
            self._register_crd(obj)
        return attrs.evolve(request, action=enums.action.CREATE, data=obj)

    async def _collect_garbage(self) -> None:
        while True:
            live = {self.objects[k].get("metadata", {}).get("uid") for k in self.objects}
            for key in list(self.objects):
                obj = self.objects[key]
                owners = [r["uid"] for r in obj.get("metadata", {}).get("ownerReferences", [])]
                if not obj.deleted and owners and not any(uid in live for uid in owners):
                    raw = obj.raw
                    obj.delete()
                    await self._buses[key[0]].put({"type": "DELETED", "object": raw})
                    break
            else:
                return


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
