"""``watch``: hooks on a model for the length of a ``with`` block, and the step clock behind them.

Lifecycle of a step (default: one per training-mode forward of the root; with ``optimizer=``, one
per ``optimizer.step()``):

* the root's forward pre-hook opens the step; on a logging step (every ``every``-th, and always
  step 0) it takes the weights' statistics and, without ``optimizer=``, hooks the parameters'
  gradient accumulation for this step only;
* each selected module's forward hook sums its output for the non-finite check (every step) and,
  on logging steps only, records the output's statistics and hooks the output's gradient;
* the step ends at the next training forward, at ``optimizer.step()``, or on exit: its records
  cross to the host in one transfer, the non-finite check is read, and events are written.

Off the logging cadence a hook costs a Python call and one ``sum`` per output; no tensor is kept,
no gradient hook is attached, nothing is written.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Callable

import torch
from torch import nn

from .diagnostics import Alert, alerts_markdown, format_report
from .errors import (
    AlreadyWatchedError,
    ConfigError,
    IntrospectWarning,
    ModelTypeError,
    NonFiniteError,
    NonFiniteWarning,
)
from .probes import named_float_tensors
from .selection import ModuleFilter, select_modules, select_parameters, unwrap_model
from .sinks import ALERTS_TAG, SUMMARY_TAG, open_writer, tag, write_step
from .step import StepBuffer
from .summary import model_summary, summary_markdown, write_graph

__all__ = ["watch", "Watcher", "LOG_KINDS", "DEFAULT_LOG", "DEFAULT_EVERY"]

logger = logging.getLogger("introspect")

LOG_KINDS = ("activations", "activation_grads", "weights", "grads")
DEFAULT_LOG = LOG_KINDS
DEFAULT_EVERY = 50
NONFINITE_ACTIONS = ("warn", "raise", "ignore")

# Which models are being watched right now. Weak, so a watcher left open never keeps a model alive.
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, Watcher]" = weakref.WeakKeyDictionary()


def _writes_on_this_rank() -> bool:
    """Under torch.distributed only rank 0 writes: N copies of the same histograms help nobody."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return True


