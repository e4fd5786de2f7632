"""Contract points of the C++ Executor (ModelRunnerCpp) that tests/doubles/trtllm.py assumes, checked for real.

Every check loads one of the tiny engines `fixtures.build_engines` made (ENGINE_BUILDS says how each was
built), talks to `runner.session` exactly as model/backends/trtllm/ does, and shuts it down again.
Not checked (cannot be provoked safely): a failing engine step failing every request in it
(`terminateActiveRequests`), and orchestrator mode on several GPUs.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import time
from collections.abc import Iterator
from typing import Any

from scripts.smoke import Check, CheckFailed, CheckSkipped, SmokeContext, require

TINY_MAX_SEQ_LEN = 512
TINY_MAX_INPUT_LEN = 256
TINY_MAX_NUM_TOKENS = 128
TINY_DRAFT_LEN = 4
# name -> (build switches, the engine_spec Build fields; see fixtures.build_engines)
ENGINE_BUILDS: dict[str, dict[str, Any]] = {
    "plain": {},
    "target": {"speculative": True},
    "no_paged_fmha": {"paged_context_fmha": False},
    "continuous": {"kv_cache_type": "continuous", "paged_context_fmha": False},
}
WAIT = datetime.timedelta(milliseconds=200)


def _engine_dir(context: SmokeContext, name: str) -> Any:
    if name not in context.engines:
        raise CheckSkipped(f"no '{name}' engine was built (run without --only llmapi)")
    return context.engines[name]


@contextlib.contextmanager
def loaded(context: SmokeContext, name: str, **overrides: Any) -> Iterator[Any]:
    """A ModelRunnerCpp with the backend's defaults (prefix caching, fail-fast window), shut down after."""
    options = {
        "max_batch_size": 4,
        "max_beam_width": 1,
        "kv_cache_free_gpu_memory_fraction": 0.2,
        "enable_chunked_context": False,
        "kv_cache_enable_block_reuse": name != "no_paged_fmha",
        "fail_fast_on_attention_window_too_large": True,
        "is_orchestrator_mode": False,
        **overrides,
    }
    runner = context.trtllm.runtime.ModelRunnerCpp.from_dir(str(_engine_dir(context, name)), rank=0, **options)
    try:
        yield runner.session
    finally:
        runner.session.shutdown()


def _api(context: SmokeContext) -> Any:
    return context.trtllm.bindings.executor


def _prompt(length: int) -> list[int]:
    return [100 + i % 500 for i in range(length)]


def _request(context: SmokeContext, prompt: list[int], max_tokens: int, **extra: Any) -> Any:
    api = _api(context)
    options = {"streaming": True, "end_id": context.end_id, "pad_id": context.end_id, **extra}
    sampling = options.pop("sampling_config", api.SamplingConfig(1, top_k=1))
    return api.Request(
        input_token_ids=prompt,
        max_tokens=max_tokens,
        sampling_config=sampling,
        output_config=api.OutputConfig(exclude_input_from_output=True),
        **options,
    )


