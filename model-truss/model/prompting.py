"""From a request to prompt token ids, and which token ids end a generation.

Shared by both backends, so the same request yields the same prompt ids on TensorRT-LLM and torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from model.errors import InvalidRequest
from model.schema import GenerateRequest


def encode_prompt(tokenizer: PreTrainedTokenizerBase, request: GenerateRequest, prompt_format: str) -> list[int]:
    """Chat messages go through the model's own chat template; a plain prompt too unless `prompt_format` is raw.

    Instruct models answer a bare question with their end-of-turn token, so by default (`auto`) a
    prompt is sent as one user turn whenever the tokenizer has a chat template.
    """
    chat = prompt_format == "chat" or (prompt_format == "auto" and bool(tokenizer.chat_template))
    if request.prompt is not None and not chat:
        return list(tokenizer(request.prompt).input_ids)
    if request.prompt is not None:
        messages = [{"role": "user", "content": request.prompt}]
    else:
        messages = [m.model_dump() for m in request.messages or []]
    return encode_chat(tokenizer, messages)


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """Messages (and tool definitions, for templates that take them) through the model's own chat template."""
    if not tokenizer.chat_template:
        raise InvalidRequest("this model has no chat template, so 'messages' cannot be rendered; send 'prompt'")
    # Render to text first: the template writes its own special tokens, so none are added twice.
    text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, *model_dirs: Path) -> frozenset[int]:
    """The tokenizer's EOS plus every `eos_token_id` in the model's generation_config.json.

    Chat models often end a turn with a token (e.g. `<|im_end|>`) that is only listed in
    generation_config.json, so the tokenizer's EOS alone would let them ramble on.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for folder in model_dirs:
        path = Path(folder) / "generation_config.json"
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else eos or [])
    return frozenset(ids)
