"""The `torch` backend: a Hugging Face causal LM served by continuous (in-flight) batching.

Why not transformers' own batching: `generate()` takes one GenerationConfig for a whole batch,
and its continuous-batching manager (5.x) has per-request temperature/top-k/top-p but no
per-request seed or repetition penalty, and greedy-vs-sampling is global. So this module runs the
model's own forward pass with a `DynamicCache` and reuses transformers' logits processors per row.

The engine thread keeps one running batch (all tensors are batch-major, B rows):
- `cache`: DynamicCache, keys/values [B, heads, T, head_dim], rows left-padded to a common T;
- `mask`: [B, T] attention mask, 0 on a row's left padding;
- `next_tokens`: [B] the token each row sampled last, not yet fed to the model.
Each `_step`:
1. drop cancelled rows; admit waiting requests into free slots: their prompts are prefilled
   together (left-padded), each row samples its first token, and the group is merged into the
   running batch by left-padding the shorter cache;
2. one decode forward for all rows ([B, 1] tokens, position = real tokens so far);
3. each row samples with its own parameters and generator: penalties (repetition, OpenAI presence /
   frequency, min_tokens), then the structured-output mask of a guided row (model/guided.py), then
   temperature / top-k / top-p; logprobs come from the raw logits, before any of these. Tokens go to the
   row's stream; finished rows leave the batch and all-padding columns are trimmed.
Failures stay with the request that caused them: a row whose sampling fails (none should: scores
are made finite, tiny temperatures decode greedily) fails alone; a prefill forward that fails for a
group is retried request by request, so only the request that fails alone is failed. A decode forward
is one computation for the whole batch, so its failure fails the running batch, and the engine
carries on with the next requests.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    LogitsProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from model.artifacts import Artifacts
from model.backends.base import (
    FEATURE_FIELDS,
    BatchingBackend,
    EngineStats,
    Limits,
    SamplingParams,
    Submission,
    TokenGuide,
    TokenLogprob,
)
from model.errors import BackendError, InvalidRequest
from model.guided import GuideCompiler, allocate_bitmask, apply_bitmask
from model.prompting import stop_token_ids
from model.settings import ServerSettings

logger = logging.getLogger(__name__)

PREFILL_TOKEN_BUDGET = 16384  # prompt tokens prefilled in one forward; bounds activation memory
FAILED = "generation failed for this request; the server log has the details"  # no internals to the client


@dataclass
class _Row:
    """One admitted request: its sampler and what it generated so far."""

    submission: Submission
    penalties: LogitsProcessorList  # applied before the guide's mask
    warpers: LogitsProcessorList  # temperature, top-k, top-p: after it (a mask after top-k could leave nothing)
    generator: torch.Generator | None  # None: greedy
    guide: TokenGuide | None = None
    generated: list[int] = field(default_factory=list)

    @property
    def params(self) -> SamplingParams:
        return self.submission.params

    def history(self, device: torch.device) -> torch.Tensor:
        """[1, prompt + generated] ids; repetition penalty needs them."""
        return torch.tensor([self.submission.prompt_ids + self.generated], device=device)


class TorchBackend(BatchingBackend):
    name = "torch"
    supports = frozenset(FEATURE_FIELDS)

    def __init__(
        self,
        model: PreTrainedModel,
        limits: Limits,
        stop_ids: frozenset[int],
        pad_id: int,
        guides: GuideCompiler | None = None,
    ) -> None:
        """`guides`: the tokenizer's grammar compiler; without one, structured output is refused."""
        super().__init__(limits, stop_ids)
        self.model = model
        self.guides = guides
        if guides is None:
            self.supports = self.supports - {"guided_decoding"}
        self.device = model.device
        self._pad_id = pad_id
        self._waiting: list[Submission] = []
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self._next_tokens = torch.zeros((0,), dtype=torch.long, device=self.device)

    @classmethod
    def load(cls, settings: ServerSettings, artifacts: Artifacts, tokenizer: PreTrainedTokenizerBase) -> TorchBackend:
        model = load_hf_model(settings, artifacts.model_dir)
        max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
        max_seq_len = min(settings.max_seq_len or max_positions, max_positions)
        limits = Limits(
            max_input_len=min(settings.max_input_len or max_seq_len - 1, max_seq_len - 1),
            max_seq_len=max_seq_len,
            max_new_tokens=min(settings.max_new_tokens_limit, max_seq_len - 1),
            max_batch_size=settings.max_batch_size,
        )
        stops = stop_token_ids(tokenizer, artifacts.model_dir, artifacts.tokenizer_dir)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops, default=0)
        logger.info("torch backend on %s in %s, stop ids %s", model.device, model.dtype, sorted(stops))
        guides = GuideCompiler(tokenizer, model.get_output_embeddings().weight.shape[0], stops)  # logits width
        return cls(model, limits, stops, pad_id, guides)

    async def prepare(self, params: SamplingParams) -> None:
        """Compile the request's grammar off the event loop (cached), so admitting it costs microseconds."""
        await super().prepare(params)
        if params.guided is None:
            return
        if params.min_new_tokens:
            raise InvalidRequest(
                "min_tokens cannot be combined with structured output: the grammar decides where the output ends; "
                "remove min_tokens",
                param="min_tokens",
            )
        assert self.guides is not None  # check_supported refused guided decoding without a compiler
        await asyncio.to_thread(self.guides.compile, params.guided)

    def stats(self) -> EngineStats:
        """Rows in the running batch, and accepted requests not yet in it (the DynamicCache has no fixed size)."""
        running = len(self._rows)
        return EngineStats(running=running, waiting=max(0, self.in_flight - running))

    # -- engine thread ---------------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._rows or self._waiting)

    @torch.inference_mode()
    def _step(self, new: list[Submission], cancelled: set[int]) -> None:
        self._waiting.extend(new)
        if cancelled:
            self._waiting = [s for s in self._waiting if s.request_id not in cancelled]
            self._keep([i for i, row in enumerate(self._rows) if row.submission.request_id not in cancelled])
        self._admit()
        if self._rows:
            try:
                self._decode()
            except Exception:  # the whole running batch shares this forward pass
                logger.exception("decode step failed for %d requests", len(self._rows))
                self._fail_rows(BackendError(FAILED))

    def _admit(self) -> None:
        free = self.limits.max_batch_size - len(self._rows)
        group: list[Submission] = []
        tokens = 0
        while self._waiting and len(group) < free:
            size = len(self._waiting[0].prompt_ids)
            if group and tokens + size > PREFILL_TOKEN_BUDGET:
                break
            group.append(self._waiting.pop(0))
            tokens += size
        if not group:
            return
        try:
            self._prefill(group)
        except Exception:  # only the requests being admitted took part in this forward
            logger.exception("prefill failed for %d requests", len(group))
            if len(group) == 1:
                group[0].stream.fail(BackendError(FAILED))
                return
            for submission in group:  # alone, so that only the request that fails by itself is failed
                try:
                    self._prefill([submission])
                except Exception:
                    logger.exception("prefill failed for request %d alone", submission.request_id)
                    submission.stream.fail(BackendError(FAILED))

    def _prefill(self, group: list[Submission]) -> None:
        width = max(len(s.prompt_ids) for s in group)
        ids = torch.full((len(group), width), self._pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(group), width), dtype=torch.long, device=self.device)
        for i, submission in enumerate(group):  # left padding: every row's last column is real
            ids[i, width - len(submission.prompt_ids) :] = torch.tensor(submission.prompt_ids, device=self.device)
            mask[i, width - len(submission.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        rows = [_make_row(s, self.device, self.guides, self.stop_token_ids) for s in group]
        tokens, logprobs, failed = self._sample(rows, out.logits[:, -1, :])
        self._merge(rows, cache, mask, tokens)
        self._dispatch(len(self._rows) - len(rows), tokens, logprobs, failed)

    def _decode(self) -> None:
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(self._rows), 1))], dim=1)
        positions = self._mask.sum(dim=1, keepdim=True) - 1  # [B, 1]: real tokens before this one
        out = self.model(
            input_ids=self._next_tokens[:, None],
            attention_mask=self._mask,
            position_ids=positions,
            past_key_values=self._cache,
            use_cache=True,
        )
        tokens, logprobs, failed = self._sample(self._rows, out.logits[:, -1, :])
        self._dispatch(0, tokens, logprobs, failed)

    def _sample(
        self, rows: list[_Row], logits: torch.Tensor
    ) -> tuple[torch.Tensor, list[TokenLogprob | None], set[int]]:
        """[B, vocab] logits -> [B] token ids, each row with its own parameters; the rows' logprobs if asked, and
        the rows whose own sampling failed (they fail alone)."""
        logits = logits.float()
        # Raw log-probabilities [vocab] of the rows that asked, before penalties, mask and temperature change logits.
        raw = {i: torch.log_softmax(logits[i], dim=-1) for i, row in enumerate(rows) if row.params.logprobs is not None}
        bitmask = allocate_bitmask(len(rows), logits.shape[-1]) if any(row.guide for row in rows) else None
        tokens = logits.argmax(dim=-1)
        failed: set[int] = set()
        for i, row in enumerate(rows):
            if not (row.penalties or row.guide is not None or row.generator is not None):
                continue
            try:
                tokens[i] = self._sample_row(row, logits[i : i + 1], bitmask, i)
            except Exception:  # this row's own parameters: it fails alone
                logger.exception("sampling failed for request %d", row.submission.request_id)
                failed.add(i)
        chosen = tokens.tolist()
        logprobs = [_logprob(raw[i], chosen[i], r.params.logprobs) if i in raw else None for i, r in enumerate(rows)]
        return tokens, logprobs, failed

    def _sample_row(self, row: _Row, logits: torch.Tensor, bitmask: torch.Tensor | None, index: int) -> int:
        """[1, vocab] logits -> one token id. Scores are made finite after the penalties: an extreme (schema-valid)
        value such as repetition_penalty=1e-300 overflows a score to inf, and inf - inf in softmax is NaN."""
        history = row.history(self.device) if row.penalties or row.warpers else None
        scores = row.penalties(history, logits) if row.penalties else logits
        scores = torch.nan_to_num(scores, nan=-torch.inf, posinf=torch.finfo(scores.dtype).max)
        if row.guide is not None and bitmask is not None:
            row.guide.fill_next_token_bitmask(bitmask, index)
            scores = scores.clone()
            apply_bitmask(scores, bitmask[index : index + 1])
        if row.generator is None:
            return int(scores.argmax(dim=-1)[0])
        probs = torch.softmax(row.warpers(history, scores), dim=-1)
        if not bool(torch.isfinite(probs).all()):  # every score was -inf: nothing left to sample from
            return int(scores.argmax(dim=-1)[0])
        return int(torch.multinomial(probs, 1, generator=row.generator)[0, 0])

    def _dispatch(
        self, first: int, tokens: torch.Tensor, logprobs: list[TokenLogprob | None], failed: set[int]
    ) -> None:
        """Hand rows first.. their new token (rows in `failed`, offsets from `first`, fail); retire finished rows."""
        keep = list(range(first))
        for offset, (token, logprob) in enumerate(zip(tokens.tolist(), logprobs, strict=True)):
            index = first + offset
            row = self._rows[index]
            params = row.params
            stream = row.submission.stream
            if offset in failed:
                stream.fail(BackendError(FAILED))
                continue
            if token in self.stop_token_ids and not params.ignore_eos:
                stream.put((), "stop")
                continue
            if row.guide is not None and not row.guide.accept_token(token):
                stream.fail(BackendError(f"the structured-output grammar rejected token {token}"))
                continue
            if row.guide is not None and row.guide.is_terminated():  # the end token the complete grammar asked for
                stream.put((), "stop")
                continue
            row.generated.append(token)
            chunk_logprobs = None if logprob is None else (logprob,)
            total = len(row.submission.prompt_ids) + len(row.generated)
            if len(row.generated) >= params.max_new_tokens or total >= self.limits.max_seq_len:
                stream.put((token,), "length", chunk_logprobs)
                continue
            stream.put((token,), None, chunk_logprobs)
            keep.append(index)
        self._next_tokens[first:] = tokens
        if len(keep) < len(self._rows):
            self._keep(keep)

    # -- batch bookkeeping -----------------------------------------------------------------

    def _merge(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        """Append a prefilled group to the running batch, left-padding whichever is shorter."""
        if self._cache is None or not self._rows:
            self._cache, self._mask, self._next_tokens, self._rows = cache, mask, tokens.clone(), rows
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for running, added in zip(self._cache.layers, cache.layers, strict=True):
            running.keys = torch.cat([_pad_left(running.keys, width, 2), _pad_left(added.keys, width, 2)])
            running.values = torch.cat([_pad_left(running.values, width, 2), _pad_left(added.values, width, 2)])
        self._mask = torch.cat([_pad_left(self._mask, width, 1), _pad_left(mask, width, 1)])
        self._next_tokens = torch.cat([self._next_tokens, tokens])
        self._rows = self._rows + rows

    def _keep(self, indices: list[int]) -> None:
        """Shrink the batch to `indices`, then drop columns that are padding in every row."""
        if len(indices) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in indices]
        if not indices:
            self._cache, self._mask = None, self._mask[:0, :0]
            self._next_tokens = self._next_tokens[:0]
            return
        index = torch.tensor(indices, device=self.device)
        assert self._cache is not None
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._next_tokens = self._next_tokens[index]
        start = int(self._mask.any(dim=0).int().argmax())
        if start:
            for layer in self._cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self._mask = self._mask[:, start:]

    def _fail_rows(self, exc: BaseException) -> None:
        for row in self._rows:
            row.submission.stream.fail(exc)
        self._keep([])

    def _fail_all(self, exc: BaseException) -> None:
        self._fail_rows(exc)
        for submission in self._waiting:
            submission.stream.fail(exc)
        self._waiting = []


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence / frequency penalties over the generated tokens (the prompt does not count):
    logit[t] -= frequency * count[t] + presence * (count[t] > 0)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float) -> None:
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len :]  # [1, n]
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def _make_row(
    submission: Submission, device: torch.device, guides: GuideCompiler | None, stops: frozenset[int]
) -> _Row:
    """transformers' own logits processors, per request; a seeded generator when sampling; the grammar's matcher."""
    params = submission.params
    penalties, warpers = LogitsProcessorList(), LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        penalties.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.presence_penalty or params.frequency_penalty:
        penalties.append(OpenAIPenalties(len(submission.prompt_ids), params.presence_penalty, params.frequency_penalty))
    if params.min_new_tokens:
        penalties.append(
            MinNewTokensLengthLogitsProcessor(len(submission.prompt_ids), params.min_new_tokens, sorted(stops))
        )
    generator = None
    if not params.greedy:
        warpers.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            warpers.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            warpers.append(TopPLogitsWarper(params.top_p))
        generator = torch.Generator(device=device)
        generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    guide = None
    if params.guided is not None and guides is not None:
        guide = guides.compile(params.guided).new_matcher()  # compiled in prepare(): a cache hit
    return _Row(submission, penalties, warpers, generator, guide)


def _logprob(raw: torch.Tensor, token: int, top: int | None) -> TokenLogprob:
    """The sampled token's raw logprob and the `top` most likely tokens, from raw [vocab] log-probabilities."""
    best = torch.topk(raw, top) if top else None
    alternatives = tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else ()
    return TokenLogprob(token, float(raw[token]), alternatives)


def load_hf_model(settings: ServerSettings, model_dir: Path) -> PreTrainedModel:
    """The weights on the configured device, in the configured dtype (shared with the accuracy reference)."""
    device = _pick_device(settings.device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=_pick_dtype(settings.dtype, device))
    return model.to(device).eval()


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise BackendError("device=cuda was asked for but no CUDA GPU is visible; set LLM_DEVICE=cpu or fix the node")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def _pick_dtype(choice: str, device: torch.device) -> torch.dtype:
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, choice)
