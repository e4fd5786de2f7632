"""`main.py` before anything is installed: `--help` needs only the standard library, a command imports its
own dependencies when it runs, and a missing package is one line that says how to run it in .venv.

Each case runs `main.main` in a fresh interpreter whose imports are limited by a meta-path finder, the way
a bare system Python (or the GPU machine, which has torch but no truss or kubernetes) would limit them.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT

# Runs in the child: refuse every top-level module outside the standard library and the project, or
# (BLOCKED) just the listed ones; then run main.main(ARGV) and report which heavy modules got imported.
CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys
    ALLOWED, BLOCKED, ARGV, OUTSIDE_VENV = {allowed!r}, {blocked!r}, {argv!r}, {outside_venv!r}
    FIRST_PARTY = {{"main", "model", "scripts", "tests"}}

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            stdlib_only = ALLOWED is not None and top not in sys.stdlib_module_names and top not in FIRST_PARTY
            if stdlib_only and top not in ALLOWED or top in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{top!r}}", name=top)
            return None

    sys.meta_path.insert(0, Refuse())
    import main
    if OUTSIDE_VENV:
        main.running_in_venv = lambda: False
    try:
        code = main.main(ARGV)
    except SystemExit as exc:  # argparse's --help and usage errors
        code = exc.code
    heavy = sorted({{"truss", "kubernetes", "torch", "transformers", "fastapi"}} & set(sys.modules))
    print(json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
    """
)


def run_main(
    argv: list[str], allowed: set[str] | None = None, blocked: frozenset[str] = frozenset(), outside_venv: bool = True
) -> tuple[int, str, list[str], list[str]]:
    """(exit code, stdout, stderr lines without the report, heavy modules imported); by default as if run by
    a Python other than .venv's."""
    code = CHILD.format(allowed=allowed, blocked=set(blocked), argv=argv, outside_venv=outside_venv)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    *stderr, report = result.stderr.strip().splitlines()
    parsed = json.loads(report)
    return parsed["code"], result.stdout, stderr, parsed["heavy"]


def test_help_needs_only_the_standard_library() -> None:
    code, out, err, heavy = run_main(["--help"], allowed=set())
    assert code == 0 and err == [] and heavy == []
    for command in ("build-context", "serve", "deploy", "bench"):
        assert command in out
    assert ".venv/bin/python main.py" in out  # how to run the commands


@pytest.mark.parametrize(
    ("argv", "package"),
    [
        (["deploy", "--overlay", "gke-a100"], "kubernetes"),
        (["bench", "gpu"], "torch"),
        (["--image", "registry.example.com/llm/server"], "truss"),
    ],
)
def test_a_command_without_its_package_says_how_to_run_it_in_the_venv(argv: list[str], package: str) -> None:
    code, out, err, _ = run_main(argv, blocked=frozenset({package}))
    assert code == 2 and out == ""
    assert len(err) == 1, err  # one line, no traceback
    (line,) = err
    assert f"needs the package '{package}'" in line
    command = " ".join(["main.py", *argv])
    assert line.endswith(f"run it with the project's virtualenv: .venv/bin/python {command}")


def test_a_package_missing_from_the_venv_says_how_to_reinstall() -> None:
    code, _, err, _ = run_main(
        ["deploy", "--overlay", "gke-a100"], blocked=frozenset({"kubernetes"}), outside_venv=False
    )
    assert code == 2
    assert err == [
        "error: 'kubernetes' is missing from .venv; reinstall it: rm .venv/.installed && make .venv/.installed"
    ]


SYSTEM_PYTHON = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="no system python3 outside the virtualenv on this machine")
def test_with_the_system_python() -> None:
    """The same as a new user's first commands, before `make`: help works, a command says what to run."""
    assert SYSTEM_PYTHON is not None
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(REPO_ROOT)}  # no VIRTUAL_ENV, no .venv on PATH
    run = functools.partial(subprocess.run, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    help_run = run([SYSTEM_PYTHON, "main.py", "--help"])
    assert help_run.returncode == 0 and "deploy" in help_run.stdout, help_run.stderr
    deploy = run([SYSTEM_PYTHON, "main.py", "deploy", "--overlay", "gke-a100"])
    assert deploy.returncode == 2 and len(deploy.stderr.splitlines()) == 1, deploy.stderr
    assert deploy.stderr.strip().endswith(".venv/bin/python main.py deploy --overlay gke-a100")


def test_bench_gpu_runs_without_truss_kubernetes_or_fastapi() -> None:
    """The GPU machine has torch and transformers but no truss, kubernetes or the server stack."""
    code, _, err, heavy = run_main(["bench", "gpu"], blocked=frozenset({"truss", "kubernetes", "fastapi"}))
    # This machine has no CUDA GPU, so the command stops there, after importing the whole GPU suite.
    assert code == 2 and err == ["error: bench gpu needs a CUDA GPU; run it on a machine with one (docs/benchmarks.md)"]
    assert "torch" in heavy and not {"truss", "kubernetes", "fastapi"} & set(heavy)


def test_subcommand_help_imports_only_that_command() -> None:
    code, out, _, heavy = run_main(["serve", "--help"], blocked=frozenset({"kubernetes", "torch"}))
    assert code == 0 and "--port" in out and "kubernetes" not in heavy


def test_a_bug_in_the_project_is_not_reported_as_a_missing_package() -> None:
    """Only third-party packages get the one-line hint; a missing first-party module is a traceback."""
    code = "import main, sys; sys.modules['scripts.serve'] = None; main.main(['serve', '--help'])"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" in result.stderr
