"""The ways of training a model that the benchmark compares, and the Runner that trains one.

Each variant says what it adds to the bare step: something set up on the runner's model
(``attach``), a context around forward and backward (``around_step``), work after backward or
after the optimizer step. To add a variant, give it one line in ``VARIANTS`` (a new kind of
variant is a ``Variant`` subclass overriding the hooks it needs).

torch, introspect and wandb are imported inside the methods that use them: the harness forks a
worker per model once torch is imported and before introspect is (see ``isolation``), and
``--help`` answers without importing torch.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from benchmarks.models import MODELS, train_loss

__all__ = [
    "NEVER",
    "SCALE_VARIANTS",
    "VARIANTS",
    "IsfiniteHooks",
    "Runner",
    "Variant",
    "close_runners",
    "logs_at",
    "variants_for",
    "wandb_init",
]

NEVER = 10**9
"""``every=NEVER``: a watch that logs at step 0 only."""


class Variant:
    """Bare training: nothing added. ``cadence``: steps between the variant's logging steps
    (None: it never logs after step 0). What ``attach`` returns is the runner's ``state``."""

    needs_wandb = False
    attention_off = False  # True: runs on models with attention only (MODELS[...].attention)

    def __init__(self, label: str, cadence: int | None = None) -> None:
        self.label = label
        self._cadence = cadence

    @property
    def cadence(self) -> int | None:
        return self._cadence

    def logs_at(self, step: int, cadence: int | None) -> bool:
        """Whether this variant does its logging work on ``step`` (0-based) at ``cadence``: step 0
        and every ``cadence``-th after it."""
        return bool(cadence) and step % cadence == 0

    def attach(self, runner: Runner) -> Any:
        """Set up on ``runner.model``; what ``runner.close()`` undoes goes on ``runner.stack``."""
        return None

    def around_step(self, runner: Runner) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def after_backward(self, runner: Runner) -> None:
        pass

    def after_step(self, runner: Runner) -> None:
        pass

    def detach(self, runner: Runner) -> None:
        """Undone on every close, even one that leaves ``runner.stack`` alone."""


class Tutorial(Variant):
    """The TensorBoard tutorial way: a histogram of every parameter and of its gradient."""

    def after_backward(self, runner: Runner) -> None:
        if runner.step_no % self.cadence == 0:
            for name, p in runner.model.named_parameters():
                runner.writer.add_histogram(name, p, runner.step_no)
                if p.grad is not None:
                    runner.writer.add_histogram(f"{name}.grad", p.grad, runner.step_no)


class Watch(Variant):
    """``watch(model, writer, summary=False, graph=False, **options)`` for the whole run (the
    one-time cost of summary and graph is measured on its own); ``optimizer=`` the runner's when
    ``with_optimizer``; ``attention_off``: the transformer pack's attention probe disabled."""

    def __init__(
        self, label: str, options: dict | None = None, *, with_optimizer: bool = False, attention_off: bool = False
    ) -> None:
        super().__init__(label)
        self.options = options or {}
        self.with_optimizer = with_optimizer
        self.attention_off = attention_off

    @property
    def cadence(self) -> int | None:
        every = self.options.get("every")
        if every is None:
            from introspect.live import DEFAULT_EVERY

            return DEFAULT_EVERY
        return None if every >= NEVER else every

    def attach(self, runner: Runner) -> Any:
        from introspect import watch

        options = dict(self.options, optimizer=runner.opt) if self.with_optimizer else self.options
        watcher = runner.stack.enter_context(watch(runner.model, runner.writer, summary=False, graph=False, **options))
        if self.attention_off:
            watcher.ctx.disabled.add("<probe attention>")  # the dispatch then never makes it active
        return watcher


