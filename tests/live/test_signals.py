"""SIGTERM and Ctrl-C at random moments of a watched training loop, and inside the two places where
a handler that did real work used to hang or lose a step: tensorboard's ``_AsyncWriter.write``
(holding its lock) and a step's device-to-host transfer.

Every trial is a fresh child forked from one server process that has imported torch and introspect
once (a fresh interpreter per trial would cost seconds each). Each child trains a small MLP under
``watch(every=1)``, reports each step as it completes, and gets one signal. The test then checks
that the child exited within 10 s and that every step it completed is in its event file.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.support.events import hist_steps, read_events

TRIALS = 50
EXIT_WITHIN_S = 10.0

SERVER = textwrap.dedent(
    r"""
    import json, os, random, signal, sys, time
    import torch
    from torch import nn
    import introspect
    from introspect.records import step as step_module
    from tensorboard.summary.writer import event_file_writer
    from torch.utils.tensorboard import SummaryWriter  # imported once here, not in every child
    from introspect.records.visuals import grad_flow_image
    grad_flow_image(["a", "b"], [1.0, 2.0], [1.0, 2.0], 0)  # matplotlib's fonts, loaded once
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # the optimizer's lazy imports (~1.5 s)
    import importlib, pkgutil, introspect.probes  # watch() imports its probes lazily: once, here
    for info in pkgutil.walk_packages(introspect.probes.__path__, "introspect.probes."):
        importlib.import_module(info.name)

    def child(logdir, where, nth, out_fd):
        torch.set_num_threads(1)
        signum = int(os.environ["TRIAL_SIGNAL"])
        calls = [0]

        def trigger():
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signum)  # lands here, inside the call

        if where == "write":  # inside _AsyncWriter.write, with its lock held
            original_check = event_file_writer._AsyncWriter._check_worker_status
            def check(self):
                trigger()
                return original_check(self)
            event_file_writer._AsyncWriter._check_worker_status = check
        elif where == "transfer":  # inside a step's one transfer to the host
            original_transfer = step_module.one_transfer
            def transfer(parts):
                trigger()
                return original_transfer(parts)
            step_module.one_transfer = transfer
            original_array = step_module.transfer_array  # a logging step's records
            def transfer_array(parts):
                trigger()
                return original_array(parts)
            step_module.transfer_array = transfer_array
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        code = 0
        try:
            with introspect.watch(model, logdir, every=1, summary=False, graph=False):
                os.write(out_fd, b"ready\n")
                for i in range(400):
                    loss = model(torch.randn(8, 4)).pow(2).mean()
                    opt.zero_grad(); loss.backward(); opt.step()
                    os.write(out_fd, f"done {i}\n".encode())
            os.write(out_fd, b"finished\n")
            time.sleep(30)  # a signal after the watch has closed meets the default handler
        except KeyboardInterrupt:
            code = 130
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        os._exit(code)

    for line in sys.stdin:
        trial = json.loads(line)
        read_fd, write_fd = os.pipe()
        os.environ["TRIAL_SIGNAL"] = str(trial["signal"])
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            child(trial["logdir"], trial["where"], trial["nth"], write_fd)
        os.close(write_fd)
        reader = os.fdopen(read_fd)
        first = reader.readline()
        if trial["where"] == "random" and first.startswith("ready"):
            time.sleep(trial["delay"])
            os.kill(pid, trial["signal"])
        sent = time.monotonic()
        deadline = sent + trial["limit"]
        status = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = None
        lines = [first] + reader.readlines()
        reader.close()
        completed = [int(l.split()[1]) for l in lines if l.startswith("done")]
        print(json.dumps({
            "exit": None if status is None else (os.waitstatus_to_exitcode(status)),
            "seconds": time.monotonic() - sent,
            "completed": completed,
            "finished": any(l.startswith("finished") for l in lines),
            "logdir": trial["logdir"],
        }), flush=True)
    """
)


def _trials(tmp_path, signum: int) -> list[dict]:
    rng = random.Random(signum)
    trials = []
    for i in range(TRIALS):
        where = "write" if i % 10 == 0 else "transfer" if i % 10 == 5 else "random"
        trials.append(
            {
                "signal": int(signum),
                "where": where,
                "nth": rng.randint(2, 30),
                "delay": rng.uniform(0.0, 0.4),
                "limit": EXIT_WITHIN_S,
                "logdir": str(tmp_path / f"trial{i}"),
            }
        )
    return trials


def _run(trials: list[dict]) -> list[dict]:
    server = subprocess.run(
        [sys.executable, "-c", SERVER],
        input="".join(json.dumps(t) + "\n" for t in trials),
        capture_output=True,
        text=True,
        timeout=len(trials) * (EXIT_WITHIN_S + 2) + 60,
    )
    assert server.returncode == 0, server.stderr[-2000:]
    results = [json.loads(line) for line in server.stdout.splitlines()]
    for result in results:
        result["stderr"] = server.stderr[-1500:]  # the children's tracebacks, if any
    return results


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="POSIX fork and signals")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_at_any_moment_loses_no_completed_step(tmp_path, signum):
    trials = _trials(tmp_path, signum)
    results = _run(trials)
    assert len(results) == len(trials)
    expected_exit = {128 + signum, -signum, 130 if signum == signal.SIGINT else 143}
    for trial, result in zip(trials, results):
        stderr = result.pop("stderr")
        what = f"{trial['where']} trial (nth={trial['nth']}, delay={trial['delay']:.2f}): {result}\n{stderr}"
        assert result["exit"] is not None, f"did not exit within {EXIT_WITHIN_S} s: {what}"
        assert result["seconds"] < EXIT_WITHIN_S, what
        assert result["exit"] in expected_exit, what
        completed = result["completed"]
        if not completed:
            continue
        steps = hist_steps(read_events(result["logdir"]), "activations/0")
        assert steps[: len(completed)] == list(range(len(completed))), (
            f"steps on disk {steps[-3:]} of {len(completed)} completed: {what}"
        )
    hit = [r for t, r in zip(trials, results) if t["where"] != "random" and r["completed"]]
    assert hit, "no trial signalled inside the writer or the transfer after a completed step"
