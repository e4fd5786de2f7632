"""The torch engine on CPU against transformers: same greedy tokens, logprobs, penalties; isolation; the KV pool.

Reference outputs come from `transformers.generate` on an untouched copy of the same weights (the engine
takes its copy apart for the native forward). Tiny random configs are built here for the architectures the
native forward covers (Llama with llama3 rope scaling, Mistral with a sliding window, Qwen2 with q/k/v bias)
and for the transformers path (Gemma).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MinNewTokensLengthLogitsProcessor,
    MistralConfig,
    PreTrainedModel,
    Qwen2Config,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from model.backends.base import GuidedDecoding, SamplingParams, TokenGuide
from model.backends.torch import TorchBackend, load_hf_model
from model.backends.torch.config import EngineConfig
from model.backends.torch.kv_blocks import BlockManager, BlockTable
from model.backends.torch.runner import _Uploader
from model.backends.torch.sampler import RowInputs, Sampler, row_values
from model.errors import BackendError, InvalidRequest
from model.guided import GuideCompiler
from model.settings import ServerSettings, load_settings
from tests.conftest import REPO_ROOT
from tests.doubles.guides import DoubleCompiler, FailingGuide, SequenceGuide

EOS = 2
TINY = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY_HEADS = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048}
TINY_CONFIGS = {
    "llama3-rope": LlamaConfig(
        **TINY,
        **TINY_HEADS,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral-window": MistralConfig(**TINY, **TINY_HEADS, sliding_window=24),
    "qwen2-bias": Qwen2Config(**TINY, **TINY_HEADS),
}


def settings_for(**overrides: object) -> ServerSettings:
    return load_settings({"device": "cpu", "max_batch_size": 8, "kv_cache_max_tokens": 4096, **overrides}, environ={})


def in_fresh_process(case: Callable[[], None]) -> None:
    """Run a case that compiles flex_attention for CPU in its own interpreter, as a server holds one engine per
    process: after the rest of the unit suite in one process, the graph-path case decoded zeros after its first
    token (it passes alone and beside each quarter of the suite; the process-wide state behind it is not found)."""
    code = f"from tests.unit.test_torch_engine import {case.__name__}; {case.__name__}()"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "model-truss"), str(REPO_ROOT)])}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def random_model(config: object) -> PreTrainedModel:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def engine(model: PreTrainedModel, settings: ServerSettings, **kwargs: object) -> TorchBackend:
    backend = TorchBackend.from_hf_model(model, settings, frozenset({EOS}), **kwargs)
    backend.start()
    return backend


async def collect(backend: TorchBackend, ids: list[int], params: SamplingParams) -> tuple[list[int], str | None, list]:
    tokens, reason, logprobs = [], None, []
    async for chunk in backend.generate(ids, params):
        tokens.extend(chunk.token_ids)
        reason = chunk.finish_reason
        logprobs.extend(chunk.logprobs or ())
    return tokens, reason, logprobs


def run(
    backend: TorchBackend, requests: list[tuple[list[int], SamplingParams]]
) -> list[tuple[list[int], str | None, list]]:
    """All requests at once."""

    async def all_at_once() -> list:
        return await asyncio.gather(*(collect(backend, ids, params) for ids, params in requests))

    return asyncio.run(all_at_once())


def solo(backend: TorchBackend, ids: list[int], params: SamplingParams) -> list[int]:
    return run(backend, [(ids, params)])[0][0]


def hf_greedy(
    model: PreTrainedModel, ids: list[int], new_tokens: int, *, ignore_eos: bool = False, **generate_kwargs: object
) -> list[int]:
    """transformers' greedy generate alone, stopping at EOS (which the engine does not emit) unless ignore_eos."""
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None if ignore_eos else EOS,
        pad_token_id=0,
        **generate_kwargs,
    )
    if ignore_eos:
        return out[0, len(ids) :].tolist()
    generated = out[0, len(ids) :].tolist()
    return generated[: generated.index(EOS)] if EOS in generated else generated


def prompts(vocab: int, lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


# -- tiny random models: native forward and transformers path ------------------------------------


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request) -> Iterator[tuple[TorchBackend, PreTrainedModel]]:
    """A native engine with a small step budget (chunked prefill) and 16-token blocks, and the reference."""
    model = random_model(TINY_CONFIGS[request.param])
    reference = copy.deepcopy(model)
    backend = engine(model, settings_for(max_num_batched_tokens=24, kv_page_size=16))
    assert backend.load_report["model_impl"].startswith("native")
    yield backend, reference
    backend.shutdown()


