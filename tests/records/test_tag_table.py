"""One tag table: every TensorBoard tag the project writes is built in introspect/records/tags.py.

The check reads the source (ast), not a run: a tag written by a call that no test exercises is
caught too. A tag argument of a writer call (``add_scalar``, ``add_histogram``, ``add_image``,
``add_text``, ... and the step buffer's ``add_plain_scalar``/``set_histogram``, the guarded
writer's ``call("add_...", tag, ...)``, any ``tag=`` keyword) may not contain a string literal
holding "/", an f-string, or a string built with ``+``, ``%`` or ``.format``; neither may an
argument of the table's own builders (``tag("spectral", f"{key}/{name}")``); a ``*_TAG(S)``
constant may not be defined outside the table, nor extended there (``f"{HEALTH_MAP_TAG}/{stat}"``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from introspect.records import tags
from tests.support import REPO_ROOT

PACKAGE = REPO_ROOT / "introspect"
TABLE = PACKAGE / "records" / "tags.py"
WRITES = re.compile(
    r"add_(scalars?|plain_scalar|histogram(_raw)?|images?|image_with_boxes|figure|text|audio|video|mesh|pr_curve)"
    r"|set_histogram"
)
TAG_CONSTANT = re.compile(r"(^|_)TAGS?$")
BUILDERS = {name for name in tags.__all__ if callable(getattr(tags, name)) and name != "tag_name"}


def tag_arguments(tree: ast.AST) -> list[ast.expr]:
    """The expressions passed as a tag to a writer call."""
    found: list[ast.expr] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        found += [k.value for k in node.keywords if k.arg == "tag"]
        method = node.func.attr if isinstance(node.func, ast.Attribute) else None
        function = node.func.id if isinstance(node.func, ast.Name) else method
        if function in BUILDERS:
            found += node.args  # a kind's name ("weights") passes: no "/" in it
        if method is not None and WRITES.fullmatch(method) and node.args:
            found.append(node.args[0])
        elif (
            method == "call"
            and len(node.args) >= 2
            and isinstance(node.args[0], ast.Constant)
            and WRITES.fullmatch(str(node.args[0].value))
        ):
            found.append(node.args[1])
    return found


def built_here(expr: ast.expr) -> ast.AST | None:
    """The part of ``expr`` that builds a tag string in place, if any."""
    for node in ast.walk(expr):
        if isinstance(node, ast.JoinedStr):
            return node
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "/" in node.value:
            return node
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mod)):
            return node
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
            return node
    return None


def tag_constants(tree: ast.Module) -> list[ast.AST]:
    """Assignments to a ``*_TAG``/``*_TAGS`` name that hold a string (not an import or alias), and
    strings built on such a constant."""
    found: list[ast.AST] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.JoinedStr, ast.BinOp)) and any(
            isinstance(n, ast.Name) and TAG_CONSTANT.search(n.id) for n in ast.walk(node)
        ):
            found.append(node)
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            if any(TAG_CONSTANT.search(n) for n in names) and any(
                isinstance(v, (ast.Constant, ast.JoinedStr)) for v in ast.walk(node.value)
            ):
                found.append(node)
    return found


def offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    where = path.relative_to(PACKAGE.parent)
    found = [f"{where}:{n.lineno}: tag built here: {ast.unparse(n)}" for n in map(built_here, tag_arguments(tree)) if n]
    found += [f"{where}:{n.lineno}: tag constant outside the table: {ast.unparse(n)}" for n in tag_constants(tree)]
    return found


def test_every_tag_is_built_in_the_table():
    files = [p for p in sorted(PACKAGE.rglob("*.py")) if p != TABLE]
    assert len(files) > 50  # the whole package was read
    problems = [line for path in files for line in offences(path)]
    assert not problems, "build these tags in introspect/records/tags.py:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "source",
    [
        'writer.add_scalar("loss/train", 1.0, 0)',
        'buffer.add_histogram(f"grads/{name}", t)',
        'writer.add_image("data/" + name, image, 0)',
        'self.ctx.writer.call("add_text", "diagnostics/x", text, step)',
        'writer.add_text("{}/{}".format(a, b), text, 0)',
        'buffer.set_histogram(tag("spectral", f"{key}/{name}"), t)',
        'Value(tag="x/%s" % name, simple_value=1.0)',
        'MY_TAG = "diagnostics/mine"',
        'full = f"{HEALTH_MAP_TAG}/{stat}"',
        'scalars = {tag("spectral", f"{key}/{s.name}"): 1.0 for s in stats}',
        'name = probe_tag(probe, key + "/" + sub, where)',
    ],
)
def test_the_check_sees_a_tag_built_in_place(source):
    tree = ast.parse(source)
    assert [n for n in map(built_here, tag_arguments(tree)) if n] or tag_constants(tree), source


@pytest.mark.parametrize(
    "source",
    [
        'buffer.add_histogram(tag("weights", name), t)',
        "writer.add_text(ALERTS_TAG, text, step)",
        'writer.add_image(DATA_TAGS["batch"], grid, step)',
        'writer.add_image(health_map_tag("grad_rms"), image, step, dataformats="HWC")',
        "buffer.add_measure(f'dead/{where}', value)",  # a debugger measure, never written
    ],
)
def test_the_check_passes_tags_from_the_table(source):
    tree = ast.parse(source)
    assert not [n for n in map(built_here, tag_arguments(tree)) if n] and not tag_constants(tree), source


def test_table_builds_the_tags_of_the_contract():
    assert tags.tag("grads", "fc.weight") == "grads/fc.weight"
    assert tags.attention_tag("entropy", "enc.attn") == "attention/entropy/enc.attn"
    assert tags.spectral_tag("alpha", "0.weight") == "spectral/alpha/0.weight"
    assert tags.health_map_tag("grad_rms") == "diagnostics/health_map/grad_rms"
    assert tags.PRE_SPIKE_TAG == "diagnostics/pre_spike"
    assert tags.probe_tag("absmax", "out", "fc") == "absmax/out/fc"
    assert tags.stored_text_tag(tags.ALERTS_TAG) == "diagnostics/alerts/text_summary"
    with pytest.raises(ValueError, match="bogus"):
        tags.tag("bogus", "x")
