"""`TokenLogprob`s in OpenAI's two shapes: chat (`content: [{token, logprob, bytes, top_logprobs}]`) and
completions (`tokens`, `token_logprobs`, `top_logprobs: [{token: logprob}]`, `text_offset`).

A token's text is the token decoded alone; its bytes are the token's own bytes (for byte-level BPE vocabularies,
a token can hold part of a UTF-8 character: its text is then U+FFFD, its bytes are exact).
"""

from __future__ import annotations

import functools
import json
from typing import Any

from transformers import PreTrainedTokenizerBase

from model.backends.base import TokenLogprob


class TokenTexts:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._byte_level = backend is not None and "ByteLevel" in json.dumps(json.loads(backend.to_str())["decoder"])
        self.text = functools.lru_cache(maxsize=65536)(self._text)
        self.bytes = functools.lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id])

    def _bytes(self, token_id: int) -> list[int]:
        if self._byte_level:
            raw = self._tokenizer.convert_ids_to_tokens(token_id)
            if all(char in BYTE_DECODER for char in raw):
                return [BYTE_DECODER[char] for char in raw]
        return list(self.text(token_id).encode("utf-8"))

    def chat(self, logprobs: list[TokenLogprob]) -> list[dict[str, Any]]:
        return [
            {**self._entry(lp.token_id, lp.logprob), "top_logprobs": [self._entry(t, v) for t, v in lp.top]}
            for lp in logprobs
        ]

    def completion(self, logprobs: list[TokenLogprob], offset: int) -> dict[str, Any]:
        """`offset`: characters of the choice's text before the first of these tokens."""
        texts = [self.text(lp.token_id) for lp in logprobs]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{self.text(t): v for t, v in lp.top} for lp in logprobs],
            "text_offset": offsets,
        }

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": self.text(token_id), "logprob": logprob, "bytes": self.bytes(token_id)}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE vocabulary writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


BYTE_DECODER = _byte_decoder()
