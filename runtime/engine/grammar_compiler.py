"""Structured-output constraints -> xgrammar CompiledGrammar, cached by (kind, text).

Compiling a JSON schema takes milliseconds to seconds, so callers compile before a request
reaches the engine thread (the server in a worker thread, `LLM.generate` in a pool); the
sampler then finds the grammar in the cache. A constraint that does not compile is a
ValueError with xgrammar's reason; callers prefix the parameter that carried it.
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
            lines = str(exc).strip().splitlines()
            reason = _LOG_PREFIX.sub("", lines[0]) if lines else type(exc).__name__
            raise ValueError(f"the {_WHAT[kind]} could not be compiled: {reason}") from exc
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
            # json.dumps writes each choice as an EBNF string literal (same escapes).
            choices = json.loads(text)
            return compiler.compile_grammar(
                "root ::= " + " | ".join(json.dumps(c) for c in choices)
            )
        return compiler.compile_grammar(text)

    @property
    def num_cached(self) -> int:
        return len(self._cache)
