"""``WatchConfig.validate`` stays a short loop over the declared options (each ``Option`` checks
itself): no function of live/config.py grows past ``MAX_LINES`` again (it was one 76-line function)."""

from __future__ import annotations

import ast
import inspect

from introspect.live import config

MAX_LINES = 60


def test_no_function_of_the_option_checks_is_long():
    tree = ast.parse(inspect.getsource(config))
    lengths = {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None
    }
    assert "validate" in lengths and lengths["validate"] <= 15
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}
