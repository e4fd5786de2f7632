"""The documentation's static checks: links and anchors resolve, the README stays short, the pages and the
code name things by what they are, and the recorded benchmark table is the one its results file produces.
The runnable blocks themselves run in tests/e2e/test_docs.py; the checker's own behaviour is pinned here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.benchmarks.gpu import GpuRow, markdown_table
from scripts.docs_check import (
    Snippet,
    broken_links,
    doc_paths,
    github_anchor,
    output_mismatch,
    run_snippet,
    runnable_snippets,
)
from tests.conftest import REPO_ROOT

README_MAX_LINES = 250
DOC_PAGES = ("api", "configuration", "engines", "deployment", "benchmarks", "security", "architecture")
# Words that point at documents outside this repository (the notes it was first built from).
FOREIGN_REFERENCES = re.compile(
    r"\bseeds? ?0\d\d\b|\bthe seed's\b|\bthe seeds\b|\bseed documents?\b|walk-?through it grew", re.I
)


def test_every_relative_link_and_anchor_resolves() -> None:
    assert broken_links(doc_paths()) == []


def test_readme_is_short_and_links_every_page() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    for page in DOC_PAGES:
        assert (REPO_ROOT / "docs" / f"{page}.md").is_file()
        assert f"(docs/{page}.md)" in readme, f"README.md does not link docs/{page}.md"


def test_every_setting_is_in_the_configuration_table() -> None:
    """A setting added to settings.py without a row in docs/configuration.md is a setting nobody finds."""
    from model.settings import ServerSettings

    table = (REPO_ROOT / "docs" / "configuration.md").read_text().split("## Settings", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([a-z_]+)`", table))
    assert sorted(set(ServerSettings.model_fields) - documented) == []


def test_the_readme_leads_with_the_two_commands_and_the_openai_client() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert readme.index("make serve") < readme.index("make test") < readme.index("from openai import OpenAI")
    assert readme.index("from openai import OpenAI") < readme.index(":predict", readme.index("from openai"))
    predict = next(s for s in runnable_snippets(REPO_ROOT / "README.md") if "requests.post" in s.code)
    assert predict.code == (
        "import requests\n\n"
        'res = requests.post("http://127.0.0.1:8080/v1/models/model:predict", json={"prompt": "What is a mistral?"})\n'
        "print(res.json())\n"
    )


def test_no_page_or_file_refers_to_documents_outside_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    hits = []
    for name in tracked.stdout.splitlines():
        path = REPO_ROOT / name
        if path.suffix in {".png", ".gguf"} or name == "tests/unit/test_docs.py" or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if FOREIGN_REFERENCES.search(line):
                hits.append(f"{name}:{number}: {line.strip()}")
    assert hits == []


def test_the_gpu_table_is_the_one_its_recorded_results_produce() -> None:
    results = json.loads((REPO_ROOT / "docs" / "benchmarks" / "gpu-h200-run3.json").read_text())
    rows = [GpuRow(**{k: v for k, v in row.items() if k != "utilisation"}) for row in results["meta"]["rows"]]
    assert markdown_table(rows) in (REPO_ROOT / "docs" / "benchmarks.md").read_text()


def test_runnable_blocks_are_found_with_their_output(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n```bash runnable\necho hi\n```\n\n```text output\nh...\n```\n\n"
        "```bash\nnot run\n```\n\n```python runnable\nprint(1)\n```\n"
    )
    first, second = runnable_snippets(page)
    assert (first.language, first.line, first.code, first.expected) == ("bash", 3, "echo hi\n", "h...\n")
    assert (second.language, second.code, second.expected) == ("python", "print(1)\n", None)
    page.write_text("```console runnable\n$ ls\n```\n")
    with pytest.raises(ValueError, match="runnable blocks are bash or python"):
        runnable_snippets(page)


def test_output_matching_allows_ellipsis_and_whitespace_but_not_other_text() -> None:
    assert output_mismatch("usage: main.py ...\n", "usage: main.py [-h]\n\n  COMMAND\n") is None
    assert output_mismatch("a  b\n", "a\nb\n") is None
    mismatch = output_mismatch("'completion_tokens': 60\n", "'completion_tokens': 118\n")
    assert mismatch is not None and "118" in mismatch


def test_blocks_that_talk_to_the_server_get_its_address() -> None:
    code = "echo http://127.0.0.1:8080/v1/models/model localhost:8080 $VIRTUAL_ENV\n"
    snippet = Snippet(REPO_ROOT / "README.md", 1, "bash", code, None)
    assert snippet.needs_server
    with pytest.raises(ValueError, match="talks to the server"):
        run_snippet(snippet)
    result = run_snippet(snippet, "http://127.0.0.1:5555")
    venv = Path(sys.executable).parent.parent
    assert result.stdout == f"http://127.0.0.1:5555/v1/models/model 127.0.0.1:5555 {venv}\n"


def test_github_anchors() -> None:
    seen: dict[str, int] = {}
    assert github_anchor("`truss push` (Baseten)", seen) == "truss-push-baseten"
    assert github_anchor("Engines: choose, build, publish and load", seen) == "engines-choose-build-publish-and-load"
    assert github_anchor("Notes", seen) == "notes"
    assert github_anchor("Notes", seen) == "notes-1"


def test_broken_links_are_reported_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Real heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md#real-heading) [here](#page) [web](https://example.com/x)\n\n"
        "[gone](missing.md) [anchor](other.md#nope) [out](../elsewhere.md) ![img](pic.png)\n"
    )
    assert broken_links([page], root=tmp_path) == [
        "page.md:5: missing.md (no such file)",
        "page.md:5: other.md#nope (no heading #nope in other.md)",
        "page.md:5: ../elsewhere.md (points outside the repository)",
        "page.md:5: pic.png (no such file)",
    ]
