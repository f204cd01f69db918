"""The README and the manual in docs/ say only what exists, and say all of it.

Fast checks: the README is a front door (at most 300 lines, a picture near the top, every docs/
page linked, every command on its list); every ``introspect`` command line and option the docs
name exists, and docs/cli.md names every command and option; every ``watch()`` option, threshold,
tag and finding kind is documented where the README sends readers for it, and nothing is
documented that the code lacks; every relative link and #anchor leads somewhere.

Slow checks: the command lines of the README's and the docs' ``bash`` blocks work as written, from a
directory with the repository's examples/ in it (the repository root) and no PYTHONPATH; and
scripts/demo prints a command that works from wherever it was run."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import introspect
from introspect.cli.commands import EXIT_CODES, main
from introspect.live import WATCH_OPTIONS
from introspect.records import tags
from tests.support import REPO_ROOT
from tests.support.saved_models import console_script, seed_cnn

README = REPO_ROOT / "README.md"
DOCS = REPO_ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
MAX_README_LINES = 300

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_SPAN = re.compile(r"`([^`]+)`")


def fenced(text: str, language: str | None = None) -> list[str]:
    """The bodies of the fenced code blocks of ``text`` (of one language, when given)."""
    return [m.group(2) for m in _FENCE.finditer(text) if language is None or m.group(1) == language]


def prose(text: str) -> str:
    """``text`` without its fenced code blocks."""
    return _FENCE.sub("", text)


def code_spans(text: str) -> list[str]:
    """Every inline code span outside fenced blocks, whitespace normalised (spans may wrap)."""
    return [" ".join(m.group(1).split()) for m in _SPAN.finditer(prose(text))]


def command_lines(path: Path) -> list[str]:
    """The ``introspect`` lines of ``path``'s ``bash`` blocks, comments dropped."""
    lines = []
    for block in fenced(path.read_text(), "bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("introspect "):
                lines.append(line)
    return lines


def cli_block() -> list[str]:
    """The README's command lines ("The CLI at a glance"), then those the docs add, each once."""
    seen: dict[str, None] = {}
    for page in PAGES:
        seen.update(dict.fromkeys(command_lines(page)))
    return list(seen)


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of each row of the markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return rows


def names_in(cell: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", cell))


# --------------------------------------------------------------------------- the front door
def test_the_readme_is_a_front_door():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES})"
    first_picture = next(i for i, line in enumerate(lines) if line.startswith("![") or "<img " in line)
    assert first_picture < 20, f"the README's first picture is at line {first_picture + 1}"
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", text))
    pages = {f"docs/{page.name}" for page in DOCS.glob("*.md")}
    assert pages - linked == set(), "docs pages the README does not link"
    assert {"architecture", "benchmarks", "cli", "debugger", "options", "probes", "tags"} <= {
        Path(p).stem for p in pages
    }
    glance = {shlex.split(line)[1] for line in command_lines(README)}
    assert glance == set(main.commands), "the README's CLI list should show every command once at least"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for line in prose(path.read_text()).splitlines():
        if line.startswith("#"):
            slug = _slug(line.lstrip("#"))
            n = 0
            while (candidate := slug if n == 0 else f"{slug}-{n}") in found:
                n += 1
            found.add(candidate)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page):
    text = prose(page.read_text())
    targets = re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'<img src="([^"]+)"', text)
    bad = []
    for target in targets:
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.is_file():
            bad.append(f"{target}: no such file")
        elif anchor and anchor not in anchors(path):
            bad.append(f"{target}: no heading #{anchor} in {path.name}")
    assert bad == []


