# Shared set-up for scripts/test and scripts/demo; source it, don't run it.
#
# Makes .venv (if absent) and installs the project into it, editable, with the test extras (or the
# extras named in $INTROSPECT_EXTRAS: scripts/bench asks for test,bench).
# The install is skipped while .venv/.introspect-installed holds the hash of pyproject.toml
# (and of the Python that made the venv) from the last successful install.
# Leaves the shell in the repository root with $VENV_PY set.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

VENV=.venv
VENV_PY="$VENV/bin/python"
STAMP="$VENV/.introspect-installed"
export MPLBACKEND=Agg

_introspect_die() { echo "error: $*" >&2; exit 1; }

if [[ ! -x "$VENV_PY" ]]; then
    PYTHON="${PYTHON:-python3}"
    command -v "$PYTHON" >/dev/null 2>&1 || _introspect_die "$PYTHON not found; install Python >= 3.10"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || _introspect_die "$("$PYTHON" --version 2>&1) is too old; Python >= 3.10 is needed"
    echo "Creating $VENV with $("$PYTHON" --version 2>&1) ..." >&2
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV" || _introspect_die "could not create $VENV (on Debian/Ubuntu: apt install python3-venv)"
fi

_introspect_want="$("$VENV_PY" -c '
import hashlib, sys
h = hashlib.sha256(open("pyproject.toml", "rb").read())
h.update(sys.version.encode())
print(h.hexdigest())
')-${INTROSPECT_EXTRAS:-test}"

if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$_introspect_want" ]]; then
    echo "Installing torch-introspect and its test dependencies into $VENV (a minute or two the first time) ..." >&2
    rm -f "$STAMP"
    # pip's own status is what counts; grep only drops the "Location ... is ignored" noise.
    set +e
    "$VENV_PY" -m pip install -q -e ".[${INTROSPECT_EXTRAS:-test}]" 2>&1 | { grep -v 'WARNING: Location .* is ignored' || true; } >&2
    _introspect_pip_status="${PIPESTATUS[0]}"
    set -e
    [[ "$_introspect_pip_status" -eq 0 ]] || _introspect_die "pip install failed (exit $_introspect_pip_status)"
    echo "$_introspect_want" > "$STAMP"
fi
unset _introspect_want _introspect_pip_status
