"""Hot-load planning, backoff, pod selection and adapter status — without kopf or an API
server; the HTTP client against real fake-runtime servers on 127.0.0.1."""

from __future__ import annotations

from typing import Any

import pytest

from pinnace.operator.adapter_sync import (
    BACKOFF_MAX_SECONDS,
    AdapterSync,
    FailureLog,
    plan_pod,
    ready_pods,
)
from pinnace.operator.runtime_client import (
    HttpRuntimeClient,
    PodEndpoint,
    RuntimeCallError,
    pod_url,
)
from pinnace.operator.status import AdapterStatus, transition_events, with_adapters

SCOPE = ("ml", "chat")


@pytest.mark.parametrize(
    ("desired", "loaded", "unload", "load"),
    [
        ({"a": "/a"}, {}, (), (("a", "/a"),)),
        ({"a": "/a"}, {"a": "/a"}, (), ()),
        ({}, {"a": "/a", "b": None}, ("a", "b"), ()),  # undeclared: unloaded
        ({"a": "/a2"}, {"a": "/a"}, ("a",), (("a", "/a2"),)),  # new path: reloaded
        ({"a": "/a"}, {"a": None}, (), ()),  # path not reported: trusted
        ({"a": "/x/a"}, {"a": "/x//a/"}, (), ()),  # the same path, spelled differently
        ({"a": None}, {"a": "/old"}, (), ()),  # still fetching: left alone
        ({"a": None}, {}, (), ()),  # still fetching: nothing to load yet
    ],
)
def test_plan_pod(
    desired: dict[str, str | None],
    loaded: dict[str, str | None],
    unload: tuple[str, ...],
    load: tuple[tuple[str, str], ...],
) -> None:
    plan = plan_pod(desired, loaded)
    assert (plan.unload, plan.load) == (unload, load)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failure_backoff_doubles_up_to_a_cap_and_clears_on_success() -> None:
    clock = Clock()
    log = FailureLog(clock)
    key = ("ml", "chat", "uid-1", "a", "/a")
    assert log.blocked(key) is None
    waits = []
    for _ in range(8):
        log.record(key, "HTTP 400")
        failure = log.blocked(key)
        assert failure is not None and failure.message == "HTTP 400"
        waits.append(failure.retry_at - clock.now)
        clock.now = failure.retry_at  # the window is over: the next call may go out
        assert log.blocked(key) is None
    assert waits[:3] == [10.0, 20.0, 40.0] and waits[-1] == BACKOFF_MAX_SECONDS
    log.clear(key)
    log.record(key, "again")
    again = log.blocked(key)
    assert again is not None and again.retry_at == clock.now + 10.0  # back to the first wait
    log.forget_gone_pods("ml", "chat", {"another-pod"})
    assert log.blocked(key) is None


class FakeRuntime:
    """An in-process RuntimeClient: per-pod loaded adapters, scripted failures."""

    def __init__(self, loaded: dict[str, dict[str, str | None]]) -> None:
        self.loaded = loaded
        self.calls: list[tuple[str, str, str]] = []
        self.bad_paths: set[str] = set()
        self.down: set[str] = set()
        self.stuck: set[str] = set()  # adapters that refuse to unload

    def list_adapters(self, pod: PodEndpoint, api_key: str | None) -> dict[str, str | None]:
        self.calls.append(("list", pod.name, ""))
        if pod.name in self.down:
            raise RuntimeCallError("GET /v1/models: ConnectError: connection refused")
        return dict(self.loaded[pod.name])

    def load_adapter(self, pod: PodEndpoint, api_key: str | None, name: str, path: str) -> None:
        self.calls.append(("load", pod.name, name))
        if path in self.bad_paths:
            raise RuntimeCallError(f"HTTP 404: no adapter at {path}", 404)
        self.loaded[pod.name][name] = path

    def unload_adapter(self, pod: PodEndpoint, api_key: str | None, name: str) -> None:
        self.calls.append(("unload", pod.name, name))
        if name in self.stuck:
            raise RuntimeCallError("HTTP 500: busy", 500)
        self.loaded[pod.name].pop(name, None)


def pods(*names: str) -> list[PodEndpoint]:
    return [PodEndpoint(n, f"uid-{n}", f"http://127.0.0.1:{i}") for i, n in enumerate(names)]


def test_sync_loads_unloads_and_reports_per_pod() -> None:
    runtime = FakeRuntime({"p0": {"old": "/old"}, "p1": {}, "p2": {}})
    runtime.down.add("p2")
    runtime.bad_paths.add("/bad")
    sync = AdapterSync(runtime)
    out = sync.sync_pods(SCOPE, pods("p0", "p1", "p2"), {"a": "/a", "bad": "/bad"}, None)
    assert [o.pod for o in out] == ["p0", "p1", "p2"]
    assert out[0].loaded == out[1].loaded == {"a"}
    assert out[0].errors == {"bad": "HTTP 404: no adapter at /bad"}
    assert out[2].unreachable == "GET /v1/models: ConnectError: connection refused"
    assert runtime.loaded["p0"] == {"a": "/a"}  # "old" was undeclared

    # Next pass: the failing load waits out its backoff, but its error is still reported.
    runtime.calls.clear()
    out = sync.sync_pods(SCOPE, pods("p0", "p1", "p2"), {"a": "/a", "bad": "/bad"}, None)
    assert [c for c in runtime.calls if c[0] == "load"] == []
    assert out[1].errors == {"bad": "HTTP 404: no adapter at /bad"}
    # A fixed path is a new attempt at once.
    runtime.calls.clear()
    sync.sync_pods(SCOPE, pods("p0", "p1"), {"a": "/a", "bad": "/good"}, None)
    assert sorted(c for c in runtime.calls if c[0] == "load") == [
        ("load", "p0", "bad"),
        ("load", "p1", "bad"),
    ]


