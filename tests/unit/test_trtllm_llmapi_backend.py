"""The tensorrt_llm_llmapi backend against a double of TensorRT-LLM 1.2's LLM API (tests/doubles/trtllm_llmapi.py).

What is checked: streamed deltas without prompt or end token, stop ids and ignore_eos, concurrent requests
batched by one LLM and never mixed up, cancellation reaching `abort()`, a failed request or step failing
only what TensorRT-LLM fails, the LLM's arguments (prefix caching, chunked prefill, tensor parallelism,
speculative configs) and the limits derived as the LLM API derives them, ModelOpt FP8 checkpoints, the
version check, logprobs and guided decoding mapped onto 1.2's SamplingParams, features 1.2 ignores refused
by name, stats, and that the engine backend and this one give the same tokens for the same model.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerBase

from model.artifacts import Artifacts, resolve_artifacts
from model.backends.base import GuidedDecoding, SamplingParams, TokenChunk
from model.backends.trtllm import TrtllmBackend
from model.backends.trtllm_llmapi import LlmApiBackend
from model.errors import ArtifactError, BackendError, EngineMismatchError, InvalidRequest
from model.settings import Backend, ServerSettings, SettingsError
from tests.doubles.trtllm import write_engine_config
from tests.doubles.trtllm_llmapi import DraftTargetDecodingConfig, EagleDecodingConfig, FakeLlmApi
from tests.unit.trtllm_fixtures import END, GREEDY, IM_END, PAD, collect, prompts, serve_all, tokens_of, wait_until


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> FakeLlmApi:
    return FakeLlmApi().install(monkeypatch)


def write_checkpoint(folder: Path, *, max_position_embeddings: int = 256, quant_algo: str | None = None) -> Path:
    """A Hugging Face checkpoint folder as far as anyone reads it: config.json, tokenizer files, a quant config."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": max_position_embeddings,
              "vocab_size": 1000}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [END, IM_END]}))
    (folder / "tokenizer.json").write_text("{}")
    if quant_algo:
        quant = {
            "producer": {"name": "modelopt"},
            "quantization": {"quant_algo": quant_algo, "kv_cache_quant_algo": quant_algo},
        }
        (folder / "hf_quant_config.json").write_text(json.dumps(quant))
    return folder


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "checkpoint")


@pytest.fixture(scope="module")
def test_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer (the guide compiler needs a real one) with the double's end and pad ids."""
    renamed = copy.deepcopy(tokenizer)
    renamed.eos_token_id, renamed.pad_token_id = END, PAD
    return renamed


@pytest.fixture
def make_llmapi(checkpoint: Path, tmp_path: Path, test_tokenizer) -> Iterator[Callable[..., LlmApiBackend]]:
    loaded: list[LlmApiBackend] = []

    def fetch(settings: ServerSettings) -> Artifacts:
        return resolve_artifacts(settings, tmp_path / "cache", None)

    def make(folder: Path | None = None, capability: tuple[int, int] | None = (9, 0), **settings: Any):
        values = {"backend": Backend.TENSORRT_LLM_LLMAPI, "max_batch_size": 8, **settings}
        model_dir = folder or checkpoint
        found = Artifacts(model_dir=model_dir, tokenizer_dir=model_dir)
        backend = LlmApiBackend.load(ServerSettings(**values), found, test_tokenizer, fetch, lambda: capability)
        loaded.append(backend)
        return backend

    yield make
    for backend in loaded:
        backend.shutdown()


def answer(chunks: list[TokenChunk]) -> tuple[list[int], str | None]:
    return tokens_of(chunks), chunks[-1].finish_reason


# -- requests ------------------------------------------------------------------------------------


def test_streams_deltas_without_prompt_or_end_token(fake_api, make_llmapi) -> None:
    fake_api.model.scripts[(21, 22)] = [30, 31, END]
    backend = make_llmapi()

    [chunks] = serve_all(backend, [([21, 22], GREEDY)])

    assert chunks == [TokenChunk((30,)), TokenChunk((31,)), TokenChunk((), "stop")]
    sampling = fake_api.llm.requests[0].sampling_params
    assert (sampling.end_id, sampling.pad_id, sampling.stop_token_ids) == (END, PAD, [IM_END])
    assert (sampling.top_k, sampling.temperature, sampling.detokenize, sampling.max_tokens) == (1, None, False, 12)


