"""watch()'s options are declared once, on WatchConfig: the signature and the docs' table agree with it."""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path

import pytest

from introspect.errors import ConfigError
from introspect.live import WATCH_OPTIONS, watch
from introspect.live.config import OPTIONS, WatchConfig
from tests.support import REPO_ROOT

ROOT = REPO_ROOT
TABLE_HEADER = "| option | default | what it does |"


def options_table() -> tuple[Path, dict[str, str]]:
    """The docs' options table (docs/options.md where it exists, else the README): each option
    named in a row's first cell, with that row's default cell."""
    page = ROOT / "docs" / "options.md"
    if not page.exists():
        page = ROOT / "README.md"
    lines = page.read_text(encoding="utf-8").splitlines()
    start = lines.index(TABLE_HEADER) + 2  # past the |---| line
    defaults: dict[str, str] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`(\w+)`", cells[0])
        assert names, f"{page.name}: a row of the options table names no option: {line}"
        for name in names:
            assert name not in defaults, f"{page.name}: {name} has two rows in the options table"
            defaults[name] = cells[1]
    return page, defaults


def test_signature_is_the_declaration():
    params = list(inspect.signature(watch).parameters.values())
    assert [p.name for p in params[:2]] == ["model", "writer"]
    options = params[2:]
    assert [p.name for p in options] == list(OPTIONS)  # the same options, in the same order
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in options)
    hints = typing.get_type_hints(watch)
    for p in options:
        declared = OPTIONS[p.name]
        assert p.default == declared.default, (p.name, p.default, declared.default)
        assert type(p.default) is type(declared.default), p.name
        assert hints[p.name] == declared.accepts, (p.name, hints[p.name], declared.accepts)
    assert frozenset(OPTIONS) == WATCH_OPTIONS


def test_every_field_is_an_option():
    fields = WatchConfig.__dataclass_fields__
    assert set(fields) == set(OPTIONS)
    for name, declared in OPTIONS.items():
        assert declared.doc and "\n" not in declared.doc, name
        assert callable(declared.check), name


def test_docs_table_lists_exactly_the_options_with_their_defaults():
    page, table = options_table()
    assert set(table) == set(OPTIONS), (
        f"{page.name}: missing {sorted(set(OPTIONS) - set(table))}, unknown {sorted(set(table) - set(OPTIONS))}"
    )
    for name, cell in table.items():
        assert cell == OPTIONS[name].shown_default, (page.name, name, cell, OPTIONS[name].shown_default)


def test_defaults_pass_their_own_checks():
    # watch(model) with nothing else: every declared default is a value its check keeps.
    checked: dict[str, object] = {}
    for name, declared in OPTIONS.items():
        checked[name] = declared.check(name, declared.default, checked)
    assert checked["image_every"] == 10 * checked["every"]
    assert checked["log"] == frozenset(OPTIONS["log"].default)


@pytest.mark.parametrize("name", ["every", "check_every", "image_every"])
def test_a_count_check_names_its_option(name):
    with pytest.raises(ConfigError, match=rf"{name}=-5"):
        OPTIONS[name].check(name, -5, {"every": 1})
