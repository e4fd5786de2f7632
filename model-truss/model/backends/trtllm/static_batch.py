"""`trtllm_runner: python`: dynamic static batching over `ModelRunner`, the Python session.

`StaticBatchEngine` gathers waiting requests into one `generate()` batch, advances it one decode step
per engine step and starts the next batch when it ends (the package docstring says what that costs).
One-rank engines only.

Tokens, as the sources define them: `output_ids` [batch, beams, max_seq_len] hold the prompt, then the
generated ids, then padding (pad/end ids); `sequence_lengths` [batch, beams] exclude the end token;
streaming yields the cumulative tensors after each decode step. A row's new ids are
`output_ids[row, 0, seen:length]`; a row that did not grow over a step has ended on its end token.

Checked against NVIDIA/TensorRT-LLM through the code index: runtime/model_runner.py and
runtime/generation.py (the 1.x line of runtime/model_runner_cpp.py, see `executor`): `ModelRunner.from_dir`
keywords, `generate(..., streaming, **sampling kwargs)`, per-row [batch] tensors and their dtypes,
`decode_stream`, output_ids layout and padding.
Only against the double (tests/doubles/trtllm.py): end_id=-1 in the Python session.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.backends.base import EngineStats, FinishReason, Limits, SamplingParams, Submission
from model.backends.trtllm.engine_config import EngineSpec, launch_layout
from model.backends.trtllm.shared import TokenIds, sampling_seed
from model.errors import BackendError, EngineMismatchError

logger = logging.getLogger(__name__)


@dataclass
class _Row:
    submission: Submission
    seen: int  # ids of this row's output_ids already handed out, prompt included
    generated: int = 0
    done: bool = False


@dataclass
class _Batch:
    rows: list[_Row]
    steps: Iterator[dict[str, torch.Tensor]]


class StaticBatchEngine:
    """`ModelRunner.generate` over one batch at a time, streamed one decode step per `step`."""

    supports: frozenset[str] = frozenset()  # one SamplingConfig per call: no per-request optional features

    def __init__(self, runner: Any, limits: Limits, ids: TokenIds) -> None:
        self._runner = runner
        self._limits = limits
        self._ids = ids
        self._waiting: list[Submission] = []
        self._batch: _Batch | None = None

    @classmethod
    def build(cls, spec: EngineSpec, limits: Limits, ids: TokenIds, engine_dir: Path) -> StaticBatchEngine:
        if spec.world_size != 1:
            raise EngineMismatchError(
                f"trtllm_runner=python serves one-rank engines only and this one has {spec.world_size} "
                f"(tp_size={spec.tp_size}, pp_size={spec.pp_size}); set trtllm_runner: cpp"
            )
        from tensorrt_llm.runtime import ModelRunner

        rank, _ = launch_layout(spec)  # refuses an mpirun launch of this one-rank engine
        return cls(ModelRunner.from_dir(str(engine_dir), rank=rank), limits, ids)

    def has_work(self) -> bool:
        return bool(self._waiting or self._batch)

    def step(self, new: list[Submission], cancelled: set[int]) -> None:
        self._waiting.extend(new)
        if cancelled:
            self._waiting = [s for s in self._waiting if s.request_id not in cancelled]
            for row in self._open_rows():
                row.done = row.submission.request_id in cancelled
        if self._batch is not None and not self._open_rows():
            self._batch = None  # all its rows were cancelled; dropping the generator ends its decode loop
        if self._batch is None and self._waiting:
            self._batch = self._start(self._take())
        if self._batch is not None:
            self._advance(self._batch)

    def fail_all(self, exc: BaseException) -> None:
        for row in self._open_rows():
            row.submission.stream.fail(exc)
        for submission in self._waiting:
            submission.stream.fail(exc)
        self._waiting, self._batch = [], None

    def stats(self) -> EngineStats:
        """Rows of the running batch, and requests waiting for the next; the Python session reports no KV use."""
        return EngineStats(running=len(self._open_rows()), waiting=len(self._waiting))

    def close(self) -> None:
        self._batch = None  # ModelRunner holds no threads or processes to stop

    def _open_rows(self) -> list[_Row]:
        return [row for row in self._batch.rows if not row.done] if self._batch else []

    def _take(self) -> list[Submission]:
        """Waiting requests in arrival order that can share one `generate` call."""
        batch: list[Submission] = []
        rest: list[Submission] = []
        longest = most_new = 0
        for submission in self._waiting:
            prompt, params = len(submission.prompt_ids), submission.params
            if prompt > self._limits.max_input_len or prompt + params.max_new_tokens > self._limits.max_seq_len:
                submission.stream.fail(BackendError(_does_not_fit(prompt, params, self._limits)))
            elif (
                len(batch) < self._limits.max_batch_size
                and (not batch or params.ignore_eos == batch[0].params.ignore_eos)  # end_id is one per call
                and max(longest, prompt) + max(most_new, params.max_new_tokens) <= self._limits.max_seq_len
            ):
                batch.append(submission)
                longest, most_new = max(longest, prompt), max(most_new, params.max_new_tokens)
            else:
                rest.append(submission)
        self._waiting = rest
        return batch

    def _start(self, batch: list[Submission]) -> _Batch | None:
        if not batch:
            return None
        params = [s.params for s in batch]
        try:
            steps = self._runner.generate(
                [torch.tensor(s.prompt_ids, dtype=torch.int32) for s in batch],
                streaming=True,
                return_dict=True,
                output_sequence_lengths=True,
                max_new_tokens=max(p.max_new_tokens for p in params),
                end_id=-1 if params[0].ignore_eos else self._ids.end_id,
                pad_id=self._ids.pad_id,
                # [batch] per-row values; greedy rows are top_k=1 at temperature 1
                temperature=torch.tensor([1.0 if p.greedy else p.temperature for p in params], dtype=torch.float32),
                top_k=torch.tensor([1 if p.greedy else p.top_k for p in params], dtype=torch.int32),
                top_p=torch.tensor([0.0 if p.greedy else p.top_p for p in params], dtype=torch.float32),
                repetition_penalty=torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32),
                random_seed=torch.tensor([sampling_seed(p) for p in params], dtype=torch.int64),
            )
        except Exception as exc:  # the inputs were refused: this batch fails, the engine goes on
            logger.exception("TensorRT-LLM refused a batch of %d requests", len(batch))
            for submission in batch:
                submission.stream.fail(BackendError(f"TensorRT-LLM refused this batch: {exc}"))
            return None
        return _Batch([_Row(s, seen=len(s.prompt_ids)) for s in batch], iter(steps))

    def _advance(self, batch: _Batch) -> None:
        try:
            with torch.no_grad():
                outputs = next(batch.steps, None)
        except Exception as exc:  # the rows share this decode step
            logger.exception("TensorRT-LLM generation failed for a batch of %d requests", len(batch.rows))
            for row in self._open_rows():
                row.submission.stream.fail(BackendError(f"TensorRT-LLM generation failed: {exc}"))
            self._batch = None
            return
        if outputs is None:  # the decode loop is over; rows still open end here
            for row in self._open_rows():
                reason: FinishReason = "length" if row.generated >= row.submission.params.max_new_tokens else "stop"
                row.submission.stream.put((), reason)
            self._batch = None
            return
        self._dispatch(batch.rows, outputs)
        if not self._open_rows():
            self._batch = None  # every row has its answer; dropping the generator ends the decode loop

    def _dispatch(self, rows: list[_Row], outputs: dict[str, torch.Tensor]) -> None:
        open_rows = [(index, row) for index, row in enumerate(rows) if not row.done]
        if not open_rows:
            return
        lengths = outputs["sequence_lengths"][:, 0].tolist()  # [batch]: prompt + generated, end token excluded
        start = min(row.seen for _, row in open_rows)
        end = max(lengths[index] for index, _ in open_rows)
        window = outputs["output_ids"][:, 0, start:end].tolist()  # [batch, end - start]: one copy per step
        for index, row in open_rows:
            new = window[index][row.seen - start : lengths[index] - start]
            row.seen = max(row.seen, lengths[index])
            self._deliver(row, new)

    def _deliver(self, row: _Row, new: list[int]) -> None:
        stream, params = row.submission.stream, row.submission.params
        if not new:  # the decoder stops extending a row once it produced its end token
            row.done = True
            stream.put((), "stop")
            return
        stops = frozenset() if params.ignore_eos else self._ids.stop_ids
        taken = new[: params.max_new_tokens - row.generated]  # the batch may run longer than this request
        for position, token in enumerate(taken):
            if token in stops:
                row.done = True
                stream.put(taken[:position], "stop")
                return
        row.generated += len(taken)
        if row.generated >= params.max_new_tokens:
            row.done = True
            stream.put(taken, "length")
        else:
            stream.put(taken)


def _does_not_fit(prompt: int, params: SamplingParams, limits: Limits) -> str:
    return (
        f"a prompt of {prompt} tokens with max_new_tokens={params.max_new_tokens} does not fit this engine "
        f"(max_input_len {limits.max_input_len}, max_seq_len {limits.max_seq_len})"
    )
