"""Fixtures: a Kubernetes API emulator (kmock on 127.0.0.1) and the real kopf operator.

kmock's `KubernetesEmulator` stores objects and streams watches; `ApiServer` adds what a
real API server does and the operator relies on: namespace from the URL, uid,
resourceVersion, generation (bumped on spec changes only), creationTimestamp, 201 on
create, CRD registration into discovery, CR validation against the CRD schema (422),
status-subresource semantics, server-side apply (create-if-absent, fields the manager
dropped are removed), equality label selectors on lists, and ownerReference garbage
collection on delete.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import itertools
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import httpx
import jsonpatch
import jsonschema
import kmock
import kopf
import kubernetes
import pytest
import yaml
from kmock._internal import enums, k8s

from pinnace.operator.client import HttpKubeClient
from pinnace.operator.handlers import build_registry

REPO = Path(__file__).resolve().parents[2]
CRD_PATH = REPO / "crds" / "pinnace.dev_llmdeployments.yaml"
# KServe's own CRDs (shared test data, never copied into the repo); tests skip without them.
KSERVE_CRD_DIR = REPO.parent / "shared" / "data" / "kserve-v0.20.0" / "crd"
# No KEDA CRD is available offline: a hand-written schema of the ScaledObject fields we use.
KEDA_CRD_PATH = Path(__file__).parent / "data" / "keda" / "scaledobjects.keda.sh.yaml"
TEST_AGENT = "pinnace-tests"
BUILTINS = {
    "apps/v1/deployments": dict(kind="Deployment", namespaced=True, subresources={"status"}),
    "v1/services": dict(kind="Service", namespaced=True, subresources={"status"}),
    "v1/persistentvolumeclaims": dict(kind="PersistentVolumeClaim", namespaced=True),
    "v1/pods": dict(kind="Pod", namespaced=True, subresources={"status"}),
    "v1/secrets": dict(kind="Secret", namespaced=True),
    "batch/v1/jobs": dict(kind="Job", namespaced=True, subresources={"status"}),
    "v1/events": dict(kind="Event", namespaced=True),
    "autoscaling/v2/horizontalpodautoscalers": dict(
        kind="HorizontalPodAutoscaler", namespaced=True, subresources={"status"}
    ),
    # Discovery only: kopf waits to see it exists (it never lists it with scanning disabled).
    "v1/namespaces": dict(kind="Namespace", namespaced=False),
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(
        kind="CustomResourceDefinition", namespaced=False
    ),
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


def merge(old: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(old) if isinstance(old, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


def dropped(old_applied: Any, new_applied: Any) -> Any:
    """Nulls for fields a field manager applied before and no longer applies (SSA)."""
    if not isinstance(old_applied, dict) or not isinstance(new_applied, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in old_applied.items():
        if key not in new_applied:
            out[key] = None
        else:
            sub = dropped(value, new_applied[key])
            if sub:
                out[key] = sub
    return out


@attrs.define(kw_only=True)
class ApiServer(k8s.KubernetesEmulator):
    _versions: Iterator[int] = attrs.field(factory=lambda: itertools.count(1), init=False)
    _schemas: dict[Any, dict[str, Any]] = attrs.field(factory=dict, init=False)
    _applied: dict[Any, dict[str, Any]] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for key, info in BUILTINS.items():
            self.resources[key] = kmock.ResourceInfo(verbs=VERBS, **info)

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

    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is None:
            return await super()._handle(request)
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
        self._validate(request, obj)
        obj = self._stamp(obj, request)
        if obj.get("kind") == "CustomResourceDefinition":
            self._register_crd(obj)
        return attrs.evolve(request, action=enums.action.CREATE, data=obj)

    def _on_patch(self, request: kmock.Request) -> kmock.Request:
        key = self._find(request, request.name)
        content_type = _header(request, "Content-Type")
        is_apply = "apply-patch" in content_type
        old = self.objects[key].raw if key is not None else {}
        if "json-patch" in content_type:  # RFC 6902 (kopf uses it for finalizers)
            try:
                patch = _diff(old, jsonpatch.apply_patch(old, request.data))
            except jsonpatch.JsonPatchConflict as exc:  # a failed "test" op
                raise k8s.KubernetesError(status=409, reason="Conflict", message=str(exc)) from exc
        else:
            patch = dict(request.data or {})
        if key is None:
            if not is_apply:
                raise k8s.KubernetesObjectNotFoundError()
            self._applied[(request.resource, request.namespace, request.name)] = patch
            create = attrs.evolve(request, name=None, subresource=None)
            return self._on_create(create, copy.deepcopy(patch))
        if is_apply:  # server-side apply: drop what this manager no longer applies
            patch = merge(dropped(self._applied.get(key), patch), patch)
            self._applied[key] = dict(request.data)
        has_status = "status" in self.resources[request.resource].subresources
        if request.subresource == "status":
            patch = {"status": patch.get("status")} if "status" in patch else {}
        elif has_status:
            patch.pop("status", None)  # the main resource ignores status changes
        new = merge(old, patch)
        new.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
        if new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        self._validate(request, new)
        # kmock merges the request data into the stored object: send the full difference.
        return attrs.evolve(request, action=enums.action.UPDATE, data=_diff(old, new))

    def _register_crd(self, crd: dict[str, Any]) -> None:
        spec = crd["spec"]
        for version in spec["versions"]:
            key = f"{spec['group']}/{version['name']}/{spec['names']['plural']}"
            self.resources[key] = kmock.ResourceInfo(
                kind=spec["names"]["kind"],
                singular=spec["names"]["singular"],
                shortnames=set(spec["names"].get("shortNames", [])),
                namespaced=spec["scope"] == "Namespaced",
                subresources=set(version.get("subresources", {})),
                verbs=VERBS,
            )
            self._schemas[kmock.resource(key)] = version["schema"]["openAPIV3Schema"]

    def _validate(self, request: kmock.Request, obj: dict[str, Any]) -> None:
        schema = self._schemas.get(request.resource)
        if schema is None:
            return
        errors = sorted(jsonschema.Draft4Validator(schema).iter_errors(obj), key=str)
        if errors:
            path = ".".join(str(p) for p in errors[0].absolute_path)
            message = f"{path}: {errors[0].message}"
            raise k8s.KubernetesError(status=422, reason="Invalid", message=message)

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


def _diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {k: None for k in old if k not in new}
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(old.get(key), dict):
            out[key] = _diff(old[key], value)
        elif old.get(key) != value:
            out[key] = value
    return out


def _header(request: kmock.Request, name: str) -> str:
    return next((v for k, v in request.headers.items() if k.lower() == name.lower()), "")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Cluster:
    """The emulator served on 127.0.0.1 from a background event loop, plus a test client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._serve(),))
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("kmock server did not start")
        self.http = httpx.Client(base_url=self.url, headers={"User-Agent": TEST_AGENT}, timeout=10)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with ApiServer() as api, kmock.Server(api) as server:
            self.api, self.url = api, str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        self.http.close()
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    # -- kubectl-like helpers (they go through HTTP like any client) --

    def apply_crd(self, crd: dict[str, Any] | None = None) -> None:
        crd = crd if crd is not None else yaml.safe_load(CRD_PATH.read_text())
        self.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)

    def post(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post(path, json=obj)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def patch(self, path: str, patch: dict[str, Any]) -> httpx.Response:
        headers = {"Content-Type": "application/merge-patch+json"}
        return self.http.patch(path, json=patch, headers=headers)

    def get(self, path: str) -> dict[str, Any] | None:
        response = self.http.get(path)
        return None if response.status_code == 404 else dict(response.json())

    def requests(self) -> list[kmock.Request]:
        return list(self.api)

    def writes(self, *, since: int = 0) -> list[str]:
        """Mutating requests by anyone but the test itself, as 'METHOD path'."""
        return [
            f"{r.method} {r.url.path}"
            for r in self.requests()[since:]
            if r.method in ("POST", "PUT", "PATCH", "DELETE")
            and _header(r, "User-Agent") != TEST_AGENT
        ]

    def events(self, reason: str) -> list[dict[str, Any]]:
        """The Events anyone has posted with this reason so far, oldest first."""
        return [
            r.data
            for r in self.requests()
            if r.method == "POST"
            and r.url.path.endswith("/events")
            and r.data.get("reason") == reason
        ]

    # -- waiting on the operator: it acts in its own thread, so tests poll what it did --

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 15.0) -> Any:
        """Poll until `predicate()` is truthy and return that value (the awaited object)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {predicate}")

    def settle(self, quiet: float = 0.8) -> None:
        """Wait until nobody has made a request for `quiet` seconds: the operator is idle,
        so a later "no write happened" check is not just early."""
        last, since = len(self.requests()), time.monotonic()
        while time.monotonic() - since < quiet:
            time.sleep(0.05)
            now = len(self.requests())
            if now != last:
                last, since = now, time.monotonic()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    try:
        yield c
    finally:
        c.close()


class Operator:
    """The real kopf operator (our registry) in a thread, talking HTTP to the emulator."""

    def __init__(self, url: str, namespaces: list[str]) -> None:
        registry = build_registry(login=False)

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url, insecure=True)

        @kopf.on.startup(registry=registry)
        def no_scanning(settings: kopf.OperatorSettings, **_: Any) -> None:
            # kmock cannot parse /api/v1/namespaces (it reads "namespaces" as a namespace
            # segment), so kopf takes the namespaces as given instead of listing them.
            settings.scanning.disabled = True

        config = kubernetes.client.Configuration(host=url)
        self.memo = kopf.Memo(client=HttpKubeClient(kubernetes.client.ApiClient(config)))
        self.stop_flag, self.ready_flag = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        kwargs = dict(
            registry=registry,
            namespaces=namespaces,
            standalone=True,
            memo=self.memo,
            stop_flag=self.stop_flag,
            ready_flag=self.ready_flag,
        )
        self._thread = threading.Thread(target=self._run, args=(kwargs,), daemon=True)
        self._thread.start()
        if not self.ready_flag.wait(15):
            raise RuntimeError("operator did not start")

    def _run(self, kwargs: dict[str, Any]) -> None:
        try:
            asyncio.run(kopf.operator(**kwargs))
        except BaseException as exc:  # surfaced by `alive`
            self.error = exc

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def stop(self) -> None:
        self.stop_flag.set()
        self._thread.join(30)


@pytest.fixture
def start_operator(cluster: Cluster) -> Iterator[Any]:
    started: list[Operator] = []

    def start(namespaces: list[str] | None = None) -> Operator:
        op = Operator(cluster.url, namespaces or ["ml"])
        started.append(op)
        return op

    yield start
    for op in started:
        op.stop()


def load_crd(path: Path) -> dict[str, Any]:
    return dict(yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))


@pytest.fixture(scope="session")
def kserve_crds() -> dict[str, dict[str, Any]]:
    """KServe v0.20.0's InferenceService, ServingRuntime and ClusterServingRuntime CRDs."""
    if not KSERVE_CRD_DIR.is_dir():
        pytest.skip(f"KServe CRDs not found at {KSERVE_CRD_DIR}")
    crds = {}
    for plural in ("inferenceservices", "servingruntimes", "clusterservingruntimes"):
        crd = load_crd(KSERVE_CRD_DIR / f"full_serving.kserve.io_{plural}.yaml")
        crds[crd["spec"]["names"]["kind"]] = crd
    return crds


