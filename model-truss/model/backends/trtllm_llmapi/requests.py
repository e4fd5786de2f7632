"""A request in the LLM API's terms, and its outputs in ours.

`llm_sampling` maps our `SamplingParams` onto TensorRT-LLM 1.2's: greedy is top_k=1, sampling sends
temperature, top_k (None for "off"), top_p and a seed; the end id and the other stop ids are explicit
(`detokenize=False`: the server detokenizes); `ignore_eos` drops the stop ids too. Logprobs: the LLM API
reads `logprobs=0` as "none" (`self.logprobs and int(self.logprobs)`), so at least 1 is asked for and the
alternatives are cut to what the request wanted. `token_logprobs` turns the LLM API's per-token dicts
({token id: Logprob(logprob, rank)}, the k most likely and the sampled one, raw log-softmax) into
`TokenLogprob`s.

Checked against NVIDIA/TensorRT-LLM through the code index: sampling_params.py at b35ac1b6 (fields,
`_validate`, `params_imply_greedy_decoding`, GuidedDecodingParams json/json_object/regex/grammar);
executor/result.py (005bc848: `Logprob`, `logprobs_diff`, a stop word's ids cut from token_ids, not from
logprobs); _torch/pyexecutor/sampler.py (a 1.x revision: top-k logprobs from the raw logits).
Only against the double (tests/doubles/trtllm_llmapi.py): that the 1.2 dict always holds the sampled token.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from model.backends.base import GuidedDecoding, SamplingParams, TokenLogprob
from model.backends.trtllm.shared import TokenIds, sampling_seed
from model.errors import BackendError


def llm_sampling(llmapi: ModuleType, params: SamplingParams, ids: TokenIds) -> Any:
    """The LLM API's SamplingParams for one request."""
    stops = [] if params.ignore_eos else sorted(ids.stop_ids - {ids.end_id})
    common: dict[str, Any] = {
        "max_tokens": params.max_new_tokens,
        "end_id": ids.end_id,
        "pad_id": ids.pad_id,
        "stop_token_ids": stops or None,
        "ignore_eos": params.ignore_eos,
        "detokenize": False,
        "logprobs": None if params.logprobs is None else max(params.logprobs, 1),
        "guided_decoding": None if params.guided is None else guided_params(llmapi, params.guided),
    }
    if params.greedy:
        return llmapi.SamplingParams(top_k=1, **common)
    return llmapi.SamplingParams(
        temperature=params.temperature,
        top_k=params.top_k or None,
        top_p=params.top_p,
        seed=sampling_seed(params),
        **common,
    )


def guided_params(llmapi: ModuleType, guided: GuidedDecoding) -> Any:
    """Our guide kinds are GuidedDecodingParams' field names, except json_schema, which the LLM API calls json."""
    guide = llmapi.GuidedDecodingParams
    if guided.kind == "json_object":
        return guide(json_object=True)
    if guided.kind == "json_schema":
        return guide(json=guided.spec)
    if guided.kind == "regex":
        return guide(regex=guided.spec)
    return guide(grammar=guided.spec)


def token_logprobs(tokens: list[int], per_token: list[dict[int, Any]], top: int) -> tuple[TokenLogprob, ...]:
    """One TokenLogprob per token; `per_token` may be longer (a stop word's entry stays when its id is cut)."""
    if len(per_token) < len(tokens):
        raise BackendError(f"TensorRT-LLM returned logprobs for {len(per_token)} of {len(tokens)} new tokens")
    made = []
    for token, candidates in zip(tokens, per_token, strict=False):
        sampled = candidates.get(token)
        if sampled is None:
            raise BackendError(f"TensorRT-LLM returned no logprob for the sampled token {token}")
        ranked = sorted(candidates.items(), key=lambda item: -item[1].logprob)[:top]
        made.append(TokenLogprob(token, sampled.logprob, tuple((t, lp.logprob) for t, lp in ranked)))
    return tuple(made)
