"""Contract points of `tensorrt_llm.LLM` (1.2, PyTorch backend) that tests/doubles/trtllm_llmapi.py assumes.

Every check builds an LLM on the tiny checkpoint `fixtures.tiny_checkpoint` made, with the arguments
model/backends/trtllm_llmapi/ uses, sends token ids as the backend does, and shuts the LLM down.
Not checked: a failing PyExecutor step failing its requests (cannot be provoked safely), and
speculative decoding (needs a trained draft or EAGLE-3 head; random weights accept nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Iterator
from typing import Any

from scripts.smoke import Check, CheckFailed, SmokeContext, require

SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}


@contextlib.contextmanager
def llm(context: SmokeContext, **overrides: Any) -> Iterator[Any]:
    llmapi = context.trtllm.llmapi
    options = {
        "max_batch_size": 4,
        "max_seq_len": 512,
        "max_num_tokens": 256,
        "enable_chunked_prefill": True,
        "kv_cache_config": llmapi.KvCacheConfig(enable_block_reuse=True, free_gpu_memory_fraction=0.2),
        "guided_decoding_backend": "xgrammar",
        "enable_iter_perf_stats": True,
        "fail_fast_on_attention_window_too_large": True,
        **overrides,
    }
    instance = llmapi.LLM(str(context.checkpoint_dir), tokenizer=str(context.checkpoint_dir), **options)
    try:
        yield instance
    finally:
        instance.shutdown()


def _sampling(context: SmokeContext, **fields: Any) -> Any:
    options = {"end_id": context.end_id, "pad_id": context.end_id, "detokenize": False, "top_k": 1, **fields}
    return context.trtllm.llmapi.SamplingParams(**options)


def _prompt(length: int) -> list[int]:
    return [100 + i % 500 for i in range(length)]


def _stream(instance: Any, prompt: list[int], sampling: Any, stop_after: int | None = None) -> tuple[list[Any], Any]:
    """(the CompletionOutput after every response, the last one); `stop_after` responses, then abort()."""

    async def run() -> tuple[list[Any], Any]:
        seen: list[Any] = []
        output = instance.generate_async(prompt, sampling, streaming=True)
        async for result in output:
            completion = result.outputs[0]
            seen.append(
                (list(completion.token_ids_diff), list(completion.logprobs_diff or []), completion.finish_reason)
            )
            if stop_after is not None and len(seen) == stop_after:
                output.abort()
        return seen, output.outputs[0]

    return asyncio.run(run())


def pytorch_backend(context: SmokeContext) -> str:
    with llm(context) as instance:
        backend = getattr(instance.args, "backend", None)
    require(backend == "pytorch", f"tensorrt_llm.LLM runs the {backend!r} backend")
    return "tensorrt_llm.LLM is the PyTorch backend"


def streaming_deltas(context: SmokeContext) -> str:
    with llm(context) as instance:
        seen, last = _stream(instance, _prompt(10), _sampling(context, max_tokens=8, ignore_eos=True))
    joined = [t for tokens, _, _ in seen for t in tokens]
    require(joined == list(last.token_ids) and len(joined) == 8, f"deltas {joined} vs token_ids {last.token_ids}")
    require(seen[-1][2] == "length", f"finish reason {seen[-1][2]!r}")
    return f"{len(seen)} responses, 8 tokens, 'length'"


def stop_token_is_cut(context: SmokeContext) -> str:
    with llm(context) as instance:
        _, free = _stream(instance, _prompt(10), _sampling(context, max_tokens=3, ignore_eos=True))
        first, second = list(free.token_ids)[:2]
        _, stopped = _stream(instance, _prompt(10), _sampling(context, max_tokens=8, stop_token_ids=[second]))
    require(list(stopped.token_ids) == [first], f"expected [{first}] before the stop id, got {list(stopped.token_ids)}")
    require(
        stopped.finish_reason == "stop" and stopped.stop_reason == second,
        f"{stopped.finish_reason}, {stopped.stop_reason}",
    )
    return "stop id cut from token_ids, finish 'stop'"


def abort_cancels(context: SmokeContext) -> str:
    with llm(context) as instance:
        _, last = _stream(instance, _prompt(10), _sampling(context, max_tokens=400, ignore_eos=True), stop_after=2)
    require(last.finish_reason == "cancelled", f"finish reason after abort(): {last.finish_reason!r}")
    require(len(last.token_ids) < 400, "the request ran to its end")
    return f"'cancelled' after {len(last.token_ids)} tokens"


def fail_fast_attention_window(context: SmokeContext) -> str:
    kv = context.trtllm.llmapi.KvCacheConfig(enable_block_reuse=True, free_gpu_memory_fraction=0.2, max_tokens=128)
    try:
        with llm(context, kv_cache_config=kv) as instance:
            kept = getattr(instance.args, "max_seq_len", None)
    except Exception as exc:  # the refusal this check expects
        return f"refused at load: {str(exc)[:120]}"
    raise CheckFailed(f"a 128-token KV cache loaded for max_seq_len 512 (the LLM now says max_seq_len {kept})")


def input_limit_without_chunked_prefill(context: SmokeContext) -> str:
    with llm(context, enable_chunked_prefill=False, max_num_tokens=128) as instance:
        try:
            instance.generate_async(_prompt(129), _sampling(context, max_tokens=1))
        except Exception as exc:  # ValueError or RequestError, by revision
            message = str(exc)
        else:
            message = ""
        _stream(instance, _prompt(128), _sampling(context, max_tokens=1))
    require("should not exceed max_num_tokens (128)" in message, f"129 prompt tokens were not refused: {message!r}")
    return "129 refused at submission, 128 served"


def _raw_logprobs(context: SmokeContext, sequence: list[int]) -> list[float]:
    """log_softmax of the checkpoint's own next-token logits, by transformers on the same weights."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(context.checkpoint_dir, torch_dtype=torch.float32).to("cuda")
    with torch.no_grad():
        logits = model(torch.tensor([sequence], device="cuda")).logits[0, -1].float()
    return torch.log_softmax(logits, dim=-1).tolist()


