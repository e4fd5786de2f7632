"""Tool calls: the tools offered in the prompt, the output constrained where a call is required, and parsed back.

- Prompt: a chat template that takes `tools` (it mentions them) renders them itself. For one that does not
  (SmolLM2's), the tools and the call format go into the system message, Hermes-style (the format Qwen2.5 and
  Hermes templates use): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; earlier assistant calls
  are written back in that format and `tool` results become `<tool_response>` user turns.
- `tool_choice: required` / a named function: the output is constrained (structured output) to a JSON array of
  calls (one call at most when `parallel_tool_calls` is false) / to one call of that function, so it always
  parses, whatever the model.
- `auto`: the model decides; text that starts a call (a `<tool_call>` tag, or a JSON object or array as the
  whole answer) is held back while streaming, and parsed at the end. Calls to unknown functions stay text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from model.backends.base import GuidedDecoding
from model.openai_api.requests import ChatCompletionRequest, NamedToolChoice, Tool

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
TAGGED_CALL = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CALL_CLOSE) + r"|$)", re.DOTALL)
NO_PARAMETERS = {"type": "object", "properties": {}}

FALLBACK_PROMPT = """You may call functions to answer. The functions, as JSON schemas:
<tools>
{tools}
</tools>
To call one, answer with only a JSON object per call, each inside <tool_call></tool_call> tags:
<tool_call>
{{"name": "<function name>", "arguments": {{<the arguments as a JSON object>}}}}
</tool_call>"""


def template_takes_tools(chat_template: str | None) -> bool:
    return bool(chat_template) and "tools" in str(chat_template)


def tools_for_template(tools: list[Tool]) -> list[dict[str, Any]]:
    return [tool.model_dump(exclude_none=True) for tool in tools]


def fallback_messages(messages: list[dict[str, Any]], tools: list[Tool] | None) -> list[dict[str, Any]]:
    """Messages for a template without tool support: tools in the system turn, calls and results as text."""
    rendered = []
    for message in messages:
        if message["role"] == "tool":
            rendered.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        elif message.get("tool_calls"):
            calls = "\n".join(_tagged(call["function"]) for call in message["tool_calls"])
            rendered.append({"role": "assistant", "content": "\n".join(filter(None, [message["content"], calls]))})
        else:
            rendered.append({"role": message["role"], "content": message["content"]})
    if tools:
        described = "\n".join(json.dumps(tools_for_template([tool])[0]["function"]) for tool in tools)
        prompt = FALLBACK_PROMPT.format(tools=described)
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": f"{rendered[0]['content']}\n\n{prompt}"}
        else:
            rendered.insert(0, {"role": "system", "content": prompt})
    return rendered


def _tagged(function: dict[str, Any]) -> str:
    call = {"name": function["name"], "arguments": json_or_text(function["arguments"])}
    return f"{CALL_OPEN}\n{json.dumps(call)}\n{CALL_CLOSE}"


def json_or_text(arguments: Any) -> Any:
    """OpenAI's arguments are a JSON string; templates and prompts want the object (or the text, if it is not JSON)."""
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def call_constraint(request: ChatCompletionRequest) -> GuidedDecoding | None:
    """The JSON schema a required or named tool call must follow; None for auto / none."""
    tools = request.tools or []
    if isinstance(request.tool_choice, NamedToolChoice):
        (tool,) = [t for t in tools if t.function.name == request.tool_choice.function.name]
        return GuidedDecoding("json_schema", json.dumps(_call_schema(tool)))
    if request.tool_choice != "required":
        return None
    calls: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": [_call_schema(t) for t in tools]}}
    if not request.parallel_tool_calls:
        calls["maxItems"] = 1
    return GuidedDecoding("json_schema", json.dumps(calls))


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "name": {"const": tool.function.name},
            "arguments": tool.function.parameters or NO_PARAMETERS,
        },
        "required": ["name", "arguments"],
    }


@dataclass
class ToolCallParser:
    """One choice's output: streamed text passes through until it may be a call, then it is held for `finish`."""

    names: frozenset[str]
    constrained: bool  # required / named: the whole output is the call(s)
    text: str = ""
    released: int = 0  # characters of `text` already given out as content
    holding: bool = False
    calls: list[dict[str, Any]] = field(default_factory=list)

    def feed(self, piece: str) -> str:
        """The part of the output so far that is surely content (not the start of a call)."""
        self.text += piece
        if self.holding or self.constrained:
            return ""
        start = self._call_start()
        if start is not None:
            self.holding = True
            safe = start
        else:
            safe = len(self.text) - _partial_tag(self.text) if self.text.strip() else self.released
        out, self.released = self.text[self.released : safe], max(self.released, safe)
        return out

    def finish(self) -> str:
        """Parse the held text: calls go to `calls`; whatever is not a call is returned as content."""
        held = self.text[self.released :]
        self.released = len(self.text)
        self.calls = [_openai_call(call) for call in _parse_calls(held) if call.get("name") in self.names]
        return "" if self.calls else held

    def _call_start(self) -> int | None:
        tagged = self.text.find(CALL_OPEN)
        if tagged >= 0:
            return tagged
        stripped = self.text.lstrip()
        if self.released == 0 and stripped[:1] in ("{", "["):
            return len(self.text) - len(stripped)
        return None


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that begins `<tool_call>`."""
    return next((n for n in range(min(len(text), len(CALL_OPEN) - 1), 0, -1) if CALL_OPEN.startswith(text[-n:])), 0)


def _parse_calls(text: str) -> list[dict[str, Any]]:
    """`<tool_call>` blocks, or the whole text as one call or a list of calls; anything unparsable: no calls."""
    bodies = TAGGED_CALL.findall(text) if CALL_OPEN in text else [text.strip()]
    calls: list[dict[str, Any]] = []
    for body in bodies:
        try:
            parsed = json.loads(body)
        except ValueError:
            return []
        items = parsed if isinstance(parsed, list) else [parsed]
        if not all(isinstance(item, dict) for item in items):
            return []
        calls.extend(items)
    return calls


def _openai_call(call: dict[str, Any]) -> dict[str, Any]:
    arguments = call.get("arguments", call.get("parameters", {}))
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"], "arguments": arguments},
    }
