"""The request body of `/v1/models/model:predict`, validated once into a `GenerateRequest`.

Validation that needs the tokenizer (prompt length against the engine's limits) happens in
`check_limits`, after the prompt is tokenized; everything else is checked here by pydantic.
Every failure becomes an `InvalidRequest` whose message names the field and what to send instead.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.backends.base import Limits, SamplingParams
from model.errors import InvalidRequest

MAX_STOP_STRINGS = 16
_Model = TypeVar("_Model", bound=BaseModel)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class SamplingFields(BaseModel):
    """The decoding controls both APIs share, with one set of bounds; the defaults are `/predict`'s.

    The OpenAI routes validate their own body first, then pass these fields (named as vLLM names them)
    through this model, so a bound is written once.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(default=0, ge=0, description="End tokens cannot come before this many new tokens.")

    @field_validator(
        "temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty", mode="before"
    )
    @classmethod
    def _int_is_a_float(cls, value: Any) -> Any:
        """Strict mode refuses `1` for a float field; JSON clients send it all the time."""
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are accepted, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @property
    def stop_strings(self) -> list[str]:
        return list(self.stop or [])

    def to_params(self, max_new_tokens: int, **extra: Any) -> SamplingParams:
        """These controls as engine parameters; `extra` sets the fields only the OpenAI routes have (logprobs...)."""
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            min_new_tokens=self.min_tokens,
            **extra,
        )


class GenerateRequest(SamplingFields):
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    max_new_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1, description="Alias of max_new_tokens (OpenAI name).")
    stream: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' (a string) or 'messages' (a chat list)")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("'prompt' is empty; send the text to complete")
        if self.messages is not None and not any(m.content.strip() for m in self.messages):
            raise ValueError("every message in 'messages' is empty; send some content")
        if self.max_new_tokens is not None and self.max_tokens is not None and self.max_new_tokens != self.max_tokens:
            raise ValueError("'max_new_tokens' and 'max_tokens' disagree; send only one of them")
        return self

    def sampling_params(self, default_max_new_tokens: int) -> SamplingParams:
        return self.to_params(self.max_new_tokens or self.max_tokens or default_max_new_tokens)


def parse_request(body: Any) -> GenerateRequest:
    """Validate a JSON body; pydantic's errors become one readable 400 message."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return validated(GenerateRequest, body)


def validated(schema: type[_Model], body: Any) -> _Model:
    """`schema` validated from `body`; pydantic's errors become one `InvalidRequest` naming the first field at fault."""
    try:
        return schema.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"]
        raise InvalidRequest(describe(exc, schema), param=str(first[0]) if first else None) from None


def check_limits(prompt_len: int, params: SamplingParams, limits: Limits) -> None:
    """Refuse what the loaded model/engine cannot run, before it reaches the engine."""
    if prompt_len > limits.max_input_len:
        raise InvalidRequest(
            f"the prompt is {prompt_len} tokens; this deployment accepts at most {limits.max_input_len}. "
            "Shorten the prompt.",
            code="context_length_exceeded",
        )
    if params.max_new_tokens > limits.max_new_tokens:
        raise InvalidRequest(
            f"max_new_tokens={params.max_new_tokens} exceeds the limit of {limits.max_new_tokens}; ask for fewer.",
            param="max_tokens",
        )
    if prompt_len + params.max_new_tokens > limits.max_seq_len:
        raise InvalidRequest(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the maximum sequence "
            f"length of {limits.max_seq_len}; lower max_new_tokens to {limits.max_seq_len - prompt_len} or less.",
            param="max_tokens",
            code="context_length_exceeded",
        )


def describe(exc: ValidationError, schema: type[BaseModel]) -> str:
    """pydantic's errors as one line a client can act on: the field, and what to send instead."""
    return "; ".join(_describe(error, schema) for error in exc.errors())


def _describe(error: Any, schema: type[BaseModel]) -> str:
    field = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        known = ", ".join(schema.model_fields)
        return f"unknown field '{field}' (accepted fields: {known})"
    message = error["msg"].removeprefix("Value error, ")
    return f"{field}: {message}" if field else message
