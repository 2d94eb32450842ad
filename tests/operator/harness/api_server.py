"""The emulated Kubernetes API server: kmock's `KubernetesEmulator`, which stores objects and
streams watches, plus what a real API server does and the operator relies on.

One concern per layer, each a subclass of the one before: discovery and CR validation against
the CRD schema (discovery.py), object metadata, label selectors and ownerReference garbage
collection (objects.py), merge/JSON patches, server-side apply and status-subresource semantics
(apply.py). `ApiServer` routes each request through them.
"""

from __future__ import annotations

from typing import Any

import attrs
import kmock
from kmock._internal import enums, k8s

from .apply import Patches


@attrs.define(kw_only=True)
class ApiServer(Patches):
    """Every request through the layers: creates are stamped (201), patches rewritten, and
    garbage is collected after each create and delete.

    `unavailable` lists object paths whose writes fail with a 503, as when etcd or an
    admission webhook is down: a test's way to make the operator's pass fail and retry.
    """

    unavailable: set[str] = attrs.field(factory=set)

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is None:
            return await super()._handle(request)
        if not any(request.resource.check(served) for served in self._get_resources()):
            # Like a real API server: a kind whose API (CRD) is not installed is a 404,
            # whatever the verb; kmock alone would store the object anyway.
            return await self._render_error(k8s.KubernetesResourceNotFoundError())
        if request.method != "GET" and request.url.path in self.unavailable:
            down = k8s.KubernetesError(status=503, reason="ServiceUnavailable", message="etcd")
            return await self._render_error(down)
        original = request
        try:
            if request.action == enums.action.CREATE:
                request = self._on_create(request, dict(request.data or {}))
            elif request.method == "PATCH" and request.name is not None:
                request = self._on_patch(request)
        except k8s.KubernetesError as exc:
            return await self._render_error(exc)
        if request is not original:  # kmock's views find requests by identity in its log
            index = next(i for i, r in enumerate(self._requests) if r is original)
            self._requests[index] = request
        response = await super()._handle(request)
        if request.action == enums.action.CREATE:
            response.set_status(201)
        if request.action in (enums.action.CREATE, enums.action.DELETE):
            # Like the real garbage collector: children of a gone owner go too, including
            # ones created late with an ownerReference to an owner that no longer exists.
            await self._collect_garbage()
        return response
