"""Examples pass the CRD (schema + CEL) and the Python model; broken ones fail both the same way.

The CRD side is checked the way the API server does it: the committed openAPIV3Schema
with jsonschema (Draft 4 = OpenAPI v3's flavour: boolean exclusiveMinimum) and every
`x-kubernetes-validations` rule evaluated by a real CEL interpreter (cel-python).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pinnace.operator.fit import check_fit
from pinnace.operator.llmdeployment import SpecError, parse_llmdeployment

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
INVALID = sorted((Path(__file__).parent / "data" / "invalid").glob("*.yaml"))


def load_case(path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """Header comments `# key: value` and the YAML body."""
    meta = {}
    for line in path.read_text().splitlines():
        if not line.startswith("# "):
            break
        key, _, value = line[2:].partition(": ")
        meta[key] = value
    return meta, yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    crd = yaml.safe_load((REPO / "crds" / "pinnace.dev_llmdeployments.yaml").read_text())
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def crd_errors(checks: Any, schema: dict[str, Any], body: dict[str, Any]) -> list[str]:
    """Schema then CEL errors (harness/validation.py); pruned fields are not errors here:
    a "pruned" case is one the API server accepts and silently loses a field of."""
    errors = checks.schema_errors(schema, body)
    # Like the API server: CEL rules see the object with schema defaults filled in.
    return errors or checks.cel_errors(schema, checks.apply_defaults(schema, body))


def test_there_are_examples_for_each_use_case() -> None:
    assert {p.stem for p in EXAMPLES} >= {
        "minimal-cpu",
        "gpu",
        "pvc-model",
        "adapters",
        "kserve",
        "kserve-serverless",
        "autoscaling",
        "autoscaling-keda",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: f"examples/{p.stem}")
def test_example_is_valid_for_the_crd_and_the_model(
    path: Path, schema: dict[str, Any], crd_validation: Any
) -> None:
    body = yaml.safe_load(path.read_text())
    assert crd_validation.object_errors(schema, body) == []  # nothing pruned either
    llmd = parse_llmdeployment(body)
    check_fit(llmd)
    # The API server stores defaulted objects: they must mean the same to the operator.
    assert parse_llmdeployment(crd_validation.apply_defaults(schema, body)) == llmd


@pytest.mark.parametrize("path", INVALID, ids=lambda p: f"examples/{p.stem}")
def test_broken_resource_is_rejected_with_its_message(
    path: Path, schema: dict[str, Any], crd_validation: Any
) -> None:
    meta, body = load_case(path)
    errors = crd_errors(crd_validation, schema, body)
    if meta["layer"] == "schema":  # kubectl apply fails
        assert len(errors) == 1 and errors[0].startswith(meta["expect-crd"]), errors
    else:  # the API server accepts it; the operator (and `pinnace render`) must not
        assert errors == []
    pruned = crd_validation.pruned_fields(schema, body)
    assert pruned == ([meta["expect"].split(":")[0]] if meta["layer"] == "pruned" else [])
    with pytest.raises(SpecError) as caught:
        check_fit(parse_llmdeployment(body))
    assert str(caught.value).startswith(meta["expect"])
    assert "\n" not in str(caught.value)


def test_every_cel_rule_has_a_broken_example(schema: dict[str, Any]) -> None:
    messages = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            messages.update(r["message"] for r in node.get("x-kubernetes-validations", []))
            for value in node.values():
                collect(value)

    collect(schema)
    expected = [load_case(p)[0].get("expect-crd", "") for p in INVALID]
    assert messages and all(any(m in e for e in expected) for m in messages), messages


def test_defaults_of_the_model_are_visible_in_status_args() -> None:
    body = yaml.safe_load((REPO / "examples" / "minimal-cpu.yaml").read_text())
    llmd = parse_llmdeployment(body)
    assert (llmd.replicas, llmd.spec.engine.dtype, llmd.spec.serving.port) == (1, "auto", 8000)
    assert llmd.spec.replicas is None  # no schema default: it would clash with autoscaling
    assert llmd.spec.serving.mode == "Deployment" and llmd.spec.autoscaling is None
    assert llmd.spec.engine.enable_prefix_caching and llmd.spec.resources.gpu is None
