"""What any engine must guarantee: one request's values or failure never touch another's tokens.

In process against the `backend` fixture (tests/unit/conftest.py: the torch engine; a new engine points
it at itself). A "poisoned" request carries extreme values the request schema accepts; batched with
innocent greedy requests, every innocent one must produce exactly its solo tokens and the poisoned one
must not fail.
"""

from __future__ import annotations

import asyncio

import pytest

from model.backends.base import BatchingBackend, SamplingParams
from model.errors import BackendError

INNOCENT_PROMPTS = ["The capital of France is", "1, 2, 3,", "Write a haiku about the sea:"]
INNOCENT = SamplingParams(max_new_tokens=10, ignore_eos=True)
POISONS = {
    "tiny-temperature": SamplingParams(max_new_tokens=10, temperature=9e-38),
    "tiny-repetition-penalty-sampling": SamplingParams(
        max_new_tokens=10, temperature=1.0, repetition_penalty=1e-300, seed=1
    ),
    "tiny-repetition-penalty-greedy": SamplingParams(max_new_tokens=10, repetition_penalty=1e-300),
    "max-temperature-tiny-top-p": SamplingParams(max_new_tokens=10, temperature=2.0, top_p=1e-300, seed=2),
    "huge-top-k-huge-seed": SamplingParams(max_new_tokens=10, temperature=2.0, top_k=10**12, seed=2**63 - 1),
}


async def _collect(backend: BatchingBackend, ids: list[int], params: SamplingParams) -> list[int] | BaseException:
    tokens: list[int] = []
    try:
        async for chunk in backend.generate(ids, params):
            tokens.extend(chunk.token_ids)
    except BackendError as exc:
        return exc
    return tokens


@pytest.fixture(scope="module")
def solo(backend: BatchingBackend, tokenizer) -> list[list[int] | BaseException]:
    """Each innocent request alone."""
    return [asyncio.run(_collect(backend, tokenizer(p).input_ids, INNOCENT)) for p in INNOCENT_PROMPTS]


def _batched(backend: BatchingBackend, tokenizer, poisons: list[tuple[list[int], SamplingParams]]) -> list:
    """The poisoned requests in the same prefill group and decode batch as the innocent ones (poisons first)."""

    async def run() -> list:
        innocent = [_collect(backend, tokenizer(p).input_ids, INNOCENT) for p in INNOCENT_PROMPTS]
        return await asyncio.gather(*(_collect(backend, ids, params) for ids, params in poisons), *innocent)

    return asyncio.run(run())


def test_extreme_sampling_values_fail_nothing_and_change_no_neighbour(backend, tokenizer, solo) -> None:
    story = tokenizer("Tell me a story").input_ids
    results = _batched(backend, tokenizer, [(story, params) for params in POISONS.values()])
    for name, poisoned in zip(POISONS, results, strict=False):
        assert not isinstance(poisoned, BaseException), f"{name} failed: {poisoned}"
        assert len(poisoned) >= 1, name
    assert results[len(POISONS) :] == solo


def test_a_tiny_temperature_decodes_greedily(backend, tokenizer, solo) -> None:
    ids = tokenizer(INNOCENT_PROMPTS[0]).input_ids
    tiny = SamplingParams(max_new_tokens=10, temperature=9e-38, ignore_eos=True)
    assert asyncio.run(_collect(backend, ids, tiny)) == solo[0]


def _contains(tokens: list[int], part: list[int]) -> bool:
    return any(tokens[i : i + len(part)] == part for i in range(len(tokens) - len(part) + 1))


def test_a_row_whose_sampling_fails_fails_alone(backend, tokenizer, solo, monkeypatch) -> None:
    """torch engine: the batched sampler raises for a step holding the poisoned row's third token; the step is
    retried sequence by sequence and only the poisoned request fails, with no internals in its message."""
    poison_ids = tokenizer("poison pill").input_ids
    sampler = backend.sampler  # type: ignore[attr-defined]
    sample = sampler.sample

    def failing(logits, rows, **kwargs):
        poisoned = {
            seq.slot
            for seq in backend.scheduler.running  # type: ignore[attr-defined]
            if seq.token_ids[: seq.num_prompt] == poison_ids
        }
        slots, output_index = rows.ints[:, 0].tolist(), rows.ints[:, 1].tolist()
        if any(slot in poisoned and index >= 2 for slot, index in zip(slots, output_index, strict=True)):
            raise RuntimeError("injected sampling failure")
        return sample(logits, rows, **kwargs)

    monkeypatch.setattr(sampler, "sample", failing)
    poisoned, *innocent = _batched(
        backend, tokenizer, [(poison_ids, SamplingParams(max_new_tokens=10, temperature=1.0))]
    )
    assert isinstance(poisoned, BackendError) and "injected" not in str(poisoned)
    assert innocent == solo
    assert backend.is_healthy()


def test_a_prefill_that_fails_for_a_group_fails_only_the_culprit(backend, tokenizer, solo, monkeypatch) -> None:
    """torch engine: the step's forward (the prompts packed together) fails while it holds the poisoned prompt;
    retried one by one, only the request that fails alone fails."""
    poison_ids = tokenizer("poison pill").input_ids
    model = backend.model  # type: ignore[attr-defined]
    compute_logits = model.compute_logits

    def failing(tokens, *args, **kwargs):
        if _contains(tokens.tolist(), poison_ids):
            raise RuntimeError("injected prefill failure")
        return compute_logits(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "compute_logits", failing)
    poisoned, *innocent = _batched(backend, tokenizer, [(poison_ids, INNOCENT)])
    assert isinstance(poisoned, BackendError) and "injected" not in str(poisoned)
    assert innocent == solo
    assert backend.is_healthy()