def test_native_greedy_matches_generate_alone_batched_chunked_and_from_the_prefix_cache(tiny) -> None:
    backend, reference = tiny
    ids = prompts(320, (5, 40, 70, 13))  # 40 and 70 tokens exceed the 24-token step budget: chunked
    params = SamplingParams(max_new_tokens=12)
    expected = [hf_greedy(reference, p, 12) for p in ids]
    assert [solo(backend, ids[0], params)] == expected[:1]
    assert [tokens for tokens, _, _ in run(backend, [(p, params) for p in ids])] == expected
    hits = backend.stats().prefix_cache_hits
    shared = [*ids[2][:48], *prompts(320, (9,), seed=1)[0]]  # 3 cached blocks of 16 from the run above
    assert solo(backend, shared, params) == hf_greedy(reference, shared, 12)
    assert backend.stats().prefix_cache_hits - hits == 48


def test_transformers_path_for_other_architectures_matches_generate() -> None:
    config = GemmaConfig(**TINY, **TINY_HEADS, head_dim=16)
    model = random_model(config)
    reference = copy.deepcopy(model)
    backend = engine(model, settings_for(max_num_batched_tokens=24, kv_page_size=16))
    try:
        assert backend.load_report["model_impl"].startswith("transformers (architecture 'gemma'")
        ids = prompts(320, (6, 37, 50))
        params = SamplingParams(max_new_tokens=10)
        assert [t for t, _, _ in run(backend, [(p, params) for p in ids])] == [hf_greedy(reference, p, 10) for p in ids]
    finally:
        backend.shutdown()


def test_the_transformers_path_can_be_forced_and_native_refuses_what_it_cannot_compute() -> None:
    model = random_model(TINY_CONFIGS["qwen2-bias"])
    reference = copy.deepcopy(model)
    backend = engine(model, settings_for(torch_model_impl="transformers"))
    try:
        assert backend.load_report["model_impl"] == "transformers (torch_model_impl=transformers)"
        ids = prompts(320, (11,))[0]
        assert solo(backend, ids, SamplingParams(max_new_tokens=8)) == hf_greedy(reference, ids, 8)
    finally:
        backend.shutdown()
    with pytest.raises(BackendError, match="torch_model_impl=native cannot serve this checkpoint"):
        TorchBackend.from_hf_model(
            random_model(GemmaConfig(**TINY, **TINY_HEADS, head_dim=16)),
            settings_for(torch_model_impl="native"),
            frozenset({EOS}),
        )


def test_cuda_graph_path_emulated_on_cpu_gives_the_same_tokens() -> None:
    in_fresh_process(graph_path_case)


def graph_path_case() -> None:
    """Decode and prefill "graphs" replayed eagerly on the same static buffers, flex_attention compiled for CPU:
    bucket padding, the scratch block and slot, the flex block masks and packed prefill against generate."""
    model = random_model(TINY_CONFIGS["mistral-window"])
    reference = copy.deepcopy(model)
    settings = settings_for(max_batch_size=2, max_num_batched_tokens=32, kv_page_size=16, kv_cache_max_tokens=1024)
    config = dataclasses.replace(EngineConfig.from_settings(settings), flex_decode=True, graphs=True)
    backend = engine(model, settings, config=config)
    try:
        assert backend.runner.graphed and backend.runner.prefill_graphs
        ids = prompts(320, (5, 30, 45))  # three requests on two rows: one waits; 45 tokens are chunked
        params = SamplingParams(max_new_tokens=10)
        assert [t for t, _, _ in run(backend, [(p, params) for p in ids])] == [hf_greedy(reference, p, 10) for p in ids]
        paths = backend.runner.steps_by_path
        assert paths["eager"] == 0 and paths["decode graph"] > 0
        assert paths["mixed with decode rows"] > 0  # the third prompt's chunks ran in one forward with a decode row
    finally:
        backend.shutdown()


