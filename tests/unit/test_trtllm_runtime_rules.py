"""What a real TensorRT-LLM 1.2 runtime refuses or derives at load, against the double that enforces it.

One test (at least) per audit finding; each fails if the backend's fix is undone, because the double
then raises what the runtime raises, or generates what the runtime would:
H1 block reuse for draft-target targets; H2 the runtime's input limit; M1 two engines' KV caches on one
GPU; M2 fail fast when the KV cache cannot hold one sequence; M3 in-flight batching build requirements;
M4 chunked context requirements; and the low items (built max_seq_len of draft-target engines, from_dir's
ignored max_input_len, step-wide failures, draft truncation), plus min_tokens, refused features and stats.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from model.artifacts import Artifacts
from model.backends.base import Limits, SamplingParams
from model.errors import BackendError, EngineMismatchError, InvalidRequest
from model.schema import check_limits
from model.settings import SettingsError
from tests.doubles.trtllm import write_engine_config
from tests.unit.trtllm_fixtures import END, GREEDY, collect, serve_all, tokens_of, wait_until

LONG = list(range(100, 200))  # a 100-token prompt


def long_prompt(length: int) -> list[int]:
    return [100 + i % 500 for i in range(length)]


# -- H1: a draft-target target loads only with KV-cache block reuse --------------------------------


def test_a_draft_target_engine_served_without_its_draft_loads_with_block_reuse(fake, make_backend, engine_dir) -> None:
    write_engine_config(engine_dir, max_draft_len=4)  # the shipped 70B target, served alone
    backend = make_backend()
    assert fake.from_dir_calls[0]["kv_cache_enable_block_reuse"] and fake.warnings == []
    [chunks] = serve_all(backend, [([11, 12], GREEDY)])
    assert tokens_of(chunks) == fake.model.tokens([11, 12], GREEDY.max_new_tokens)


def test_a_draft_target_target_without_paged_context_fmha_is_refused_before_loading(
    fake, make_backend, engine_dir
) -> None:
    write_engine_config(engine_dir, max_draft_len=4, paged_context_fmha=False)
    with pytest.raises(EngineMismatchError, match=r"build\.paged_context_fmha: true"):
        make_backend()
    assert fake.from_dir_calls == []


def test_block_reuse_cannot_be_switched_off_for_a_draft_target_target(fake, make_backend, engine_dir) -> None:
    write_engine_config(engine_dir, max_draft_len=4)
    with pytest.raises(SettingsError, match=r"LLM_ENABLE_BLOCK_REUSE"):
        make_backend(enable_block_reuse=False)


def test_block_reuse_asked_of_an_engine_that_cannot_reuse_is_refused_not_silently_dropped(
    fake, make_backend, engine_dir
) -> None:
    write_engine_config(engine_dir, paged_context_fmha=False)
    with pytest.raises(SettingsError, match="switches block reuse off"):
        make_backend(enable_block_reuse=True)
    make_backend()  # by default it is simply off there, and TensorRT-LLM has nothing to fix
    assert fake.from_dir_calls[-1]["kv_cache_enable_block_reuse"] is False and fake.warnings == []


# -- H2: the prompt limit is the runtime's, not build_config.max_input_len -------------------------


def test_without_chunked_context_prompts_are_limited_to_max_num_tokens(fake, make_backend, engine_dir) -> None:
    write_engine_config(engine_dir, max_input_len=64, max_seq_len=128, max_num_tokens=32)
    backend = make_backend(enable_chunked_context=False)
    assert backend.limits.max_input_len == 32

    [fits, too_long] = serve_all(backend, [(long_prompt(32), GREEDY), (long_prompt(33), GREEDY)])

    assert tokens_of(fits) == fake.model.tokens(long_prompt(32), GREEDY.max_new_tokens)
    assert isinstance(too_long, BackendError) and "exceeds maximum input length (32)" in str(too_long)
    with pytest.raises(InvalidRequest, match="accepts at most 32"):  # what a client gets instead: a 400
        check_limits(33, GREEDY, backend.limits)


@pytest.mark.parametrize(("chunked", "accepted"), [(False, 8192), (None, 32767)])
def test_the_32k_mistral_engine_accepts_what_the_runtime_accepts(fake, make_backend, engine_dir, chunked, accepted):
    write_engine_config(engine_dir, max_batch_size=32, max_input_len=32256, max_seq_len=32768, max_num_tokens=8192)
    backend = make_backend(max_batch_size=32, enable_chunked_context=chunked)
    assert backend.limits.max_input_len == accepted
    assert fake.executor.limits.max_input_len == accepted  # the double derives it independently


def test_chunked_context_is_on_by_default_and_long_prompts_are_served(fake, make_backend, engine_dir) -> None:
    write_engine_config(engine_dir, max_input_len=64, max_seq_len=128, max_num_tokens=32)
    backend = make_backend()
    assert fake.from_dir_calls[0]["enable_chunked_context"] and backend.limits.max_input_len == 127

    [chunks] = serve_all(backend, [(LONG, SamplingParams(max_new_tokens=27))])

    assert tokens_of(chunks) == fake.model.tokens(LONG, 27)


def test_max_input_len_above_the_runtime_limit_is_refused_with_the_fix(fake, make_backend, engine_dir) -> None:
    write_engine_config(engine_dir, max_input_len=64, max_seq_len=128, max_num_tokens=32)
    with pytest.raises(SettingsError, match=r"max_input_len=64 exceeds the 32 .*turn on enable_chunked_context"):
        make_backend(enable_chunked_context=False, max_input_len=64)


# -- M1 and M2: the KV cache on the GPU ------------------------------------------------------------


@pytest.fixture
def small_gpu_pair(fake, tmp_path: Path, engine_dir: Path, artifacts: Artifacts) -> Path:
    """A 70B-like target (8 layers) and a 1B-like draft (2 layers) on a GPU that fits both only if they share.

    KV bytes per token: target 1024, draft 256 (so the target's share is 0.8). With 0.9 of free memory each,
    the draft's cache would hold 64 tokens (2 blocks) of the 128 one sequence needs.
    """
    write_engine_config(engine_dir, max_draft_len=4, num_hidden_layers=8)
    write_engine_config(tmp_path / "drafts" / "draft-1b", num_hidden_layers=2)
    (artifacts.tokenizer_dir / "tokenizer.json").write_text("{}")
    fake.gpu_memory_bytes = 256 * 1024
    return tmp_path / "drafts"


def test_target_and_draft_on_one_gpu_split_the_kv_cache_so_both_hold_a_sequence(
    fake, make_backend, small_gpu_pair
) -> None:
    backend = make_backend(draft_model_repo=str(small_gpu_pair), draft_subfolder="draft-1b")

    target_call, draft_call = fake.from_dir_calls
    assert target_call["kv_cache_free_gpu_memory_fraction"] == pytest.approx(0.9 * 0.8)
    assert draft_call["kv_cache_free_gpu_memory_fraction"] == pytest.approx(0.9 * 0.2 / (1 - 0.9 * 0.8))
    for executor in fake.executors:
        assert executor.limits.window is None  # no clamped attention window
        assert executor.limits.kv_blocks * executor.limits.tokens_per_block >= executor.limits.max_seq_len
    [chunks] = serve_all(backend, [([21, 22], SamplingParams(max_new_tokens=40))])
    assert tokens_of(chunks) == fake.model.tokens([21, 22], 40)


def test_a_kv_cache_too_small_for_one_sequence_fails_at_load_naming_the_fraction(fake, make_backend) -> None:
    fake.gpu_memory_bytes = 20_000  # 2 blocks of 32 tokens fit; one sequence is 128 tokens
    with pytest.raises(EngineMismatchError, match=r"Attention window too large.*LLM_KV_CACHE_FREE_GPU_MEMORY_FRACTION"):
        make_backend()
    assert fake.from_dir_calls[0]["fail_fast_on_attention_window_too_large"] is True
    assert fake.warnings == []  # it failed; it did not clamp the window and serve wrong continuations


# -- M3 and M4: what the C++ Executor needs from the build ----------------------------------------


@pytest.mark.parametrize(
    ("build", "fix"),
    [
        ({"kv_cache_type": "CONTINUOUS"}, r"build\.kv_cache_type: paged"),
        ({"remove_input_padding": False}, "packed input"),
    ],
)
def test_an_engine_the_executor_cannot_batch_in_flight_is_refused_for_the_cpp_runner(
    fake, make_backend, engine_dir, build: dict[str, Any], fix: str
) -> None:
    write_engine_config(engine_dir, paged_context_fmha=False, **build)
    with pytest.raises(EngineMismatchError, match=fix):
        make_backend()
    assert fake.from_dir_calls == []
    make_backend(trtllm_runner="python")  # the Python session loads it


def test_chunked_context_on_an_engine_without_paged_context_fmha_is_refused(fake, make_backend, engine_dir) -> None:
    write_engine_config(engine_dir, paged_context_fmha=False)  # like the int8-KV spec
    with pytest.raises(SettingsError, match=r"build\.paged_context_fmha: true"):
        make_backend(enable_chunked_context=True)
    assert fake.from_dir_calls == []


def test_an_engine_without_paged_context_fmha_is_served_without_chunks_or_reuse(fake, make_backend, engine_dir):
    write_engine_config(engine_dir, max_input_len=64, max_seq_len=128, max_num_tokens=48, paged_context_fmha=False)
    backend = make_backend()
    call = fake.from_dir_calls[0]
    assert (call["enable_chunked_context"], call["kv_cache_enable_block_reuse"]) == (False, False)
    assert backend.limits.max_input_len == 48 and fake.warnings == []


# -- the low items -----------------------------------------------------------------------------------


def test_a_draft_target_engine_limits_use_the_built_max_seq_len(fake, make_backend, engine_dir) -> None:
    write_engine_config(engine_dir, max_seq_len=128, max_draft_len=4)  # config.json says 132
    backend = make_backend()
    assert backend.limits.max_seq_len == 128
    request = SamplingParams(max_new_tokens=128 - 27)

    [chunks] = serve_all(backend, [(long_prompt(27), request)])

    assert tokens_of(chunks) == fake.model.tokens(long_prompt(27), request.max_new_tokens)
    assert fake.executor.adjustments == []  # the runtime never had to lower max_tokens


def test_max_input_len_is_enforced_by_the_limits_not_handed_to_from_dir(fake, make_backend) -> None:
    backend = make_backend(max_input_len=20)
    assert backend.limits.max_input_len == 20 and fake.from_dir_calls[0]["max_input_len"] is None
    with pytest.raises(InvalidRequest, match="accepts at most 20"):
        check_limits(21, GREEDY, backend.limits)


def test_a_failing_engine_step_fails_every_request_in_it_and_the_engine_goes_on(fake, make_backend) -> None:
    poison = [66, 67]
    fake.model.failing_step_prompts.add(tuple(poison))
    backend = make_backend()

    results = serve_all(backend, [([61], GREEDY), (poison, GREEDY), ([62], GREEDY)])
    later = asyncio.run(collect(backend, [63], GREEDY))

    assert all(isinstance(r, BackendError) and "injected step failure" in str(r) for r in results)
    assert tokens_of(later) == fake.model.tokens([63], GREEDY.max_new_tokens)
    assert backend.is_healthy()


@pytest.fixture
def narrow_target(fake, tmp_path: Path, engine_dir: Path, artifacts: Artifacts) -> Path:
    """A target whose input limit (no chunked context: max_num_tokens 40) is far below its max_seq_len."""
    write_engine_config(engine_dir, max_input_len=64, max_seq_len=128, max_num_tokens=40, max_draft_len=4)
    write_engine_config(tmp_path / "drafts" / "draft-1b")
    (artifacts.tokenizer_dir / "tokenizer.json").write_text("{}")
    return tmp_path / "drafts"


def test_speculative_rounds_never_make_the_runtime_truncate_drafts_or_lower_max_tokens(
    fake, make_backend, narrow_target
) -> None:
    backend = make_backend(
        draft_model_repo=str(narrow_target), draft_subfolder="draft-1b", enable_chunked_context=False
    )
    longest = backend.limits.max_seq_len  # each request as long as the limits allow
    requests = [
        ([31, 32, 33], SamplingParams(max_new_tokens=longest - 3)),
        ([34], SamplingParams(max_new_tokens=longest - 1)),
    ]

    results = serve_all(backend, requests)

    for (prompt, params), chunks in zip(requests, results, strict=True):
        assert tokens_of(chunks) == fake.model.tokens(prompt, params.max_new_tokens)
    assert [executor.adjustments for executor in fake.executors] == [[], []]
    assert longest == 41  # every round's sequence is a prompt of at most 40 tokens (max_num_tokens)


# -- optional features and stats ---------------------------------------------------------------------


@pytest.fixture
def single_stop_artifacts(tmp_path: Path, engine_dir: Path) -> Artifacts:
    """A tokenizer whose end id is its only stop id."""
    tokenizer_dir = tmp_path / "single-stop"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": END}))
    return Artifacts(model_dir=engine_dir, tokenizer_dir=tokenizer_dir)


def test_min_tokens_holds_back_the_end_id(fake, make_backend, single_stop_artifacts) -> None:
    fake.model.scripts[(41,)] = [50, END]
    backend = make_backend(single_stop_artifacts)
    params = SamplingParams(max_new_tokens=6, min_new_tokens=3)
    asyncio.run(backend.prepare(params))

    [chunks] = serve_all(backend, [([41], params)])

    made = tokens_of(chunks)
    assert made[0] == 50 and END not in made and len(made) == 6
    assert fake.executor.requests[1].sampling_config.min_tokens == 3


def test_min_tokens_is_refused_where_other_stop_ids_would_end_the_answer_early(fake, make_backend) -> None:
    backend = make_backend()  # the chat tokenizer also stops on an end-of-turn id
    with pytest.raises(InvalidRequest, match="min_tokens"):
        asyncio.run(backend.prepare(SamplingParams(max_new_tokens=4, min_new_tokens=2)))


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(max_new_tokens=4, logprobs=0), "logprobs"),
        (SamplingParams(max_new_tokens=4, presence_penalty=0.5), "presence_penalty"),
        (SamplingParams(max_new_tokens=4, frequency_penalty=0.5), "frequency_penalty"),
    ],
)
def test_features_the_executor_cannot_honour_are_refused_by_name(fake, make_backend, params, field) -> None:
    backend = make_backend()
    with pytest.raises(InvalidRequest, match=field):
        asyncio.run(backend.prepare(params))


def test_stats_report_requests_kv_use_and_prefix_cache_hits(fake, make_backend) -> None:
    backend = make_backend()
    shared = long_prompt(70)  # two full 32-token blocks, then a partial one
    backend.start()

    asyncio.run(collect(backend, shared, SamplingParams(max_new_tokens=3)))
    wait_until(lambda: backend.stats().prefix_cache_queries == 64)  # read once the engine went idle
    assert backend.stats().prefix_cache_hits == 0
    asyncio.run(collect(backend, shared, SamplingParams(max_new_tokens=3)))
    wait_until(lambda: backend.stats().prefix_cache_queries == 128)

    stats = backend.stats()
    assert stats.prefix_cache_hits == 64
    assert (stats.running, stats.waiting, stats.kv_cache_usage) == (0, 0, 0.0)


def test_limits_of_a_plain_engine_are_unchanged_by_the_rules(fake, make_backend) -> None:
    assert make_backend().limits == Limits(max_input_len=127, max_seq_len=128, max_new_tokens=127, max_batch_size=8)
