"""TokenGuide doubles (the protocol in model/backends/base.py), standing in for model/guided.py's matchers.

`SequenceGuide` allows exactly one token sequence: the bitmask lets only the next token through, so the
engine's batched mask path must produce that sequence; it terminates once the sequence is complete.
`FailingGuide` raises in `accept_token` after some tokens: a request whose guide breaks must fail alone.
"""

from __future__ import annotations

from typing import Any


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