# -- the embedded SmolLM2 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(embedded_dir: Path, tokenizer) -> Iterator[tuple[TorchBackend, PreTrainedModel]]:
    """The engine with xgrammar's compiler for SmolLM2's tokenizer, and the doubles registered in `GUIDES`."""
    settings = settings_for(max_batch_size=8, max_num_batched_tokens=64)
    model = load_hf_model(settings, embedded_dir)
    compiler = DoubleCompiler(GuideCompiler(tokenizer, model.get_output_embeddings().out_features, {EOS}))
    GUIDES.clear()
    compiler.doubles = GUIDES
    backend = engine(model, settings, guides=compiler)
    yield backend, load_hf_model(settings, embedded_dir)
    backend.shutdown()


GUIDES: dict[str, Callable[[], TokenGuide]] = {}  # spec -> a double, for the `smol` engine


def test_smollm2_chunked_prefill_and_a_prefix_hit_match_generate(smol, tokenizer) -> None:
    backend, reference = smol
    text = "A mistral is a strong, cold wind that blows through the Rhone valley in winter and spring. " * 3
    ids = tokenizer(text + "Describe its effect on farming:").input_ids  # > 64 tokens: chunked
    params = SamplingParams(max_new_tokens=16)
    expected = hf_greedy(reference, ids, 16)
    assert solo(backend, ids, params) == expected
    hits = backend.stats().prefix_cache_hits
    assert solo(backend, ids, params) == expected
    assert backend.stats().prefix_cache_hits > hits


def test_logprobs_are_the_log_softmax_of_transformers_logits(smol, tokenizer) -> None:
    backend, reference = smol
    ids = tokenizer("The capital of France is").input_ids
    tokens, _, logprobs = run(backend, [(ids, SamplingParams(max_new_tokens=6, logprobs=5, ignore_eos=True))])[0]
    with torch.no_grad():
        logits = reference(torch.tensor([ids + tokens])).logits[0, len(ids) - 1 : -1].float()
    expected = logits.log_softmax(-1)
    assert [lp.token_id for lp in logprobs] == tokens
    for step, lp in enumerate(logprobs):
        assert lp.logprob == pytest.approx(float(expected[step, tokens[step]]), abs=1e-4)
        top = expected[step].topk(5)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_repetition_penalty_and_min_tokens_match_transformers_processors(smol, tokenizer) -> None:
    backend, reference = smol
    ids = tokenizer("1, 2, 3,").input_ids
    penalised = SamplingParams(max_new_tokens=16, repetition_penalty=1.3)
    assert solo(backend, ids, penalised) == hf_greedy(reference, ids, 16, repetition_penalty=1.3)
    chat = [{"role": "user", "content": "Answer with one word: is the sea wet?"}]
    stops_early = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert len(solo(backend, stops_early, SamplingParams(max_new_tokens=16))) < 10  # the model ends by itself
    at_least = SamplingParams(max_new_tokens=16, min_new_tokens=10)
    assert solo(backend, stops_early, at_least) == hf_greedy(reference, stops_early, 16, min_new_tokens=10)


def test_a_poisoned_row_leaves_its_batch_byte_identical(smol, tokenizer) -> None:
    backend, _ = smol
    innocent = [tokenizer(p).input_ids for p in ("The capital of France is", "Write a haiku about the sea:")]
    plain = SamplingParams(max_new_tokens=12, ignore_eos=True)
    seeded = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3, ignore_eos=True)
    alone = [solo(backend, innocent[0], plain), solo(backend, innocent[1], seeded)]
    poison = tokenizer("1, 2, 3,").input_ids
    poisons = [
        SamplingParams(max_new_tokens=12, temperature=9e-38, ignore_eos=True),
        SamplingParams(max_new_tokens=12, temperature=1.0, repetition_penalty=1e-300, seed=1, ignore_eos=True),
        SamplingParams(max_new_tokens=12, temperature=2.0, top_k=1_000_000, repetition_penalty=2.0, ignore_eos=True),
    ]
    results = run(backend, [(innocent[0], plain), (innocent[1], seeded)] + [(poison, p) for p in poisons])
    assert [results[0][0], results[1][0]] == alone
    for tokens, reason, _ in results[2:]:
        assert len(tokens) == 12 and reason == "length"
    assert results[2][0] == solo(backend, poison, SamplingParams(max_new_tokens=12, ignore_eos=True))  # ~greedy


