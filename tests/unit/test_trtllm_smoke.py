"""scripts/trtllm_smoke.py: the dry run lists every check, and the checks pass against the doubles.

The smoke checks state what the doubles assume; running them against the doubles (engines written as
trtllm-build writes config.json, a checkpoint folder) shows the two say the same, so a FAIL on a GPU
means the real TensorRT-LLM differs from the doubles. Checks that need a real model (raw logprobs
against transformers, schema-valid JSON, different samples per seed) or the server are left out here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import trtllm_smoke
from scripts.smoke import SmokeContext, engine_checks, llmapi_checks, run_checks
from tests.doubles.trtllm import FakeTrtllm, write_engine_config
from tests.doubles.trtllm_llmapi import FakeLlmApi

NEEDS_A_REAL_MODEL = {"llmapi.logprobs_raw_top_k", "llmapi.guided_json_schema", "llmapi.seed_reproducible"}


def test_dry_run_prints_every_check_once_and_a_json_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert trtllm_smoke.main(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line.split("  ")[1] for line in lines if line.startswith("CHECK  ")]
    every = [check.name for checks in trtllm_smoke.PATHS.values() for check in checks]
    assert listed == every and len(set(every)) == len(every)
    report = json.loads(lines[-1])
    assert report["dry_run"] and report["planned"] == every


def test_only_limits_the_paths(capsys: pytest.CaptureFixture[str]) -> None:
    assert trtllm_smoke.main(["--dry-run", "--only", "llmapi"]) == 0
    names = json.loads(capsys.readouterr().out.splitlines()[-1])["planned"]
    assert names and all(name.startswith("llmapi.") for name in names)


def fake_engines(root: Path) -> dict[str, Path]:
    """The four smoke engines, as trtllm-build would describe them."""
    sizes = {"max_batch_size": 8, "max_seq_len": engine_checks.TINY_MAX_SEQ_LEN,
             "max_num_tokens": engine_checks.TINY_MAX_NUM_TOKENS}  # fmt: skip
    plain = {**sizes, "max_input_len": engine_checks.TINY_MAX_INPUT_LEN}
    narrow = {**sizes, "max_input_len": engine_checks.TINY_MAX_NUM_TOKENS, "paged_context_fmha": False}
    builds = {
        "plain": plain,
        "target": {**plain, "max_draft_len": engine_checks.TINY_DRAFT_LEN},
        "no_paged_fmha": narrow,
        "continuous": {**narrow, "kv_cache_type": "CONTINUOUS"},
    }
    for name, build in builds.items():
        write_engine_config(root / name, **build)
    return {name: root / name for name in builds}


def test_the_engine_checks_pass_against_the_engine_double(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeTrtllm().install(monkeypatch)
    context = SmokeContext(fake.modules()["tensorrt_llm"], tmp_path, tmp_path, fake_engines(tmp_path), end_id=2)

    outcomes = run_checks(engine_checks.CHECKS, context, echo=lambda line: None)

    assert [(o.name, o.status, o.detail) for o in outcomes if o.status != "PASS"] == []


def test_the_llmapi_checks_pass_against_the_llmapi_double(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    api = FakeLlmApi().install(monkeypatch)
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 2048, "vocab_size": 1000}))
    context = SmokeContext(api.modules()["tensorrt_llm"], tmp_path, tmp_path, {}, end_id=2)
    checks = [check for check in llmapi_checks.CHECKS if check.name not in NEEDS_A_REAL_MODEL]

    outcomes = run_checks(checks, context, echo=lambda line: None)

    assert [(o.name, o.status, o.detail) for o in outcomes if o.status != "PASS"] == []


def test_a_behaviour_the_double_does_not_have_is_a_fail_with_the_difference(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeTrtllm().install(monkeypatch)
    engines = fake_engines(tmp_path)
    write_engine_config(engines["target"], max_seq_len=engine_checks.TINY_MAX_SEQ_LEN)  # as if max_seq_len did not grow
    context = SmokeContext(fake.modules()["tensorrt_llm"], tmp_path, tmp_path, engines, end_id=2)

    [outcome] = run_checks(engine_checks.CHECKS[:1], context, echo=lambda line: None)

    assert outcome.status == "FAIL" and "config.json says 512" in outcome.detail
