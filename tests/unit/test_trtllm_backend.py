"""The tensorrt_llm backend against a double that follows TensorRT-LLM 1.2's contract (tests/doubles/trtllm.py).

What is checked: concurrent requests share in-flight batches through one engine thread and each gets
its own tokens; chunks are deltas without prompt or end token; finish reasons; cancellation reaches
`cancel_request`; an engine error fails one request only; limits come from config.json and settings
above the engine are refused; the multi-GPU launch modes; the Python runner's batching and decoding;
the two runners agree; and draft-target speculative decoding gives greedy requests the same tokens as
plain decoding, in fewer target steps when the draft agrees, with its settings checked at load.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from model import engine_meta
from model.artifacts import Artifacts
from model.backends.base import Limits, SamplingParams, TokenChunk
from model.backends.trtllm import TrtllmBackend, serve_worker_rank
from model.backends.trtllm.executor import executor_of
from model.errors import ArtifactError, BackendError, EngineMismatchError
from model.settings import Backend, ServerSettings, SettingsError, load_settings
from tests.doubles.trtllm import FakeModel, write_engine_config
from tests.unit.trtllm_fixtures import (
    END,
    GREEDY,
    IM_END,
    PAD,
    answer,
    collect,
    prompts,
    serve_all,
    tokens_of,
    wait_until,
)

# -- cpp runner: the Executor --------------------------------------------------------------------


def test_concurrent_requests_share_in_flight_batches_and_never_mix_up(fake, make_backend) -> None:
    backend = make_backend()
    requests = [(prompt, SamplingParams(max_new_tokens=6 + i)) for i, prompt in enumerate(prompts(8))]

    results = serve_all(backend, requests)

    for (prompt, params), chunks in zip(requests, results, strict=True):
        assert tokens_of(chunks) == fake.model.tokens(prompt, params.max_new_tokens)
        assert [c.finish_reason for c in chunks][-1] == "length"
        assert len(chunks) >= params.max_new_tokens  # streamed step by step, not in one piece
    executor = fake.executor
    assert [name for name, _ in executor.calls[:9]] == ["enqueue"] * 8 + ["await"]  # all enqueued, then awaited
    assert executor.batch_sizes[0] == 8  # one engine iteration advanced all eight
    assert len(executor.caller_threads) == 1 and threading.get_ident() not in executor.caller_threads


def test_requests_arriving_while_others_generate_join_the_running_batch(fake, make_backend) -> None:
    fake.iteration_seconds = 0.002
    backend = make_backend()
    backend.start()

    async def main() -> list[list[TokenChunk]]:
        tasks = []
        for prompt in prompts(6):
            tasks.append(asyncio.create_task(collect(backend, prompt, SamplingParams(max_new_tokens=50))))
            await asyncio.sleep(0.003)  # the earlier requests are mid-generation (50 steps of 2 ms) when this arrives
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())

    for prompt, chunks in zip(prompts(6), results, strict=True):
        assert tokens_of(chunks) == fake.model.tokens(prompt, 50)
    assert max(fake.executor.batch_sizes) == 6


def test_stream_carries_deltas_without_prompt_or_end_token(fake, make_backend) -> None:
    prompt = [21, 22, 23]
    fake.model.scripts[tuple(prompt)] = [30, 31, END]
    backend = make_backend()

    [chunks] = serve_all(backend, [(prompt, GREEDY)])

    assert chunks == [TokenChunk((30,)), TokenChunk((31,)), TokenChunk((), "stop")]


def test_stop_word_token_is_dropped_from_the_last_chunk(fake, make_backend) -> None:
    prompt = [24, 25]
    fake.model.scripts[tuple(prompt)] = [40, 41, IM_END, 42]
    backend = make_backend()

    [chunks] = serve_all(backend, [(prompt, GREEDY)])

    assert tokens_of(chunks) == [40, 41]
    assert chunks[-1].finish_reason == "stop"
    request = fake.executor.requests[1]
    assert (request.end_id, request.pad_id, request.stop_words) == (END, PAD, [[IM_END]])
    assert request.streaming and request.max_tokens == GREEDY.max_new_tokens


def test_ignore_eos_runs_to_max_new_tokens_through_end_and_stop_tokens(fake, make_backend) -> None:
    prompt = [26, 27]
    fake.model.scripts[tuple(prompt)] = [50, END, IM_END, 51]
    backend = make_backend()

    [chunks] = serve_all(backend, [(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True))])

    assert tokens_of(chunks) == [50, END, IM_END, 51]
    assert chunks[-1].finish_reason == "length"
    request = fake.executor.requests[1]
    assert (request.end_id, request.stop_words) == (-1, None)


def test_sampling_parameters_reach_each_request(fake, make_backend) -> None:
    backend = make_backend()
    sampled = SamplingParams(max_new_tokens=3, temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=123)
    unseeded = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=40)

    serve_all(backend, [([11], GREEDY), ([12], sampled), ([13], unseeded), ([14], unseeded)])

    configs = {r.input_token_ids[0]: r.sampling_config for r in fake.executor.requests.values()}
    greedy = configs[11]
    assert (greedy.top_k, greedy.top_p, greedy.temperature, greedy.seed) == (1, None, None, None)
    chosen = configs[12]
    assert (chosen.top_k, chosen.top_p, chosen.temperature, chosen.seed) == (None, 0.9, 0.7, 123)
    assert chosen.repetition_penalty == 1.1 and greedy.repetition_penalty is None
    assert (configs[13].top_k, configs[13].top_p) == (40, 1.0)  # top_p sent: unset top_k and top_p mean greedy
    assert None not in (configs[13].seed, configs[14].seed) and configs[13].seed != configs[14].seed


def test_closing_a_stream_cancels_its_request_in_the_executor(fake, make_backend) -> None:
    fake.iteration_seconds = 0.002
    backend = make_backend()
    backend.start()
    long_prompt, other_prompt = [31, 32], [33]

    async def main() -> list[TokenChunk]:
        other = asyncio.create_task(collect(backend, other_prompt, SamplingParams(max_new_tokens=40)))
        stream = backend.generate(long_prompt, SamplingParams(max_new_tokens=100))
        first = [await anext(stream), await anext(stream)]
        await stream.aclose()  # the client went away
        assert first == [TokenChunk((t,)) for t in fake.model.tokens(long_prompt, 2)]
        return await other

    other_chunks = asyncio.run(main())

    executor = fake.executor
    cancelled_id = next(i for i, r in executor.requests.items() if r.input_token_ids == long_prompt)
    wait_until(lambda: ("cancel", cancelled_id) in executor.calls)
    assert tokens_of(other_chunks) == fake.model.tokens(other_prompt, 40)  # the other request is untouched
    wait_until(lambda: not backend.engine.has_work())


def test_an_engine_error_fails_only_its_own_request(fake, make_backend) -> None:
    bad = [60, 61]
    fake.model.failing_prompts.add(tuple(bad))
    backend = make_backend()
    good = prompts(3)

    results = serve_all(backend, [(good[0], GREEDY), (bad, GREEDY), (good[1], GREEDY), (good[2], GREEDY)])

    assert isinstance(results[1], BackendError) and "injected failure" in str(results[1])
    for prompt, chunks in zip(good, [results[0], results[2], results[3]], strict=True):
        assert tokens_of(chunks) == fake.model.tokens(prompt, GREEDY.max_new_tokens)
    assert backend.is_healthy()


def test_the_executor_is_found_under_either_attribute_name(fake) -> None:
    executor = SimpleNamespace(enqueue_request=lambda request: 1)
    assert executor_of(SimpleNamespace(session=executor)) is executor  # 1.x
    assert executor_of(SimpleNamespace(executor=executor)) is executor  # an older revision
    with pytest.raises(EngineMismatchError, match="holds no TensorRT-LLM Executor"):
        executor_of(SimpleNamespace(session=None))


def test_shutdown_shuts_the_executor_down(fake, make_backend) -> None:
    backend = make_backend()
    backend.start()
    backend.shutdown()
    assert fake.executor.calls[-1] == ("shutdown", None)


# -- load: engine check, limits, settings --------------------------------------------------------


def test_engine_check_runs_before_the_engine_is_loaded(fake, make_backend, engine_dir) -> None:
    make_backend()
    assert fake.events == [("verify", str(engine_dir)), ("ModelRunnerCpp.from_dir", str(engine_dir))]


def test_a_failed_engine_check_stops_the_load(fake, make_backend, monkeypatch) -> None:
    def refuse(engine_dir: Path) -> None:
        raise EngineMismatchError("built for sm_90, this GPU is sm_80")

    monkeypatch.setattr(engine_meta, "verify_engine_compatible", refuse)
    with pytest.raises(EngineMismatchError, match="sm_90"):
        make_backend()
    assert fake.from_dir_calls == []


def test_limits_come_from_the_engine_config_capped_by_settings(fake, make_backend) -> None:
    backend = make_backend(max_batch_size=4, max_new_tokens_limit=2048, kv_cache_free_gpu_memory_fraction=0.8)
    # chunked context is on by default here (paged context FMHA), so prompts may fill max_seq_len - 1
    assert backend.limits == Limits(max_input_len=127, max_seq_len=128, max_new_tokens=127, max_batch_size=4)
    call = fake.from_dir_calls[0]
    assert (call["max_batch_size"], call["max_input_len"], call["max_beam_width"]) == (4, None, 1)
    assert (call["kv_cache_free_gpu_memory_fraction"], call["enable_chunked_context"]) == (0.8, True)
    assert (call["kv_cache_enable_block_reuse"], call["fail_fast_on_attention_window_too_large"]) == (True, True)
    assert (call["rank"], call["is_orchestrator_mode"]) == (0, False)

    smaller = make_backend(
        max_batch_size=2, max_input_len=32, max_seq_len=100, max_new_tokens_limit=50, default_max_new_tokens=20
    )
    assert smaller.limits == Limits(max_input_len=32, max_seq_len=100, max_new_tokens=50, max_batch_size=2)


@pytest.mark.parametrize(
    ("setting", "value", "built"), [("max_batch_size", 32, 8), ("max_input_len", 128, 127), ("max_seq_len", 256, 128)]
)
def test_settings_above_the_engine_are_refused_with_the_fix(fake, make_backend, setting, value, built) -> None:
    with pytest.raises(SettingsError) as refused:
        make_backend(**{setting: value})
    message = str(refused.value)
    assert f"{setting}={value}" in message and f"at most {built}" in message and f"LLM_{setting.upper()}" in message
    assert fake.from_dir_calls == []


def test_a_folder_without_engine_config_is_an_artifact_error(fake, make_backend, engine_dir) -> None:
    (engine_dir / "config.json").unlink()
    with pytest.raises(ArtifactError, match="trtllm-build"):
        make_backend()


def test_a_tokenizer_from_another_model_is_refused(fake, artifacts) -> None:
    tokenizer = SimpleNamespace(eos_token_id=5000, pad_token_id=None)
    settings = ServerSettings(backend=Backend.TENSORRT_LLM, max_batch_size=8)
    with pytest.raises(EngineMismatchError, match="outside the model's vocabulary"):
        TrtllmBackend.load(settings, artifacts, tokenizer)


# -- multi-GPU -----------------------------------------------------------------------------------


def test_a_multi_rank_engine_in_one_process_uses_orchestrator_mode(fake, make_backend, engine_dir) -> None:
    write_engine_config(engine_dir, tp_size=4)
    backend = make_backend()
    assert (fake.from_dir_calls[0]["rank"], fake.from_dir_calls[0]["is_orchestrator_mode"]) == (0, True)
    [chunks] = serve_all(backend, [([7 + 10], GREEDY)])
    assert tokens_of(chunks) == fake.model.tokens([17], GREEDY.max_new_tokens)


def test_under_mpirun_rank_zero_serves_in_leader_mode(fake, make_backend, engine_dir) -> None:
    write_engine_config(engine_dir, tp_size=2)
    fake.mpi_world_size = 2
    make_backend()
    assert (fake.from_dir_calls[0]["rank"], fake.from_dir_calls[0]["is_orchestrator_mode"]) == (0, False)


def test_under_mpirun_other_ranks_run_the_worker_not_the_server(fake, make_backend, engine_dir) -> None:
    write_engine_config(engine_dir, tp_size=2)
    fake.mpi_world_size, fake.mpi_rank = 2, 1
    with pytest.raises(EngineMismatchError, match="serve_worker_rank"):
        make_backend()

    serve_worker_rank(ServerSettings(backend=Backend.TENSORRT_LLM, max_batch_size=8), engine_dir)

    assert fake.from_dir_calls[-1]["rank"] == 1 and not fake.from_dir_calls[-1]["is_orchestrator_mode"]
    assert fake.executor.calls[-1] == ("shutdown", None)  # blocks until rank 0 stops on a real node


def test_an_mpi_world_that_does_not_fit_the_engine_is_refused(fake, make_backend, engine_dir) -> None:
    write_engine_config(engine_dir, tp_size=2)
    fake.mpi_world_size = 3
    with pytest.raises(EngineMismatchError, match="mpirun -n 2"):
        make_backend()


def test_the_python_runner_refuses_multi_rank_engines(fake, make_backend, engine_dir) -> None:
    write_engine_config(engine_dir, tp_size=2)
    with pytest.raises(EngineMismatchError, match="trtllm_runner: cpp"):
        make_backend(trtllm_runner="python")


# -- python runner: dynamic static batching -------------------------------------------------------


def test_python_runner_batches_waiting_requests_and_decodes_padded_cumulative_outputs(fake, make_backend) -> None:
    ends, stops, short, long = [41, 42, 43, 44], [45], [46, 47], [48]
    fake.model.scripts[tuple(ends)] = [70, 71, END]
    fake.model.scripts[tuple(stops)] = [72, IM_END, 73]
    backend = make_backend(trtllm_runner="python")
    sampled = SamplingParams(max_new_tokens=9, temperature=0.5, top_p=0.8, seed=7)
    requests = [(ends, GREEDY), (stops, GREEDY), (short, SamplingParams(max_new_tokens=4)), (long, sampled)]

    results = serve_all(backend, requests)

    assert [tokens_of(chunks) for chunks in results] == [
        [70, 71],
        [72],
        fake.model.tokens(short, 4),
        fake.model.tokens(long, 9),
    ]
    assert [chunks[-1].finish_reason for chunks in results] == ["stop", "stop", "length", "length"]
    assert all(chunk.token_ids or chunk.finish_reason for chunks in results for chunk in chunks)
    assert len(results[3]) >= 9  # streamed step by step
    [call] = fake.generate_calls  # one generate() for all four
    assert call["prompts"] == [ends, stops, short, long] and call["streaming"]
    sampling = call["sampling"]
    assert (sampling.max_new_tokens, sampling.end_id, sampling.pad_id) == (12, END, PAD)
    assert sampling.top_k.tolist() == [1, 1, 1, 0]
    assert sampling.temperature.tolist()[3] == pytest.approx(0.5) and sampling.top_p.tolist()[3] == pytest.approx(0.8)
    assert sampling.random_seed.tolist()[3] == 7


def test_python_runner_splits_batches_that_would_exceed_max_seq_len(fake, make_backend) -> None:
    backend = make_backend(trtllm_runner="python")
    long_prompt = list(range(100, 160))  # 60 tokens
    requests = [(long_prompt, SamplingParams(max_new_tokens=8)), ([12], SamplingParams(max_new_tokens=100))]

    results = serve_all(backend, requests)

    for (prompt, params), chunks in zip(requests, results, strict=True):
        assert tokens_of(chunks) == fake.model.tokens(prompt, params.max_new_tokens)
    assert [call["prompts"] for call in fake.generate_calls] == [[long_prompt], [[12]]]  # 60 + 100 > 128


def test_python_runner_keeps_ignore_eos_requests_in_their_own_batch(fake, make_backend) -> None:
    fake.model.scripts[(95,)] = [96, END, 97]
    backend = make_backend(trtllm_runner="python")
    requests = [([95], SamplingParams(max_new_tokens=3, ignore_eos=True)), ([95], SamplingParams(max_new_tokens=3))]

    results = serve_all(backend, requests)

    assert [(tokens_of(c), c[-1].finish_reason) for c in results] == [([96, END, 97], "length"), ([96], "stop")]
    assert [call["sampling"].end_id for call in fake.generate_calls] == [-1, END]  # end_id is one per generate()


def test_python_runner_failure_fails_its_batch_and_the_next_batch_is_served(fake, make_backend) -> None:
    bad = [62]
    fake.model.failing_prompts.add(tuple(bad))
    backend = make_backend(trtllm_runner="python")

    first = serve_all(backend, [(bad, GREEDY), ([63], GREEDY)])
    later = asyncio.run(collect(backend, [64], GREEDY))

    assert all(isinstance(result, BackendError) for result in first)
    assert tokens_of(later) == fake.model.tokens([64], GREEDY.max_new_tokens)
    assert backend.is_healthy()


def test_python_runner_drops_a_batch_once_its_requests_are_cancelled(fake, make_backend) -> None:
    fake.iteration_seconds = 0.002
    backend = make_backend(trtllm_runner="python")
    backend.start()

    async def main() -> tuple[list[TokenChunk], list[TokenChunk]]:
        stream = backend.generate([93], SamplingParams(max_new_tokens=100))
        first = [await anext(stream), await anext(stream)]
        await stream.aclose()
        return first, await collect(backend, [94], SamplingParams(max_new_tokens=3))

    first, later = asyncio.run(main())

    assert tokens_of(first) == fake.model.tokens([93], 2)
    assert tokens_of(later) == fake.model.tokens([94], 3)
    assert [call["prompts"] for call in fake.generate_calls] == [[[93]], [[94]]]
    assert fake.generate_calls[0]["steps"] < 50  # stopped soon after the cancel instead of running 100 steps


def test_the_two_runners_agree(fake, make_backend) -> None:
    fake.model.scripts[(80, 81)] = [90, END]
    fake.model.scripts[(82,)] = [91, 92, IM_END]
    requests = [([80, 81], GREEDY), ([82], GREEDY), ([83, 84, 85], SamplingParams(max_new_tokens=5))]

    by_executor = serve_all(make_backend(trtllm_runner="cpp"), requests)
    by_session = serve_all(make_backend(trtllm_runner="python"), requests)

    def answer(chunks: list[TokenChunk]) -> tuple[list[int], str | None]:
        return tokens_of(chunks), chunks[-1].finish_reason

    answers = [answer(c) for c in by_executor]
    assert answers == [answer(c) for c in by_session]
    assert answers[:2] == [([90], "stop"), ([91, 92], "stop")]


# -- draft-target speculative decoding -----------------------------------------------------------


@pytest.fixture
def draft_repo(tmp_path: Path, engine_dir: Path, artifacts: Artifacts) -> Path:
    """A target built with draft_tokens_external (max_draft_len 4) and a repo with its draft in `draft-1b/`."""
    write_engine_config(engine_dir, max_draft_len=4)
    write_engine_config(tmp_path / "drafts" / "draft-1b")
    (artifacts.tokenizer_dir / "tokenizer.json").write_text("{}")  # resolve_artifacts checks it is there
    return tmp_path / "drafts"


@pytest.fixture
def make_speculative(make_backend, draft_repo) -> Callable[..., TrtllmBackend]:
    def make(**settings: Any) -> TrtllmBackend:
        return make_backend(draft_model_repo=str(draft_repo), draft_subfolder="draft-1b", **settings)

    return make


def test_speculative_greedy_outputs_equal_plain_outputs(fake, make_backend, make_speculative, draft_repo) -> None:
    fake.model.scripts[(80, 81)] = [90, 91, 92, 93, 94, 95, END]
    fake.model.scripts[(82,)] = [91, 92, IM_END]
    fake.models[str(draft_repo / "draft-1b")] = FakeModel(scripts=fake.model.scripts, wrong_every=3)  # agrees 2 in 3
    requests = [
        ([80, 81], GREEDY),
        ([82], GREEDY),
        ([83, 84, 85], SamplingParams(max_new_tokens=23)),
        ([86], SamplingParams(max_new_tokens=1)),
        ([80, 81], SamplingParams(max_new_tokens=9, ignore_eos=True)),
        *((prompt, SamplingParams(max_new_tokens=17)) for prompt in prompts(5)),
    ]

    plain = serve_all(make_backend(), requests)
    speculative = serve_all(make_speculative(), requests)

    assert [answer(c) for c in speculative] == [answer(c) for c in plain]
    assert answer(speculative[0]) == ([90, 91, 92, 93, 94, 95], "stop")
    assert answer(speculative[1]) == ([91, 92], "stop")
    target, draft = fake.executors[-2:]
    assert len(target.requests) < sum(len(tokens_of(c)) for c in speculative)  # some drafts were accepted
    assert max(target.batch_sizes) > 1 and max(draft.batch_sizes) > 1  # requests advance together


def test_an_agreeing_draft_takes_one_target_step_per_draft_len_plus_one_tokens(fake, make_speculative) -> None:
    backend = make_speculative()  # the draft's model is the target's: every draft token is accepted
    prompt = [101, 102]

    [chunks] = serve_all(backend, [(prompt, SamplingParams(max_new_tokens=21))])

    assert answer(chunks) == (fake.model.tokens(prompt, 21), "length")
    target, draft = fake.executors
    assert len(target.requests) == 5 and len(target.batch_sizes) == 5  # 5 + 5 + 5 + 5 + 1 tokens, one step each
    assert [len(r.draft_tokens) for r in target.requests.values()] == [4, 4, 4, 4, 0]
    assert [r.max_tokens for r in draft.requests.values()] == [4, 4, 4, 4]
    assert [len(c.token_ids) for c in chunks] == [5, 5, 5, 5, 1]
    for request in draft.requests.values():
        assert not request.streaming and request.sampling_config.top_k == 1  # greedy proposals
    first = target.requests[1]
    assert (first.input_token_ids, first.max_tokens) == (prompt, 5)
    assert first.draft_tokens == fake.model.tokens(prompt, 4) and not first.streaming
    for call in fake.from_dir_calls:
        assert call["kv_cache_enable_block_reuse"] and call["is_orchestrator_mode"]
        assert call["max_input_len"] is None  # the Executor ignores it; the limits keep rounds within the inputs


def test_speculative_rounds_continue_from_the_accepted_tokens(fake, make_speculative, draft_repo) -> None:
    fake.models[str(draft_repo / "draft-1b")] = FakeModel(wrong_every=1)  # never right: one token per round
    backend = make_speculative(max_draft_len=2)
    prompt = [103]

    [chunks] = serve_all(backend, [(prompt, SamplingParams(max_new_tokens=4))])

    assert answer(chunks) == (fake.model.tokens(prompt, 4), "length")
    target, draft = fake.executors
    assert [r.input_token_ids for r in target.requests.values()] == [
        prompt + fake.model.tokens(prompt, n) for n in range(4)
    ]
    assert [r.max_tokens for r in draft.requests.values()] == [2, 2, 1]  # never past max_new_tokens


def test_cancelling_a_speculative_request_cancels_its_call_in_flight(fake, make_speculative) -> None:
    fake.iteration_seconds = 0.002
    backend = make_speculative()
    backend.start()
    cancelled, other = [31, 32], [33]

    async def main() -> list[TokenChunk]:
        task = asyncio.create_task(collect(backend, other, SamplingParams(max_new_tokens=40)))
        stream = backend.generate(cancelled, SamplingParams(max_new_tokens=100))
        await anext(stream)
        await stream.aclose()
        return await task

    other_chunks = asyncio.run(main())

    assert tokens_of(other_chunks) == fake.model.tokens(other, 40)
    wait_until(lambda: not backend.engine.has_work())
    target, draft = fake.executors
    ours = {
        (executor, i)
        for executor in (target, draft)
        for i, r in executor.requests.items()
        if r.input_token_ids[:2] == cancelled
    }
    cancels = [(executor, i) for executor in (target, draft) for name, i in executor.calls if name == "cancel"]
    assert len(cancels) == 1 and cancels[0] in ours  # the one call in flight, on whichever executor held it
    last = max(ours, key=lambda call: call[1] if call[0] is cancels[0][0] else -1)
    assert last == cancels[0]  # and no round was started after it


def test_a_failed_round_fails_only_its_request(fake, make_speculative, draft_repo) -> None:
    bad = [60, 61]
    fake.model.failing_prompts.add(tuple(bad))  # the target refuses it; the draft has its own model
    fake.models[str(draft_repo / "draft-1b")] = FakeModel()
    backend = make_speculative()
    good = prompts(3)

    results = serve_all(backend, [(good[0], GREEDY), (bad, GREEDY), (good[1], GREEDY), (good[2], GREEDY)])

    assert isinstance(results[1], BackendError) and "injected failure" in str(results[1])
    for prompt, chunks in zip(good, [results[0], results[2], results[3]], strict=True):
        assert answer(chunks) == (fake.model.tokens(prompt, GREEDY.max_new_tokens), "length")
    assert backend.is_healthy()


def test_speculative_load_checks_the_draft_and_keeps_sequences_within_both_engines(
    fake, make_speculative, draft_repo
) -> None:
    write_engine_config(draft_repo / "draft-1b", max_num_tokens=64)
    backend = make_speculative(enable_chunked_context=False)
    assert ("verify", str(draft_repo / "draft-1b")) in fake.events
    # without chunked context each round's input (prompt + tokens so far) must fit the draft's
    # min(max_seq_len - 1, max_num_tokens 64): sequences end at 65
    assert backend.limits == Limits(max_input_len=64, max_seq_len=65, max_new_tokens=64, max_batch_size=8)


def test_a_target_without_draft_tokens_external_is_refused(fake, make_speculative, engine_dir) -> None:
    write_engine_config(engine_dir)
    with pytest.raises(EngineMismatchError, match="--speculative_decoding_mode draft_tokens_external"):
        make_speculative()


def test_max_draft_len_above_the_target_build_is_refused(fake, make_speculative) -> None:
    with pytest.raises(SettingsError, match=r"max_draft_len=5 .*LLM_MAX_DRAFT_LEN\) to at most 4"):
        make_speculative(max_draft_len=5)


def test_a_draft_with_another_vocabulary_is_refused(fake, make_speculative, draft_repo) -> None:
    write_engine_config(draft_repo / "draft-1b", vocab_size=2000)
    with pytest.raises(EngineMismatchError, match="vocabulary of 2000 tokens but the target has 1000"):
        make_speculative()


def test_a_missing_draft_subfolder_names_the_draft_settings(fake, make_backend, draft_repo) -> None:
    with pytest.raises(ArtifactError, match=r"draft engine: .*LLM_DRAFT_SUBFOLDER"):
        make_backend(draft_model_repo=str(draft_repo), draft_subfolder="draft-3b")


@pytest.mark.parametrize(
    ("environ", "fix"),
    [
        ({"LLM_MAX_DRAFT_LEN": "4"}, "set draft_model_repo (LLM_DRAFT_MODEL_REPO)"),
        ({"LLM_DRAFT_MODEL_REPO": "org/drafts"}, "set backend: tensorrt_llm with trtllm_runner: cpp"),
        ({"LLM_SPECULATIVE_MODE": "eagle3", "LLM_BACKEND": "tensorrt_llm"}, "needs backend: tensorrt_llm_llmapi"),
        ({"LLM_MAX_NUM_TOKENS": "4096", "LLM_BACKEND": "tensorrt_llm"}, "build.max_num_tokens"),
        (
            {"LLM_DRAFT_MODEL_REPO": "org/drafts", "LLM_BACKEND": "tensorrt_llm", "LLM_TRTLLM_RUNNER": "python"},
            "trtllm_runner: cpp",
        ),
        ({"LLM_MAX_DRAFT_LEN": "0", "LLM_DRAFT_MODEL_REPO": "org/drafts"}, "greater than or equal to 1"),
    ],
)
def test_draft_settings_that_cannot_be_served_are_refused(environ: dict[str, str], fix: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(fix)):
        load_settings({}, environ)