def test_seeded_sampling_is_the_same_whatever_the_batch(smol, tokenizer) -> None:
    backend, _ = smol
    ids = tokenizer("Once upon a time").input_ids
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.95, seed=11, ignore_eos=True)
    alone = solo(backend, ids, params)
    others = [tokenizer(p).input_ids for p in ("Hi", "The sea is", "1, 2, 3,")]
    batch = run(
        backend,
        [(o, SamplingParams(max_new_tokens=20, temperature=0.7, seed=i)) for i, o in enumerate(others)]
        + [(ids, params)],
    )
    assert batch[-1][0] == alone
    assert solo(backend, ids, dataclasses.replace(params, seed=12)) != alone


def test_guided_rows_follow_their_mask_beside_free_rows(smol, tokenizer) -> None:
    backend, _ = smol
    target = tokenizer(" forty two", add_special_tokens=False).input_ids
    GUIDES["answer"] = lambda: SequenceGuide(target)
    free_ids = tokenizer("The capital of France is").input_ids
    free = SamplingParams(max_new_tokens=10, ignore_eos=True)
    guided = SamplingParams(max_new_tokens=10, temperature=1.0, seed=5, guided=GuidedDecoding("regex", "answer"))
    results = run(backend, [(tokenizer("Answer:").input_ids, guided), (free_ids, free)])
    assert results[0][:2] == (target, "stop")
    assert results[1][0] == solo(backend, free_ids, free)
    assert "guided_decoding" in backend.supports


def test_a_row_whose_guide_breaks_fails_alone(smol, tokenizer) -> None:
    backend, _ = smol
    GUIDES["breaks"] = lambda: FailingGuide(tokenizer(" a b c d", add_special_tokens=False).input_ids, 2)
    free_ids = tokenizer("Write a haiku about the sea:").input_ids
    free = SamplingParams(max_new_tokens=10, ignore_eos=True)

    async def scenario() -> tuple[BaseException | None, list[int]]:
        broken = asyncio.create_task(
            collect(backend, free_ids, SamplingParams(8, guided=GuidedDecoding("regex", "breaks")))
        )
        fine = asyncio.create_task(collect(backend, free_ids, free))
        try:
            await broken
            error = None
        except BackendError as exc:
            error = exc
        return error, (await fine)[0]

    error, tokens = asyncio.run(scenario())
    assert error is not None and "injected" not in str(error)  # the client gets no internals
    assert tokens == solo(backend, free_ids, free)
    assert backend.is_healthy()


CITY = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "capital": {"type": "boolean"}},  # SmolLM2 loops on integers
    "required": ["name", "capital"],
}


def test_a_json_schema_row_compiled_by_xgrammar_validates_beside_a_free_row(smol, tokenizer) -> None:
    backend, _ = smol
    ask = tokenizer("Describe a city as JSON:").input_ids
    constrained = SamplingParams(max_new_tokens=40, guided=GuidedDecoding("json_schema", json.dumps(CITY)))
    asyncio.run(backend.prepare(constrained))  # compiles off the loop, as the server does
    free_ids = tokenizer("The capital of France is").input_ids
    free = SamplingParams(max_new_tokens=12, ignore_eos=True)
    (tokens, reason, _), (free_tokens, _, _) = run(backend, [(ask, constrained), (free_ids, free)])
    assert reason == "stop"  # the grammar completed and the end token it then allows was sampled
    jsonschema.validate(json.loads(tokenizer.decode(tokens)), CITY)
    assert free_tokens == solo(backend, free_ids, free)


def test_prepare_refuses_a_bad_schema_and_min_tokens_with_a_grammar_naming_the_field(smol) -> None:
    backend, _ = smol
    with pytest.raises(InvalidRequest) as bad:
        asyncio.run(backend.prepare(SamplingParams(max_new_tokens=4, guided=GuidedDecoding("json_schema", "{"))))
    assert bad.value.param == "response_format.json_schema.schema"
    both = SamplingParams(max_new_tokens=4, min_new_tokens=2, guided=GuidedDecoding("json_object"))
    with pytest.raises(InvalidRequest) as combined:
        asyncio.run(backend.prepare(both))
    assert combined.value.param == "min_tokens"


def test_without_a_grammar_compiler_structured_output_is_refused_by_name(embedded_dir: Path) -> None:
    settings = settings_for(max_batch_size=2)
    backend = TorchBackend.from_hf_model(load_hf_model(settings, embedded_dir), settings, frozenset({EOS}))
    assert "guided_decoding" not in backend.supports
    with pytest.raises(InvalidRequest, match="response_format"):
        asyncio.run(backend.prepare(SamplingParams(max_new_tokens=4, guided=GuidedDecoding("json_object"))))