def logprobs_are_raw_top_k(context: SmokeContext) -> str:
    prompt = _prompt(10)
    sampling = _sampling(context, max_tokens=1, top_k=None, temperature=0.5, seed=1, logprobs=3)
    with llm(context) as instance:
        _, last = _stream(instance, prompt, sampling)
    token, candidates = last.token_ids[0], last.logprobs[0]
    require(token in candidates and len(candidates) >= 3, f"the dict {candidates} lacks the sampled token or top 3")
    raw = _raw_logprobs(context, prompt)
    worst = max(abs(entry.logprob - raw[t]) for t, entry in candidates.items())
    require(worst < 0.15, f"logprobs differ from the raw log-softmax by {worst:.3f} (temperature applied?)")
    return f"{len(candidates)} entries incl. the sampled token, max |diff| vs raw log-softmax {worst:.3f}"


def logprobs_zero_asks_for_none(context: SmokeContext) -> str:
    with llm(context) as instance:
        _, last = _stream(instance, _prompt(10), _sampling(context, max_tokens=2, logprobs=0))
    require(not last.logprobs, f"logprobs=0 returned {last.logprobs}")
    return "logprobs=0 returns none (the backend asks for at least 1)"


def guided_json_schema(context: SmokeContext) -> str:
    from transformers import AutoTokenizer

    guide = context.trtllm.llmapi.GuidedDecodingParams(json=json.dumps(SCHEMA))
    with llm(context) as instance:
        _, last = _stream(instance, _prompt(10), _sampling(context, max_tokens=64, guided_decoding=guide))
    text = AutoTokenizer.from_pretrained(context.checkpoint_dir).decode(last.token_ids)
    require(last.finish_reason == "stop", f"finish reason {last.finish_reason!r} for {text!r}")
    parsed = json.loads(text)
    require(isinstance(parsed.get("answer"), int), f"{text!r} does not match the schema")
    return f"{text!r}, 'stop'"


def bad_guide_fails_its_step(context: SmokeContext) -> str:
    """The matcher is built inside a step (GuidedDecoder._build): the backend compiles guides first for this reason."""
    bad = context.trtllm.llmapi.GuidedDecodingParams(regex="a+(")

    async def run(instance: Any) -> list[BaseException | None]:
        async def outcome(prompt: list[int], sampling: Any, started: asyncio.Event | None) -> BaseException | None:
            try:
                async for _ in instance.generate_async(prompt, sampling, streaming=True):
                    if started is not None:
                        started.set()
            except Exception as exc:  # the outcome this check looks at
                return exc
            return None

        started = asyncio.Event()
        plain = asyncio.create_task(outcome(_prompt(10), _sampling(context, max_tokens=400, ignore_eos=True), started))
        await started.wait()
        guided = await outcome(_prompt(10), _sampling(context, max_tokens=8, guided_decoding=bad), None)
        return [await plain, guided]

    with llm(context) as instance:
        plain_error, guided_error = asyncio.run(run(instance))
    require(guided_error is not None, "a regex xgrammar cannot parse was served")
    require(plain_error is not None, f"only the guided request failed ({guided_error}): the step went on")
    return f"both requests of the step failed: {str(guided_error)[:100]}"