def test_a_stop_id_ends_the_answer_without_appearing_in_it(fake_api, make_llmapi) -> None:
    fake_api.model.scripts[(24,)] = [40, 41, IM_END, 42]
    backend = make_llmapi()

    [chunks] = serve_all(backend, [([24], GREEDY)])

    assert answer(chunks) == ([40, 41], "stop")


def test_ignore_eos_runs_to_max_new_tokens_through_end_and_stop_tokens(fake_api, make_llmapi) -> None:
    fake_api.model.scripts[(26,)] = [50, END, IM_END, 51]
    backend = make_llmapi()

    [chunks] = serve_all(backend, [([26], SamplingParams(max_new_tokens=4, ignore_eos=True))])

    assert answer(chunks) == ([50, END, IM_END, 51], "length")
    sampling = fake_api.llm.requests[0].sampling_params
    assert sampling.ignore_eos and sampling.stop_token_ids is None


def test_concurrent_requests_share_the_llm_and_never_mix_up(fake_api, make_llmapi) -> None:
    fake_api.iteration_seconds = 0.002
    backend = make_llmapi()
    requests = [(prompt, SamplingParams(max_new_tokens=10 + i)) for i, prompt in enumerate(prompts(8))]

    results = serve_all(backend, requests)

    for (prompt, params), chunks in zip(requests, results, strict=True):
        assert answer(chunks) == (fake_api.model.tokens(prompt, params.max_new_tokens), "length")
        assert len(chunks) >= params.max_new_tokens  # streamed token by token
    assert max(fake_api.llm.batch_sizes) == 8


def test_sampled_requests_send_their_parameters_and_a_seed(fake_api, make_llmapi) -> None:
    backend = make_llmapi()
    serve_all(backend, [([11], SamplingParams(max_new_tokens=2, temperature=0.7, top_p=0.9, seed=5)),
                        ([12], SamplingParams(max_new_tokens=2, temperature=1.0, top_k=40))])  # fmt: skip
    first, second = (r.sampling_params for r in fake_api.llm.requests)
    assert (first.temperature, first.top_p, first.top_k, first.seed) == (0.7, 0.9, None, 5)
    assert (second.top_k, second.top_p) == (40, 1.0) and second.seed is not None


def test_closing_a_stream_aborts_its_request(fake_api, make_llmapi) -> None:
    fake_api.iteration_seconds = 0.002
    backend = make_llmapi()
    backend.start()

    async def main() -> list[TokenChunk]:
        other = asyncio.create_task(collect(backend, [33], SamplingParams(max_new_tokens=40)))
        stream = backend.generate([31, 32], SamplingParams(max_new_tokens=200))
        await anext(stream)
        await stream.aclose()
        return await other

    other = asyncio.run(main())

    assert tokens_of(other) == fake_api.model.tokens([33], 40)
    wait_until(lambda: backend.in_flight == 0 and not backend._has_work())
    aborted = next(r for r in fake_api.llm.requests if r.prompt_token_ids == [31, 32])
    assert aborted.request_id not in fake_api.llm._by_id  # TensorRT-LLM ended it
    assert len(aborted.generated) < 200


def test_a_request_tensorrt_llm_fails_fails_alone(fake_api, make_llmapi) -> None:
    fake_api.model.failing_prompts.add((60, 61))
    backend = make_llmapi()

    results = serve_all(backend, [([62], GREEDY), ([60, 61], GREEDY), ([63], GREEDY)])

    assert isinstance(results[1], BackendError) and "injected failure" in str(results[1])
    assert tokens_of(results[0]) == fake_api.model.tokens([62], GREEDY.max_new_tokens)
    assert backend.is_healthy()


