"""The GPU smoke test's pieces: what a check is, the registry, the runner and its report.

A check states one contract point the TensorRT-LLM doubles (tests/doubles/) assume and verifies it on a
real TensorRT-LLM: `engine_checks` against the C++ Executor (ModelRunnerCpp), `llmapi_checks` against
`tensorrt_llm.LLM`, `server_checks` through the real server. Each returns a short detail on success and
raises `CheckFailed` otherwise; the runner prints one PASS/FAIL/SKIP line per check and one JSON line.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

Status = Literal["PASS", "FAIL", "SKIP"]


class CheckFailed(AssertionError):
    """The real TensorRT-LLM does not behave as the double assumes; the message says how it differs."""


class CheckSkipped(Exception):
    """What the check needs was not prepared (e.g. `--only llmapi` built no engine)."""


@dataclass
class SmokeContext:
    """What the checks run against: a tiny checkpoint, engines built from it, and the tensorrt_llm package."""

    trtllm: ModuleType
    work_dir: Path
    checkpoint_dir: Path  # a 2-layer Llama with random weights and SmolLM2's tokenizer, as a Hugging Face folder
    engines: dict[str, Path] = field(default_factory=dict)  # ENGINE_BUILDS names -> engine folders
    end_id: int = 2
    repo_root: Path | None = None


@dataclass(frozen=True)
class Check:
    name: str
    claim: str  # the contract point, as the double implements it
    run: Callable[[SmokeContext], str]


@dataclass(frozen=True)
class Outcome:
    name: str
    status: Status
    detail: str


def require(condition: bool, detail: str) -> None:
    if not condition:
        raise CheckFailed(detail)


def run_checks(checks: list[Check], context: SmokeContext, echo: Callable[[str], None] = print) -> list[Outcome]:
    """Every check, in order; one that raises anything but CheckFailed is a FAIL with the exception's text."""
    outcomes = []
    for check in checks:
        try:
            outcome = Outcome(check.name, "PASS", check.run(context))
        except CheckFailed as exc:
            outcome = Outcome(check.name, "FAIL", str(exc))
        except CheckSkipped as exc:
            outcome = Outcome(check.name, "SKIP", str(exc))
        except Exception as exc:  # the check's own call broke: that is a finding too, with its cause
            last = traceback.extract_tb(exc.__traceback__)[-1]
            outcome = Outcome(
                check.name, "FAIL", f"{type(exc).__name__}: {exc} ({Path(last.filename).name}:{last.lineno})"
            )
        echo(f"{outcome.status}  {outcome.name}  {outcome.detail}")
        outcomes.append(outcome)
    return outcomes


def describe(checks: list[Check], echo: Callable[[str], None] = print) -> None:
    """--dry-run: the checks a run would make, one line each."""
    for check in checks:
        echo(f"CHECK  {check.name}  {check.claim}")


def summary(outcomes: list[Outcome], facts: dict[str, Any]) -> str:
    """The one JSON line scripts parse."""
    counts = {status: sum(o.status == status for o in outcomes) for status in ("PASS", "FAIL", "SKIP")}
    return json.dumps({
        **facts,
        "passed": counts["PASS"],
        "failed": counts["FAIL"],
        "skipped": counts["SKIP"],
        "checks": [{"name": o.name, "status": o.status, "detail": o.detail} for o in outcomes],
    })  # fmt: skip
