"""``introspect.errors.warn`` from a script run as ``python -m pkg.train``: the warning is shown and
training goes on (``__main__``'s loader is the module's, and refuses to fetch a source line for the
name ``__main__``: warnings' own lookup raised ImportError out of every hook that warned)."""

from __future__ import annotations

import os
import subprocess
import sys


def test_warn_under_python_dash_m(tmp_path):
    package = tmp_path / "mpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text(
        "from introspect.errors import warn\nwarn('introspect: hello')\nprint('training went on')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, str(tmp_path)]))
    result = subprocess.run(
        [sys.executable, "-m", "mpkg.train"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "training went on" in result.stdout
    assert "IntrospectWarning: introspect: hello" in result.stderr
