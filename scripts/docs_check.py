"""The documentation check: the commands README.md and docs/*.md mark as runnable run, and every link resolves.

Markup (GitHub reads only the first word of a fence's info string, so both render as plain code blocks):

    ```bash runnable            a command the check runs (bash, or python for a script) from the repository
    python main.py --help       root, with the running Python's bin/ first on PATH, as in an activated .venv
    ```
    ```text output              directly after a runnable block: what it prints; `...` matches anything and
    usage: main.py ...          runs of whitespace compare equal (doctest's ELLIPSIS, NORMALIZE_WHITESPACE)
    ```

A runnable block that names the local server (http://127.0.0.1:8080 or localhost:8080) runs against a
server the caller provides (tests/e2e/test_docs.py passes the session's server), its address substituted.
Links: relative paths must exist inside the repository and `#anchors` must name a heading of the page they
point into (GitHub's heading ids). Addresses with a scheme (https:, mailto:) are not fetched.
"""

from __future__ import annotations

import doctest
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from markdown_it import MarkdownIt
from markdown_it.token import Token

from scripts import REPO_ROOT

RUNNABLE = "runnable"
OUTPUT = "output"
LANGUAGES = {"bash": ["bash", "-euo", "pipefail", "-c"], "python": [sys.executable, "-c"]}
LOCAL_SERVER = re.compile(r"(?:127\.0\.0\.1|localhost):8080")
TIMEOUT_S = 300  # one block; the slowest generates a few hundred tokens on two CPU cores
OUTPUT_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
_markdown = MarkdownIt("commonmark").enable("table")


def doc_paths(root: Path = REPO_ROOT) -> list[Path]:
    """The pages the check covers: README.md and every docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    expected: str | None  # the `output` block that follows, if any

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT)}:{self.line}"

    @property
    def needs_server(self) -> bool:
        return LOCAL_SERVER.search(self.code) is not None


def runnable_snippets(path: Path) -> list[Snippet]:
    """The page's runnable blocks in page order, each with the output block right after it."""
    fences = [t for t in _markdown.parse(path.read_text()) if t.type == "fence"]
    snippets = []
    for i, fence in enumerate(fences):
        language, *flags = fence.info.split() or [""]
        if RUNNABLE not in flags:
            continue
        if language not in LANGUAGES:
            raise ValueError(f"{path}:{_line(fence)}: runnable blocks are bash or python, not {language!r}")
        after = fences[i + 1] if i + 1 < len(fences) else None
        expected = after.content if after is not None and OUTPUT in after.info.split()[1:] else None
        snippets.append(Snippet(path, _line(fence), language, fence.content, expected))
    return snippets


def run_snippet(snippet: Snippet, server_url: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run one block from the repository root; `server_url` replaces the local server's address."""
    code = snippet.code
    if snippet.needs_server:
        if server_url is None:
            raise ValueError(f"{snippet.where} talks to the server; pass server_url")
        code = LOCAL_SERVER.sub(urlsplit(server_url).netloc, code)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
    env["VIRTUAL_ENV"] = str(bin_dir.parent)
    return subprocess.run(
        [*LANGUAGES[snippet.language], code],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def output_mismatch(expected: str, got: str) -> str | None:
    """None when `got` matches the documented output, else doctest's account of the difference."""
    checker = doctest.OutputChecker()
    if checker.check_output(expected, got, OUTPUT_FLAGS):
        return None
    example = doctest.Example(source="", want=expected)
    return checker.output_difference(example, got, OUTPUT_FLAGS)


def github_anchor(title: str, seen: dict[str, int]) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to '-', repeats numbered."""
    slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    return slug if count == 0 else f"{slug}-{count}"


def anchors(path: Path) -> set[str]:
    tokens = _markdown.parse(path.read_text())
    seen: dict[str, int] = {}
    return {github_anchor(_plain_text(tokens[i + 1]), seen) for i, t in enumerate(tokens) if t.type == "heading_open"}


def broken_links(paths: list[Path], root: Path = REPO_ROOT) -> list[str]:
    """Every relative link or image that does not resolve inside `root`, as `page:line: target (why)`."""
    root = root.resolve()
    problems = []
    for path in paths:
        for line, target in _link_targets(path):
            why = _why_broken(path.resolve(), target, root)
            if why:
                problems.append(f"{path.resolve().relative_to(root)}:{line}: {target} ({why})")
    return problems


def _why_broken(page: Path, target: str, root: Path) -> str | None:
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return None  # an address outside the repository; not fetched
    file = (page.parent / unquote(parts.path)).resolve() if parts.path else page
    if not file.is_relative_to(root):
        return "points outside the repository"
    if not file.exists():
        return "no such file"
    if parts.fragment and file.suffix == ".md" and parts.fragment not in anchors(file):
        return f"no heading #{parts.fragment} in {file.relative_to(root)}"
    return None


def _link_targets(path: Path) -> list[tuple[int, str]]:
    targets = []
    for block in _markdown.parse(path.read_text()):
        for child in block.children or []:
            target = child.attrs.get("href") or child.attrs.get("src")
            if child.type in {"link_open", "image"} and isinstance(target, str):
                targets.append((_line(block), target))
    return targets


def _plain_text(inline: Token) -> str:
    """A heading's text as GitHub renders it: code spans without their backticks, link texts without targets."""
    return "".join(c.content for c in inline.children or [] if c.type in {"text", "code_inline"})


def _line(token: Token) -> int:
    return token.map[0] + 1 if token.map else 0
