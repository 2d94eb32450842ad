"""Runtime pods: Pod objects in the emulator whose IP:port is a small real HTTP server."""

from __future__ import annotations

import asyncio
import copy
import threading
from pathlib import Path
from typing import Any

import aiohttp.web

from .cluster import Cluster


class FakeRuntime:
    """One runtime pod's adapter API on 127.0.0.1, every call recorded. It answers as
    runtime/server does (statuses, error bodies, messages; test_runtime_contract.py compares
    the two call by call): a missing adapter is a 404, a name already loaded a 400.

    `root` is the pod's filesystem: a `lora_path` loads when `root/<path>/adapter_config.json`
    exists. A restarted runtime is a new FakeRuntime on the same port, with nothing loaded.
    """

    def __init__(self, root: Path, api_key: str | None, base: str, port: int = 0) -> None:
        self.root, self.api_key, self.base, self.port = root, api_key, base, port
        self.loaded: dict[str, str] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []  # (path, JSON body)
        self.unauthorized = 0
        self._runner: aiohttp.web.AppRunner | None = None

    def calls_to(self, endpoint: str) -> list[dict[str, Any]]:
        return [body for path, body in self.calls if path == endpoint]

    async def start(self) -> None:
        app = aiohttp.web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/load_lora_adapter", self._load)
        app.router.add_post("/v1/unload_lora_adapter", self._unload)
        self._runner = aiohttp.web.AppRunner(app)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _denied(self, request: aiohttp.web.Request) -> aiohttp.web.Response | None:
        if self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}":
            return None
        self.unauthorized += 1
        if "Authorization" not in request.headers:
            return _error(401, "Missing API key: send the header 'Authorization: Bearer <key>'.")
        return _error(401, "Incorrect API key provided.")

    async def _models(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        if denied := self._denied(request):
            return denied
        self.calls.append(("/v1/models", {}))
        data = [{"id": self.base, "object": "model", "parent": None, "root": "/models/base"}]
        data += [
            {"id": name, "object": "model", "parent": self.base, "root": path}
            for name, path in self.loaded.items()
        ]
        return aiohttp.web.json_response({"object": "list", "data": data})

    async def _load(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        if denied := self._denied(request):
            return denied
        body = await request.json()
        self.calls.append(("/v1/load_lora_adapter", body))
        name, path = body["lora_name"], body["lora_path"]
        if name in self.loaded:
            message = f"The lora adapter '{name}' has already been loaded."
            return _error(400, message, kind="InvalidUserInput")
        folder = self.root / path.lstrip("/")
        if not folder.is_dir():
            return _error(
                404, f"Loading lora {name} failed: No adapter found for {path}: not a folder."
            )
        if not (folder / "adapter_config.json").is_file():
            missing = f"No adapter found for {path}: it has no adapter_config.json."
            return _error(404, f"Loading lora {name} failed: {missing}")
        self.loaded[name] = path
        return aiohttp.web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        if denied := self._denied(request):
            return denied
        body = await request.json()
        self.calls.append(("/v1/unload_lora_adapter", body))
        name = body["lora_name"]
        if self.loaded.pop(name, None) is None:
            return _error(404, f"The lora adapter '{name}' cannot be found.")
        return aiohttp.web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")


def _error(status: int, message: str, kind: str | None = None) -> aiohttp.web.Response:
    """runtime/server/errors.py's OpenAI-shaped error body."""
    kind = kind or {401: "AuthenticationError", 404: "NotFoundError"}[status]
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return aiohttp.web.json_response(body, status=status, headers=headers)


class RuntimePods:
    """Runtime pods of one Deployment: Pod objects (from its live template) in the emulator,
    running and ready at 127.0.0.1 on the port of their own FakeRuntime."""

    def __init__(self, cluster: Cluster | None, root: Path) -> None:
        self._cluster, self.root = cluster, root
        self.runtimes: dict[str, FakeRuntime] = {}
        self._restarts: dict[str, int] = {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def write_adapter(self, path: str) -> None:
        """An adapter folder (its config file is what the fake runtime checks) at `path` on
        the pods' filesystem: baked into the image, or written to the cache by a Job."""
        folder = self.root / path.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    @property
    def cluster(self) -> Cluster:
        if self._cluster is None:
            raise RuntimeError("runtime_servers has no cluster: use runtime_pods")
        return self._cluster

    def serve(self, *, api_key: str | None = None, base: str = "base") -> FakeRuntime:
        """A runtime server alone (no Pod object), stopped with the fixture."""
        runtime = FakeRuntime(self.root, api_key, base)
        self._run(runtime.start())
        self.runtimes[f"server-{len(self.runtimes)}"] = runtime
        return runtime

    def start(
        self, deployment: str, name: str, *, api_key: str | None = None, base: str = "base"
    ) -> FakeRuntime:
        """Start a runtime, then create its Pod and report it ready (as kubelet would)."""
        runtime = FakeRuntime(self.root, api_key, base)
        self._run(runtime.start())
        self.runtimes[name] = runtime
        dep = self.cluster.get(deployment)
        assert dep is not None, deployment
        template = dep["spec"]["template"]
        spec = copy.deepcopy(template["spec"])
        spec["containers"][0]["ports"][0]["containerPort"] = runtime.port
        meta = {"name": name, **{k: template["metadata"][k] for k in ("labels", "annotations")}}
        namespace = dep["metadata"]["namespace"]
        self.cluster.post(
            f"/api/v1/namespaces/{namespace}/pods",
            {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec},
        )
        self._restarts[name] = 0
        self.set_ready(namespace, name, True)
        return runtime

    def set_ready(self, namespace: str, name: str, ready: bool) -> None:
        container = {"name": "runtime", "ready": ready, "restartCount": self._restarts[name]}
        status = {"phase": "Running", "podIP": "127.0.0.1", "containerStatuses": [container]}
        path = f"/api/v1/namespaces/{namespace}/pods/{name}/status"
        assert self.cluster.patch(path, {"status": status}).status_code == 200

    def restart(self, namespace: str, name: str) -> FakeRuntime:
        """The runtime container restarts: not ready, a fresh empty runtime, ready again."""
        old = self.runtimes[name]
        self._restarts[name] += 1
        self.set_ready(namespace, name, False)
        self._run(old.stop())
        fresh = FakeRuntime(self.root, old.api_key, old.base, port=old.port)
        self._run(fresh.start())
        self.runtimes[name] = fresh
        self.set_ready(namespace, name, True)
        return fresh

    def close(self) -> None:
        for runtime in self.runtimes.values():
            self._run(runtime.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
