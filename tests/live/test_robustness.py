"""Never losing a run, never breaking one: interruptions at awkward moments, probes that fail
(``strict=``), and a property-based test over modules returning arbitrary nested structures."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import tempfile
import textwrap
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from introspect import IntrospectError, IntrospectWarning, ProbeError, watch
from tests.support import QUIET
from tests.support.events import hist_steps, histogram_tags, read_events
from tests.support.hooks import hook_state
from tests.support.training import make_optimizer


# =========================================================================== failing probes
class ToSparse(nn.Module):
    """An exotic output: a sparse tensor (statistics cannot reshape it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to_sparse()


def _sparse_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), ToSparse())


def _sparse_steps(model: nn.Module, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(2, 4)).to_dense().sum().backward()


def test_failing_probe_warns_once_and_training_goes_on(tmp_path):
    model = _sparse_model()
    with pytest.warns(IntrospectWarning, match=r"stopped watching 1 \(ToSparse\).*sparse") as record:
        with watch(model, tmp_path / "run", every=1, **QUIET) as w:
            _sparse_steps(model, 3)
    assert w.step == 2
    assert len([r for r in record if "stopped watching" in str(r.message)]) == 1
    acc = read_events(tmp_path / "run")
    assert hist_steps(acc, "activations/0") == [0, 1, 2]  # the other modules are still watched
    assert not [t for t in histogram_tags(acc) if t.startswith("activations/1")]


def test_strict_raises_with_the_module_name(tmp_path):
    model = _sparse_model()
    before = hook_state(model)
    with pytest.raises(ProbeError) as info:
        with watch(model, tmp_path / "run", every=1, strict=True, **QUIET):
            _sparse_steps(model, 2)
    assert isinstance(info.value, IntrospectError)
    assert info.value.module == "1"
    assert "probe on 1 (ToSparse) failed: RuntimeError" in str(info.value)
    assert "strict=True" in str(info.value)
    assert hook_state(model) == before