def _stand_in_crd(kind: str, plural: str, version: str) -> dict[str, Any]:
    free = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    schema = {"type": "object", "properties": {"spec": free, "status": free}}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.serving.kserve.io"},
        "spec": {
            "group": "serving.kserve.io",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                }
            ],
        },
    }


@pytest.fixture(scope="session")
def kserve_api_crds() -> list[dict[str, Any]]:
    """CRDs to register KServe's API in the emulator: KServe's own where present, else
    schema-less stand-ins (for tests about requests, not about KServe's schemas)."""
    if KSERVE_CRD_DIR.is_dir():
        return [
            load_crd(KSERVE_CRD_DIR / f"full_serving.kserve.io_{plural}.yaml")
            for plural in ("inferenceservices", "servingruntimes")
        ]
    return [
        _stand_in_crd("InferenceService", "inferenceservices", "v1beta1"),
        _stand_in_crd("ServingRuntime", "servingruntimes", "v1alpha1"),
    ]


@pytest.fixture(scope="session")
def keda_crd() -> dict[str, Any]:
    return load_crd(KEDA_CRD_PATH)


def pruned_fields(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Fields of `value` its structural schema does not declare: the API server would drop
    them silently, so a typo in a rendered custom resource shows up here instead."""
    if schema.get("x-kubernetes-preserve-unknown-fields") or path == "metadata":
        return []  # object metadata is validated by the API server's own rules
    out: list[str] = []
    if isinstance(value, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, sub in value.items():
            where = f"{path}.{key}".lstrip(".")
            if not path and key in ("apiVersion", "kind", "metadata"):
                continue  # kept on every object, declared or not
            if props is not None and key in props:
                out += pruned_fields(props[key], sub, where)
            elif isinstance(extra, dict):
                out += pruned_fields(extra, sub, where)
            else:
                out.append(where)
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += pruned_fields(schema["items"], item, f"{path}[{i}]")
    return out


def crd_schema_errors(crd: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """What the API server would say about `obj` given this CRD: schema errors, then fields
    it would prune (reported here as errors: we never mean to send a field that is lost)."""
    [version] = [v for v in crd["spec"]["versions"] if obj["apiVersion"].endswith(v["name"])]
    schema = version["schema"]["openAPIV3Schema"]
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in jsonschema.Draft4Validator(schema).iter_errors(obj)
    ]
    return errors + [f"{f}: unknown field" for f in pruned_fields(schema, obj)]


@pytest.fixture(scope="session")
def schema_errors() -> Any:
    """`schema_errors(crd, obj) -> list[str]`, empty when the API server would accept obj."""
    return crd_schema_errors


@pytest.fixture
def kube_client(cluster: Cluster) -> HttpKubeClient:
    """The operator's own client, pointed at the emulator."""
    config = kubernetes.client.Configuration(host=cluster.url)
    return HttpKubeClient(kubernetes.client.ApiClient(config))


@pytest.fixture
def create_llmd(cluster: Cluster) -> Any:
    """Create an LLMDeployment from examples/NAME.yaml (CRD applied first), return its path."""
    cluster.apply_crd()

    def create(name: str, *, namespace: str = "ml", **spec: Any) -> str:
        body = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
        body["metadata"]["namespace"] = namespace
        body["spec"].update(spec)
        base = f"/apis/pinnace.dev/v1alpha1/namespaces/{namespace}/llmdeployments"
        cluster.post(base, body)
        return f"{base}/{body['metadata']['name']}"

    return create


# -- Runtime pods: Pod objects in the emulator whose IP:port is a small real HTTP server --


class FakeRuntime:
    """One runtime pod's adapter API (vLLM's contract) on 127.0.0.1, every call recorded.

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
            return _error(400, f"The lora adapter '{name}' has already been loaded.")
        if not (self.root / path.lstrip("/") / "adapter_config.json").is_file():
            return _error(400, f"Loading lora {name} failed: No adapter found for {path}")
        self.loaded[name] = path
        return aiohttp.web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        if denied := self._denied(request):
            return denied
        body = await request.json()
        self.calls.append(("/v1/unload_lora_adapter", body))
        if self.loaded.pop(body["lora_name"], None) is None:
            return _error(404, f"The lora adapter '{body['lora_name']}' cannot be found.")
        return aiohttp.web.Response(text="Success")


def _error(status: int, message: str) -> aiohttp.web.Response:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}[status]
    body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return aiohttp.web.json_response(body, status=status)


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


@pytest.fixture
def runtime_pods(cluster: Cluster, tmp_path: Path) -> Iterator[RuntimePods]:
    pods = RuntimePods(cluster, tmp_path / "podfs")
    try:
        yield pods
    finally:
        pods.close()


@pytest.fixture
def runtime_servers(tmp_path: Path) -> Iterator[RuntimePods]:
    """Fake runtime HTTP servers without an API server (`serve()`), for client tests."""
    servers = RuntimePods(None, tmp_path / "podfs")
    try:
        yield servers
    finally:
        servers.close()