class Watcher:
    """Hooks on one model while it trains. Made by :func:`watch`; see its docstring for options.

    Read ``step`` for your own logging, ``alerts`` for what the debugger found and ``report()`` for
    the same in words. ``close()`` (or leaving the ``with`` block) removes every hook.
    """

    def __init__(
        self,
        model: nn.Module,
        writer: Any = None,
        *,
        every: int = DEFAULT_EVERY,
        log: str | Iterable[str] = DEFAULT_LOG,
        include: ModuleFilter = None,
        exclude: ModuleFilter = None,
        optimizer: torch.optim.Optimizer | None = None,
        on_nonfinite: str = "warn",
        check_every: int = 1,
        summary: bool = True,
        graph: bool = True,
    ) -> None:
        # Every check runs before the first hook exists.
        if not isinstance(model, nn.Module):
            raise ModelTypeError(
                f"watch() expects a torch.nn.Module, got {type(model).__name__}; pass the model "
                "itself (e.g. watch(net, writer)), not its output or state_dict"
            )
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every must be an integer >= 1 (log every N steps), got every={every!r}")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 0:
            raise ConfigError(
                f"check_every must be an integer >= 0 (0 turns the non-finite check off), got {check_every!r}"
            )
        kinds = (log,) if isinstance(log, str) else tuple(log)
        unknown = [k for k in kinds if k not in LOG_KINDS]
        if unknown:
            raise ConfigError(f"log= got unknown kinds {unknown}; choose from {list(LOG_KINDS)}")
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise ConfigError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {on_nonfinite!r}")
        if optimizer is not None and not callable(getattr(optimizer, "register_step_post_hook", None)):
            raise ConfigError(
                f"optimizer= must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        root = unwrap_model(model)
        if root in _ACTIVE:
            raise AlreadyWatchedError(
                f"{type(root).__name__} is already being watched; leave the first watch() (or call "
                "its close()) before starting another on the same model"
            )
        modules = select_modules(root, include, exclude)

        self.model = model
        self.every = every
        self.log = frozenset(kinds)
        self.on_nonfinite = on_nonfinite
        self.check_every = check_every
        self.alerts: list[Alert] = []
        self._root = root
        self._modules = modules
        self._params = select_parameters(root, modules)
        self._optimizer = optimizer
        self._summary = summary
        self._graph = graph
        self._writer, self._owns_writer = (
            open_writer(writer) if _writes_on_this_rank() else (None, False)
        )

        self._handles: list[Any] = []  # every hook of the watch, removed in close()
        self._step_handles: list[Any] = []  # hooks of the current logging step only
        self._buffer: StepBuffer | None = None
        self._step = 0
        self._next_step = 0
        self._depth = 0  # nesting of root forwards (a model that calls itself)
        self._active = False  # inside a counted (training, grad-enabled) forward of the root
        self._suspended = False  # our own extra forwards (summary, graph) are not observed
        self._first_batch_pending = summary or graph
        self._disabled: set[str] = set()
        self._warned_origins: set[str] = set()
        self._weights_before: dict[str, torch.Tensor] = {}
        self._closed = False
        self._attach()

    # ----------------------------------------------------------------- public
    @property
    def step(self) -> int:
        """The step of the most recent training forward (0 before the first)."""
        return self._step

    @property
    def writer(self) -> Any:
        """The SummaryWriter in use (None on a non-zero distributed rank)."""
        return self._writer

    @property
    def module_names(self) -> list[str]:
        """Tag names of the modules whose outputs are watched."""
        return list(self._modules)

    @property
    def parameter_names(self) -> list[str]:
        """Names of the parameters whose weights and gradients are watched."""
        return list(self._params)

    def report(self) -> str:
        """What the debugger found, as a short table for the terminal."""
        return format_report(self.alerts, self._next_step)

    def close(self) -> None:
        """Finish the current step, write it, remove every hook, flush; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._buffer is not None:
                self._end_step(may_raise=False)
        finally:
            self._remove_handles(self._step_handles)
            self._remove_handles(self._handles)
            _ACTIVE.pop(self._root, None)
            self._weights_before = {}
            self._active = False
            if self._writer is not None:
                try:
                    if self._owns_writer:
                        self._writer.close()
                    else:
                        self._writer.flush()
                except Exception as e:  # a full disk must not turn a finished run into a crash
                    warnings.warn(f"introspect: could not flush the writer: {e}", IntrospectWarning, stacklevel=2)

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"step {self._step}"
        return (
            f"Watcher({type(self._root).__name__}, {len(self._modules)} modules, "
            f"{len(self._params)} parameters, every={self.every}, {state})"
        )

    # ----------------------------------------------------------------- hooks
    def _attach(self) -> None:
        _ACTIVE[self._root] = self
        try:
            self._handles.append(
                self._root.register_forward_pre_hook(self._on_root_pre, with_kwargs=True)
            )
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._make_output_hook(name)))
            # Registered last so that it runs after the root's own output hook.
            self._handles.append(self._root.register_forward_hook(self._on_root_post, always_call=True))
            if self._optimizer is not None:
                self._handles.append(self._optimizer.register_step_pre_hook(self._on_optimizer_pre))
                self._handles.append(self._optimizer.register_step_post_hook(self._on_optimizer_post))
        except BaseException:
            self._remove_handles(self._handles)
            _ACTIVE.pop(self._root, None)
            raise

    @staticmethod
    def _remove_handles(handles: list[Any]) -> None:
        while handles:
            handles.pop().remove()

    def _on_root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._suspended:
            return None
        self._depth += 1
        if self._depth > 1:
            return None
        self._active = module.training and torch.is_grad_enabled()
        if not self._active:
            return None
        try:
            if self._first_batch_pending:
                self._first_batch_pending = False
                self._first_batch(module, args, kwargs)
            if self._optimizer is None:
                if self._buffer is not None:
                    self._end_step(may_raise=True)
                self._open_step()
            elif self._buffer is None:
                self._open_step()
        except BaseException:  # e.g. NonFiniteError: this forward never starts
            self._depth -= 1
            self._active = False
            raise
        return None

    def _on_root_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._suspended:
            return None
        self._depth = max(self._depth - 1, 0)
        if self._depth == 0:
            self._active = False
        return None

    def _make_output_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self._active or self._suspended or name in self._disabled:
                return None
            buffer = self._buffer
            if buffer is None:
                return None
            try:
                tensors = named_float_tensors(output)
                several = len(tensors) > 1
                for suffix, tensor in tensors:
                    where = f"{name}/{suffix}" if several else name
                    if self._checks(buffer.step):
                        buffer.add_finite_check(where, tensor)
                    if not buffer.logging:
                        continue
                    if "activations" in self.log:
                        buffer.add_histogram(tag("activations", where), tensor)
                    if "activation_grads" in self.log and tensor.requires_grad:
                        tensor.register_hook(self._make_output_grad_hook(buffer, where))
            except Exception as e:
                self._disable(name, module, e)
            return None

        return hook

    def _make_output_grad_hook(self, buffer: StepBuffer, where: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if buffer.closed or self._closed or where in self._disabled:
                return None
            try:
                buffer.add_histogram(tag("activation_grads", where), grad)
            except Exception as e:
                self._disable(where, None, e)
            return None

        return hook

    def _make_param_grad_hook(self, buffer: StepBuffer, name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if buffer.closed or param.grad is None:
                return None
            buffer.set_histogram(tag("grads", name), param.grad)
            return None

        return hook

    def _on_optimizer_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        buffer = self._buffer
        if buffer is None or not buffer.logging:
            return None
        for name, param in self._params.items():
            if param.grad is None:
                continue
            if "grads" in self.log:
                buffer.set_histogram(tag("grads", name), param.grad)
            self._weights_before[name] = param.detach().clone()
        return None

    def _on_optimizer_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        buffer = self._buffer
        if buffer is None:
            # optimizer.step() without a training forward since the last one: still a step.
            self._step = self._next_step
            self._next_step += 1
            return None
        if self._weights_before:
            for name, before in self._weights_before.items():
                param = self._params[name]
                delta = torch.linalg.vector_norm(param.detach() - before)
                ratio = delta / torch.linalg.vector_norm(before).clamp_min(1e-12)
                buffer.add_scalar(tag("update_ratio", name), ratio)
            self._weights_before = {}
        self._end_step(may_raise=True)
        return None

    # ----------------------------------------------------------------- steps
    def _checks(self, step: int) -> bool:
        return self.check_every > 0 and step % self.check_every == 0

    def _open_step(self) -> None:
        step = self._next_step
        self._next_step += 1
        self._step = step
        buffer = StepBuffer(step=step, logging=self._writer is not None and step % self.every == 0)
        self._buffer = buffer
        if not buffer.logging:
            return
        if "weights" in self.log:
            for name, param in self._params.items():
                buffer.add_histogram(tag("weights", name), param)
        if "grads" in self.log and self._optimizer is None:
            for name, param in self._params.items():
                self._step_handles.append(
                    param.register_post_accumulate_grad_hook(self._make_param_grad_hook(buffer, name))
                )

    def _end_step(self, may_raise: bool) -> None:
        buffer, self._buffer = self._buffer, None
        self._remove_handles(self._step_handles)
        if buffer is None:
            return
        host = buffer.to_host()  # the one host sync of the step
        if self._writer is not None:
            try:
                write_step(self._writer, host)
            except Exception as e:
                self._disable("<writer>", None, e)
        if host.nonfinite:
            self._report_nonfinite(host.step, host.nonfinite, may_raise)

    # ----------------------------------------------------------------- findings
    def _report_nonfinite(self, step: int, names: Sequence[str], may_raise: bool) -> None:
        origin = names[0]  # output hooks fire children first, in execution order
        module = self._modules.get(origin.split("/")[0])
        kind = type(module).__name__ if module is not None else "module"
        later = len(names) - 1
        message = f"first NaN/Inf in the forward output of {origin} ({kind})"
        if later:
            message += f"; {later} later output{'s' if later != 1 else ''} also non-finite"
        alert = Alert("nonfinite", origin, step, message, {"nonfinite_outputs": float(len(names))})
        self._add_alert(alert)
        if self.on_nonfinite == "raise" and may_raise:
            raise NonFiniteError(f"introspect: step {step}: {message}", alert)
        if self.on_nonfinite == "warn" and origin not in self._warned_origins:
            self._warned_origins.add(origin)
            warnings.warn(f"introspect: step {step}: {message}", NonFiniteWarning, stacklevel=4)

    def _add_alert(self, alert: Alert) -> None:
        self.alerts.append(alert)
        logger.warning("%s", alert)
        if self._writer is not None:
            try:
                self._writer.add_text(ALERTS_TAG, alerts_markdown(self.alerts), alert.step)
            except Exception as e:
                self._disable("<writer>", None, e)

    def _disable(self, name: str, module: nn.Module | None, error: Exception) -> None:
        """A probe that fails warns once and stops; training goes on."""
        if name in self._disabled:
            return
        self._disabled.add(name)
        what = f"{name} ({type(module).__name__})" if module is not None else name
        warnings.warn(
            f"introspect: stopped watching {what} after an error in its probe: "
            f"{type(error).__name__}: {error}",
            IntrospectWarning,
            stacklevel=3,
        )
        if name == "<writer>":
            self._writer = None

    def _first_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Summary and graph from the real first batch, with training's state put back after."""
        if self._writer is None:
            return
        self._suspended = True
        try:
            if self._summary:
                try:
                    text = model_summary(module, args, kwargs)
                except Exception as e:
                    warnings.warn(
                        f"introspect: model summary skipped: {type(e).__name__}: {e}",
                        IntrospectWarning,
                        stacklevel=4,
                    )
                else:
                    print(text)
                    self._writer.add_text(SUMMARY_TAG, summary_markdown(text), 0)
            if self._graph:
                write_graph(self._writer, module, args, kwargs)
        finally:
            self._suspended = False


def watch(
    model: nn.Module,
    writer: Any = None,
    *,
    every: int = DEFAULT_EVERY,
    log: str | Iterable[str] = DEFAULT_LOG,
    include: ModuleFilter = None,
    exclude: ModuleFilter = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_nonfinite: str = "warn",
    check_every: int = 1,
    summary: bool = True,
    graph: bool = True,
) -> Watcher:
    """Watch ``model`` train: per-layer histograms, gradients, weights, summary, graph, NaN origin.

    >>> with watch(model, SummaryWriter("runs/exp1")) as w:       # doctest: +SKIP
    ...     for x, y in loader:
    ...         loss = loss_fn(model(x), y)
    ...         opt.zero_grad(); loss.backward(); opt.step()
    ...         writer.add_scalar("loss", loss.item(), w.step)
    >>> print(w.report())                                          # doctest: +SKIP

    Hooks are attached at once (so ``w = watch(...)`` without ``with`` works too; call
    ``w.close()`` when done) and removed on exit, including on exceptions and Ctrl-C.

    Args:
        model: any ``nn.Module``; DataParallel/DDP and ``torch.compile`` wrappers are unwrapped.
        writer: a ``SummaryWriter`` (torch or tensorboardX; flushed, never closed, on exit), a
            log directory (a writer is made and closed), or None for ``runs/<time>``.
        every: log every N steps (step 0 always). Off-cadence steps cost a hook call and one sum
            per output.
        log: what to capture on logging steps: any of "activations", "activation_grads",
            "weights", "grads".
        include / exclude: module-name globs (``"features.*"``) or module types; default is
            every module that owns parameters plus every leaf.
        optimizer: count one step per ``optimizer.step()`` (gradient accumulation) and log
            ``update_ratio/{param}``.
        on_nonfinite: "warn" (once per origin), "raise" (``NonFiniteError``) or "ignore".
        check_every: run the non-finite check every N steps (0: never). It costs one sum per
            output and one host sync per step.
        summary / graph: print the torchinfo summary and write the graph on the first batch.
    """
    return Watcher(
        model,
        writer,
        every=every,
        log=log,
        include=include,
        exclude=exclude,
        optimizer=optimizer,
        on_nonfinite=on_nonfinite,
        check_every=check_every,
        summary=summary,
        graph=graph,
    )
