"""``introspect board``: tensorboard stops with the command, however the command ends."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from introspect.cli.board import is_loopback
from introspect.cli.commands import main
from tests.support.saved_models import cli_env, console_script


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensorboards_serving(port: int) -> list[int]:
    """The pids of live tensorboard processes started for ``port`` (found by their command line)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--port" in command and str(port).encode() in command and any(b"tensorboard" in c for c in command):
            found.append(int(pid))
    return found


def gone_within(port: int, seconds: float) -> list[int]:
    """Wait until no tensorboard for ``port`` is alive (it may take a moment to stop after its
    SIGTERM); returns those still alive at the deadline, killed so that nothing is left behind."""
    deadline = time.monotonic() + seconds
    while (alive := tensorboards_serving(port)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return alive


@pytest.mark.slow
@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads /proc; SIGKILL cleanup is Linux's PR_SET_PDEATHSIG"
)
@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_nothing_listens_after_the_command_is_signalled(tmp_path, how):
    port = free_port()
    proc = subprocess.Popen(
        [console_script(), "board", "--logdir", str(tmp_path), "--port", str(port), "--host", "127.0.0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=cli_env(),
    )
    try:
        assert proc.stdout.readline().strip() == f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 120
        while not listening(port):
            assert proc.poll() is None, "introspect board exited before tensorboard listened"
            assert time.monotonic() < deadline, "tensorboard never listened"
            time.sleep(0.5)
        proc.send_signal(getattr(signal, how))  # to the command only, not to its process group
        code = proc.wait(timeout=60)
        if how != "SIGKILL":
            assert code == 128 + getattr(signal, how)
        deadline = time.monotonic() + 15
        while listening(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not listening(port), f"tensorboard still serves port {port} after {how} to introspect board"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        leftovers = gone_within(port, seconds=15)
    assert not leftovers, f"tensorboard processes outlived the command: {leftovers}"


def test_a_missing_log_directory_is_an_error(tmp_path):
    result = CliRunner().invoke(main, ["board", "--logdir", str(tmp_path / "nope"), "--port", "1"])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: no such log directory: {tmp_path / 'nope'}"
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(main, ["board", "--logdir", str(tmp_path / "file"), "--port", "1"])
    assert result.exit_code == 1 and "not a directory" in result.stderr


def test_a_host_beyond_loopback_is_warned_about(tmp_path):
    result = CliRunner().invoke(main, ["board", "--logdir", str(tmp_path / "nope"), "--port", "1", "--host", "0.0.0.0"])
    lines = result.stderr.strip().splitlines()
    assert re.match(r"warning: --host 0\.0\.0\.0 serves .* to anyone who can reach this machine", lines[0])
    assert lines[1].startswith("error: no such log directory")  # nothing was served
    quiet = CliRunner().invoke(main, ["board", "--logdir", str(tmp_path / "nope"), "--port", "1"])
    assert "warning" not in quiet.stderr


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.4", False),
        ("myhost.example", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback
