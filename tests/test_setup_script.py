"""scripts/_setup.sh, as scripts/demo and scripts/test source it: the demo installs the package
alone (no test extras: lightning, transformers, timm, hypothesis, accelerate), scripts/test the
test extras, each only when its stamp is stale, and a missing .venv is created first.

Nothing is installed: the repository's scripts run in a copy of it whose Python is a stand-in that
logs its command lines (pip, the demo, ruff, mypy, pytest) and runs only the ``-c`` snippets the
scripts compute their stamp with."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO_ROOT

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> {log}
case "$1" in
    -c) exec {real} "$@" ;;
    -m) if [[ "$2" == venv ]]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi ;;
esac
exit 0
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for name in ("_setup.sh", "demo", "test"):
        shutil.copy2(REPO_ROOT / "scripts" / name, root / "scripts" / name)
    shutil.copy2(REPO_ROOT / "pyproject.toml", root / "pyproject.toml")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python-stand-in"
    fake.write_text(FAKE_PYTHON.format(log=tmp_path / "calls.log", real=sys.executable))
    (bin_dir / "id").write_text("#!/usr/bin/env bash\necho 1000\n")  # not root: scripts/test installs no chromium
    for path in (fake, bin_dir / "id"):
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return root


def run_script(repo: Path, name: str, *args: str) -> list[str]:
    """Run scripts/NAME in the copy; the command lines the stand-in Python got during it."""
    log = repo.parent / "calls.log"
    log.write_text("")
    env = dict(os.environ, PATH=f"{repo.parent / 'bin'}{os.pathsep}{os.environ['PATH']}")
    env["PYTHON"] = str(repo.parent / "bin" / "python-stand-in")
    result = subprocess.run(
        ["bash", str(repo / "scripts" / name), *args],
        cwd=repo.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [line for line in log.read_text().splitlines() if not line.startswith("-c ")]


def installs(calls: list[str]) -> list[str]:
    return [line for line in calls if line.startswith("-m pip install")]


def test_the_demo_installs_the_package_alone_and_scripts_test_adds_the_test_extras(repo):
    calls = run_script(repo, "demo", "--quick")
    assert (repo / ".venv" / "bin" / "python").is_file()  # made, on a fresh machine
    assert any(line.startswith("-m venv .venv") for line in calls)
    assert installs(calls) == ["-m pip install -q -e ."]  # no [test]: no lightning, transformers, timm, ...
    assert any(line.startswith("examples/quickstart.py --logdir runs/quickstart --quick") for line in calls)
    assert installs(run_script(repo, "demo", "--quick")) == []  # stamped: not again

    calls = run_script(repo, "test", "-q")
    assert installs(calls) == ["-m pip install -q -e .[test]"]
    assert [line.split()[1] for line in calls if line.startswith("-m ")][1:] == ["ruff", "ruff", "mypy", "pytest"]
    assert installs(run_script(repo, "test", "-q")) == []
    assert installs(run_script(repo, "demo", "--quick")) == []  # the test install holds the package too


def test_a_changed_pyproject_reinstalls_what_each_script_needs(repo):
    run_script(repo, "test")
    with open(repo / "pyproject.toml", "a") as f:
        f.write("\n# changed\n")
    assert installs(run_script(repo, "demo", "--quick")) == ["-m pip install -q -e ."]
    assert installs(run_script(repo, "test")) == ["-m pip install -q -e .[test]"]


def test_the_test_extras_hold_what_only_the_tests_need():
    """What the demo no longer installs is in the test extra, so scripts/test still has it."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    test_extra = " ".join(project["optional-dependencies"]["test"])
    for name in ("lightning", "transformers", "timm", "hypothesis", "accelerate", "pytest"):
        assert name in test_extra
        assert not any(dep.startswith(name) for dep in project["dependencies"])
