"""Structured-output constraints -> xgrammar CompiledGrammar, cached by (kind, text).

Compiling a JSON schema takes milliseconds to seconds, so it happens off the step: the
engine core compiles in a worker thread before a request joins the scheduler
(`LLM.generate` in a pool), and the sampler finds the grammar in the cache. A server's
front end only parses a constraint (`check_constraint`) to answer a bad one with a 400.
A constraint that does not compile is a ValueError with xgrammar's reason; callers prefix
the parameter that carried it.
"""

from __future__ import annotations

import json
import re
import threading
from typing import TYPE_CHECKING

from pinnace.runtime.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerBase

# Kinds -> what error messages call them.
_WHAT = {
    "json": "JSON schema",
    "json_object": "JSON grammar",
    "regex": "regex",
    "choice": "choice list",
    "grammar": "grammar",
}
# xgrammar's C++ messages start with "[hh:mm:ss] /path/file.cc:123: ": not for users.
_LOG_PREFIX = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


def check_constraint(spec: StructuredOutputsParams) -> None:
    """ValueError (as `GrammarCompiler.compile` words it) unless the constraint parses.

    For front ends: parsing needs no tokenizer and takes well under a millisecond for a
    12-field JSON schema, where compiling its token masks takes ~10 ms (tiny vocabulary)
    after ~200 ms reading the vocabulary once; only the engine core compiles."""
    import xgrammar as xgr

    kind, text = spec.key
    try:
        if kind == "json":
            json.loads(text)
            xgr.Grammar.from_json_schema(text, strict_mode=True, any_whitespace=False)
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        elif kind == "choice":
            xgr.Grammar.from_ebnf(_choice_ebnf(text))
        elif kind == "grammar":
            xgr.Grammar.from_ebnf(text)
    except Exception as exc:
        raise ValueError(_compile_error(kind, exc)) from exc


def _choice_ebnf(text: str) -> str:
    # json.dumps writes each choice as an EBNF string literal (same escapes).
    return "root ::= " + " | ".join(json.dumps(c) for c in json.loads(text))


def _compile_error(kind: str, exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    reason = _LOG_PREFIX.sub("", lines[0]) if lines else type(exc).__name__
    return f"the {_WHAT[kind]} could not be compiled: {reason}"


class GrammarCompiler:
    """Thread-safe; the tokenizer's vocabulary is read once, on first use."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: list[int]
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width (may exceed the tokenizer's)
        self.stop_token_ids = stop_token_ids
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None
        self._cache: dict[tuple[str, str], xgr.CompiledGrammar] = {}

    def _xgr(self) -> xgr.GrammarCompiler:
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=2)
            return self._compiler

    def compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        key = spec.key
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        kind, text = key
        try:
            compiled = self._compile(kind, text)
        except Exception as exc:  # xgrammar raises RuntimeError / ValueError / its own types
            raise ValueError(_compile_error(kind, exc)) from exc
        with self._lock:
            self._cache[key] = compiled
        return compiled

    def _compile(self, kind: str, text: str) -> xgr.CompiledGrammar:
        compiler = self._xgr()
        if kind == "json":
            # Fail on a malformed schema here, with json's own message.
            json.loads(text)
            return compiler.compile_json_schema(text, strict_mode=True, any_whitespace=False)
        if kind == "json_object":
            return compiler.compile_builtin_json_grammar()
        if kind == "regex":
            return compiler.compile_regex(text)
        if kind == "choice":
            return compiler.compile_grammar(_choice_ebnf(text))
        return compiler.compile_grammar(text)

    @property
    def num_cached(self) -> int:
        return len(self._cache)
