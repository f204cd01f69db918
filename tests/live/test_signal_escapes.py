"""Ctrl-C and SIGTERM always work, even when the process is stuck: a writer blocked forever (on the
writer thread, or on the training thread in the user's own ``add_scalar``), or the training thread
blocked in ``open()`` of a FIFO. Each case is a child process under ``watch``; the test sends the
signals and measures how long the child takes to end after the one that must end it:

* within :data:`GRACE_S` + 1 s of one SIGTERM;
* within 3 s of a second Ctrl-C;

and what the child's writer wrote before it hung is still in its event file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from introspect.live.signals import GRACE_S
from tests.support.events import hist_steps, read_events

CHILD = textwrap.dedent(
    r"""
    import os, sys, threading, time
    import torch
    from torch import nn
    from torch.utils.tensorboard import SummaryWriter
    import introspect

    case, logdir, fifo = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    hang = threading.Event()
    never = threading.Event()

    class HungWriter:
        # A real writer (each call flushed to disk) until ``hang`` is set; then every call
        # blocks forever, as on a hung disk or network mount.
        def __init__(self):
            self.inner = SummaryWriter(logdir)
        def _call(self, name, *args, **kwargs):
            if hang.is_set():
                never.wait()
            getattr(self.inner, name)(*args, **kwargs)
            self.inner.flush()
        def add_histogram_raw(self, *a, **k): self._call("add_histogram_raw", *a, **k)
        def add_scalar(self, *a, **k): self._call("add_scalar", *a, **k)
        def add_text(self, *a, **k): self._call("add_text", *a, **k)
        def flush(self):
            if hang.is_set():
                never.wait()
            self.inner.flush()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = HungWriter()
    with introspect.watch(model, writer, every=1, summary=False, graph=False) as w:
        for i in range(100000):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()
            if i == 3:
                time.sleep(0.5)  # steps 0-2 reach the disk (step 3 closes at the next forward)
                hang.set()
                print("ready", flush=True)
            if i >= 3:
                if case == "user_write":
                    writer.add_scalar("loss", loss.item(), i)  # the training thread blocks here
                elif case == "fifo":
                    open(fifo, "rb")  # blocks in C until a writer opens the FIFO: never
                else:
                    time.sleep(0.01)
    """
)


def _start(tmp_path, case: str) -> subprocess.Popen:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, case, str(tmp_path / "run"), str(fifo)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    line = ""
    while time.monotonic() < deadline and not line:
        line = child.stdout.readline().strip()
        if child.poll() is not None:
            break
    if line != "ready":
        child.kill()
        pytest.fail(f"the child did not start: {line!r} {child.communicate()[1][-2000:]}")
    time.sleep(0.3)  # the training thread is in the blocking call (or the loop) by now
    return child


def _ended_within(child: subprocess.Popen, limit: float) -> float:
    sent = time.monotonic()
    try:
        child.wait(timeout=limit + 20)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        pytest.fail(f"the child was still alive {limit + 20:.0f} s after the signal")
    took = time.monotonic() - sent
    print(f"ended {took:.2f} s after the signal")
    assert took < limit, f"the child took {took:.2f} s to end (limit {limit:.1f} s)"
    return took


CASES = ["writer_thread", "user_write", "fifo"]


@pytest.mark.parametrize("case", CASES)
def test_one_sigterm_ends_a_stuck_process_within_the_grace_period(tmp_path, case):
    child = _start(tmp_path, case)
    child.send_signal(signal.SIGTERM)
    _ended_within(child, GRACE_S + 1.0)
    assert child.returncode in (143, -signal.SIGTERM), child.communicate()[1][-2000:]
    # What the writer wrote before it hung is on disk.
    assert hist_steps(read_events(tmp_path / "run"), "weights/0.weight")[:3] == [0, 1, 2]


@pytest.mark.parametrize("case", CASES)
def test_a_second_ctrl_c_ends_a_stuck_process_at_once(tmp_path, case):
    child = _start(tmp_path, case)
    child.send_signal(signal.SIGINT)
    time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    _ended_within(child, 3.0)
    assert child.returncode != 0
    assert hist_steps(read_events(tmp_path / "run"), "weights/0.weight")[:3] == [0, 1, 2]