def test_strict_is_quiet_when_nothing_fails(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with watch(model, tmp_path / "run", every=1, strict=True, **QUIET) as w:
        for _ in range(2):
            model(torch.randn(3, 4)).sum().backward()
    assert w.step == 1


# =========================================================================== interruptions
def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


class FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise KeyboardInterrupt("Ctrl-C in the middle of backward")


@pytest.mark.parametrize("where", ["between-forward-and-backward", "inside-backward"])
def test_interrupt_mid_step_keeps_every_event_and_removes_hooks(tmp_path, where):
    model = _mlp()
    opt = make_optimizer(model)
    before = hook_state(model, opt)
    with pytest.raises(KeyboardInterrupt):
        with watch(model, tmp_path / "run", every=1, **QUIET):
            for _ in range(2):
                loss = model(torch.randn(3, 4)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            out = model(torch.randn(3, 4))  # step 2: forward done, backward not
            if where == "between-forward-and-backward":
                raise KeyboardInterrupt
            FailingBackward.apply(out).sum().backward()
    assert hook_state(model, opt) == before
    acc = read_events(tmp_path / "run")
    assert hist_steps(acc, "activations/0") == [0, 1, 2]  # the interrupted step's forward too
    assert hist_steps(acc, "grads/0.weight") == [0, 1]
    # The graph built under the watcher still runs backward, and nothing of ours fires.
    model(torch.randn(3, 4)).sum().backward()
    with watch(model, tmp_path / "again", every=1, **QUIET) as w:
        model(torch.randn(3, 4)).sum().backward()
    assert w.step == 0


SIGTERM_MID_STEP = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    from introspect import watch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def hooks():
        n = sum(len(getattr(m, a)) for m in model.modules() for a in
                ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_always_called"))
        return n + sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())

    try:
        with watch(model, sys.argv[1], every=1, summary=False, graph=False) as w:
            for i in range(3):
                loss = model(torch.randn(3, 4)).pow(2).mean()
                opt.zero_grad(); loss.backward(); opt.step()
            out = model(torch.randn(3, 4))  # step 3: its forward ran, its backward never will
            print("ready", hooks(), flush=True)
            time.sleep(60)  # SIGTERM arrives here
    except SystemExit:
        out.pow(2).mean().backward()  # the half-step's graph still works, untouched by us
        print("hooks after", hooks(), flush=True)
        raise
    """
)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_between_forward_and_backward(tmp_path):
    logdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_MID_STEP, str(logdir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        ready = proc.stdout.readline().split()
        assert ready[0] == "ready" and int(ready[1]) > 0  # hooks attached, mid-step
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "hooks after 0" in out, (out, err)
    acc = read_events(logdir)
    assert hist_steps(acc, "activations/0") == [0, 1, 2, 3]
    assert hist_steps(acc, "grads/0.weight") == [0, 1, 2]


# =========================================================================== property-based
Pair = collections.namedtuple("Pair", ["first", "second"])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.bool]

leaves = st.one_of(
    st.none(),
    st.integers(-3, 3),
    st.text(max_size=3),
    st.tuples(st.just("tensor"), st.sampled_from(DTYPES), st.integers(0, 4), st.booleans()),
)
structures = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from(["a", "b", "c"]), inner, max_size=3),
        st.tuples(inner, inner).map(lambda t: Pair(*t)),
    ),
    max_leaves=6,
)


def _build(spec, h: torch.Tensor):
    """The structure ``spec`` describes, its tensors made from ``h`` (so gradients can flow)."""
    if isinstance(spec, tuple) and len(spec) == 4 and spec[0] == "tensor":
        _, dtype, width, grad = spec
        t = h[:, :width] * 1.5
        if dtype.is_floating_point:
            t = t.to(dtype)
            return t if grad else t.detach()
        return (t * 10).to(torch.int64) if dtype == torch.int64 else t > 0
    if isinstance(spec, Pair):
        return Pair(_build(spec.first, h), _build(spec.second, h))
    if isinstance(spec, tuple):
        return tuple(_build(s, h) for s in spec)
    if isinstance(spec, list):
        return [_build(s, h) for s in spec]
    if isinstance(spec, dict):
        return {k: _build(v, h) for k, v in spec.items()}
    return spec


def _float_leaves(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _float_leaves(item)]
    return []


class Emit(nn.Module):
    def __init__(self, spec) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, h: torch.Tensor):
        return _build(self.spec, h)


class Host(nn.Module):
    """A Linear, then a module returning the drawn structure, then a loss over its float leaves
    (so the structure's tensors get gradients, in their own dtypes)."""

    def __init__(self, spec) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.emit = Emit(spec)
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        loss = self.head(h).sum()
        for t in _float_leaves(self.emit(h)):
            if t.requires_grad:
                loss = loss + t.float().pow(2).sum()
        return loss


def _run(spec, watched: bool, logdir: str):
    torch.manual_seed(0)
    model = Host(spec)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    before = hook_state(model, opt)
    losses, grads = [], []
    w = watch(model, logdir, every=1, **QUIET) if watched else None
    try:
        for _ in range(2):
            loss = model(torch.randn(3, 4))
            opt.zero_grad()
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            losses.append(loss.detach().clone())
    finally:
        if w is not None:
            w.close()
    assert hook_state(model, opt) == before
    return losses, grads, [p.detach().clone() for p in model.parameters()]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=structures)
def test_any_nested_output_is_watched_without_changing_training(spec):
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntrospectWarning)  # not one probe gives up
        with tempfile.TemporaryDirectory() as logdir:
            watched = _run(spec, True, logdir)
            acc = read_events(logdir)
    bare = _run(spec, False, "")
    for a, b in zip(watched[0], bare[0]):
        assert torch.equal(a, b)  # bitwise: losses...
    for step_a, step_b in zip(watched[1], bare[1]):
        for a, b in zip(step_a, step_b):
            assert torch.equal(a, b)  # ...gradients...
    for a, b in zip(watched[2], bare[2]):
        assert torch.equal(a, b)  # ...and the weights they made
    assert hist_steps(acc, "activations/lin") == [0, 1]
    # Every non-empty floating tensor of the structure got a histogram.
    n_float = len([t for t in _float_leaves(_build(spec, torch.zeros(3, 4))) if t.numel() > 0])
    emitted = {t for t in histogram_tags(acc) if t.startswith("activations/emit")}
    assert len(emitted) == n_float, (spec, emitted)


SPARSE_FROM_C = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    from introspect import watch

    class ToSparse(nn.Module):
        def forward(self, x):
            return x.to_sparse()

    model = nn.Sequential(nn.Linear(4, 4), ToSparse())
    with watch(model, sys.argv[1], every=1, summary=False, graph=False) as w:
        for _ in range(2):
            model(torch.randn(2, 4)).to_dense().sum().backward()
    print("steps", w.step + 1)
    """
)


@pytest.mark.slow
def test_failing_probe_warning_from_python_c(tmp_path):
    """``python -c`` code has no source file: the warning must still be issued, not crash."""
    proc = subprocess.run(
        [sys.executable, "-c", SPARSE_FROM_C, str(tmp_path / "run")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "steps 2" in proc.stdout
    assert "IntrospectWarning: introspect: stopped watching 1 (ToSparse)" in proc.stderr
