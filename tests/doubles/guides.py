"""TokenGuide doubles (the protocol in model/backends/base.py), standing in for model/guided.py's matchers.

`SequenceGuide` allows exactly one token sequence: the bitmask lets only the next token through, so the
engine's batched mask path must produce that sequence; it terminates once the sequence is complete.
`FailingGuide` raises in `accept_token` after some tokens: a request whose guide breaks must fail alone.
`DoubleCompiler` has GuideCompiler's interface: a guide whose `spec` names a registered double gets that
double, any other goes to the real compiler it wraps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from model.backends.base import GuidedDecoding, TokenGuide
from model.guided import GuideCompiler


@dataclass(frozen=True)
class _CompiledDouble:
    factory: Callable[[], TokenGuide]

    def new_matcher(self) -> TokenGuide:
        return self.factory()


class DoubleCompiler:
    def __init__(self, real: GuideCompiler) -> None:
        self.real = real
        self.doubles: dict[str, Callable[[], TokenGuide]] = {}

    def compile(self, guided: GuidedDecoding) -> Any:
        if guided.spec in self.doubles:
            return _CompiledDouble(self.doubles[guided.spec])
        return self.real.compile(guided)


class SequenceGuide:
    def __init__(self, tokens: list[int]) -> None:
        self.tokens = list(tokens)
        self.position = 0

    def fill_next_token_bitmask(self, bitmask: Any, index: int) -> None:
        bitmask[index] = 0
        if self.position < len(self.tokens):
            token = self.tokens[self.position]
            word, bit = divmod(token, 32)
            value = 1 << bit
            bitmask[index, word] = value - (1 << 32) if value >= 1 << 31 else value  # int32 two's complement

    def accept_token(self, token_id: int) -> bool:
        if self.position >= len(self.tokens) or token_id != self.tokens[self.position]:
            return False
        self.position += 1
        return True

    def is_terminated(self) -> bool:
        return self.position == len(self.tokens)


class FailingGuide(SequenceGuide):
    def __init__(self, tokens: list[int], fail_after: int) -> None:
        super().__init__(tokens)
        self.fail_after = fail_after

    def accept_token(self, token_id: int) -> bool:
        if self.position >= self.fail_after:
            raise RuntimeError("injected guide failure")
        return super().accept_token(token_id)