class DetectAnomaly(Variant):
    def around_step(self, runner: Runner) -> contextlib.AbstractContextManager:
        import torch

        # Anomaly mode is a thread-wide switch: on for this variant's own step only (the other
        # variants run interleaved in this thread). set_detect_anomaly, unlike detect_anomaly,
        # does not warn on every entry.
        return torch.autograd.set_detect_anomaly(True, check_nan=True)


class IsfiniteHooks:
    """The NaN check a user writes by hand: a forward hook on every module that reads
    ``torch.isfinite(out).all()`` on the host for each output, and a hook on each output tensor
    that does the same for the gradient arriving there. ``first`` is the first flag raised:
    (module name, "forward" or "backward", step); ``step`` is the caller's to advance."""

    def __init__(self, model) -> None:
        from introspect.runtime.tensors import named_float_tensors

        self._tensors = named_float_tensors
        self.step = 0
        self.first: tuple[str, str, int] | None = None
        self._handles = []
        try:
            for name, module in model.named_modules():
                self._handles.append(module.register_forward_hook(self._output_hook(name)))  # "": the root
        except BaseException:
            self.remove()
            raise

    def _flag(self, name: str, phase: str) -> None:
        if self.first is None:
            self.first = (name, phase, self.step)

    def _output_hook(self, name: str):
        import torch

        def grad_hook(grad) -> None:
            if not bool(torch.isfinite(grad).all()):  # one host read per gradient
                self._flag(name, "backward")

        def hook(module, args, output) -> None:
            for _, tensor in self._tensors(output):
                if not bool(torch.isfinite(tensor).all()):  # one host read per output
                    self._flag(name, "forward")
                if tensor.requires_grad:
                    tensor.register_hook(grad_hook)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class Isfinite(Variant):
    def attach(self, runner: Runner) -> IsfiniteHooks:
        hooks = IsfiniteHooks(runner.model)
        runner.stack.callback(hooks.remove)
        return hooks

    def around_step(self, runner: Runner) -> contextlib.AbstractContextManager:
        runner.state.step = runner.step_no
        return contextlib.nullcontext()


class WandbWatch(Variant):
    """``wandb.watch(model, log="all", log_freq=cadence)`` into the runner's offline run."""

    needs_wandb = True

    def logs_at(self, step: int, cadence: int | None) -> bool:
        # Its histograms go out with the commit that ends a log_freq period (see after_step).
        return bool(cadence) and (step + 1) % cadence == 0

    def attach(self, runner: Runner) -> Any:
        import wandb

        wandb.watch(runner.model, log="all", log_freq=self.cadence)

    def after_step(self, runner: Runner) -> None:
        # wandb.watch's hooks log with commit=False on every log_freq-th call; the user's next
        # wandb.log commits them. Commit exactly on those steps, so no per-step wandb.log is
        # counted that the other variants do not pay for.
        if (runner.step_no + 1) % self.cadence == 0:
            runner.wandb_run.log({}, commit=True)

    def detach(self, runner: Runner) -> None:
        import wandb

        with contextlib.suppress(Exception):
            wandb.unwatch(runner.model)


VARIANTS: dict[str, Variant] = {
    "bare": Variant("bare loop"),
    "tb_every1": Tutorial("tutorial: add_histogram of every param + grad, every step", 1),
    "tb_every100": Tutorial("tutorial: add_histogram of every param + grad, every 100 steps", 100),
    "watch_default": Watch("watch(), default cadence"),
    "watch_every1": Watch("watch(every=1, optimizer=opt): everything on", {"every": 1}, with_optimizer=True),
    "watch_check": Watch("watch(every=10**9): non-finite check only", {"every": NEVER}),
    "watch_hooks": Watch("watch(every=10**9, check_every=0): hooks only", {"every": NEVER, "check_every": 0}),
    # The transformer pack's attention probe, on and off (its cost is the difference).
    "watch_every1_no_attn": Watch(
        "watch(every=1, optimizer=opt), attention probe off", {"every": 1}, with_optimizer=True, attention_off=True
    ),
    "watch_check_no_attn": Watch("watch(every=10**9), attention probe off", {"every": NEVER}, attention_off=True),
    # The two ways to find a NaN without this project (the fault table says what each finds).
    "detect_anomaly": DetectAnomaly("detect_anomaly: set_detect_anomaly(True, check_nan=True) around each step"),
    "isfinite_hooks": Isfinite("naive isfinite hooks: host read of isfinite(t).all() per module output and its grad"),
    "wandb_1": WandbWatch('wandb.watch(log="all", log_freq=1), offline', 1),
    "wandb_100": WandbWatch('wandb.watch(log="all", log_freq=100), offline', 100),
}


