"""Token chunks in, text pieces out: incremental detokenization and stop strings.

`generate_text` is the only path from a backend's token stream to text. The non-streaming
response is the concatenation of exactly the pieces a stream would carry, so the two can
never disagree. Guarantees:
- a piece never ends inside a multi-byte character (no U+FFFD halves reach the client), and a
  generation that stops inside one (a length stop after its first byte) ends at the last whole
  character: the incomplete one is dropped, not sent as U+FFFD (its tokens still count in usage);
- a stop string is found even when it spans two pieces; it is not included in the output,
  and generation is cancelled in the engine as soon as it is seen;
- usage counts the prompt and every token the engine generated for this request.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from model.backends.base import FinishReason, TokenChunk, TokenLogprob

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a growing id list into text deltas.

    Decoding each new id alone breaks multi-byte characters and the tokenizer's
    space handling, so every step decodes a short window of ids (from `prefix_offset`)
    twice, with and without the new ids, and emits the difference once it is whole.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: tuple[int, ...] | list[int]) -> str:
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) > len(prefix_text) and not full_text.endswith(REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """At the end, what is still held back, less the U+FFFD an incomplete last character decodes to.

        Held-back text always ends in U+FFFD (that is why it was held), so a replacement character the
        model generated itself as its very last character is dropped too: the rare price of never
        inventing one.
        """
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :].rstrip(REPLACEMENT_CHAR)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


class StopStringMatcher:
    """Holds back text that could be the start of a stop string until it is decided."""

    def __init__(self, stop_strings: list[str]) -> None:
        self._stops = stop_strings
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Returns the text that is safe to emit; sets `stopped` when a stop string completes."""
        if not self._stops:
            return text
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[: min(hits)], ""
            return out
        hold = self._longest_partial_stop()
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(self._pending) - hold :]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out

    def _longest_partial_stop(self) -> int:
        """Length of the longest suffix of the pending text that begins some stop string."""
        for size in range(min(len(self._pending), max(map(len, self._stops)) - 1), 0, -1):
            suffix = self._pending[-size:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return size
        return 0


@dataclass
class GenerationResult:
    """Filled in while the text streams; complete once the stream is exhausted."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    pieces: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per generated token, when the request asked

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def as_response(self) -> dict:
        return {
            "output": self.text,
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
            },
        }


async def generate_text(
    chunks: AsyncGenerator[TokenChunk, None],
    tokenizer: PreTrainedTokenizerBase,
    stop_strings: list[str],
    result: GenerationResult,
) -> AsyncIterator[str]:
    """Turn a backend's token chunks into non-empty text pieces, recording them in `result`."""
    detokenizer = IncrementalDetokenizer(tokenizer)
    matcher = StopStringMatcher(stop_strings)
    try:
        async for chunk in chunks:
            result.completion_tokens += len(chunk.token_ids)
            result.logprobs.extend(chunk.logprobs or ())
            piece = matcher.feed(detokenizer.add(chunk.token_ids))
            if chunk.finish_reason is not None and not matcher.stopped:
                piece += matcher.feed(detokenizer.flush())
                piece += "" if matcher.stopped else matcher.flush()
                result.finish_reason = "stop" if matcher.stopped else chunk.finish_reason
            elif matcher.stopped:
                result.finish_reason = "stop"
            if piece:
                result.pieces.append(piece)
                yield piece
            if result.finish_reason is not None:
                return
    finally:
        await chunks.aclose()  # a stop string or a gone client cancels the request in the engine
