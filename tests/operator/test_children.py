"""operator/children.py is the one table of kinds: the client, pruning, watches and both RBAC
files agree with it, every rendered kind is in it, and renderers never import the
controller."""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from pinnace.operator import children, client, handlers
from pinnace.operator.llmdeployment import parse_llmdeployment
from pinnace.operator.render import PRUNABLE, render_all

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
# Grants kopf itself needs, not the reconciler: events, cluster scanning, peering.
KOPF_ONLY = {
    ("", "events", "create"),
    *(("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("list", "watch")),
    *(("", "namespaces", v) for v in ("list", "watch")),
    *(
        ("kopf.dev", plural, verb)
        for plural in ("clusterkopfpeerings", "kopfpeerings")
        for verb in ("get", "list", "watch", "patch")
    ),
}


def granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def deploy_rules() -> list[dict[str, Any]]:
    docs = yaml.safe_load_all((REPO / "deploy" / "rbac.yaml").read_text())
    [role] = [d for d in docs if d and d["kind"] == "ClusterRole"]
    return list(role["rules"])


def helm_rules() -> list[dict[str, Any]]:
    """The chart's ClusterRole rules: its rules are plain YAML, only the metadata is
    templated (test_chart.py renders the chart with Helm and compares it too)."""
    text = (REPO / "helm" / "pinnace" / "templates" / "rbac.yaml").read_text()
    role = text.split("---")[0]
    plain = "\n".join(line for line in role.splitlines() if "{{" not in line)
    return list(yaml.safe_load(plain)["rules"])


@pytest.mark.parametrize("rules", [deploy_rules, helm_rules], ids=["deploy", "helm"])
def test_rbac_grants_exactly_the_table(rules: Any) -> None:
    assert granted(rules()) - KOPF_ONLY == children.rbac_grants()


def test_rbac_check_fails_when_a_kind_is_missing() -> None:
    """The check above can fail: drop any kind's rule and the grants no longer match."""
    rules = deploy_rules()
    for index, rule in enumerate(rules):
        fewer = rules[:index] + rules[index + 1 :]
        if rule["apiGroups"] == ["kopf.dev"] or rule["resources"] in (
            ["events"],
            ["customresourcedefinitions"],
            ["namespaces"],
        ):
            continue
        assert granted(fewer) - KOPF_ONLY != children.rbac_grants(), rule


def test_every_prunable_kind_may_be_deleted_and_every_rendered_kind_is_in_the_table() -> None:
    assert PRUNABLE == children.PRUNABLE
    for kind in PRUNABLE:
        assert "delete" in children.BY_KIND[kind].verbs
    rendered: set[str] = set()
    for path in EXAMPLES:
        body = yaml.safe_load(path.read_text())
        for spec in ({}, {"networkPolicy": {}}, {"replicas": 3}):
            variant = copy.deepcopy(body)
            variant["spec"].update(spec)
            try:
                objects = render_all(parse_llmdeployment(variant))
            except ValueError:
                continue  # e.g. networkPolicy in KServe mode, refused
            rendered |= {o["kind"] for o in objects}
    # Every child named after the resource is pruned when no longer rendered; Jobs by label.
    assert rendered - {"PersistentVolumeClaim", "Job"} <= set(PRUNABLE)
    assert rendered <= set(children.BY_KIND)
    assert {"PodDisruptionBudget", "NetworkPolicy"} <= rendered


def test_the_client_knows_every_kind_and_the_handlers_watch_the_watched_ones() -> None:
    assert {k.kind: (k.api_version, k.plural) for k in children.KINDS} == client.RESOURCES
    registry = handlers.build_registry(login=False)
    watched = {
        (h.selector.group, h.selector.version, h.selector.any_name)
        for h in registry._watching._handlers  # kopf keeps no public listing of them
        if h.id.endswith("child_event")
    }
    assert watched == {(k.group, k.version, k.plural) for k in children.WATCHED}


def test_renderers_never_import_controller_modules() -> None:
    controller = {"reconcile", "handlers", "client", "status", "adapter_sync", "runtime_client"}
    for path in (REPO / "operator" / "render").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                imported = {parts[-1]} | {a.name for a in node.names}
                if parts[:2] == ["pinnace", "operator"]:
                    assert not imported & controller, f"{path.name} imports {node.module}"
