"""The torch backend as the server loads it, in process on the embedded SmolLM2, against `transformers.generate`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from model.backends.base import SamplingParams
from model.backends.torch import TorchBackend, load_hf_model
from model.errors import BackendError
from model.settings import load_settings

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea, please, in English:",
    "1, 2, 3,",
    "A mistral is a strong, cold wind that blows through the Rhone valley. Describe its effect on farming:",
]


@pytest.fixture(scope="module")
def hf_model(embedded_dir: Path):
    """The same weights, untouched (the engine takes its copy apart)."""
    return load_hf_model(load_settings({"device": "cpu"}, environ={}), embedded_dir)


def _ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt).input_ids


async def _collect(backend: TorchBackend, ids: list[int], params: SamplingParams) -> tuple[list[int], str | None]:
    tokens: list[int] = []
    reason = None
    async for chunk in backend.generate(ids, params):
        tokens.extend(chunk.token_ids)
        reason = chunk.finish_reason
    return tokens, reason


def _reference(backend: TorchBackend, hf_model, ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain transformers greedy generate, one request alone, stopping at the same end ids."""
    out = hf_model.generate(
        torch.tensor([ids]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(backend.stop_token_ids),
        pad_token_id=0,
    )
    generated = out[0, len(ids) :].tolist()
    return [t for t in generated if t not in backend.stop_token_ids]


def test_concurrent_greedy_matches_transformers_generate(backend: TorchBackend, hf_model, tokenizer) -> None:
    params = SamplingParams(max_new_tokens=24)

    async def run_all() -> list[tuple[list[int], str | None]]:
        return await asyncio.gather(*(_collect(backend, _ids(tokenizer, p), params) for p in PROMPTS))

    results = asyncio.run(run_all())
    for prompt, (tokens, reason) in zip(PROMPTS, results, strict=True):
        assert tokens == _reference(backend, hf_model, _ids(tokenizer, prompt), 24), prompt
        assert reason == ("length" if len(tokens) == 24 else "stop")


def test_requests_joining_mid_flight_get_their_own_tokens(backend: TorchBackend, hf_model, tokenizer) -> None:
    """The second request is admitted while the first is decoding (a prefill chunk beside a decoding row)."""
    long_params, short_params = SamplingParams(max_new_tokens=30, ignore_eos=True), SamplingParams(max_new_tokens=8)

    async def staggered() -> tuple[list[int], list[int]]:
        first = asyncio.create_task(_collect(backend, _ids(tokenizer, PROMPTS[0]), long_params))
        await asyncio.sleep(0.3)
        second = await _collect(backend, _ids(tokenizer, PROMPTS[3]), short_params)
        return (await first)[0], second[0]

    first, second = asyncio.run(staggered())
    assert len(first) == 30
    assert second == _reference(backend, hf_model, _ids(tokenizer, PROMPTS[3]), 8)


def test_seeded_sampling_is_reproducible_inside_a_batch(backend: TorchBackend, tokenizer) -> None:
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.9, seed=7, ignore_eos=True)
    greedy = SamplingParams(max_new_tokens=16, ignore_eos=True)
    ids = _ids(tokenizer, PROMPTS[1])

    async def alone() -> list[int]:
        return (await _collect(backend, ids, sampled))[0]

    async def with_neighbours() -> list[int]:
        results = await asyncio.gather(
            _collect(backend, _ids(tokenizer, PROMPTS[0]), greedy), _collect(backend, ids, sampled)
        )
        return results[1][0]

    assert asyncio.run(alone()) == asyncio.run(with_neighbours())
    other_seed = SamplingParams(**{**sampled.__dict__, "seed": 8})
    assert asyncio.run(_collect(backend, ids, other_seed))[0] != asyncio.run(alone())


def test_repetition_penalty_changes_greedy_output(backend: TorchBackend, tokenizer) -> None:
    ids = _ids(tokenizer, "1, 2, 3,")
    plain = asyncio.run(_collect(backend, ids, SamplingParams(max_new_tokens=20, ignore_eos=True)))[0]
    penalised = asyncio.run(
        _collect(backend, ids, SamplingParams(max_new_tokens=20, repetition_penalty=1.8, ignore_eos=True))
    )[0]
    assert penalised != plain


def test_closing_the_stream_cancels_the_request(backend: TorchBackend, tokenizer) -> None:
    async def first_token_then_leave() -> None:
        stream = backend.generate(_ids(tokenizer, PROMPTS[0]), SamplingParams(max_new_tokens=2000, ignore_eos=True))
        await anext(stream)
        await stream.aclose()

    asyncio.run(first_token_then_leave())
    assert backend.in_flight == 0
    for _ in range(100):
        if not backend._has_work():
            break
        asyncio.run(asyncio.sleep(0.05))
    assert not backend._has_work(), "the cancelled request is still in the running batch"


def test_a_failing_prefill_fails_only_that_request(backend: TorchBackend, hf_model, tokenizer, monkeypatch) -> None:
    poison = _ids(tokenizer, "poison pill")
    compute_logits = backend.model.compute_logits

    def failing(tokens, *args, **kwargs):
        if any(tokens[i : i + len(poison)].tolist() == poison for i in range(len(tokens) - len(poison) + 1)):
            raise RuntimeError("injected prefill failure")
        return compute_logits(tokens, *args, **kwargs)

    monkeypatch.setattr(backend.model, "compute_logits", failing)

    async def scenario() -> tuple[list[int], list[int], BaseException | None]:
        healthy = asyncio.create_task(_collect(backend, _ids(tokenizer, PROMPTS[2]), SamplingParams(max_new_tokens=12)))
        await asyncio.sleep(0.3)
        admitted_with_it = asyncio.create_task(_collect(backend, _ids(tokenizer, PROMPTS[0]), SamplingParams(8)))
        try:
            await _collect(backend, poison, SamplingParams(max_new_tokens=4))
            error = None
        except BackendError as exc:
            error = exc
        return (await healthy)[0], (await admitted_with_it)[0], error

    tokens, neighbour, error = asyncio.run(scenario())
    assert error is not None and "injected" not in str(error)  # the client gets no internals
    assert tokens == _reference(backend, hf_model, _ids(tokenizer, PROMPTS[2]), 12)
    assert neighbour == _reference(backend, hf_model, _ids(tokenizer, PROMPTS[0]), 8)
    assert backend.is_healthy()
