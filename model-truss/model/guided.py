"""Structured output, the grammar side: a `GuidedDecoding` compiled for one tokenizer, and per-request matchers.

The grammar library is xgrammar (the backend TensorRT-LLM's own guided decoding uses). It was chosen by
measuring the cost per generated token of computing the allowed-token mask and advancing past the sampled
token, on the same JSON documents, for xgrammar, llguidance and outlines-core (`python main.py bench guided
--libraries ...`, docs/api.md). An engine that masks logits itself:

    compiler = GuideCompiler(tokenizer, vocab_size, stop_token_ids)  # once, at load
    compiled = compiler.compile(params.guided)   # in prepare(), off the event loop; cached; InvalidRequest if bad
    guide = compiled.new_matcher()               # per request, on the engine thread (microseconds)
    guide.fill_next_token_bitmask(bitmask, row)  # bitmask: int32 [batch, ceil(vocab / 32)], allocate_bitmask()
    apply_bitmask(logits, bitmask)               # logits [batch, vocab]: disallowed tokens -> -inf
    guide.accept_token(token); guide.is_terminated()

Whitespace between JSON tokens is not free (`any_whitespace=False`): a small model given the choice loops
on newlines until max_tokens. `json_schema` compiles in xgrammar's strict mode (no properties or items the
schema does not name), so every output validates against the schema as written. `json_object` is any JSON
object. The output ends once the grammar is complete and the model samples an end token, the only token then
allowed.

Only what xgrammar 0.1.25 (TensorRT-LLM 1.2's pin, in the GPU image) and 0.2.x (requirements.txt) share is used.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import xgrammar
from transformers import PreTrainedTokenizerBase

from model.backends.base import GuidedDecoding, TokenGuide
from model.errors import InvalidRequest

CACHE_SIZE = 256  # compiled grammars kept (a JSON schema compiles in ~10-20 ms on CPU, a few MB at most)
ANY_OBJECT = '{"type": "object"}'

# The request field each kind of guide comes from, for error messages.
GUIDE_FIELDS = {
    "json_object": "response_format",
    "json_schema": "response_format.json_schema.schema",
    "regex": "regex",
    "grammar": "grammar",
}


@dataclass(frozen=True)
class CompiledGuide:
    """A grammar compiled for one tokenizer; shared by every request that asks for it."""

    grammar: xgrammar.CompiledGrammar

    def new_matcher(self) -> TokenGuide:
        """A fresh per-request state (xgrammar's matcher implements the `TokenGuide` protocol as is)."""
        return xgrammar.GrammarMatcher(self.grammar)


class GuideCompiler:
    """Compiles `GuidedDecoding`s for one tokenizer; thread-safe (xgrammar's compiler is), results cached."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_token_ids: Iterable[int] | None = None
    ) -> None:
        stops = sorted(stop_token_ids) if stop_token_ids is not None else None
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        self.vocab_size = vocab_size
        self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)  # our own LRU below keys on the guide

    @functools.lru_cache(maxsize=CACHE_SIZE)  # noqa: B019 - one compiler per engine, alive as long as the server
    def compile(self, guided: GuidedDecoding) -> CompiledGuide:
        """The compiled grammar; raises `InvalidRequest` naming the field if the schema/regex/grammar is bad."""
        field = GUIDE_FIELDS[guided.kind]
        if guided.kind != "json_object" and not guided.spec:
            raise InvalidRequest(f"{field} is empty; send the {guided.kind.replace('_', ' ')}", param=field)
        try:
            return CompiledGuide(self._compile(guided))
        except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar reports a bad input as one of these
            message = f"{field} cannot be used for structured output: {_first_line(exc)}"
            raise InvalidRequest(message, param=field) from None

    def _compile(self, guided: GuidedDecoding) -> xgrammar.CompiledGrammar:
        if guided.kind == "json_object":
            return self._compiler.compile_json_schema(ANY_OBJECT, any_whitespace=False, strict_mode=False)
        assert guided.spec is not None
        if guided.kind == "json_schema":
            json.loads(guided.spec)  # a ValueError with the position, clearer than the compiler's
            return self._compiler.compile_json_schema(guided.spec, any_whitespace=False, strict_mode=True)
        if guided.kind == "regex":
            return self._compiler.compile_regex(guided.spec)
        return self._compiler.compile_grammar(guided.spec)


def allocate_bitmask(batch: int, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """int32 [batch, ceil(vocab / 32)], every token allowed."""
    return torch.full((batch, (vocab_size + 31) // 32), -1, dtype=torch.int32, device=device)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: logits [B, vocab] of tokens whose bit is 0 in bitmask [B, ceil(vocab / 32)] become -inf."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask.unsqueeze(-1) >> bits) & 1).bool().flatten(1)  # [B, 32 * words], bit j of word w = 32w + j
    logits.masked_fill_(~allowed[:, : logits.shape[-1]].to(logits.device), float("-inf"))


def _first_line(exc: BaseException) -> str:
    """The library's message without its C++ log prefix (`[10:34:39] /project/cpp/x.cc:4944: `)."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", line)
