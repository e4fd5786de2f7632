"""The launcher's pieces that need no running server: access-log filtering, the API key, the drain bound."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from model.server_app import StripQueryString, log_config_without_queries, read_api_key
from model.settings import ServerSettings, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_access_log_lines_lose_their_query_string() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "POST", "/v1/completions?api_key=leak", "1.1", 200), None,
    )  # fmt: skip
    assert StripQueryString().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "POST /v1/completions HTTP/1.1" 200'


def test_the_filter_runs_first_on_truss_access_logger() -> None:
    truss_like = {
        "filters": {"health_check_filter": {}},
        "loggers": {"uvicorn.access": {"filters": ["health_check_filter"]}, "uvicorn": {}},
    }
    config = log_config_without_queries(truss_like)
    assert config["loggers"]["uvicorn.access"]["filters"] == ["strip_query", "health_check_filter"]
    assert truss_like["loggers"]["uvicorn.access"]["filters"] == ["health_check_filter"]  # not mutated


def test_the_api_key_comes_from_the_named_secret_and_empty_means_off() -> None:
    settings = ServerSettings()
    assert read_api_key({"llm_api_key": " k3y\n"}, settings) == "k3y"
    assert read_api_key({"llm_api_key": ""}, settings) is None
    assert read_api_key({}, settings) is None


def test_pods_get_longer_to_stop_than_the_drain_takes() -> None:
    deployment = yaml.safe_load((REPO / "k8s/base/deployment.yaml").read_text())
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > load_settings(None, environ={}).drain_timeout_s
    config = yaml.safe_load((REPO / "model-truss/config.yaml").read_text())
    assert "llm_api_key" in config["secrets"]
    assert config["runtime"]["predict_concurrency"] > 2 * 2 * 4096  # twice the largest possible queue