def test_a_failing_step_fails_its_requests_and_the_backend_goes_on(fake_api, make_llmapi) -> None:
    fake_api.model.failing_step_prompts.add((66,))
    backend = make_llmapi()

    results = serve_all(backend, [([64], GREEDY), ([66], GREEDY)])
    later = asyncio.run(collect(backend, [65], GREEDY))

    assert all(isinstance(r, BackendError) and "injected step failure" in str(r) for r in results)
    assert tokens_of(later) == fake_api.model.tokens([65], GREEDY.max_new_tokens)


# -- loading: the LLM's arguments, limits, checks ----------------------------------------------------


def test_the_llm_is_built_with_prefix_caching_chunked_prefill_and_stats(fake_api, make_llmapi, checkpoint) -> None:
    backend = make_llmapi(kv_cache_free_gpu_memory_fraction=0.85, tensor_parallel_size=1)
    llm = fake_api.llm
    assert llm.model_dir == checkpoint and llm.kwargs["tokenizer"] == str(checkpoint)
    kv = llm.kwargs["kv_cache_config"]
    assert (kv.enable_block_reuse, kv.free_gpu_memory_fraction) == (True, 0.85)
    assert llm.kwargs["enable_chunked_prefill"] and llm.kwargs["enable_iter_perf_stats"]
    assert llm.kwargs["guided_decoding_backend"] == "xgrammar"
    assert (llm.kwargs["max_seq_len"], llm.kwargs["max_num_tokens"], llm.kwargs["max_batch_size"]) == (256, 8192, 8)
    assert backend.limits.max_input_len == 255 and backend.supports == {"logprobs", "guided_decoding"}


def test_without_chunked_prefill_prompts_are_limited_as_the_llm_api_limits_them(fake_api, make_llmapi) -> None:
    backend = make_llmapi(enable_chunked_context=False, max_num_tokens=32, enable_block_reuse=False)
    assert backend.limits.max_input_len == 32
    assert not fake_api.llm.kwargs["kv_cache_config"].enable_block_reuse

    [fits, too_long] = serve_all(backend, [(list(range(100, 132)), GREEDY), (list(range(100, 133)), GREEDY)])

    assert tokens_of(fits) == fake_api.model.tokens(list(range(100, 132)), GREEDY.max_new_tokens)
    assert isinstance(too_long, BackendError) and "should not exceed max_num_tokens (32)" in str(too_long)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"max_seq_len": 512}, r"max_position_embeddings \(256\)"),
        ({"max_input_len": 64, "enable_chunked_context": False, "max_num_tokens": 32}, "exceeds the 32 prompt tokens"),
    ],
)
def test_settings_the_checkpoint_cannot_serve_are_refused(fake_api, make_llmapi, settings, message) -> None:
    with pytest.raises(SettingsError, match=message):
        make_llmapi(**settings)


def test_more_gpus_than_visible_is_refused_by_the_llm(fake_api, make_llmapi) -> None:
    with pytest.raises(EngineMismatchError, match="Only 1 GPUs are available, but 2 are required"):
        make_llmapi(tensor_parallel_size=2)


def test_a_kv_cache_too_small_for_one_sequence_fails_at_load_naming_the_fix(fake_api, make_llmapi) -> None:
    fake_api.kv_blocks = 4  # 128 tokens; one sequence of the checkpoint's max_seq_len is 256
    with pytest.raises(EngineMismatchError, match=r"LLM_KV_CACHE_FREE_GPU_MEMORY_FRACTION.*LLM_MAX_SEQ_LEN"):
        make_llmapi()
    assert fake_api.load_calls[0]["fail_fast_on_attention_window_too_large"] is True and fake_api.llms == []
    assert fake_api.warnings == []  # it failed; it did not lower max_seq_len under the server's limits

    backend = make_llmapi(max_seq_len=128)  # what the message says to do
    assert backend.limits.max_seq_len == 128


