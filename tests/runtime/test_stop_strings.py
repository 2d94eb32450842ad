"""StopMatcher finds exactly what searching every stop string finds, step by step, and its
per-step cost does not grow with the number of stop strings."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pinnace.runtime.engine.stop_strings import StopMatcher


def naive(text: str, old_len: int, stops: list[str]) -> tuple[int, str] | None:
    """The search StopMatcher replaces: each stop from just before the new text."""
    best: tuple[int, str] | None = None
    for stop in stops:
        idx = text.find(stop, max(0, old_len - len(stop) + 1))
        if idx >= 0 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best


ALPHABET = "abc😀 "


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    st.lists(st.text(ALPHABET, min_size=1, max_size=4), min_size=1, max_size=6),
    st.lists(st.text(ALPHABET, max_size=5), min_size=1, max_size=8),
)
def test_same_matches_as_searching_each_stop(stops: list[str], pieces: list[str]) -> None:
    matcher, text = StopMatcher(stops), ""
    for piece in pieces:
        old_len, text = len(text), text + piece
        found, expected = matcher.find(text, old_len), naive(text, old_len, stops)
        # Same place; at one place either stop that starts there is right.
        assert (found and found[0]) == (expected and expected[0]), (stops, text)
        if found is not None:
            assert text.startswith(found[1], found[0]) and found[1] in stops
            return  # the engine stops here


def test_empty_stop_is_refused_and_no_stops_match_nothing() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(["ok", ""])
    assert StopMatcher([]).find("anything", 0) is None


def test_cost_per_step_does_not_grow_with_the_number_of_stops() -> None:
    text = "the quick brown fox jumps over the lazy dog " * 40

    def per_step(stops: list[str]) -> float:
        matcher = StopMatcher(stops)
        start = time.perf_counter()
        for _ in range(3):
            for end in range(4, len(text), 4):  # 4 characters a step, like a token
                assert matcher.find(text[:end], end - 4) is None
        return time.perf_counter() - start

    few = [f"#{i}#" for i in range(4)]
    many = [f"#{i}#{'x' * (i % 20)}" for i in range(1000)]
    per_step(few)  # warm up
    assert per_step(many) < 3 * per_step(few) + 0.01
