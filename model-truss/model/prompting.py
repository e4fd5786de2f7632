"""From a request to prompt token ids, and which token ids end a generation.

Shared by both backends, so the same request yields the same prompt ids on TensorRT-LLM and torch.

Message content is text, never markup: a user who types `<|im_start|>system` gets those characters
tokenized as text, not the control token, so nobody can forge a system or assistant turn. Only the
chat template's own markup becomes special tokens. `PromptEncoder` renders the template with a
placeholder in place of each message's content, tokenizes the template's text with special tokens
recognised, and each content with them split into plain text (`encode_special_tokens`), then joins
the ids in order. A raw `prompt` (`prompt_format: raw`) is the model's whole input as the client
wrote it, so special tokens in it are honoured, as in a completions API.
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from model.errors import InvalidRequest
from model.schema import GenerateRequest


class PromptEncoder:
    """One tokenizer's prompt rendering; thread-safe (its tokenizers are only read), so it runs off the event loop.

    It never calls the transformers tokenizer itself to encode: that call switches special-token
    parsing on the shared Rust tokenizer, a race between threads. It reads two Rust tokenizers instead.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> None:
        self.tokenizer = tokenizer
        self.chat = prompt_format == "chat" or (prompt_format == "auto" and bool(tokenizer.chat_template))
        self._markup: Tokenizer = tokenizer.backend_tokenizer  # special tokens recognised
        self._text = Tokenizer.from_str(self._markup.to_str())
        self._text.encode_special_tokens = True  # special-token strings are split into ordinary tokens
        self._special_ids = frozenset(
            [*tokenizer.all_special_ids, *(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)]
        )
        # No token decodes to more characters than its vocabulary entry has (byte-level and SentencePiece
        # vocabularies spell a token with at most one character per byte), so a prompt of more than
        # max_input_len * this many characters cannot fit and is refused without tokenizing it.
        self.max_token_chars = max(map(len, tokenizer.get_vocab()))

    def encode(self, request: GenerateRequest) -> list[int]:
        """Chat messages go through the model's own chat template; a plain prompt too unless the format is raw.

        Instruct models answer a bare question with their end-of-turn token, so by default (`auto`) a
        prompt is sent as one user turn whenever the tokenizer has a chat template.
        """
        if request.prompt is not None and not self.chat:
            return self.encode_raw(request.prompt)
        if request.prompt is not None:
            messages = [{"role": "user", "content": request.prompt}]
        else:
            messages = [m.model_dump() for m in request.messages or []]
        return self.encode_chat(messages)

    def encode_raw(self, text: str) -> list[int]:
        """Text that is the model's whole input, as a completions prompt is: its special tokens are honoured."""
        return _encode(self._markup, text, add_special_tokens=True)

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Messages (and tool definitions, for templates that take them) through the model's own chat template."""
        if not self.tokenizer.chat_template:
            raise InvalidRequest("this model has no chat template, so 'messages' cannot be rendered; send 'prompt'")
        return self._render(messages, tools)

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        marker = f"\ue000{uuid.uuid4().hex}"  # private-use characters: no template writes them
        stand_ins = [{**m, "content": f"{marker}{i}\ue001"} for i, m in enumerate(messages)]
        parts = re.split(re.escape(marker) + "([0-9]+)\ue001", self._template(stand_ins, tools))
        contents = [m["content"] for m in messages]
        # parts: template text, content index, template text, ... (split keeps the captured index)
        filled = "".join(contents[int(p)] if k % 2 else p for k, p in enumerate(parts))
        real = self._template(messages, tools)
        if filled != real:  # the template changes content (e.g. trims it): refuse markup smuggled in it
            return self._checked(real, self._template(stand_ins, tools))
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids += _encode(self._text, contents[int(part)])
            elif part:
                ids += _encode(self._markup, part)
        return ids

    def _checked(self, rendered: str, markup_only: str) -> list[int]:
        """The whole rendering, tokenized at once, if its content added no special token to the template's own."""
        ids = _encode(self._markup, rendered)
        markup = _encode(self._markup, markup_only)
        if self._count_special(ids) > self._count_special(markup):
            raise InvalidRequest(
                "a message's content contains a special token of this model (such as "
                f"'{self.tokenizer.convert_ids_to_tokens(min(self._special_ids))}'); remove it from the content"
            )
        return ids

    def _count_special(self, ids: list[int]) -> int:
        return sum(i in self._special_ids for i in ids)

    def _template(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        # Rendered to text: the template writes its own special tokens, so none are added twice.
        return self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)


def _encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    """`encode_batch`, not `encode`: only the batch call lets go of the GIL, so the event loop runs meanwhile."""
    return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


@functools.lru_cache(maxsize=8)
def prompt_encoder(tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> PromptEncoder:
    return PromptEncoder(tokenizer, prompt_format)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, request: GenerateRequest, prompt_format: str) -> list[int]:
    """`PromptEncoder.encode` with the encoder built once per tokenizer and format."""
    return prompt_encoder(tokenizer, prompt_format).encode(request)


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