def test_a_modelopt_fp8_checkpoint_is_served_with_no_build(fake_api, make_llmapi, tmp_path) -> None:
    fp8 = write_checkpoint(tmp_path / "fp8", quant_algo="FP8")
    make_llmapi(fp8, capability=(9, 0))
    assert fake_api.llm.quant_algo == "FP8"
    with pytest.raises(EngineMismatchError, match=r"needs sm_89 or newer, and this machine has sm_80"):
        make_llmapi(fp8, capability=(8, 0))


def test_an_engine_folder_is_refused_with_the_backend_to_use(fake_api, make_llmapi, tmp_path) -> None:
    engine = tmp_path / "engine"
    write_engine_config(engine)
    with pytest.raises(ArtifactError, match="serve it with backend tensorrt_llm"):
        make_llmapi(engine)


def test_a_tensorrt_llm_other_than_1_2_is_refused(monkeypatch, make_llmapi) -> None:
    FakeLlmApi(version="1.3.0rc1").install(monkeypatch)
    with pytest.raises(EngineMismatchError, match=r"release:1\.2\.x"):
        make_llmapi()


@pytest.mark.parametrize(
    ("mode", "config"), [("draft_target", DraftTargetDecodingConfig), ("eagle3", EagleDecodingConfig)]
)
def test_a_draft_turns_on_speculative_decoding(fake_api, make_llmapi, tmp_path, mode, config) -> None:
    draft = write_checkpoint(tmp_path / "draft")
    backend = make_llmapi(draft_model_repo=str(draft), speculative_mode=mode, max_draft_len=3)

    speculative = fake_api.llm.kwargs["speculative_config"]
    assert isinstance(speculative, config) and (speculative.max_draft_len, speculative.speculative_model_dir) == (
        3,
        str(draft),
    )
    assert "guided_decoding_backend" not in fake_api.llm.kwargs and backend.supports == frozenset()
    with pytest.raises(InvalidRequest, match="logprobs"):
        asyncio.run(backend.prepare(SamplingParams(max_new_tokens=2, logprobs=1)))
    [chunks] = serve_all(backend, [([71], GREEDY)])
    assert tokens_of(chunks) == fake_api.model.tokens([71], GREEDY.max_new_tokens)


# -- features ---------------------------------------------------------------------------------------


def test_logprobs_are_the_raw_log_softmax_of_each_token_and_its_top_alternatives(fake_api, make_llmapi) -> None:
    backend = make_llmapi()
    prompt = [81, 82]

    [top2, top0] = serve_all(
        backend,
        [
            (prompt, SamplingParams(max_new_tokens=3, logprobs=2)),
            (prompt, SamplingParams(max_new_tokens=3, logprobs=0)),
        ],
    )

    made = fake_api.model.tokens(prompt, 3)
    for chunks, k in ((top2, 2), (top0, 0)):
        logprobs = [lp for chunk in chunks for lp in chunk.logprobs or ()]
        assert [lp.token_id for lp in logprobs] == made
        for step, lp in enumerate(logprobs):
            distribution = fake_api.model.distribution(prompt, made[:step])
            assert lp.logprob == pytest.approx(distribution[0][1]) and lp.logprob < 0
            assert lp.top == tuple((t, pytest.approx(v)) for t, v in distribution[:k])
    assert [r.sampling_params.logprobs for r in fake_api.llm.requests] == [2, 1]  # 0 would mean "none" to 1.2


def test_guided_decoding_maps_each_kind_onto_guided_decoding_params(fake_api, make_llmapi) -> None:
    fake_api.guided_outputs = {"json": [91, 92, 93], "json_object": [94], "regex": [95], "grammar": [96]}
    backend = make_llmapi()
    schema = '{"type": "object"}'
    guides = [GuidedDecoding("json_schema", schema), GuidedDecoding("json_object"), GuidedDecoding("regex", "a+"),
              GuidedDecoding("grammar", 'root ::= "a"')]  # fmt: skip

    results = serve_all(backend, [([90], SamplingParams(max_new_tokens=8, guided=guide)) for guide in guides])

    assert [answer(c) for c in results] == [([91, 92, 93], "stop"), ([94], "stop"), ([95], "stop"), ([96], "stop")]
    sent = [r.sampling_params.guided_decoding for r in fake_api.llm.requests]
    assert (sent[0].json, sent[1].json_object, sent[2].regex, sent[3].grammar) == (schema, True, "a+", 'root ::= "a"')


