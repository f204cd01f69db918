"""The integrations are optional extras: ``import introspect`` never imports a framework, and a
missing one gives an ImportError naming the install command."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap

import pytest

FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a fresh interpreter imports torch
def test_import_introspect_imports_no_framework():
    result = _run(f"""
        import sys
        import introspect, introspect.integrations
        from introspect import watch
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r})
        print(loaded)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "module, blocked, extra",
    [
        ("introspect.integrations.lightning", ("lightning", "lightning.pytorch", "pytorch_lightning"), "lightning"),
        ("introspect.integrations.transformers", ("transformers",), "transformers"),
    ],
    ids=["lightning", "transformers"],
)
def test_missing_extra_names_the_install_command(module, blocked, extra, monkeypatch):
    # None in sys.modules makes `import name` raise ImportError, as if it were not installed.
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=re.escape(f'pip install "torch-introspect[{extra}]"')):
        importlib.import_module(module)