# --------------------------------------------------------------------------- the command line
def _options_of(command: str | None) -> set[str]:
    params = main.params if command is None else main.commands[command].params
    return {opt for p in params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")} | {"--help", "-h"}


def _option_tokens(words: list[str]) -> list[str]:
    tokens = (w.strip("([").rstrip(")],.;:").split("=")[0] for w in words)
    return [t for t in tokens if t.startswith("--")]


def documented_command_lines() -> list[tuple[str, str]]:
    """``(page, command line)`` for every ``introspect ...`` in a code span or a bash block."""
    found = []
    for page in PAGES:
        text = page.read_text()
        found += [(page.name, span) for span in code_spans(text) if span.startswith("introspect ")]
        found += [(page.name, line) for line in command_lines(page)]
    return found


def test_every_documented_command_and_option_exists():
    lines = documented_command_lines()
    assert len(lines) > 20
    bad = []
    for page, line in lines:
        words = line.split()
        command = words[1] if re.fullmatch(r"[a-z][a-z-]*", words[1]) else None
        if command is not None and command not in main.commands:
            bad.append(f"{page}: {line}: no command {command!r}")
            continue
        unknown = set(_option_tokens(words[1:])) - _options_of(command)
        if unknown:
            bad.append(f"{page}: {line}: {sorted(unknown)} not options of {command or 'introspect'}")
    assert bad == []


def test_every_option_the_cli_page_names_exists():
    spans = code_spans((DOCS / "cli.md").read_text())
    named = {t for span in spans for t in _option_tokens(span.split())}
    every = set().union(*(_options_of(c) for c in main.commands), _options_of(None))
    assert named - every == set()


SHARED_OPTIONS = {"--debug", "--arch", "--arch-kwargs", "--unsafe"}
"""Described once for every command that has them, above docs/cli.md's table."""


def test_the_cli_page_names_every_command_and_option():
    text = (DOCS / "cli.md").read_text()
    rows = {row[0].strip("`").split()[0]: " ".join(row[1:]) for row in table_rows(text, "| command |")}
    assert set(rows) == set(main.commands)
    missing = []
    for name in main.commands:
        for option in _options_of(name) - {"--help", "-h"}:
            where = text if option in SHARED_OPTIONS else rows[name]
            if not re.search(re.escape(option) + r"(?![\w-])", where):
                missing.append(f"{name} {option}")
    assert missing == []
    assert "introspect --version" in text


def test_the_exit_codes_table_matches_the_cli():
    rows = {row[0]: row[1] for row in table_rows((DOCS / "cli.md").read_text(), "| exit code |")}
    for error, code in EXIT_CODES:
        if code != 1:
            assert error.__name__ in rows[str(code)], (code, error)
    assert {"1", "2"} <= set(rows)


# --------------------------------------------------------------------------- watch() and the debugger
def test_the_options_table_lists_every_watch_option():
    rows = table_rows((DOCS / "options.md").read_text(), "| option | default | what it does |")
    documented = set().union(*(names_in(row[0]) for row in rows))
    assert documented == set(WATCH_OPTIONS)


_WATCH_CALL = re.compile(r"(?<![\w.])watch\(((?:[^()]|\([^()]*\))*)\)")


def test_every_watch_keyword_and_threshold_the_docs_use_exists():
    thresholds = {f.name for f in dataclasses.fields(introspect.Thresholds)}
    bad = []
    for page in PAGES:
        text = page.read_text()
        for call in _WATCH_CALL.finditer(text):
            flat = re.sub(r"\([^()]*\)|\{[^{}]*\}", "", call.group(1))
            bad += [
                f"{page.name}: watch({k}=)" for k in re.findall(r"(\w+)=", flat) if k not in WATCH_OPTIONS | {"writer"}
            ]
        for mapping in re.findall(r"thresholds=\{([^}]*)\}", text):
            bad += [f"{page.name}: threshold {k}" for k in re.findall(r'"(\w+)"\s*:', mapping) if k not in thresholds]
    assert bad == []


def test_the_thresholds_table_lists_every_threshold():
    rows = table_rows((DOCS / "debugger.md").read_text(), "| threshold | default | meaning |")
    documented = set().union(*(names_in(row[0]) for row in rows))
    assert documented == {f.name for f in dataclasses.fields(introspect.Thresholds)}


def finding_kinds() -> set[str]:
    """Every ``Alert`` kind the package builds: ``Alert("kind", ...)`` or ``replace(..., kind="kind")``."""
    kinds = set()
    for path in Path(introspect.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            callee = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if callee == "Alert" and node.args and isinstance(node.args[0], ast.Constant):
                kinds.add(node.args[0].value)
            kinds.update(k.value.value for k in node.keywords if k.arg == "kind" and isinstance(k.value, ast.Constant))
    return kinds


def test_the_debugger_page_lists_every_finding_kind():
    kinds = finding_kinds()
    assert {"nonfinite", "dead_units", "grad_overflow", "data_imbalance"} <= kinds
    rows = table_rows((DOCS / "debugger.md").read_text(), "| kind | what | when |")
    documented = set().union(*(names_in(row[0]) for row in rows)) - {"forward", "backward"}
    assert documented == kinds


def test_every_training_finding_kind_has_advice():
    """A root cause opens the report with one line of what to try: a kind without one would open
    it bare. Data findings come from ``introspect data`` (their own report), not from a run."""
    from introspect.debugger.alerts import ADVICE

    training = {k for k in finding_kinds() if not k.startswith("data_")}
    assert sorted(training - set(ADVICE)) == []


def test_the_tags_page_names_every_tag():
    from introspect.probes.grad_spike import PRE_SPIKE_TAG

    text = (DOCS / "tags.md").read_text()
    constants = [tags.SUMMARY_TAG, tags.ALERTS_TAG, tags.GRAD_FLOW_TAG, tags.HEALTH_MAP_TAG, tags.INPUTS_TAG]
    names = [*constants, *tags.DATA_TAGS.values(), PRE_SPIKE_TAG, *(f"`{kind}/" for kind in tags.TAG_KINDS)]
    assert [name for name in names if name not in text] == []


# --------------------------------------------------------------------------- slow: the commands run
def make_the_files(here: Path) -> None:
    """Every file the commands name, made as a user would have them."""
    import torchvision

    model = seed_cnn()
    torch.save(model.state_dict(), here / "weights.pt")
    torch.export.save(torch.export.export(model, (torch.randn(1, 3, 32, 32),)), str(here / "model.pt2"))
    torch.save(seed_cnn(0).state_dict(), here / "epoch1.pt")
    torch.save(seed_cnn(1).state_dict(), here / "epoch9.pt")
    torch.manual_seed(0)
    torch.save({"model": torchvision.models.resnet18().state_dict(), "epoch": 9}, here / "ckpt.pt")
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(here / "r18.safetensors"))
    from tests.support.hf_models import tiny_gpt2

    tiny_gpt2().save_pretrained(here / "gpt2-tiny")
    from PIL import Image

    for split, classes in (("val", ["all"]), ("train", ["cat", "dog"])):
        for c in classes:
            folder = here / "data" / split / ("" if split == "val" else c)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(3):
                pixels = torch.randint(
                    0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(i + 10 * len(c))
                )
                Image.fromarray(pixels.numpy()).save(folder / f"{c}{i}.png")
    (here / "examples").symlink_to(REPO_ROOT / "examples")  # what the repository root holds


@pytest.mark.slow
def test_every_documented_command_line_works_as_written(tmp_path):
    commands = cli_block()
    assert commands[0].startswith("introspect summary weights.pt --arch examples.models:SeedCNN")
    make_the_files(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MPLBACKEND"] = "Agg"
    script = console_script()
    ran = []
    for command in commands:
        args = shlex.split(command)
        assert args[0] == "introspect", command
        if args[1] == "board":  # serves until stopped: tests/cli/test_cli.py checks it prints its URL and serves
            continue
        result = subprocess.run(
            [script, *args[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 0, (command, result.stderr[-2000:])
        assert "error:" not in result.stderr, (command, result.stderr)
        ran.append(args[1])
    assert ran.count("summary") == 3 and {"graph", "weights", "activations", "data", "compare", "map"} <= set(ran)
    assert (tmp_path / "runs" / "graph").is_dir() and (tmp_path / "runs" / "acts").is_dir()


def setup_is_current() -> bool:
    """scripts/_setup.sh would not reinstall: its stamp matches pyproject.toml and this Python."""
    stamp = REPO_ROOT / ".venv" / ".introspect-installed"
    if Path(sys.executable).parent.parent.resolve() != (REPO_ROOT / ".venv").resolve() or not stamp.is_file():
        return False
    digest = hashlib.sha256((REPO_ROOT / "pyproject.toml").read_bytes())
    digest.update(sys.version.encode())
    return stamp.read_text().strip() == digest.hexdigest()


@pytest.mark.slow
def test_the_demo_prints_a_command_that_works_from_where_it_ran(tmp_path):
    if not setup_is_current():
        pytest.skip("scripts/demo would install the project first (run scripts/test or scripts/demo once)")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [str(REPO_ROOT / "scripts" / "demo"), "--quick", "--logdir", "mylogs"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(text for text in result.stdout.splitlines() if "/bin/tensorboard --logdir" in text)
    binary, _, logdir, *_ = shlex.split(line)
    assert Path(binary).is_absolute() and Path(binary).is_file()
    assert Path(logdir) == elsewhere / "mylogs"  # where the user ran it, not the repository
    assert any((elsewhere / "mylogs").rglob("events.out.tfevents.*"))
