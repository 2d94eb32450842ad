"""Incremental detokenization with SmolLM2's real byte-level BPE tokenizer: no half
characters, text equal to a full decode, stop strings trimmed as vLLM trims them, and
streaming hold-back so shown text is never taken back."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pinnace.runtime.core.outputs import RequestUpdate
from pinnace.runtime.engine.detokenizer import IncrementalDetokenizer
from pinnace.runtime.engine.request_state import RequestState
from pinnace.runtime.sampling_params import SamplingParams

MULTIBYTE = "Hello 😀 世界 — naïve café 🎉🎉 日本語のテキスト, Ελληνικά and 🧑‍🚀!"


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def make_detok(tokenizer) -> Callable[..., IncrementalDetokenizer]:
    def make(prompt: str = "Say something:", **kwargs) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), **kwargs)

    return make


def feed_one_by_one(detok: IncrementalDetokenizer, token_ids: list[int]) -> list[str | None]:
    """Update token by token until a stop string matches (the engine then finishes)."""
    results = []
    for token_id in token_ids:
        results.append(detok.update([token_id]))
        if results[-1] is not None:
            break
    return results


def test_split_multibyte_characters_never_show_a_replacement_char(tokenizer, make_detok):
    ids = tokenizer.encode(MULTIBYTE)
    # The test is only meaningful if characters really are split across tokens.
    assert sum("\ufffd" in tokenizer.decode([t]) for t in ids) >= 10
    detok = make_detok()
    seen = []
    for token_id in ids:
        before = detok.text
        assert detok.update([token_id]) is None
        assert "\ufffd" not in detok.text
        assert "\ufffd" not in detok.output_text(finished=False)
        assert detok.text.startswith(before)  # text only ever grows
        seen.append(detok.text)
    assert detok.text == tokenizer.decode(ids) == MULTIBYTE
    # Some steps emitted nothing: they ended inside a character.
    assert sum(a == b for a, b in itertools.pairwise(seen)) >= 5


@pytest.mark.parametrize(
    "text",
    [
        MULTIBYTE,
        " leading space, trailing space ",
        "def f(x):\n    return x ** 2  # square\n\n\tdone",
        "Numbers: 3.14159, 2,718; 1e-9 and -42%",
        "ALL CAPS, MiXeD cAsE, snake_case and kebab-case!!!",
    ],
)
def test_incremental_text_equals_full_decode(tokenizer, make_detok, text):
    ids = tokenizer.encode(text)
    one_by_one = make_detok()
    feed_one_by_one(one_by_one, ids)
    assert one_by_one.text == tokenizer.decode(ids) == text
    rng = random.Random(0)
    chunked, i = make_detok(), 0
    while i < len(ids):
        n = rng.randint(1, 4)
        chunked.update(ids[i : i + n])
        i += n
    assert chunked.text == text


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(tokenizer, make_detok, skip):
    ids = [*tokenizer.encode("Hi"), tokenizer.eos_token_id, *tokenizer.encode(" there")]
    detok = make_detok(skip_special_tokens=skip)
    feed_one_by_one(detok, ids)
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=skip)
    assert detok.text == ("Hi there" if skip else f"Hi{tokenizer.eos_token} there")


def test_a_plain_rust_tokenizer_is_decoded_without_the_wrapper(tokenizer, make_detok):
    """SmolLM2's tokenizer takes the direct path (the Rust decode transformers would call);
    random ids, specials included, give the wrapper's text either way."""
    detok = make_detok()
    assert detok._decode.__name__ == "direct"
    rng = random.Random(1)
    ids = [rng.randrange(len(tokenizer)) for _ in range(400)]
    for skip in (True, False):
        fast, slow = make_detok(skip_special_tokens=skip), make_detok(skip_special_tokens=skip)
        slow._decode = lambda window, s=skip: tokenizer.decode(window, skip_special_tokens=s)
        feed_one_by_one(fast, ids)
        feed_one_by_one(slow, ids)
        assert fast.text == slow.text and len(fast.text) > 400


def test_a_tokenizer_that_cleans_up_spaces_keeps_the_wrapper(tokenizer_dir: Path):
    """transformers' clean-up (" ." -> ".") happens in its wrapper: that path stays."""
    cleaning = AutoTokenizer.from_pretrained(tokenizer_dir, clean_up_tokenization_spaces=True)
    cleaning.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    ids = cleaning.encode("Hello , world .")
    detok = IncrementalDetokenizer(cleaning, [])
    assert detok._decode.__name__ == "wrapped"
    feed_one_by_one(detok, ids)
    assert detok.text == cleaning.decode(ids) == "Hello, world."


SENTENCE = "Hello world. Stop here please"


@pytest.mark.parametrize(
    ("stop", "include", "expected"),
    [
        ("Stop", False, "Hello world. "),  # excluded by default
        ("Stop", True, "Hello world. Stop"),
        ("wor", False, "Hello "),  # ends inside a token: the rest of the token goes too
        ("wor", True, "Hello wor"),
        ("d. S", False, "Hello worl"),  # spans three tokens
        ("d. S", True, "Hello world. S"),
    ],
)
def test_stop_string_is_trimmed_like_vllm(tokenizer, make_detok, stop, include, expected):
    ids = tokenizer.encode(SENTENCE)
    detok = make_detok(stop=[stop], include_stop_str_in_output=include)
    results = feed_one_by_one(detok, ids)
    # Reported exactly once, on the token that completes the match.
    hit = next(i for i in range(len(ids)) if stop in tokenizer.decode(ids[: i + 1]))
    assert results == [None] * hit + [stop]
    assert detok.text == expected
    assert detok.stop_reason == stop
    assert detok.output_text(finished=True) == expected