SCALE_VARIANTS = ["bare", "watch_default", "watch_every1", "watch_hooks", "watch_check", "wandb_1", "detect_anomaly"]
"""What ``--scale`` compares on each model of the scale axis."""


def logs_at(key: str, cadence: int | None):
    """Whether variant ``key`` does its logging work on a step (by its 0-based number), as a
    function of the step; ``cadence`` None: it never logs after step 0."""
    return lambda step: VARIANTS[key].logs_at(step, cadence)


def variants_for(model: str, requested: list[str], wandb_version: str | None) -> dict[str, str]:
    """key -> status for every variant on ``model``: "ok" for those that run, else why not."""

    def status(key: str, variant: Variant) -> str:
        if variant.needs_wandb and not wandb_version:
            return "not installed"
        if key not in requested or (variant.attention_off and not MODELS[model].attention):
            return "not run"
        return "ok"

    return {key: status(key, variant) for key, variant in VARIANTS.items()}


class Runner:
    """One variant: its own model, Adam optimizer and SummaryWriter, and its own step counter."""

    def __init__(self, key: str, model, x, y, device: str, logdir: Path, wandb_run=None) -> None:
        import torch
        from torch.utils.tensorboard import SummaryWriter

        self.key = key
        self.variant = VARIANTS[key]
        self.model = model
        self.x, self.y = x, y
        self.device = device
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        self.writer = SummaryWriter(str(logdir))
        self.step_no = 0
        self.step_times: list[tuple[bool, float]] = []
        """(whether the variant logged on it, seconds) of each step since the caller cleared it
        (CPU only: on CUDA a step's time needs a synchronize, which the chunk timing does once)."""
        self.wandb_run = wandb_run
        self.stack = contextlib.ExitStack()
        self._torch = torch
        self.state = self.variant.attach(self)

    def step(self) -> None:
        with self.variant.around_step(self):
            loss = train_loss(self.model, self.x, self.y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        self.variant.after_backward(self)
        self.opt.step()
        self.variant.after_step(self)
        self.step_no += 1

    def run(self, steps: int) -> None:
        timed = self.device == "cpu"
        for _ in range(steps):
            logs = self.variant.logs_at(self.step_no, self.variant.cadence)
            t0 = time.perf_counter()
            self.step()
            if timed:
                self.step_times.append((logs, time.perf_counter() - t0))
        self.writer.flush()
        if self.device == "cuda":
            self._torch.cuda.synchronize()

    def close(self, finish_watch: bool = True) -> None:
        """Remove the variant's hooks and close its writer. ``finish_watch=False`` leaves the
        watcher's end-of-run work undone (its last step and grad-flow figure, ~1 s each): for a
        process that ends right after, where it would only cost time."""
        try:
            if finish_watch:
                self.stack.close()
        finally:
            self.writer.close()
            self.variant.detach(self)


def close_runners(runners, finish_watch: bool = True) -> None:
    """Close every runner; one that fails to close does not keep the others open."""
    for runner in runners:
        with contextlib.suppress(Exception):
            runner.close(finish_watch)


def wandb_init(directory: Path):
    """An offline wandb run in ``directory``, its console capture off."""
    import wandb

    return wandb.init(
        mode="offline", dir=str(directory), project="introspect-bench", settings=wandb.Settings(console="off")
    )
