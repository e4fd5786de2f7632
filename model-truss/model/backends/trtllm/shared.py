"""Helpers both TensorRT-LLM paths use (engines and the LLM API): ids, seeds, a request's last chunk, the draft.

Checked against NVIDIA/TensorRT-LLM through the code index: examples/run.py and examples/utils.py (pad_id
falls back to end_id); sampling_params.py at b35ac1b6 ("seed: None means using C++ runtime default 0").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from model.artifacts import Artifacts
from model.backends.base import FinishReason, SamplingParams, TokenLogprob, TokenStream
from model.errors import ArtifactError, EngineMismatchError
from model.prompting import stop_token_ids
from model.settings import ServerSettings


@dataclass(frozen=True)
class TokenIds:
    end_id: int
    pad_id: int
    stop_ids: frozenset[int]  # end_id included


def token_ids(tokenizer: PreTrainedTokenizerBase, artifacts: Artifacts, vocab_size: int) -> TokenIds:
    """end_id = the tokenizer's EOS; pad_id = its pad token, else end_id (as examples/utils.py does)."""
    stops = stop_token_ids(tokenizer, artifacts.model_dir, artifacts.tokenizer_dir)
    end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else min(stops, default=None)
    if end_id is None:
        raise ArtifactError(
            f"the tokenizer at {artifacts.tokenizer_dir} has no EOS token and no generation_config.json lists one, "
            "so generation could never stop; use the tokenizer the engine was built from (tokenizer_repo)"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    outside = sorted(t for t in {end_id, *stops} if not 0 <= t < vocab_size)  # pad may be an added token
    if outside:
        raise EngineMismatchError(
            f"special token ids {outside} of the tokenizer at {artifacts.tokenizer_dir} are outside the model's "
            f"vocabulary ({vocab_size}), so it is not the model's tokenizer; set tokenizer_repo to the "
            "model the engine or checkpoint came from"
        )
    return TokenIds(int(end_id), int(pad_id), frozenset({int(end_id), *stops}))


def sampling_seed(params: SamplingParams) -> int:
    """The request's seed, else a fresh one: the engines' default seed (0) repeats across requests."""
    return params.seed if params.seed is not None else random.getrandbits(63)


def finish_stream(
    stream: TokenStream,
    tokens: list[int],
    reason: FinishReason,
    stop_ids: frozenset[int],
    logprobs: tuple[TokenLogprob, ...] | None = None,
) -> None:
    """Last chunk; a stop word's token, which TensorRT-LLM may output, is not part of the answer."""
    if reason == "stop" and tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    stream.put(tokens, reason, None if logprobs is None else logprobs[: len(tokens)])


def draft_settings(settings: ServerSettings, target: Artifacts) -> ServerSettings:
    """What `resolve_artifacts` needs to find the draft: its repo and subfolder; the tokenizer is the target's."""
    same_repo = settings.draft_model_repo == settings.model_repo
    return settings.model_copy(
        update={
            "model_repo": settings.draft_model_repo,
            "subfolder": settings.draft_subfolder,
            "revision": settings.revision if same_repo else None,  # a pinned commit exists in its own repo only
            "allow_patterns": None,
            "tokenizer_repo": str(target.tokenizer_dir),  # a local folder: nothing to download
        }
    )