def test_bad_token_ids_fail_that_request_with_a_400(smol) -> None:
    backend, _ = smol
    with pytest.raises(InvalidRequest, match=r"in \[0, 49152\)"):
        run(backend, [([1, 10**9], SamplingParams(max_new_tokens=2))])


def test_stats_report_rows_waiting_kv_use_and_prefix_hits(smol, tokenizer) -> None:
    backend, _ = smol
    ids = tokenizer("Tell me about the weather in Provence in winter, please, in two sentences. " * 6).input_ids
    for _ in range(2):
        solo(backend, ids, SamplingParams(max_new_tokens=2))
    stats = backend.stats()
    assert stats.running == 0 and stats.waiting == 0 and stats.kv_cache_usage == 0.0
    assert stats.prefix_cache_queries >= stats.prefix_cache_hits > 0
    assert backend.limits.kv_cache_tokens == 4096


# -- the KV pool --------------------------------------------------------------------------------


def test_kv_pool_exhaustion_queues_and_preempts_without_mixing_rows() -> None:
    """A pool of 192 tokens (12 blocks of 16) for 6 requests of up to ~90 tokens each."""
    model = random_model(TINY_CONFIGS["llama3-rope"])
    reference = copy.deepcopy(model)
    backend = engine(model, settings_for(kv_page_size=16, kv_cache_max_tokens=192, max_num_batched_tokens=32))
    try:
        ids = prompts(320, (30, 41, 9, 60, 25, 50), seed=4)
        params = SamplingParams(max_new_tokens=30, ignore_eos=True)
        expected = [hf_greedy(reference, p, 30, ignore_eos=True) for p in ids]
        assert [t for t, _, _ in run(backend, [(p, params) for p in ids])] == expected
        assert backend.limits.kv_cache_tokens == 192 and backend.stats().kv_cache_usage == 0.0
    finally:
        backend.shutdown()


def test_block_manager_reuses_cached_prefixes_and_evicts_least_recently_freed() -> None:
    blocks = BlockManager(5, 4, prefix_caching=True)  # 4 usable blocks of 4 tokens
    first, second = BlockTable(), BlockTable()
    tokens = list(range(10))
    assert blocks.allocate(first, tokens) == 0 and len(first.blocks) == 3
    blocks.register(first, tokens, computed=10)  # two full blocks get a hash
    assert blocks.allocate(second, [*tokens[:8], 99]) == 8  # both reused (at least one token left to compute)
    assert second.blocks[:2] == first.blocks[:2] and blocks.free_blocks == 0
    cached = first.blocks[:2]
    blocks.free(first)
    blocks.free(second)
    assert blocks.free_blocks == 4 and blocks.usage == 0.0
    assert blocks.cached_prefix(tokens) == cached
    third = BlockTable()
    blocks.allocate(third, [7] * 16)  # takes all four blocks: the cached ones are evicted
    assert blocks.cached_prefix(tokens) == []
    assert (blocks.queries, blocks.hits) == (10 + 9 + 16, 8)


def test_uploads_of_one_step_never_share_staging_memory() -> None:
    """A second upload must not overwrite the first while its copy may still be queued (CUDA, non-blocking)."""
    uploader = _Uploader(torch.device("cpu"))
    uploader.flip()
    (first,) = uploader.upload([np.arange(5)], torch.int64)
    (second,) = uploader.upload([np.arange(500) + 100], torch.int64)  # outgrows the buffer too
    assert first.tolist() == [0, 1, 2, 3, 4] and second[:2].tolist() == [100, 101]


def test_no_launch_reuses_staging_memory_that_its_own_or_the_previous_launch_uploaded() -> None:
    in_fresh_process(staging_memory_case)


