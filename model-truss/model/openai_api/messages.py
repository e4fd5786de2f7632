"""Chat messages as OpenAI clients send them, rendered to prompt token ids through the model's chat template.

Roles: system, developer (a system turn for this server), user, assistant (with `tool_calls`), tool. Content is
a string, null (an assistant turn that only calls tools) or a list of text parts, each with a string `text`.
Image, audio and file parts are refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase

from model.errors import InvalidRequest
from model.openai_api.requests import ChatCompletionRequest
from model.openai_api.tools import fallback_messages, json_or_text, template_takes_tools, tools_for_template
from model.prompting import prompt_encoder

ROLES = ("system", "developer", "user", "assistant", "tool")


def encode_messages(
    tokenizer: PreTrainedTokenizerBase, request: ChatCompletionRequest, check_chars: Callable[[int], None]
) -> list[int]:
    """The prompt ids; `check_chars` first refuses content too long to fit, without tokenizing it."""
    messages = [_message(i, m) for i, m in enumerate(request.messages)]
    check_chars(sum(len(m["content"]) for m in messages))
    offered = request.tools if request.uses_tools else None
    encoder = prompt_encoder(tokenizer, "chat")  # content is tokenized as text: no special tokens from users
    if template_takes_tools(tokenizer.chat_template):
        return encoder.encode_chat([_for_template(m) for m in messages], tools_for_template(offered or []) or None)
    return encoder.encode_chat(fallback_messages(messages, offered))


def _message(index: int, message: dict[str, Any]) -> dict[str, Any]:
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequest(
            f"messages[{index}].role must be one of {', '.join(ROLES)}, got {role!r}", param=f"messages[{index}].role"
        )
    normal: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": _text(index, message)}
    if role == "assistant" and message.get("tool_calls"):
        normal["tool_calls"] = [_tool_call(index, call) for call in message["tool_calls"]]
    if role == "tool":
        normal["tool_call_id"] = message.get("tool_call_id")
    return normal


def _text(index: int, message: dict[str, Any]) -> str:
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise InvalidRequest(
            f"messages[{index}].content must be a string or a list of text parts", param=f"messages[{index}].content"
        )
    if any(not isinstance(part, dict) or part.get("type") != "text" for part in content):
        raise InvalidRequest(
            f"messages[{index}].content: only text content parts are supported (no images, audio or files)",
            param=f"messages[{index}].content",
        )
    for number, part in enumerate(content):
        if not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"messages[{index}].content[{number}].text must be a string, got {type(part.get('text')).__name__}",
                param=f"messages[{index}].content[{number}].text",
            )
    return "".join(part["text"] for part in content)


def _tool_call(index: int, call: Any) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest(
            f"messages[{index}].tool_calls: each call needs function.name and function.arguments",
            param=f"messages[{index}].tool_calls",
        )
    return {
        "id": call.get("id"),
        "type": "function",
        "function": {"name": function["name"], "arguments": function.get("arguments") or "{}"},
    }


def _for_template(message: dict[str, Any]) -> dict[str, Any]:
    """Templates write arguments with `tojson`: give them the object, not OpenAI's JSON string."""
    if "tool_calls" not in message:
        return message
    calls = [
        {**call, "function": {**call["function"], "arguments": json_or_text(call["function"]["arguments"])}}
        for call in message["tool_calls"]
    ]
    return {**message, "tool_calls": calls}
