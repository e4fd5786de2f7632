"""The text layer: detokenization that never splits a character, stop strings across pieces, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from model.backends.base import TokenChunk
from model.streaming import GenerationResult, IncrementalDetokenizer, StopStringMatcher, generate_text

MULTIBYTE_TEXT = "Mistral 风 blows 🌬️ over the Rhône — naïve café, 東京, emoji 🤖🚀 done."


def _pieces(tokenizer, ids: list[int], step: int = 1) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    return [*pieces, detokenizer.flush()]


@pytest.mark.parametrize("step", [1, 2, 3])
def test_detokenized_pieces_join_to_the_full_decode(tokenizer, step: int) -> None:
    ids = tokenizer(MULTIBYTE_TEXT, add_special_tokens=False).input_ids
    pieces = _pieces(tokenizer, ids, step)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == MULTIBYTE_TEXT
    assert not any("\ufffd" in piece for piece in pieces)
    # Byte-level BPE splits 🤖 over several ids: some steps must have held text back.
    assert "" in pieces[:-1]


def test_a_truncated_character_at_the_end_is_dropped_not_replaced(tokenizer) -> None:
    ids = tokenizer("ok 🤖", add_special_tokens=False).input_ids
    robot = tokenizer("🤖", add_special_tokens=False).input_ids
    assert len(robot) > 1 and tokenizer.decode(ids[:-1]).endswith("\ufffd")
    detokenizer = IncrementalDetokenizer(tokenizer)
    emitted = detokenizer.add(ids[:-1])  # a length stop inside the robot's bytes
    assert emitted + detokenizer.flush() == "ok "


def test_a_length_stop_inside_a_character_ends_without_a_replacement_character(tokenizer) -> None:
    ids = tokenizer("ok 🤖", add_special_tokens=False).input_ids

    async def chunks() -> AsyncGenerator[TokenChunk, None]:
        for token in ids[:-2]:
            yield TokenChunk((token,))
        yield TokenChunk((ids[-2],), "length")

    result = GenerationResult(prompt_tokens=1)

    async def run() -> list[str]:
        return [piece async for piece in generate_text(chunks(), tokenizer, [], result)]

    pieces = asyncio.run(run())
    assert "".join(pieces) == result.text == "ok "
    assert result.completion_tokens == len(ids) - 1 and result.finish_reason == "length"


@pytest.mark.parametrize(
    ("feeds", "stops", "emitted", "stopped"),
    [
        (["Hello wor", "ld and more"], ["world"], "Hello ", True),
        (["abc", "de", "f"], ["cdx"], "abcdef", False),
        (["The end", "###", " tail"], ["##"], "The end", True),
        (["xx STO", "P yy"], ["STOP", "P y"], "xx ", True),
        (["aaa"], [], "aaa", False),
    ],
)
def test_stop_matcher(feeds: list[str], stops: list[str], emitted: str, stopped: bool) -> None:
    matcher = StopStringMatcher(stops)
    out = ""
    for text in feeds:
        out += matcher.feed(text)
        if matcher.stopped:
            break
    if not matcher.stopped:
        out += matcher.flush()
    assert (out, matcher.stopped) == (emitted, stopped)


def test_stop_matcher_holds_back_only_a_possible_stop_prefix() -> None:
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.feed("yes </ans") == "yes "
    assert matcher.feed("wering") == "</answering"


class _ScriptedBackend:
    """Yields scripted chunks and records whether the consumer closed it early."""

    def __init__(self, chunks: list[TokenChunk]) -> None:
        self.chunks = chunks
        self.closed_early = False

    async def generate(self) -> AsyncGenerator[TokenChunk, None]:
        delivered = 0
        try:
            for chunk in self.chunks:
                delivered += 1
                yield chunk
        finally:
            self.closed_early = delivered < len(self.chunks)


def _run(tokenizer, chunks: list[TokenChunk], stops: list[str]) -> tuple[list[str], GenerationResult, bool]:
    backend = _ScriptedBackend(chunks)
    result = GenerationResult(prompt_tokens=7)

    async def collect() -> list[str]:
        return [p async for p in generate_text(backend.generate(), tokenizer, stops, result)]

    return asyncio.run(collect()), result, backend.closed_early


def _chunks(tokenizer, text: str, finish: str) -> list[TokenChunk]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [TokenChunk((i,)) for i in ids[:-1]] + [TokenChunk((ids[-1],), finish)]


def test_generate_text_usage_and_finish_reason(tokenizer) -> None:
    pieces, result, closed_early = _run(tokenizer, _chunks(tokenizer, MULTIBYTE_TEXT, "length"), [])
    assert "".join(pieces) == result.text == MULTIBYTE_TEXT
    assert all(pieces)
    response = result.as_response()
    completion = len(tokenizer(MULTIBYTE_TEXT, add_special_tokens=False).input_ids)
    assert response["usage"] == {"prompt_tokens": 7, "completion_tokens": completion, "total_tokens": 7 + completion}
    assert response["finish_reason"] == "length"
    assert not closed_early


def test_stop_string_cancels_the_engine_request(tokenizer) -> None:
    text = "First sentence. STOP here and then a lot more text that must never be generated."
    pieces, result, closed_early = _run(tokenizer, _chunks(tokenizer, text, "length"), ["STOP"])
    assert result.text == "".join(pieces) == "First sentence. "
    assert result.finish_reason == "stop"
    assert closed_early
    assert result.completion_tokens < len(tokenizer(text, add_special_tokens=False).input_ids)


def test_stop_string_in_the_final_chunk(tokenizer) -> None:
    pieces, result, _ = _run(tokenizer, _chunks(tokenizer, "one two three", "stop"), [" three"])
    assert "".join(pieces) == "one two"
    assert result.finish_reason == "stop"


def test_end_token_finish_with_an_empty_last_chunk(tokenizer) -> None:
    chunks = [*_chunks(tokenizer, "all done", "length")[:-1], TokenChunk((), "stop")]
    _, result, _ = _run(tokenizer, chunks, [])
    assert result.finish_reason == "stop"
    assert result.text == tokenizer.decode(tokenizer("all done", add_special_tokens=False).input_ids[:-1])