def test_a_stale_adapter_that_will_not_unload_is_reported_not_loaded_twice() -> None:
    runtime = FakeRuntime({"p0": {"a": "/v1"}})
    runtime.stuck.add("a")
    [outcome] = AdapterSync(runtime).sync_pods(SCOPE, pods("p0"), {"a": "/v2"}, None)
    assert outcome.errors == {"a": "HTTP 500: busy"} and outcome.loaded == {"a"}
    assert ("load", "p0", "a") not in runtime.calls


def pod(name: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": name, "uid": f"uid-{name}"},
        "spec": {
            "containers": [
                {
                    "name": "runtime",
                    "args": ["serve", "/m", "--enable-lora"],
                    "ports": [{"name": "http", "containerPort": 8000}],
                }
            ]
        },
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.1",
            "containerStatuses": [{"name": "runtime", "ready": True}],
        },
    }
    for key, value in overrides.items():
        body[key] = {**body[key], **value}
    return body


def test_only_ready_lora_pods_are_synced() -> None:
    no_lora = pod("c")
    no_lora["spec"]["containers"][0]["args"] = ["serve", "/m"]
    candidates = [
        pod("b"),
        pod("a", status={"podIP": "fd00::1"}),
        no_lora,
        pod("d", metadata={"deletionTimestamp": "2025-01-01T00:00:00Z"}),
        pod("e", status={"phase": "Pending"}),
        pod("f", status={"containerStatuses": [{"name": "runtime", "ready": False}]}),
        pod("g", status={"podIP": None}),
    ]
    assert ready_pods(candidates) == [
        PodEndpoint("a", "uid-a", "http://[fd00::1]:8000"),
        PodEndpoint("b", "uid-b", "http://10.0.0.1:8000"),
    ]
    assert pod_url("10.1.2.3", 9000) == "http://10.1.2.3:9000"


def test_adapter_condition_and_events() -> None:
    now, base = "2025-01-01T00:00:00Z", {"conditions": []}
    loaded = [AdapterStatus(name="a", state="Loaded", loaded_replicas=2)]
    status = with_adapters(base, loaded, generation=3, now=now)
    [cond] = status["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("AdaptersReady", "True", "Loaded")
    assert status["adapters"] == [{"name": "a", "state": "Loaded", "loadedReplicas": 2}]
    assert [e.reason for e in transition_events(base, status)] == ["AdaptersLoaded"]

    failing = [
        *loaded,
        AdapterStatus(name="b", state="Failed", loaded_replicas=0, last_error="pod p: HTTP 400"),
        AdapterStatus(name="c", state="Fetching"),
    ]
    later = with_adapters(status, failing, generation=4, now="2025-01-02T00:00:00Z")
    [cond] = later["conditions"]
    assert (cond["status"], cond["reason"], cond["message"]) == (
        "False",
        "AdapterFailed",
        "b: pod p: HTTP 400",
    )
    events = transition_events(status, later)
    assert [(e.type, e.reason, e.message) for e in events] == [
        ("Warning", "AdapterFailed", "adapter b: pod p: HTTP 400")
    ]
    assert transition_events(later, later) == []  # the same failure is one event, not one a pass
    fetching = with_adapters(base, failing[2:], generation=4, now=now)
    assert fetching["conditions"][0]["reason"] == "Fetching"
    # LoRA off: adapters and their condition go.
    off = with_adapters(later, None, generation=5, now=now)
    assert "adapters" not in off and off["conditions"] == []


def test_http_client_speaks_the_runtime_contract(runtime_servers: Any) -> None:
    runtime_servers.write_adapter("/adapters/a")
    server = runtime_servers.serve(api_key="k")
    target = PodEndpoint("p", "uid-p", pod_url("127.0.0.1", server.port))
    client = HttpRuntimeClient()
    assert client.list_adapters(target, "k") == {}
    client.load_adapter(target, "k", "a", "/adapters/a")
    assert client.list_adapters(target, "k") == {"a": "/adapters/a"}  # the base model is not
    with pytest.raises(RuntimeCallError) as caught:
        client.load_adapter(target, "k", "a", "/adapters/a")
    assert caught.value.status == 400
    assert str(caught.value) == (
        "POST /v1/load_lora_adapter: HTTP 400: The lora adapter 'a' has already been loaded."
    )
    client.unload_adapter(target, "k", "a")
    client.unload_adapter(target, "k", "a")  # unknown (404) is already unloaded
    with pytest.raises(RuntimeCallError) as caught:
        client.list_adapters(target, "wrong")
    assert caught.value.status == 401 and "Incorrect API key" in str(caught.value)
    dead = PodEndpoint("q", "uid-q", pod_url("127.0.0.1", 1))
    with pytest.raises(RuntimeCallError) as caught:
        client.list_adapters(dead, None)
    assert caught.value.status is None and str(caught.value).startswith("GET /v1/models: Connect")
