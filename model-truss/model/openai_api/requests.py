"""OpenAI request bodies (chat and completions), validated; what they ask for, in the shared path's terms.

Accepted as OpenAI clients send them, and honoured: everything below. Accepted with no effect because
there is nothing to do: `user`, `metadata`, `store: false`, `logit_bias: {}`, `parallel_tool_calls` (honoured
for `tool_choice: required`), `stream_options.include_obfuscation`, `service_tier`. vLLM's extra sampling
fields (`extra_body`): `top_k` (-1 = off), `repetition_penalty`, `ignore_eos`, `min_tokens`. `seed: -1` means
no seed. Types are read as OpenAI's own server reads them (`"stream": "false"` is false).

Refused with a 400 that names the field, because this server cannot do them: a non-empty `logit_bias`,
`store: true`, completions `suffix` and `best_of` > n, `echo` with `logprobs` (no prompt logprobs), non-text
content parts, and every field OpenAI has that is not listed here (audio, modalities, prediction, ...).
Bounds (temperature 0..2, ...) are `schema.SamplingFields`', the same as `/predict`'s.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.backends.base import MAX_TOP_LOGPROBS, GuidedDecoding
from model.errors import InvalidRequest
from model.schema import SamplingFields, validated

MAX_CHOICES = 128  # OpenAI's bound on n; the engine's batch size bounds it further (routes.py)
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0}  # OpenAI's, not /predict's greedy default


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool = True  # random padding against side channels: nothing to pad here


class JsonSchemaFormat(_Body):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only then")
        return self

    def guide(self) -> GuidedDecoding | None:
        if self.type == "json_object":
            return GuidedDecoding("json_object")
        if self.json_schema is not None:
            return GuidedDecoding("json_schema", json.dumps(self.json_schema.json_schema))
        return None


class FunctionDefinition(_Body):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class OpenAIRequest(_Body):
    """Fields both endpoints share; `model` is echoed back, not used to route (one model is served)."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    seed: int | None = Field(default=None, ge=-1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    # vLLM's extra sampling fields (the client's extra_body)
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0

    @model_validator(mode="after")
    def _refuse_what_cannot_be_honoured(self) -> OpenAIRequest:
        if self.logit_bias:
            raise _refused("logit_bias", "logit_bias is not supported (only {} or null); remove it")
        if self.store:
            raise _refused("store", "store: true is not supported: this server keeps no completions; send false")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def requested_max_tokens(self) -> int | None:
        if self.max_tokens == 0:
            raise _refused("max_tokens", "max_tokens must be at least 1")
        return self.max_tokens

    def sampling(self) -> SamplingFields:
        """The decoding controls, OpenAI's defaults filled in, checked against the shared bounds."""
        fields = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": None if self.top_k == -1 else self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "seed": None if self.seed == -1 else self.seed,
            "stop": self.stop,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
        }
        return validated(SamplingFields, {**OPENAI_DEFAULTS, **{k: v for k, v in fields.items() if v is not None}})


class ChatCompletionRequest(OpenAIRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _refused("top_logprobs", "top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise _refused("tool_choice", "tool_choice needs tools; send the tools or remove tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = [tool.function.name for tool in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise _refused("tool_choice", f"tool_choice names '{self.tool_choice.function.name}', not in tools")
        if self.response_format and self.response_format.type != "text" and self.uses_tools:
            raise _refused(
                "response_format",
                "response_format and tools both decide the output's shape; send tool_choice 'none' or a text format",
            )
        return self

    @property
    def uses_tools(self) -> bool:
        """Tools are offered to the model (tool_choice none hides them, as OpenAI does)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens (its newer name) wins; 0 is refused whether or not max_tokens is there."""
        if self.max_completion_tokens == 0:
            raise _refused("max_completion_tokens", "max_completion_tokens must be at least 1")
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().requested_max_tokens()


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        if self.suffix:
            raise _refused("suffix", "suffix (text after the insertion point) is not supported; remove it")
        if self.best_of is not None and self.best_of != self.n:
            raise _refused("best_of", "best_of other than n is not supported; use n, or remove best_of")
        if self.echo and self.logprobs is not None:
            raise _refused("echo", "echo with logprobs needs the prompt's logprobs, which this server does not compute")
        if not self.prompts:
            raise _refused("prompt", "prompt is empty; send the text (or token ids) to complete")
        return self

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        """One entry per prompt: texts, or token-id lists."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt] if prompt else []
        if prompt and all(isinstance(item, int) for item in prompt):
            return [prompt]  # type: ignore[list-item]
        return [item for item in prompt if item]  # type: ignore[misc]


def parse(body: Any, kind: type[OpenAIRequest]) -> OpenAIRequest:
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return validated(kind, body)


def _refused(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param)