def _responses(executor: Any, request_id: int, timeout_s: float = 60) -> list[Any]:
    """Every response of one request until its final one (or its error)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for response in executor.await_responses(timeout=WAIT):
            if response.request_id != request_id:
                continue
            got.append(response)
            if response.has_error() or response.result.is_final:
                return got
    raise AssertionError(f"request {request_id} got no final response in {timeout_s} s")


def _tokens(responses: list[Any]) -> list[int]:
    return [t for r in responses if not r.has_error() for t in r.result.output_token_ids[0]]


def _greedy(context: SmokeContext, name: str, prompt: list[int], count: int) -> list[int]:
    with loaded(context, name) as executor:
        return _tokens(_responses(executor, executor.enqueue_request(_request(context, prompt, count))))


# -- load-time rules ---------------------------------------------------------------------------------


def max_seq_len_grows_by_max_draft_len(context: SmokeContext) -> str:
    config = json.loads((_engine_dir(context, "target") / "config.json").read_text())["build_config"]
    require(
        config["max_seq_len"] == TINY_MAX_SEQ_LEN + TINY_DRAFT_LEN,
        f"built with --max_seq_len {TINY_MAX_SEQ_LEN} --max_draft_len {TINY_DRAFT_LEN}, config.json says "
        f"{config['max_seq_len']}",
    )
    return f"config.json max_seq_len {config['max_seq_len']} = {TINY_MAX_SEQ_LEN} + {TINY_DRAFT_LEN}"


def _load_error(context: SmokeContext, name: str, **overrides: Any) -> str:
    try:
        with loaded(context, name, **overrides):
            return ""
    except RuntimeError as exc:
        return str(exc)


def draft_target_needs_block_reuse(context: SmokeContext) -> str:
    error = _load_error(context, "target", kv_cache_enable_block_reuse=False)
    require("block reuse must be enabled" in error, f"loaded without block reuse, or another error: {error!r}")
    require(_load_error(context, "target") == "", "the target did not load with block reuse either")
    return "refused without block reuse, loads with it"


def block_reuse_is_dropped_without_paged_context_fmha(context: SmokeContext) -> str:
    error = _load_error(context, "no_paged_fmha", kv_cache_enable_block_reuse=True)
    require(error == "", f"asking for block reuse without paged context FMHA failed the load: {error!r}")
    return "loads (the runtime switches reuse off with a warning)"


def chunked_context_needs_paged_context_fmha(context: SmokeContext) -> str:
    error = _load_error(context, "no_paged_fmha", enable_chunked_context=True)
    require("Chunked context requires" in error, f"expected the chunked-context refusal, got {error!r}")
    return "refused at load"


def inflight_batching_needs_paged_kv_and_packed_input(context: SmokeContext) -> str:
    error = _load_error(context, "continuous", kv_cache_enable_block_reuse=False)
    require("packed input and paged KV cache" in error, f"expected the in-flight batching refusal, got {error!r}")
    return "a continuous-KV engine is refused at load"


def fail_fast_when_the_kv_cache_cannot_hold_a_sequence(context: SmokeContext) -> str:
    error = _load_error(context, "plain", kv_cache_free_gpu_memory_fraction=1e-7)
    require("Attention window too large" in error, f"expected the fail-fast refusal, got {error!r}")
    return "refused at load instead of clamping the window"


# -- requests ------------------------------------------------------------------------------------------


def input_limit_without_chunked_context(context: SmokeContext) -> str:
    with loaded(context, "plain") as executor:
        fits = _responses(executor, executor.enqueue_request(_request(context, _prompt(TINY_MAX_NUM_TOKENS), 1)))
        too_long = _request(context, _prompt(TINY_MAX_NUM_TOKENS + 1), 1)
        refused = _responses(executor, executor.enqueue_request(too_long))
    if fits[-1].has_error():
        raise CheckFailed(f"a {TINY_MAX_NUM_TOKENS}-token prompt was refused: {fits[-1].error_msg}")
    require(
        refused[-1].has_error() and f"exceeds maximum input length ({TINY_MAX_NUM_TOKENS})" in refused[-1].error_msg,
        "a prompt one token above min(max_seq_len - 1, max_num_tokens) was not refused as the rule says",
    )
    return f"limit {TINY_MAX_NUM_TOKENS} = max_num_tokens (build max_input_len {TINY_MAX_INPUT_LEN})"


def input_limit_with_chunked_context(context: SmokeContext) -> str:
    with loaded(context, "plain", enable_chunked_context=True) as executor:
        request = _request(context, _prompt(TINY_MAX_SEQ_LEN - 1), 1)
        responses = _responses(executor, executor.enqueue_request(request))
    if responses[-1].has_error():
        raise CheckFailed(f"a max_seq_len - 1 prompt was refused: {responses[-1].error_msg}")
    return f"a {TINY_MAX_SEQ_LEN - 1}-token prompt is served"


def streaming_responses_are_deltas(context: SmokeContext) -> str:
    api = _api(context)
    with loaded(context, "plain") as executor:
        responses = _responses(executor, executor.enqueue_request(_request(context, _prompt(10), 8, end_id=-1)))
    tokens = _tokens(responses)
    finals = [r for r in responses if r.result.is_final]
    require(len(tokens) == 8, f"8 new tokens expected in the deltas, got {len(tokens)}: {tokens}")
    require(len(finals) == 1 and finals[0].result.finish_reasons[0] == api.FinishReason.LENGTH, "one final LENGTH")
    return f"{len(responses)} responses, 8 tokens, no prompt, LENGTH"


def stop_words_are_output_end_id_is_not(context: SmokeContext) -> str:
    api = _api(context)
    first, second, third = _greedy(context, "plain", _prompt(10), 3)
    with loaded(context, "plain") as executor:
        stopped = _responses(
            executor, executor.enqueue_request(_request(context, _prompt(10), 8, stop_words=[[second]]))
        )
        ended = _responses(executor, executor.enqueue_request(_request(context, _prompt(10), 8, end_id=third)))
    require(_tokens(stopped) == [first, second], f"stop word: expected [{first}, {second}], got {_tokens(stopped)}")
    require(stopped[-1].result.finish_reasons[0] == api.FinishReason.STOP_WORDS, "stop word: not STOP_WORDS")
    require(_tokens(ended) == [first, second], f"end id: expected [{first}, {second}], got {_tokens(ended)}")
    require(ended[-1].result.finish_reasons[0] == api.FinishReason.END_ID, "end id: not END_ID")
    return "stop word's token output, end id's not"


def min_tokens_holds_back_the_end_id(context: SmokeContext) -> str:
    api = _api(context)
    _, second = _greedy(context, "plain", _prompt(10), 2)
    sampling = api.SamplingConfig(1, top_k=1, min_tokens=5)
    with loaded(context, "plain") as executor:
        request = _request(context, _prompt(10), 8, end_id=second, sampling_config=sampling)
        tokens = _tokens(_responses(executor, executor.enqueue_request(request)))
    require(len(tokens) >= 5 and second not in tokens[:5], f"the end id came before min_tokens: {tokens}")
    return f"{len(tokens)} tokens, no end id in the first 5"


def cancel_ends_with_cancelled(context: SmokeContext) -> str:
    api = _api(context)
    with loaded(context, "plain") as executor:
        request_id = executor.enqueue_request(_request(context, _prompt(10), 400, end_id=-1))
        executor.await_responses(timeout=WAIT)
        executor.cancel_request(request_id)
        responses = _responses(executor, request_id)
    reason = responses[-1].result.finish_reasons[0]
    require(reason == api.FinishReason.CANCELLED, f"the last response says {reason}")
    return f"CANCELLED after {len(_tokens(responses))} tokens"


def external_draft_tokens_round(context: SmokeContext) -> str:
    api = _api(context)
    prompt = _prompt(12)
    own = _greedy(context, "target", prompt, TINY_DRAFT_LEN + 1)
    draft = [*own[:2], own[2] + 1, own[3]]  # two right, then a wrong one
    with loaded(context, "target") as executor:
        request = _request(context, prompt, len(draft) + 1, streaming=False,
                           external_draft_tokens_config=api.ExternalDraftTokensConfig(draft))  # fmt: skip
        responses = _responses(executor, executor.enqueue_request(request))
    require(len(responses) == 1, f"expected one final response, got {len(responses)}")
    require(
        _tokens(responses) == own[:3],
        f"expected the 2 accepted tokens and one of its own {own[:3]}, got {_tokens(responses)}",
    )
    return f"accepted 2 of 4, 3 tokens in one response, finish {responses[0].result.finish_reasons[0]}"


def iteration_stats_count_reused_blocks(context: SmokeContext) -> str:
    prompt = _prompt(96)
    with loaded(context, "plain") as executor:
        executor.get_latest_iteration_stats()
        for _ in range(2):
            _responses(executor, executor.enqueue_request(_request(context, prompt, 2)))
        stats = executor.get_latest_iteration_stats()
    require(bool(stats), "no iteration stats")
    kv = stats[-1].kv_cache_stats
    require(hasattr(stats[-1], "num_active_requests") and hasattr(stats[-1], "num_queued_requests"), "request counts")
    require(kv.reused_blocks >= 96 // kv.tokens_per_block - 1, f"reused_blocks {kv.reused_blocks} after a repeat")
    return f"reused {kv.reused_blocks}, missed {kv.missed_blocks} blocks of {kv.tokens_per_block} tokens"


def kv_split_fits_target_and_draft(context: SmokeContext) -> str:
    from model.backends.trtllm.engine_config import EngineSpec
    from model.backends.trtllm.speculative import kv_fractions

    target, draft = EngineSpec.read(_engine_dir(context, "target")), EngineSpec.read(_engine_dir(context, "plain"))
    target_fraction, draft_fraction = kv_fractions(0.9, target, draft)
    with (
        loaded(context, "target", kv_cache_free_gpu_memory_fraction=target_fraction) as target_executor,
        loaded(context, "plain", kv_cache_free_gpu_memory_fraction=draft_fraction) as draft_executor,
    ):
        windows = []
        for executor, spec in ((target_executor, target), (draft_executor, draft)):
            _responses(executor, executor.enqueue_request(_request(context, _prompt(8), 2)))
            kv = executor.get_latest_iteration_stats()[-1].kv_cache_stats
            windows.append(kv.max_num_blocks * kv.tokens_per_block)
            require(
                windows[-1] >= spec.max_seq_len, f"a KV cache of {windows[-1]} tokens < max_seq_len {spec.max_seq_len}"
            )
    return f"target {windows[0]} tokens, draft {windows[1]} tokens of KV cache"


CHECKS = [
    Check(
        "engine.max_seq_len_grows_by_max_draft_len",
        "a speculative build writes max_seq_len + max_draft_len",
        max_seq_len_grows_by_max_draft_len,
    ),
    Check(
        "engine.draft_target_needs_block_reuse",
        "a draft_tokens_external target loads only with block reuse",
        draft_target_needs_block_reuse,
    ),
    Check(
        "engine.block_reuse_dropped_without_paged_context_fmha",
        "block reuse on an engine without paged context FMHA is switched off, not an error",
        block_reuse_is_dropped_without_paged_context_fmha,
    ),
    Check(
        "engine.chunked_context_needs_paged_context_fmha",
        "chunked context without paged context FMHA fails at load",
        chunked_context_needs_paged_context_fmha,
    ),
    Check(
        "engine.inflight_batching_needs_paged_kv_and_packed_input",
        "a continuous-KV engine fails at load",
        inflight_batching_needs_paged_kv_and_packed_input,
    ),
    Check(
        "engine.fail_fast_attention_window",
        "fail_fast_on_attention_window_too_large refuses a too-small KV cache",
        fail_fast_when_the_kv_cache_cannot_hold_a_sequence,
    ),
    Check(
        "engine.input_limit_without_chunked_context",
        "prompts up to min(max_seq_len - 1, max_num_tokens)",
        input_limit_without_chunked_context,
    ),
    Check(
        "engine.input_limit_with_chunked_context",
        "prompts up to max_seq_len - 1 with chunked context",
        input_limit_with_chunked_context,
    ),
    Check(
        "engine.streaming_deltas",
        "streaming responses carry new tokens only; one final LENGTH",
        streaming_responses_are_deltas,
    ),
    Check(
        "engine.stop_word_output_end_id_not",
        "a stop word's token is output (STOP_WORDS), the end id is not (END_ID)",
        stop_words_are_output_end_id_is_not,
    ),
    Check(
        "engine.min_tokens_holds_back_end_id",
        "SamplingConfig(min_tokens) blocks the end id",
        min_tokens_holds_back_the_end_id,
    ),
    Check("engine.cancel", "cancel_request ends the request with CANCELLED", cancel_ends_with_cancelled),
    Check(
        "engine.external_draft_tokens_round",
        "accepted draft prefix + one own token, in one final response",
        external_draft_tokens_round,
    ),
    Check(
        "engine.iteration_stats",
        "get_latest_iteration_stats: request counts, cumulative reused/missed blocks",
        iteration_stats_count_reused_blocks,
    ),
    Check(
        "engine.kv_split_two_engines",
        "the backend's KV split gives target and draft a full sequence each",
        kv_split_fits_target_and_draft,
    ),
]