def penalties_are_ignored(context: SmokeContext) -> str:
    with llm(context) as instance:
        _, plain = _stream(instance, _prompt(10), _sampling(context, max_tokens=16, ignore_eos=True))
        penalized = _sampling(context, max_tokens=16, ignore_eos=True, repetition_penalty=2.0, presence_penalty=2.0,
                              frequency_penalty=2.0)  # fmt: skip
        _, with_penalties = _stream(instance, _prompt(10), penalized)
    require(
        list(plain.token_ids) == list(with_penalties.token_ids),
        "penalties changed the tokens: this TensorRT-LLM applies them, so the backend could offer them",
    )
    return "same tokens with and without penalties (ignored, as the backend assumes when it refuses them)"


def seed_makes_sampling_reproducible(context: SmokeContext) -> str:
    def sample(instance: Any, seed: int) -> list[int]:
        sampling = _sampling(context, max_tokens=24, ignore_eos=True, top_k=None, temperature=1.0, seed=seed)
        return list(_stream(instance, _prompt(10), sampling)[1].token_ids)

    with llm(context) as instance:
        first, again, other = sample(instance, 7), sample(instance, 7), sample(instance, 8)
    require(first == again, "the same seed gave different tokens")
    require(first != other, "different seeds gave the same tokens")
    return "same seed, same tokens; another seed, others"


def stats_count_reused_blocks(context: SmokeContext) -> str:
    with llm(context) as instance:
        for _ in range(2):
            _stream(instance, _prompt(96), _sampling(context, max_tokens=2))
        rows = [json.loads(r) if isinstance(r, str) else r for r in instance.get_stats(timeout=2)]
    kv = next((row["kvCacheStats"] for row in reversed(rows) if row.get("kvCacheStats")), None)
    require(kv is not None, f"no kvCacheStats in {len(rows)} stats rows")
    require(
        all(key in kv for key in ("usedNumBlocks", "maxNumBlocks", "tokensPerBlock", "reusedBlocks", "missedBlocks")),
        str(kv),
    )
    require(
        kv["reusedBlocks"] >= math.floor(96 / kv["tokensPerBlock"]) - 1,
        f"reusedBlocks {kv['reusedBlocks']} after a repeat",
    )
    return f"reusedBlocks {kv['reusedBlocks']}, missedBlocks {kv['missedBlocks']}"


CHECKS = [
    Check("llmapi.pytorch_backend", "tensorrt_llm.LLM is the PyTorch backend", pytorch_backend),
    Check(
        "llmapi.streaming_deltas", "token_ids_diff are the new ids; they join to token_ids; 'length'", streaming_deltas
    ),
    Check("llmapi.stop_token_cut", "a stop_token_ids id ends with 'stop' and is cut from token_ids", stop_token_is_cut),
    Check("llmapi.abort", "RequestOutput.abort() ends the request with 'cancelled'", abort_cancels),
    Check(
        "llmapi.fail_fast_attention_window",
        "fail_fast_on_attention_window_too_large refuses a KV cache smaller than one max_seq_len sequence",
        fail_fast_attention_window,
    ),
    Check(
        "llmapi.input_limit_without_chunked_prefill",
        "prompts above max_num_tokens refused at submission",
        input_limit_without_chunked_prefill,
    ),
    Check(
        "llmapi.logprobs_raw_top_k",
        "logprobs=k: k most likely + the sampled token, raw log-softmax",
        logprobs_are_raw_top_k,
    ),
    Check("llmapi.logprobs_zero_is_none", "logprobs=0 means no logprobs", logprobs_zero_asks_for_none),
    Check(
        "llmapi.guided_json_schema",
        "GuidedDecodingParams(json=schema) with xgrammar gives schema-valid JSON, 'stop'",
        guided_json_schema,
    ),
    Check(
        "llmapi.bad_guide_fails_step",
        "a guide xgrammar cannot compile fails every request of its step",
        bad_guide_fails_its_step,
    ),
    Check(
        "llmapi.penalties_ignored",
        "1.2's sampler ignores repetition/presence/frequency penalties",
        penalties_are_ignored,
    ),
    Check("llmapi.seed_reproducible", "a per-request seed reproduces a sample", seed_makes_sampling_reproducible),
    Check(
        "llmapi.iteration_stats", "get_stats(): kvCacheStats with cumulative reusedBlocks", stats_count_reused_blocks
    ),
]