def staging_memory_case() -> None:
    """On CUDA an upload is a non-blocking copy that runs later on the stream; the host must not rewrite its
    staging memory until then, i.e. before the launch after next (the engine collects step N before launching
    N + 2). On CPU an upload returns the staging memory itself, so the ranges are read off the results: the
    graph path (decode inputs, chunk inputs, sampler rows, repetition-penalty tokens in one step) must keep the
    ranges of each launch apart from each other and from the launch before."""
    model = random_model(TINY_CONFIGS["qwen2-bias"])
    settings = settings_for(max_batch_size=4, max_num_batched_tokens=32, kv_page_size=16, kv_cache_max_tokens=1024)
    config = dataclasses.replace(EngineConfig.from_settings(settings), flex_decode=True, graphs=True)
    backend = TorchBackend.from_hf_model(model, settings, frozenset({EOS}), config=config)
    runner = backend.runner
    launches: list[list[tuple[int, int]]] = []
    upload, launch = runner._upload.upload, runner.launch

    def recording_upload(arrays, dtype):
        out = upload(arrays, dtype)
        launches[-1].extend((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in out if t.numel())
        return out

    def recording_launch(plan, batch):
        launches.append([])
        return launch(plan, batch)

    runner._upload.upload, runner.launch = recording_upload, recording_launch
    backend.start()
    try:
        ids = prompts(320, (5, 40, 23, 61), seed=2)
        params = [SamplingParams(max_new_tokens=12, repetition_penalty=1.2), SamplingParams(max_new_tokens=12)]
        results = run(backend, [(p, params[i % 2]) for i, p in enumerate(ids)])
    finally:
        backend.shutdown()
    assert all(len(tokens) == 12 for tokens, _, _ in results)
    assert len(launches) > 12 and runner.steps_by_path["mixed with decode rows"] > 0
    for previous, current in zip([[], *launches], launches, strict=False):
        ranges = sorted(current)
        assert all(end <= start for (_, end), (start, _) in itertools.pairwise(ranges))
        assert not any(s < e2 and s2 < e for s, e in current for s2, e2 in previous)


# -- the sampler on its own -----------------------------------------------------------------------


def _sample(logits: torch.Tensor, params: list[SamplingParams], sampler: Sampler | None = None, step: int = 0):
    sampler = sampler or Sampler(
        slots=len(params), vocab_size=logits.shape[1], stop_ids=frozenset({EOS}), device=torch.device("cpu")
    )
    rows = [row_values(p, slot, step, p.seed or 0) for slot, p in enumerate(params)]
    inputs = RowInputs(
        torch.tensor([r[0] for r in rows]),
        torch.tensor([r[1] for r in rows], dtype=torch.float32),
        torch.full((len(params), sampler.bitmask_words), -1, dtype=torch.int32),
    )
    ints, floats = sampler.sample(logits, inputs, full=True, logprobs=True)
    return ints[:, 0], floats, sampler


def test_sampler_is_finite_for_extreme_values_and_tiny_temperature_is_greedy() -> None:
    logits = torch.randn(4, 64) * 30
    params = [
        SamplingParams(1, temperature=9e-38, seed=1),
        SamplingParams(1, temperature=2.0, repetition_penalty=1e-300, seed=2),
        SamplingParams(1, temperature=1.0, frequency_penalty=2.0, presence_penalty=-2.0, seed=3),
        SamplingParams(1, temperature=1e-5, top_p=1e-9, top_k=10**9, seed=4),
    ]
    sampler = Sampler(slots=4, vocab_size=64, stop_ids=frozenset({EOS}), device=torch.device("cpu"))
    sampler.mark_seen(torch.arange(4).repeat_interleave(64), torch.arange(64).repeat(4))  # every token seen
    tokens, floats, _ = _sample(logits, params, sampler)
    assert torch.isfinite(floats).all()
    assert int(tokens[0]) == int(logits[0].argmax())
    assert all(0 <= int(t) < 64 for t in tokens)


def test_penalties_follow_transformers_and_openai_formulas() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 32)
    history = torch.tensor([[3, 5, 5, 7]])  # prompt [3], output [5, 5, 7]
    sampler = Sampler(slots=1, vocab_size=32, stop_ids=frozenset({EOS}), device=torch.device("cpu"))
    sampler.mark_seen(torch.tensor([0]), torch.tensor([3]))
    sampler.output_counts[0, torch.tensor([5, 7])] = torch.tensor([2, 1], dtype=torch.int32)
    params = SamplingParams(1, repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25)
    penalised = sampler._penalise(logits.clone(), torch.tensor([0]), torch.tensor([row_values(params, 0, 3, 0)[1]]))
    expected = RepetitionPenaltyLogitsProcessor(1.5)(history, logits.clone())
    counts = torch.zeros(32)
    counts[5], counts[7] = 2, 1
    expected = expected - 0.25 * counts - 0.5 * (counts > 0)  # OpenAI: frequency * count + presence * (count > 0)
    assert torch.allclose(penalised, expected)
    logits[0, EOS] = 100.0  # the end token would win
    min_tokens = MinNewTokensLengthLogitsProcessor(1, 3, EOS)(torch.tensor([[1, 4]]), logits.clone())
    tokens, _, _ = _sample(logits.clone(), [SamplingParams(1, min_new_tokens=3)], step=1)
    assert int(tokens[0]) == int(min_tokens.argmax()) != EOS
    tokens, _, _ = _sample(logits.clone(), [SamplingParams(1, min_new_tokens=3)], step=3)
    assert int(tokens[0]) == EOS


