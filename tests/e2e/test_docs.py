"""The docs check: every block README.md and docs/*.md mark as runnable runs, and prints what the page says.

Blocks run in page order, from the repository root with this virtualenv first on PATH; those that talk to
http://127.0.0.1:8080 run against the session's server (tests/e2e/conftest.py), its address substituted.
Markup and matching rules: scripts/docs_check.py.
"""

from __future__ import annotations

import pytest

from scripts.docs_check import Snippet, doc_paths, output_mismatch, run_snippet, runnable_snippets

SNIPPETS = [snippet for path in doc_paths() for snippet in runnable_snippets(path)]


def test_the_pages_have_runnable_blocks() -> None:
    """A marker typo would silently leave a page unchecked."""
    checked = {snippet.path.name for snippet in SNIPPETS}
    assert {"README.md", "api.md", "configuration.md", "engines.md", "deployment.md", "benchmarks.md"} <= checked


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: s.where)
def test_documented_block_runs(snippet: Snippet, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue("server").url if snippet.needs_server else None
    result = run_snippet(snippet, url)
    output = f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{snippet.where} exited with {result.returncode}\n{output}"
    if snippet.expected is not None:
        mismatch = output_mismatch(snippet.expected, result.stdout)
        assert mismatch is None, f"{snippet.where} printed something else than the page shows:\n{mismatch}"
