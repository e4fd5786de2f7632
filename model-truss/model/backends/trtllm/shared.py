"""Helpers every engine of this package uses: the request's seed, and its last chunk."""

from __future__ import annotations

import random

from model.backends.base import FinishReason, SamplingParams, TokenStream


def sampling_seed(params: SamplingParams) -> int:
    """The request's seed, else a fresh one: the engines' default seed (0) repeats across requests."""
    return params.seed if params.seed is not None else random.getrandbits(63)


def finish_stream(stream: TokenStream, tokens: list[int], reason: FinishReason, stop_ids: frozenset[int]) -> None:
    """Last chunk; a stop word's token, which the Executor outputs, is not part of the answer."""
    if reason == "stop" and tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    stream.put(tokens, reason)
