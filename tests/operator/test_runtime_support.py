"""What the operator refuses because the runtime would refuse it at load (RuntimeUnsupported):
pure checks on parsed resources, no cluster."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from pinnace.operator.llmdeployment import LLMDeployment, SpecError, parse_llmdeployment
from pinnace.operator.runtime_support import REASON, check_runtime_support

REPO = Path(__file__).resolve().parents[2]
DRAFT = {"method": "draft_model", "model": "pvc://model-store/draft", "numSpeculativeTokens": 3}


def example(name: str, **spec: Any) -> LLMDeployment:
    body = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
    body["spec"].update(copy.deepcopy(spec))
    return parse_llmdeployment(body)


def test_a_draft_model_on_several_gpus_is_refused() -> None:
    """The runtime splits no draft across tensor ranks or pipeline stages."""
    llmd = example("pvc-model", engine={"tensorParallelSize": 1, "pipelineParallelSize": 2,
                                        "speculative": DRAFT})  # fmt: skip
    with pytest.raises(SpecError, match="draft model") as err:
        check_runtime_support(llmd)
    assert err.value.reason == REASON


def test_ngram_and_a_single_gpu_draft_are_not() -> None:
    ngram = {"method": "ngram", "numSpeculativeTokens": 3}
    check_runtime_support(example("pvc-model", engine={"tensorParallelSize": 2,
                                                       "speculative": ngram}))  # fmt: skip
    check_runtime_support(example("pvc-model", engine={"tensorParallelSize": 1,
                                                       "speculative": DRAFT}))  # fmt: skip