BAD_GUIDES = [
    (GuidedDecoding("json_schema", "{oops"), "response_format.json_schema.schema"),
    (GuidedDecoding("json_schema", '{"type": 5}'), "response_format.json_schema.schema"),
    (GuidedDecoding("regex", "a+("), "regex"),
    (GuidedDecoding("grammar", "root ::= "), "grammar"),
]


@pytest.mark.parametrize(("guide", "field"), BAD_GUIDES)
def test_a_guide_that_cannot_compile_is_a_400_naming_its_field(fake_api, make_llmapi, guide, field) -> None:
    backend = make_llmapi()
    with pytest.raises(InvalidRequest, match="cannot be used for structured output") as refused:
        asyncio.run(backend.prepare(SamplingParams(max_new_tokens=2, guided=guide)))
    assert refused.value.param == field


def test_a_guide_that_reaches_the_llm_uncompiled_fails_its_whole_step(fake_api, make_llmapi) -> None:
    """Why `prepare` compiles: TensorRT-LLM builds the matcher inside a step, failing every request in it."""
    fake_api.iteration_seconds = 0.01
    backend = make_llmapi()
    bad = SamplingParams(max_new_tokens=8, guided=GuidedDecoding("regex", "a+("))

    results = serve_all(backend, [([61], SamplingParams(max_new_tokens=40)), ([62], bad)])

    assert all(isinstance(r, BackendError) and "Regex parsing error" in str(r) for r in results)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(max_new_tokens=2, presence_penalty=0.5), "presence_penalty"),
        (SamplingParams(max_new_tokens=2, frequency_penalty=0.5), "frequency_penalty"),
        (SamplingParams(max_new_tokens=2, repetition_penalty=1.2), "repetition_penalty"),
        (SamplingParams(max_new_tokens=2, min_new_tokens=1), "min_tokens"),
    ],
)
def test_what_1_2_would_ignore_is_refused_by_name(fake_api, make_llmapi, params, field) -> None:
    backend = make_llmapi()
    with pytest.raises(InvalidRequest, match=field):
        asyncio.run(backend.prepare(params))


def test_stats_report_waiting_running_kv_use_and_prefix_cache_hits(fake_api, make_llmapi) -> None:
    fake_api.iteration_seconds = 0.002
    backend = make_llmapi()
    backend.start()
    shared = list(range(100, 170))  # two full 32-token blocks

    async def running() -> tuple[int, int]:
        stream = backend.generate(shared, SamplingParams(max_new_tokens=50))
        await anext(stream)
        counts = backend.stats().running, backend.stats().waiting
        await stream.aclose()
        return counts

    assert asyncio.run(running()) == (1, 0)
    asyncio.run(collect(backend, shared, SamplingParams(max_new_tokens=3)))
    wait_until(lambda: backend.stats().prefix_cache_queries == 128)  # read once the LLM went idle
    stats = backend.stats()

    assert stats.prefix_cache_hits == 64
    assert (stats.running, stats.waiting) == (0, 0) and stats.kv_cache_usage is not None


def test_the_engine_backend_and_the_llm_api_backend_agree(fake, make_backend, make_llmapi, monkeypatch) -> None:
    scripts = {(80, 81): [90, END], (82,): [91, 92, IM_END]}
    requests = [([80, 81], GREEDY), ([82], GREEDY), ([83, 84, 85], SamplingParams(max_new_tokens=5))]
    fake.model.scripts.update(scripts)
    engine_backend: TrtllmBackend = make_backend()  # loaded while the engine double is installed
    FakeLlmApi(model=fake.model).install(monkeypatch)

    by_engine = serve_all(engine_backend, requests)
    by_llm_api = serve_all(make_llmapi(), requests)

    assert [answer(c) for c in by_engine] == [answer(c) for c in by_llm_api]
    assert [answer(c) for c in by_engine][:2] == [([90], "stop"), ([91, 92], "stop")]
