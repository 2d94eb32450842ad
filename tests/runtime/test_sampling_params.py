"""SamplingParams validation: every invalid value is a ValueError that names its field."""

from __future__ import annotations

import json
import math

import pytest

from pinnace.runtime.sampling_params import SamplingParams, StructuredOutputsParams


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(n=0), "n"),
        (dict(n=-3), "n"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=math.nan), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.01), "top_p"),
        (dict(top_p=-0.5), "top_p"),
        (dict(top_p=math.nan), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=5, max_tokens=4), "min_tokens"),
        (dict(logprobs=-1), "logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),
        (dict(stop=""), "stop"),
        (dict(stop=["ok", ""]), "stop"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b") as info:
        SamplingParams(**kwargs)
    value = next(iter(kwargs.values()))
    if isinstance(value, (int, float)):
        assert str(value) in str(info.value)  # the message shows what was passed


def test_valid_values_are_normalized():
    params = SamplingParams(top_k=-1, stop="###", stop_token_ids=None, max_tokens=None)
    assert params.top_k == 0
    assert params.stop_strings == ["###"]
    assert params.stop_token_ids == []
    assert SamplingParams(stop=["a", "b"]).stop_strings == ["a", "b"]
    assert SamplingParams().stop_strings == []
    # Boundaries that are allowed.
    SamplingParams(temperature=0.0, top_p=1.0, top_k=1, max_tokens=1, min_tokens=1, logprobs=0)
    SamplingParams(min_tokens=100, max_tokens=None)


def test_defaults_follow_vllm():
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k) == (1, 1.0, 1.0, 0)
    assert (params.max_tokens, params.min_tokens, params.seed) == (16, 0, None)
    assert not params.ignore_eos and not params.include_stop_str_in_output
    assert params.skip_special_tokens


def test_greedy_is_temperature_zero():
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.5).is_greedy


def test_for_sample_gives_each_of_n_samples_its_own_seed():
    params = SamplingParams(n=3, seed=10, temperature=0.7, stop=["x"])
    children = [params.for_sample(i) for i in range(3)]
    assert [c.seed for c in children] == [10, 11, 12]
    assert all(c.n == 1 and c.temperature == 0.7 and c.stop_strings == ["x"] for c in children)
    assert params.n == 3 and params.seed == 10  # the parent is unchanged
    assert SamplingParams(n=2).for_sample(1).seed is None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.1}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"bad_words": [" "]}, "bad_words"),
    ],
)
def test_processor_settings_are_validated(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kwargs)


def test_logit_bias_is_clamped_and_token_ids_checked_against_the_vocabulary():
    params = SamplingParams(logit_bias={"5": 250.0, 7: -300})  # type: ignore[dict-item]
    assert params.logit_bias == {5: 100.0, 7: -100.0}

    class Tok:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [len(w) for w in text.split(" ")]

    params.update_from_tokenizer(Tok(), vocab_size=10)
    with pytest.raises(ValueError, match="allowed_token_ids has token id 10"):
        SamplingParams(allowed_token_ids=[1, 10]).update_from_tokenizer(Tok(), 10)
    words = SamplingParams(bad_words=["abc de"])
    words.update_from_tokenizer(Tok(), 10)
    assert words.bad_words_token_ids == [[3, 2], [0, 3, 2]]  # as is, and after a space


def test_best_of_children_carry_logprobs_for_ranking():
    params = SamplingParams(n=2, best_of=4, seed=1)
    assert params.num_samples == 4
    child = params.for_sample(3)
    assert (child.n, child.best_of, child.seed, child.logprobs) == (1, None, 4, 0)


def test_structured_outputs_need_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="non-empty strings"):
        StructuredOutputsParams(choice=["a", ""])
    schema = {"type": "object", "properties": {"b": {}, "a": {}}}
    assert StructuredOutputsParams(json=schema).key == ("json", json.dumps(schema))
    assert StructuredOutputsParams(json_object=True).key == ("json_object", "")
