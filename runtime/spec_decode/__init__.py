"""Speculative decoding: proposers (n-gram prompt lookup, a draft model) and the
verification that keeps the target model's outputs (greedy) or distribution (sampling)."""

from pinnace.runtime.spec_decode.config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
