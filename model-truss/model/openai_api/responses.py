"""OpenAI's response objects, built from what each choice produced: the full response, or its server-sent events.

Every choice yields `ChoiceItem`s (text, its tokens' logprobs, and on the last one the finish reason and any
tool calls); the full response is those items gathered, so a stream and a full response of the same request
carry the same text. A stream is `data: {chunk}` events, then a `usage` chunk if `stream_options.include_usage`,
then `data: [DONE]`. A failure after the first event cannot change the status any more: it is sent as an
`data: {"error": {...}}` event (as vLLM does, and the openai client raises it), followed by `[DONE]`, and no
normal final chunk.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from model.backends.base import TokenLogprob
from model.errors import BackendError, ClientDisconnected, ServingError
from model.http_io import openai_error
from model.openai_api.logprobs import TokenTexts

logger = logging.getLogger(__name__)


@dataclass
class ChoiceItem:
    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    offset: int = 0  # characters of this choice's text before `text` (completions' text_offset)
    finish_reason: str | None = None  # on a choice's last item only
    tool_calls: list[dict[str, Any]] | None = None  # on a choice's last item, if the output was calls


Usage = Callable[[], dict[str, int]]


class OpenAIResponse:
    """One request's response: chat (`chat.completion`) or completions (`text_completion`) shapes."""

    def __init__(self, *, chat: bool, model: str, texts: TokenTexts, logprobs: bool, include_usage: bool) -> None:
        self.chat, self.model, self.texts = chat, model, texts
        self.logprobs, self.include_usage = logprobs, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    async def full(self, items: AsyncIterator[ChoiceItem], usage: Usage) -> dict[str, Any]:
        gathered: dict[int, list[ChoiceItem]] = {}
        async for item in items:
            gathered.setdefault(item.index, []).append(item)
        choices = [self._full_choice(index, gathered[index]) for index in sorted(gathered)]
        return self._envelope("chat.completion" if self.chat else "text_completion", choices) | {"usage": usage()}

    async def events(self, items: AsyncIterator[ChoiceItem], indices: list[int], usage: Usage) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        try:
            if self.chat:
                role = {"delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                yield _sse(self._envelope(kind, [{"index": i, **role} for i in indices]))
            async for item in items:
                for choice in self._chunk_choices(item):
                    yield _sse(self._envelope(kind, [choice]))
        except ClientDisconnected:
            return
        except ServingError as exc:
            yield _sse(openai_error(exc))
            yield "data: [DONE]\n\n"
            return
        except Exception as exc:  # the engine broke mid-stream: tell the client, as an error event
            logger.exception("stream failed after its first event")
            yield _sse(openai_error(BackendError(f"generation failed: {exc}")))
            yield "data: [DONE]\n\n"
            return
        if self.include_usage:
            yield _sse(self._envelope(kind, []) | {"usage": usage()})
        yield "data: [DONE]\n\n"

    # -- one choice ------------------------------------------------------------------------

    def _full_choice(self, index: int, items: list[ChoiceItem]) -> dict[str, Any]:
        text = "".join(item.text for item in items)
        logprobs = [lp for item in items for lp in item.logprobs]
        last = items[-1]
        choice: dict[str, Any] = {"index": index, "finish_reason": last.finish_reason}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if last.tool_calls:
                message = {"role": "assistant", "content": text.strip() or None, "tool_calls": last.tool_calls}
            choice |= {"message": message, "logprobs": self._chat_logprobs(logprobs)}
        else:
            choice |= {"text": text, "logprobs": self._completion_logprobs(logprobs, items[0].offset)}
        return choice

    def _chunk_choices(self, item: ChoiceItem) -> list[dict[str, Any]]:
        """A choice's item as chunk choices: its text (with logprobs), its tool calls, its finish reason."""
        base = {"index": item.index, "finish_reason": None}
        out = []
        if item.text or item.logprobs:
            if self.chat:
                delta = {"delta": {"content": item.text}, "logprobs": self._chat_logprobs(item.logprobs)}
            else:
                delta = {"text": item.text, "logprobs": self._completion_logprobs(item.logprobs, item.offset)}
            out.append(base | delta)
        if item.tool_calls:
            calls = [{"index": k, **call} for k, call in enumerate(item.tool_calls)]
            out.append(base | {"delta": {"tool_calls": calls}, "logprobs": None})
        if item.finish_reason is not None:
            ending = {"delta": {}} if self.chat else {"text": ""}
            out.append(base | ending | {"logprobs": None, "finish_reason": item.finish_reason})
        return out

    def _chat_logprobs(self, logprobs: list[TokenLogprob]) -> dict[str, Any] | None:
        return {"content": self.texts.chat(logprobs), "refusal": None} if self.logprobs else None

    def _completion_logprobs(self, logprobs: list[TokenLogprob], offset: int) -> dict[str, Any] | None:
        return self.texts.completion(logprobs, offset) if self.logprobs else None

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
