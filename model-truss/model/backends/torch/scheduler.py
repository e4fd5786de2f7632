"""What each engine step computes: admission, decode rows, chunked prefill under a token budget, preemption.

A step computes at most `token_budget` tokens: one for every decoding sequence (always all of them, so a
running stream never waits for a prompt), and prefill chunks of admitted prompts with what is left, shortest
remaining prompt first (a 2,000-token prompt is cut into chunks and never holds back the short ones that
arrived with it). The budget counts tokens really computed: no padding, and a prompt prefix found in the
prefix cache costs nothing.

Sequences hold a sampling slot (a row of the sampler's per-request state) from admission to the end. When the
KV pool cannot give a decoding sequence its next block, the most recently admitted sequence is preempted:
its blocks are freed and it is queued again in front, to be recomputed from its known tokens (prompt and
output); its slot, and with it its penalty counts and seed, stay, so its output does not change.

Token accounting (steps are pipelined, so a sampled token may not be on the host yet):
`token_ids` = prompt + output read back; `in_flight` = tokens sampled by launched steps, not yet read back;
`num_tokens` = both; `num_computed` = positions whose KV launched steps write. A sequence decodes when
`num_computed == num_tokens - 1` (its last token is the step's input, read on the device); otherwise it
prefills `token_ids[num_computed:]`, which needs every token on the host (`in_flight == 0`).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from model.backends.base import Submission, TokenGuide
from model.backends.torch.kv_blocks import BlockManager, BlockTable

FREE_BLOCK_WATERMARK = 0.01  # admission keeps this share of the pool free for decoding rows to grow into


@dataclass(eq=False)
class Sequence:
    """One request inside the engine."""

    submission: Submission
    token_ids: list[int]
    num_prompt: int
    seed: int
    guide: TokenGuide | None = None
    slot: int = -1  # sampling slot; -1 until admitted
    table: BlockTable = field(default_factory=BlockTable)
    num_computed: int = 0
    in_flight: int = 0
    admitted: int = -1  # admission order, for preemption (newest first)
    marked: int = 0  # token_ids[:marked] are marked seen in the sampler (repetition penalty)
    fresh: bool = True  # not launched yet: its sampling slot still holds the previous request's state
    finished: bool = False

    @property
    def request_id(self) -> int:
        return self.submission.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.in_flight

    @property
    def num_generated(self) -> int:
        """Tokens sampled so far, read back or not: the index of the next sampled token."""
        return self.num_tokens - self.num_prompt

    @property
    def decoding(self) -> bool:
        return self.num_computed == self.num_tokens - 1

    def wants_token(self, max_seq_len: int) -> bool:
        """Whether another token may be sampled (the length limits are known without reading tokens back)."""
        return (
            not self.finished
            and self.num_generated < self.submission.params.max_new_tokens
            and self.num_tokens < max_seq_len
        )


@dataclass(frozen=True)
class Chunk:
    """Prefill work of one sequence in a step: positions start .. start + len(tokens) - 1."""

    seq: Sequence
    start: int
    tokens: list[int]
    samples: bool  # the chunk ends the sequence's known tokens, so the step samples its next token


@dataclass(frozen=True)
class StepPlan:
    """One step's work, fixed when planned (the sequences' counters move once it is launched)."""

    decode: list[Sequence]  # one token each; the input token is read on the device
    chunks: list[Chunk]

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences that get a token from this step, in the order of the sampler's rows."""
        return self.decode + [c.seq for c in self.chunks if c.samples]

    @property
    def sequences(self) -> list[Sequence]:
        return self.decode + [c.seq for c in self.chunks]

    def split(self) -> list[StepPlan]:
        """The same work as independent steps, one sequence each."""
        return [StepPlan([seq], []) for seq in self.decode] + [StepPlan([], [chunk]) for chunk in self.chunks]


class Scheduler:
    """Owns the waiting queue and the running set; `schedule()` plans one step."""

    def __init__(self, blocks: BlockManager, *, max_rows: int, token_budget: int, max_seq_len: int) -> None:
        self.blocks = blocks
        self.max_rows = max_rows
        self.token_budget = token_budget
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._free_slots = list(range(max_rows - 1, -1, -1))
        self._admissions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> StepPlan | None:
        """Admit what fits, then plan decode rows and prefill chunks; None when nothing can run now."""
        self._admit()
        decode = self._decode_rows()
        chunks = self._prefill_chunks(self.token_budget - len(decode))
        if not decode and not chunks:
            return None
        return StepPlan(decode, chunks)

    def launched(self, plan: StepPlan) -> None:
        """Record that `plan` runs on the device: its KV gets written, its samples are in flight."""
        for seq in plan.decode:
            seq.num_computed += 1
        for chunk in plan.chunks:
            chunk.seq.num_computed += len(chunk.tokens)
        for seq in plan.sampled:
            seq.in_flight += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (ended, cancelled or failed) and release what it holds."""
        seq.finished = True
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.table)
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1

    # -- planning ---------------------------------------------------------------------------

    def _admit(self) -> None:
        reserve = max(1, int(FREE_BLOCK_WATERMARK * self.blocks.usable_blocks))
        while self.waiting:
            seq = self.waiting[0]
            if seq.in_flight:  # a preempted sequence waits for its last token before it is recomputed
                return
            if seq.slot < 0 and not self._free_slots:
                return
            reserve_now = reserve if self.running else 0  # alone, a sequence may use the whole pool
            if not self.blocks.can_allocate(seq.token_ids, reserve_now):
                return
            self.waiting.popleft()
            if seq.slot < 0:
                seq.slot = self._free_slots.pop()
            seq.num_computed = self.blocks.allocate(seq.table, seq.token_ids)
            seq.admitted = self._admissions
            self._admissions += 1
            self.running.append(seq)

    def _decode_rows(self) -> list[Sequence]:
        rows, preempted = [], set()
        for seq in list(self.running):
            if seq in preempted or not seq.decoding or not seq.wants_token(self.max_seq_len):
                continue
            while not self.blocks.can_grow(seq.table, seq.num_tokens):
                victim = max(self.running, key=lambda s: s.admitted)
                self._preempt(victim)
                preempted.add(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq.table, seq.num_tokens)
                rows.append(seq)
        return [seq for seq in rows if seq not in preempted] if preempted else rows

    def _prefill_chunks(self, budget: int) -> list[Chunk]:
        pending = [s for s in self.running if not s.decoding and s.in_flight == 0]
        chunks = []
        for seq in sorted(pending, key=lambda s: len(s.token_ids) - s.num_computed):
            if budget <= 0:
                break
            start = seq.num_computed
            tokens = seq.token_ids[start : start + budget]
            chunks.append(Chunk(seq, start, tokens, start + len(tokens) == seq.num_tokens))
            budget -= len(tokens)
        return chunks

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's KV and queue it in front, to be recomputed (it keeps its slot)."""
        self.running.remove(seq)
        self.blocks.free(seq.table)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