def test_top_k_and_top_p_keep_the_tokens_transformers_keeps() -> None:
    from model.backends.torch.sampler import _top_k_top_p

    torch.manual_seed(1)
    for _ in range(5):
        scores = torch.randn(1, 200) * 3
        for k, p in ((0, 0.9), (20, 1.0), (15, 0.5)):
            ours = _top_k_top_p(scores.clone(), torch.tensor([k]), torch.tensor([p])) > float("-inf")
            theirs = scores.clone()
            if k:
                theirs = TopKLogitsWarper(k)(None, theirs)
            if p < 1.0:
                theirs = TopPLogitsWarper(p)(None, theirs)
            assert torch.equal(ours, theirs > float("-inf"))


def test_seeded_noise_samples_the_softmax_distribution() -> None:
    """Counter-based Gumbel noise: over many (seed, step) pairs the frequencies follow softmax(logits / T)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(400, 1)
    sampler = Sampler(slots=400, vocab_size=6, stop_ids=frozenset(), device=torch.device("cpu"))
    counts = torch.zeros(6)
    for step in range(10):
        params = [SamplingParams(1, temperature=1.0, seed=s) for s in range(400)]
        tokens, _, _ = _sample(logits, params, sampler, step=step)
        counts += torch.bincount(tokens, minlength=6)
    expected = logits[0].softmax(-1) * 4000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (counts, expected)  # p = 0.001 for 5 degrees of freedom
    same = [SamplingParams(1, temperature=1.0, seed=s) for s in range(3)]
    assert _sample(logits[:3], same, step=9)[0].tolist() == _sample(logits[:3], same, step=9)[0].tolist()


def test_a_long_prompt_never_stalls_the_short_ones_beside_it(embedded_dir: Path, tokenizer) -> None:
    """1,531 prompt tokens arriving with 15 short prompts (the step budget is 256 tokens on CPU): every short
    request gets its first token within the first steps, then a token at every step until it ends, while the
    long prompt is prefilled in chunks beside them. Counted in engine steps, not seconds."""
    settings = settings_for(max_batch_size=16, kv_cache_max_tokens=8192)
    backend = engine(load_hf_model(settings, embedded_dir), settings)
    steps: dict[int, list[int]] = {}  # request id -> the engine step at which each of its tokens arrived
    prompt_of: dict[int, int] = {}
    deliver = backend._deliver

    def recording(seq, token, ints, floats) -> None:
        steps.setdefault(seq.request_id, []).append(backend.steps)
        prompt_of[seq.request_id] = seq.num_prompt
        deliver(seq, token, ints, floats)

    backend._deliver = recording
    try:
        text = " ".join(f"Item {i}: the mistral blows down the Rhone valley." for i in range(200))
        long_ids = tokenizer(text).input_ids[:1531]
        shorts = [tokenizer(f"Question {i}: what is {i} plus {i}?").input_ids for i in range(15)]
        params = SamplingParams(max_new_tokens=16, ignore_eos=True)
        results = run(backend, [(long_ids, params)] + [(s, params) for s in shorts])
    finally:
        backend.shutdown()
    assert all(len(tokens) == 16 for tokens, _, _ in results)
    short_steps = [seen for request, seen in steps.items() if prompt_of[request] != 1531]
    (long_steps,) = [seen for request, seen in steps.items() if prompt_of[request] == 1531]
    assert len(short_steps) == 15
    for seen in short_steps:
        assert seen[0] <= 3, f"a short request waited until step {seen[0]} for its first token"
        assert np.diff(seen).tolist() == [1] * 15, f"a short request skipped steps: {seen}"
    assert long_steps[0] > max(seen[0] for seen in short_steps) + 4  # its chunks ran while the others decoded
