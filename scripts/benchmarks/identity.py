"""Does the engine compute what transformers computes? Greedy tokens and logprobs against `generate`.

On a GPU in bf16 two correct implementations differ in rounding, so exact token identity is not the test:
1. transformers `generate` (greedy, one request alone) gives each step's token, its logprob and the margin
   between its best two logits (`reference`, run before the engine takes the model apart);
2. the engine generates the same prompts at once (batched, long prompts chunked, a shared prefix reused from
   the prefix cache), asking for logprobs;
3. `compare`: tokens must agree until the first step where the reference's top-2 margin is within
   `tie_margin` (a near-tie that rounding may flip; nothing after it is compared); a disagreement anywhere
   else is a mismatch; the logprobs of agreeing tokens must be within `logprob_tol`;
4. `against_float32`: how far each bf16 side (engine, transformers) is from the same weights in float32,
   each on its own tokens (teacher forcing): if the engine is no further from float32 than transformers is,
   a gap between the two bf16 sides is rounding, not a bug.
On CPU in float32 the unit tests ask for exact token identity instead (tests/unit/test_torch_engine.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel

from model.backends.base import BatchingBackend, SamplingParams

TIE_MARGIN = 0.1  # logits; bf16 rounding of a 4096-wide dot product is far below this
LOGPROB_TOL = 0.1


@dataclass(frozen=True)
class Reference:
    tokens: list[int]
    logprobs: list[float]  # of each chosen token
    margins: list[float]  # top-1 minus top-2 logit


@dataclass(frozen=True)
class Comparison:
    prompt_tokens: int
    compared: int  # steps compared (up to a near-tie or the end)
    stopped_at_tie: bool
    mismatches: int
    max_logprob_diff: float

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.max_logprob_diff <= LOGPROB_TOL


def identity_prompts(vocab_size: int, budget: int, block_size: int, seed: int = 0) -> list[list[int]]:
    """Short and long prompts (one longer than the step budget: chunked prefill), two sharing a prefix of
    several KV blocks (the second is sent after the first: a prefix-cache hit)."""
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(0, vocab_size - 1, (n,), generator=generator).tolist()

    shared = ids(3 * block_size)
    return [ids(7), ids(33), ids(128), ids(budget + 188), [*shared, *ids(21)], [*shared, *ids(40)]]


@torch.inference_mode()
def reference(model: PreTrainedModel, prompt: list[int], new_tokens: int) -> Reference:
    eos = model.config.vocab_size - 1
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
        output_logits=True,
        return_dict_in_generate=True,
    )
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs, margins = [], []
    for step, token in zip(out.logits, tokens, strict=True):
        logits = step[0].float()
        top2 = logits.topk(2).values
        logprobs.append(float(logits.log_softmax(-1)[token]))
        margins.append(float(top2[0] - top2[1]))
    return Reference(tokens, logprobs, margins)


def engine_outputs(
    backend: BatchingBackend, prompts: list[list[int]], new_tokens: int
) -> list[tuple[list[int], list[float]]]:
    """All prompts but the last at once, then the last (its prefix is cached by then); greedy, with logprobs."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, logprobs=0)

    async def one(prompt: list[int]) -> tuple[list[int], list[float]]:
        tokens, logprobs = [], []
        async for chunk in backend.generate(prompt, params):
            tokens.extend(chunk.token_ids)
            logprobs.extend(lp.logprob for lp in chunk.logprobs or ())
        return tokens, logprobs

    async def run() -> list[tuple[list[int], list[float]]]:
        first = await asyncio.gather(*(one(p) for p in prompts[:-1]))
        return [*first, await one(prompts[-1])]

    return asyncio.run(run())


def compare(ref: Reference, tokens: list[int], logprobs: list[float], prompt_tokens: int) -> Comparison:
    compared, mismatches, worst, tie = 0, 0, 0.0, False
    for step, (want, got) in enumerate(zip(ref.tokens, tokens, strict=True)):
        if want != got:
            if ref.margins[step] <= TIE_MARGIN:
                tie = True
            else:
                mismatches += 1
            break
        worst = max(worst, abs(ref.logprobs[step] - logprobs[step]))
        compared += 1
    return Comparison(prompt_tokens, compared, tie, mismatches, worst)


def summary(results: list[Comparison]) -> dict:
    return {
        "ok": all(r.ok for r in results),
        "tie_margin": TIE_MARGIN,
        "logprob_tol": LOGPROB_TOL,
        "prompts": [asdict(r) | {"ok": r.ok} for r in results],
    }


@torch.inference_mode()
def teacher_forced(model: PreTrainedModel, prompt: list[int], tokens: list[int]) -> Reference:
    """The model's logprob of each given token after the prompt and the tokens before it; margins of its top 2."""
    ids = torch.tensor([prompt + tokens], device=model.device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) + len(tokens) - 1].float()
    top2 = logits.topk(2, dim=-1)
    logprobs = logits.log_softmax(-1).gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
    return Reference(top2.indices[:, 0].tolist(), logprobs.tolist(), (top2.values[:, 0] - top2.values[:, 1]).tolist())


def against_float32(forced: Reference, tokens: list[int], logprobs: list[float]) -> dict:
    """One bf16 side against float32 on its own tokens: steps until a clear disagreement, largest logprob gap."""
    agreeing, worst = 0, 0.0
    for step, token in enumerate(tokens):
        worst = max(worst, abs(logprobs[step] - forced.logprobs[step]))
        if token != forced.tokens[step]:
            return {
                "agreeing_steps": agreeing,
                "clear_mismatch": forced.margins[step] > TIE_MARGIN,
                "max_logprob_diff": worst,
            }
        agreeing += 1
    return {"agreeing_steps": agreeing, "clear_mismatch": False, "max_logprob_diff": worst}


def float32_summary(gaps: list[dict]) -> dict:
    """Over all prompts, each bf16 side against float32 (`against_float32` pairs): its largest logprob gap and
    the prompts on which it clearly disagrees; the engine is right if it is no further off than transformers."""
    return {
        side: {
            "max_logprob_diff": round(max((g[side]["max_logprob_diff"] for g in gaps), default=0.0), 4),
            "clear_mismatches": sum(g[side]["clear_mismatch"] for g in gaps),
        }
        for side in ("engine", "transformers")
    }


def compare_all(
    references: list[Reference], prompts: list[list[int]], outputs: list[tuple[list[int], list[float]]]
) -> list[Comparison]:
    """`compare` for each prompt: the engine's (tokens, logprobs) against its reference."""
    return [
        compare(ref, tokens, logprobs, len(prompt))
        for ref, prompt, (tokens, logprobs) in zip(references, prompts, outputs, strict=True)
    ]


def float32_gaps(
    float32: PreTrainedModel,
    references: list[Reference],
    prompts: list[list[int]],
    outputs: list[tuple[list[int], list[float]]],
) -> list[dict]:
    """Per prompt, step 4 for both bf16 sides: the engine on its tokens, transformers on the reference's."""
    return [
        {
            "engine": against_float32(teacher_forced(float32, prompt, tokens), tokens, logprobs),
            "transformers": against_float32(teacher_forced(float32, prompt, ref.tokens), ref.tokens, ref.logprobs),
        }
        for ref, prompt, (tokens, logprobs) in zip(references, prompts, outputs, strict=True)
    ]
