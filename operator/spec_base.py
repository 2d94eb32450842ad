"""The building blocks of the `LLMDeployment` spec: Kubernetes value patterns, cross-field
`Rule`s and `SpecModel`, the base of every spec class.

Cross-field rules are declared once as `Rule(cel, message, check)`: the CEL text goes into
the CRD (`x-kubernetes-validations`, enforced by the API server), the Python `check` runs
in `SpecModel`'s validator (for `pinnace render` and the operator), with the same message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel

# Kubernetes resource.Quantity, as the API server accepts it ("16Gi", "500m", "1e9").
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]"
    r"|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
MODEL_URI_PATTERN = r"^(hf|pvc|s3|gs|file)://[^\s]+$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
URL_PATTERN = r"^https?://[^\s]+$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
PARAM_COUNT_PATTERN = r"^[0-9]+(\.[0-9]+)?[KMBT]?$"

Quantity = str
DOWNLOAD_SCHEMES = ("hf://", "s3://", "gs://")


@dataclass(frozen=True)
class Rule:
    """A cross-field rule: `cel` for the API server, `check` for Python, one message."""

    cel: str
    message: str
    check: Callable[[Any], bool]


def _add_rules(schema: dict[str, Any], cls: type) -> None:
    rules: tuple[Rule, ...] = getattr(cls, "rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [{"rule": r.cel, "message": r.message} for r in rules]


class SpecModel(BaseModel):
    """Base: camelCase field names as in the CRD, unknown fields rejected, rules enforced."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        json_schema_extra=_add_rules,
    )
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> SpecModel:
        for rule in self.rules:
            if not rule.check(self):
                raise ValueError(rule.message)
        return self
