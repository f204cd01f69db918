"""Two measurements for the edges issue (issue 30), printed, not asserted (a shared machine's
timings are no test): ``python -m benchmarks.edges writer`` and ``python -m benchmarks.edges layers``.

* ``writer``: training step time at ``every=1`` with a writer that sleeps 0.5 s per call against the
  same watch with a normal writer (both SummaryWriter-like objects taking per-tag calls), and the
  writes the slow one dropped.
* ``layers``: ``nn.Sequential`` of N ``Linear(4, 4)`` (1,000 and 10,000), 2 steps at ``every=1``:
  the event file's size and the time per step, per layer. A run whose event file passes
  ``--max-mb`` is stopped (the alerts table used to grow with the square of the findings).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


class SleepyWriter:
    """Per-tag calls into a real SummaryWriter, each after ``sleep_s`` (0: a normal writer)."""

    def __init__(self, logdir: str, sleep_s: float) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.inner = SummaryWriter(logdir)
        self.sleep_s = sleep_s

    def _call(self, name: str, *args: Any, **kwargs: Any) -> None:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        getattr(self.inner, name)(*args, **kwargs)

    def add_histogram_raw(self, *a: Any, **k: Any) -> None:
        self._call("add_histogram_raw", *a, **k)

    def add_scalar(self, *a: Any, **k: Any) -> None:
        self._call("add_scalar", *a, **k)

    def add_text(self, *a: Any, **k: Any) -> None:
        self._call("add_text", *a, **k)

    def add_image(self, *a: Any, **k: Any) -> None:
        self._call("add_image", *a, **k)

    def flush(self) -> None:
        self.inner.flush()


def _step_times(sleep_s: float, steps: int) -> tuple[float, int]:
    from introspect import watch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    with tempfile.TemporaryDirectory() as logdir:
        writer = SleepyWriter(logdir, sleep_s)
        times = []
        with watch(model, writer, every=1, summary=False, graph=False) as w:
            for _ in range(steps):
                start = time.perf_counter()
                loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - start)
            writer.sleep_s = 0.0  # the disk recovers: the queue drains fast at close
        writer.inner.close()
    return statistics.median(times[3:]), w.dropped_writes


def writer_main(steps: int) -> None:
    for sleep_s in (0.0, 0.5, 0.0, 0.5):
        median, dropped = _step_times(sleep_s, steps)
        print(f"writer sleeping {sleep_s:.1f} s per call: median step {median * 1e3:.2f} ms, {dropped} writes dropped")


LAYERS_CHILD = r"""
import sys, time, torch
from torch import nn
from introspect import watch
n, logdir = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(n)])
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(8, 4)
times = []
start_all = time.perf_counter()
with watch(model, logdir, every=1, summary=False, graph=False) as w:
    for _ in range(2):
        start = time.perf_counter()
        loss = model(x).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        times.append(time.perf_counter() - start)
        print(f"step {len(times) - 1}: {times[-1]:.3f} s, {len(w.alerts)} findings so far", flush=True)
close_s = time.perf_counter() - start_all - sum(times)
print(f"steps_s={times[0]:.3f},{times[1]:.3f} close_s={close_s:.3f} findings={len(w.alerts)} dropped={w.dropped_writes}")
"""


def layers_main(counts: list[int], max_mb: float, timeout: float = 1200.0) -> None:
    for n in counts:
        with tempfile.TemporaryDirectory() as logdir:
            env = dict(os.environ, OMP_NUM_THREADS="1")
            child = subprocess.Popen(
                [sys.executable, "-c", LAYERS_CHILD, str(n), logdir], stdout=subprocess.PIPE, text=True, env=env
            )
            size, stopped, deadline = 0, False, time.monotonic() + timeout
            while child.poll() is None:
                size = sum(p.stat().st_size for p in Path(logdir).rglob("*") if p.is_file())
                if size > max_mb * 1e6 or time.monotonic() > deadline:
                    child.kill()
                    stopped = True
                    break
                time.sleep(0.5)
            out = " | ".join(child.communicate()[0].strip().splitlines())
            size = sum(p.stat().st_size for p in Path(logdir).rglob("*") if p.is_file())
            state = f"STOPPED (above {max_mb:g} MB or {timeout:g} s): {out}" if stopped else out
            print(f"{n} layers: event files {size / 1e6:.1f} MB; {state}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.edges")
    parser.add_argument("what", choices=("writer", "layers"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--layers", default="1000,10000")
    parser.add_argument("--max-mb", type=float, default=3000.0)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds a layers run may take")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "writer":
        writer_main(args.steps)
    else:
        layers_main([int(n) for n in args.layers.split(",")], args.max_mb, args.timeout)


if __name__ == "__main__":
    main()