def test_stop_string_straddling_a_token_boundary(tokenizer, make_detok):
    text = " stopword and more"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode([t]) for t in ids]
    assert pieces[:2] == [" stop", "word"]
    assert not any("pwo" in p for p in pieces)  # only the boundary holds the match
    detok = make_detok(stop=["pwo"])
    assert feed_one_by_one(detok, ids)[:2] == [None, "pwo"]
    assert detok.text == " sto"


@pytest.mark.parametrize(
    "stops", [["please", "world", "here"], ["here", "please", "world"], ["world", "Hello w"]]
)
def test_the_earliest_of_several_stop_strings_wins(tokenizer, make_detok, stops):
    # All stops appear in one update (several tokens at once): the earliest match wins,
    # whatever the list order.
    detok = make_detok(stop=stops)
    found = detok.update(tokenizer.encode(SENTENCE))
    expected = min(stops, key=SENTENCE.index)
    assert found == detok.stop_reason == expected
    assert detok.text == SENTENCE[: SENTENCE.index(expected)]


def test_stop_strings_in_the_prompt_do_not_count(make_detok, tokenizer):
    detok = make_detok(prompt="Stop. Stop. Stop", stop=["Stop"])
    assert feed_one_by_one(detok, tokenizer.encode(" and go")) == [None, None]
    assert detok.text == " and go"


def test_streaming_holds_back_what_could_start_a_stop_string(tokenizer, make_detok):
    ids = tokenizer.encode("The answer is 42. END! and then some")
    detok = make_detok(stop=["END!", "xy"])
    shown, texts = [], []
    for token_id in ids:
        stopped = detok.update([token_id]) is not None
        shown.append(detok.output_text(finished=stopped))
        texts.append(detok.text)
        if stopped:
            break
    assert detok.stop_reason == "END!"
    # While running, len("END!") - 1 characters are held back...
    for visible, text in zip(shown[:-1], texts[:-1], strict=True):
        assert visible == text[: max(0, len(text) - 3)]
    assert any(text.endswith(("E", "EN", "END")) for text in texts)
    # ...so streamed text is never taken back once the stop string completes.
    assert shown[-1] == "The answer is 42. "
    assert all(shown[-1].startswith(s) for s in shown)


def test_no_hold_back_without_stops_or_when_stops_are_included(tokenizer, make_detok):
    ids = tokenizer.encode("The answer is 42. END! and then some")
    plain = make_detok()
    for token_id in ids:
        plain.update([token_id])
        assert plain.output_text(finished=False) == plain.text
    included = make_detok(stop=["then"], include_stop_str_in_output=True)
    for token_id in ids:
        stopped = included.update([token_id])
        assert included.output_text(finished=False) == included.text
        if stopped:
            break
    assert included.text == "The answer is 42. END! and then"


@pytest.mark.parametrize("finish_reason", [None, "length"])
def test_a_stop_string_is_the_finish_reason_even_on_the_last_token(tokenizer, finish_reason):
    # As in vLLM, a stop string completed by the step's token wins over a max_tokens
    # finish reported for the same token: the text was cut at the stop string.
    params = SamplingParams(stop=["here"], max_tokens=5)
    state = RequestState("req", SENTENCE, tokenizer.encode("Q:"), params, tokenizer)
    sample = state.samples["req"]
    ids = tokenizer.encode(SENTENCE)  # Hello| world|.| Stop| here| please
    for token_id in ids[:4]:
        assert sample.apply(RequestUpdate("req", [token_id])) is None
    assert sample.apply(RequestUpdate("req", [ids[4]], finish_reason=finish_reason)) == "here"
    output = state.output()
    completion = output.outputs[0]
    assert output.finished
    assert (completion.finish_reason, completion.stop_reason) == ("stop", "here")
    assert completion.text == "Hello world. Stop "
    assert completion.token_ids == ids[:5]


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("stop_token", ["eos", "stop_token_id"])
def test_the_stop_tokens_text_is_left_out_unless_included(tokenizer, include, stop_token):
    # vLLM: when EOS or a stop_token_ids token ends the request, its text is dropped
    # unless include_stop_str_in_output (the token id is still returned).
    ids = tokenizer.encode("Hello world.")  # Hello| world|.
    last, reason = (tokenizer.eos_token_id, None) if stop_token == "eos" else (ids[-1], ids[-1])
    ids = [*ids[:-1], last]
    params = SamplingParams(
        stop_token_ids=[ids[-1]] if reason else None,
        include_stop_str_in_output=include,
        skip_special_tokens=False,
    )
    state = RequestState("req", None, tokenizer.encode("Q:"), params, tokenizer)
    sample = state.samples["req"]
    for token_id in ids[:-1]:
        sample.apply(RequestUpdate("req", [token_id]))
    assert (
        sample.apply(RequestUpdate("req", [last], finish_reason="stop", stop_reason=reason)) is None
    )
    completion = state.output().outputs[0]
    assert (completion.finish_reason, completion.stop_reason) == ("stop", reason)
    assert completion.token_ids == ids
    assert completion.text == (
        tokenizer.decode(ids, skip_special_tokens=False) if include else "Hello world"
    )
