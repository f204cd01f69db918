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

import inspect
import logging
import math
import operator
import signal
import sys
import threading
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
from torch import nn

from . import eventfile
from .data import log_input_batch
from .diagnostics import (
    Alert,
    CallRecord,
    GradientHealth,
    Thresholds,
    alerts_markdown,
    check_activation_health,
    format_report,
    locate_nonfinite,
)
from .amp import LOW_PRECISION, check_grad_scaler, overflow_note, scale_tensor, scaler_overflow, unscale
from .compiled import COMPILED_WARNING, compiling, forget_compiled_code, is_compiled, outside_graph
from .distributed import (
    check_rank_mode,
    ddp_syncs_gradients,
    find_ddp,
    new_session,
    nonfinite_on_rank,
    origin_code,
    origin_ranks,
    rank_origin_alert,
    rank_writer_target,
    reduced_gradient_sum,
    writes_here,
)
from .errors import (
    AlreadyWatchedError,
    ConfigError,
    IntrospectError,
    IntrospectWarning,
    ModelTypeError,
    NonFiniteError,
    NonFiniteWarning,
    ProbeError,
    warn,
)
from .hparams import RunHparams, check_metrics
from .feature_maps import Picked, draw, sample_picker
from .probes import FINITE_PRESERVING, named_float_tensors, unit_health
from .selection import ModuleFilter, select_modules, select_parameters, unwrap_model
from .sinks import (
    ALERTS_TAG,
    GRAD_FLOW_TAG,
    INPUTS_TAG,
    SUMMARY_TAG,
    open_writer,
    tag,
    tag_name,
    write_step,
)
from .step import HostStep, StepBuffer
from .summary import model_summary, summary_markdown, write_graph
from .visuals import grad_flow_image

__all__ = ["watch", "Watcher", "LOG_KINDS", "DEFAULT_LOG", "DEFAULT_EVERY"]

logger = logging.getLogger("introspect")
logger.addHandler(logging.NullHandler())  # the application decides where findings go

LOG_KINDS = ("activations", "activation_grads", "weights", "grads", "feature_maps")
DEFAULT_LOG = LOG_KINDS
DEFAULT_EVERY = 50
IMAGE_EVERY_FACTOR = 10  # image_every defaults to 10 x every: one picture costs ~10-20 ms (PNG + checksum)
NONFINITE_ACTIONS = ("warn", "raise", "ignore")

# Which models are being watched right now. Weak, so a watcher left open never keeps a model alive.
_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, Watcher]" = weakref.WeakKeyDictionary()


def _queue_after_backward(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the current backward pass finishes (from a hook inside it)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


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
        thresholds: Thresholds | Mapping[str, float] | None = None,
        summary: bool = True,
        graph: bool = True,
        hparams: Mapping[str, Any] | None = None,
        step_fn: Callable[[], int] | None = None,
        image_every: int | None = None,
        log_inputs: bool = False,
        ranks: str = "zero",
        grad_scaler: Any = None,
        strict: bool = False,
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
        if image_every is None:
            image_every = IMAGE_EVERY_FACTOR * every
        if isinstance(image_every, bool) or not isinstance(image_every, int) or image_every < 1:
            raise ConfigError(f"image_every must be an integer >= 1 (draw feature maps every N steps), got {image_every!r}")
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
        limits = Thresholds.coerce(thresholds)
        run_hparams = RunHparams(hparams) if hparams is not None else None
        if step_fn is not None:
            _read_step(step_fn)  # a counter that cannot be read fails here, not inside a hook
        check_rank_mode(ranks)
        check_grad_scaler(grad_scaler)
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
        self.thresholds = limits
        self.alerts: list[Alert] = []
        self._root = root
        self._modules = modules
        self._module_types = {name: type(m).__name__ for name, m in modules.items()}
        self._params = select_parameters(root, modules)
        self.image_every = image_every
        self._image_step = False  # this step draws feature maps
        self._maps: dict[str, Picked] = {}  # first sample's slice per output, until the step is written
        self._inputs_pending = log_inputs
        self._optimizer = optimizer
        self._summary = summary
        self._graph = graph
        self._writer, self._owns_writer = (
            open_writer(rank_writer_target(writer, ranks)) if writes_here(ranks) else (None, False)
        )
        # Same bytes, checksummed without a pure-Python byte loop (see eventfile.py); undone in close().
        self._sped_up = self._writer if eventfile.speed_up(self._writer) else None
        self._step_fn = step_fn
        self._hparams = run_hparams
        draws = "feature_maps" in self.log and callable(getattr(self._writer, "add_image", None))
        pickers = {n: sample_picker(m) for n, m in modules.items()} if draws else {}
        self._pickers = {n: p for n, p in pickers.items() if p is not None}
        self._strict = strict
        self._grad_scaler = grad_scaler
        self._overflow_step = -1  # the latest step whose scaled gradients overflowed
        self._half_outputs: dict[str, torch.dtype] = {}  # float16/bfloat16 outputs, for overflow notes
        self._compiled_seen = False  # an output hook was traced by torch.compile (see compiled.py)
        self._compiled_warned = False
        self._ddp = find_ddp(model)
        self._session = new_session()  # names this watcher's keys in the process group's store
        self._ddp_sync = False  # the latest forward's backward all-reduces gradients
        self._rank_origin_done = False  # the once-per-run exchange naming a NaN's rank
        self._reduced_grads: dict[str, torch.Tensor] = {}  # read once DDP has averaged them

        self._handles: list[Any] = []  # every hook of the watch, removed in close()
        self._step_handles: list[Any] = []  # hooks of the current logging step only
        self._buffer: StepBuffer | None = None
        self._step = 0
        self._next_step = 0
        self._active = False  # inside a counted (training, grad-enabled) forward of the root
        self._suspended = False  # our own extra forwards (summary, graph) are not observed
        self._first_batch_pending = summary or graph
        # Log the step after a NaN/Inf whatever the cadence; and the first step (with step_fn=,
        # a resumed run's first step need not be 0).
        self._force_log = True
        self._disabled: set[str] = set()
        self._alerted: set[tuple[str, str]] = set()
        self._weights_before: dict[str, torch.Tensor] = {}
        self._grad_health = GradientHealth(limits)
        self._unit_windows: dict[str, Any] = {}  # per-unit masks carried across logging steps
        self._last_layer_grads: tuple[int, dict[str, tuple[float, float, float]]] | None = None
        self._grad_flow_drawn: int | None = None
        self._previous_sigterm: Any = None
        self._final_metrics: dict[str, float] | None = None
        self._closed = False
        if run_hparams is not None and self._writer is not None:
            self._hparams_write(run_hparams.start, self._writer)
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

    def finish(self, metrics: Mapping[str, Any] | None = None) -> None:
        """Record the run's final (or best) metrics beside its ``hparams`` for TensorBoard's
        HPARAMS dashboard, then close. Call it once, inside the ``with`` block or after it.

        >>> w.finish(metrics={"val_acc": 0.92})                      # doctest: +SKIP
        """
        values = check_metrics(metrics)
        run = self._hparams = self._hparams or RunHparams({})
        if run.ended:
            raise IntrospectError(
                "this run's HPARAMS session has ended already (finish() was called, or the watch "
                "closed on an error); metrics are recorded once")
        self._final_metrics = values
        if not self._closed:
            self.close()  # writes the metrics before it closes or flushes the writer
        elif self._writer is not None:  # after close: a closed torch SummaryWriter reopens its file
            self._end_hparams(failed=False)
            if self._owns_writer:
                self._writer.close()
            else:
                self._writer.flush()

    def close(self) -> None:
        """Finish the current step, write it, remove every hook, flush; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._buffer is not None:
                self._end_step(may_raise=False)
            self._draw_grad_flow()
            self._end_hparams(failed=sys.exc_info()[0] is not None)
        finally:
            self._remove_handles(self._step_handles)
            self._remove_handles(self._handles)
            self._restore_sigterm()
            _ACTIVE.pop(self._root, None)
            if self._compiled_seen:
                forget_compiled_code()  # compiled code would go on calling our (removed) hooks
            self._weights_before = {}
            self._maps = {}
            self._unit_windows = {}
            self._active = False
            if self._sped_up is not None:
                eventfile.restore(self._sped_up)
            if self._writer is not None:
                try:
                    if self._owns_writer:
                        self._writer.close()
                    else:
                        self._writer.flush()
                except Exception as e:  # a full disk must not turn a finished run into a crash
                    warn(f"introspect: could not flush the writer: {e}", IntrospectWarning)

    def _end_hparams(self, failed: bool) -> None:
        """The metrics from ``finish()``, or a failed session's end when closing on an error."""
        run = self._hparams
        if run is None or self._writer is None:
            return
        if self._final_metrics is not None:
            self._hparams_write(run.finish, self._writer, self._final_metrics, self._step)
        elif failed:
            self._hparams_write(run.end, self._writer, True, self._step)

    def _hparams_write(self, write: Callable[..., None], *args: Any) -> None:
        if "<hparams>" in self._disabled:
            return
        try:
            write(*args)
        except Exception as e:  # hyperparameters are never worth a crashed run
            self._disable("<hparams>", None, e)

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
        if is_compiled(self.model, self._root):
            forget_compiled_code()  # code compiled before now would never call our hooks
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
            self._install_sigterm()
        except BaseException:
            self._remove_handles(self._handles)
            self._restore_sigterm()
            _ACTIVE.pop(self._root, None)
            raise

    @staticmethod
    def _remove_handles(handles: list[Any]) -> None:
        while handles:
            handles.pop().remove()

    def _install_sigterm(self) -> None:
        """SIGTERM (a scheduler's kill, ``docker stop``) writes the open step before the process goes."""
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        except (ValueError, OSError):  # no signals here (embedded interpreter, odd platform)
            self._previous_sigterm = None

    def _restore_sigterm(self) -> None:
        previous, self._previous_sigterm = self._previous_sigterm, None
        if previous is None or threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        previous = self._previous_sigterm
        self.close()  # writes the open step, removes hooks, restores the previous handler
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)

    def _on_root_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if compiling():  # the step clock runs eagerly, outside a compiled graph
            return outside_graph(self._open_forward, module, args, kwargs)
        return self._open_forward(module, args, kwargs)

    def _open_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # A root that calls itself recursively would count each call as a step; a depth counter
        # cannot be kept honest, since torch skips always_call hooks on KeyboardInterrupt.
        if self._suspended or self._closed:
            return None
        self._active = module.training and torch.is_grad_enabled()
        if not self._active:
            return None
        self._ddp_sync = ddp_syncs_gradients(self._ddp)
        try:
            if self._first_batch_pending:
                self._first_batch_pending = False
                self._first_batch(module, args, kwargs)
            if self._inputs_pending:
                self._inputs_pending = False
                self._log_inputs(args, kwargs)
            self._sync_step()
            buffer = self._buffer
            if buffer is not None and buffer.checking:
                inputs = (
                    [("", args[0])] if not kwargs and len(args) == 1 and isinstance(args[0], torch.Tensor)
                    else named_float_tensors((args, kwargs))
                )
                for _, tensor in inputs:
                    if not tensor.is_floating_point():
                        continue
                    buffer.add_check(("model_in",), tensor)
                    buffer.mark_output(tensor, -1)
        except BaseException:  # e.g. NonFiniteError: this forward never starts
            self._active = False
            raise
        return None

    def _on_root_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if compiling():
            return outside_graph(self._close_forward)
        return self._close_forward()

    def _close_forward(self) -> None:
        if not self._suspended:
            self._active = False
        if self._compiled_seen and not self._compiled_warned:
            self._compiled_warned = True
            warn(COMPILED_WARNING, IntrospectWarning)
        return None

    def _make_output_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        module_type = self._module_types[name]
        measure_units = unit_health(module_type)
        pick_sample = self._pickers.get(name)
        safe = module_type in FINITE_PRESERVING

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if compiling():  # traced into a compiled graph: add nothing to it
                self._compiled_seen = True
                return None
            if self._suspended or name in self._disabled:
                return None
            if not self._active and (self._step_fn is None or not self._join_external_step(module)):
                return None
            buffer = self._buffer
            if buffer is None or not (buffer.checking or buffer.logging or self._image_step):
                return None
            try:
                tensors = named_float_tensors(output)
                several = len(tensors) > 1
                call = -1
                if buffer.checking:
                    call = buffer.new_call(CallRecord(name, module_type, safe=safe))
                    for _, tensor in named_float_tensors(args):
                        producer = buffer.producer_of(tensor)
                        if producer is None:
                            buffer.add_check(("in", call), tensor)
                        elif producer >= 0:
                            buffer.calls[call].producers.append(producer)
                for suffix, tensor in tensors:
                    where = f"{name}/{suffix}" if several else name
                    total = None
                    if buffer.checking:
                        if tensor.dtype in LOW_PRECISION:
                            self._half_outputs[where] = tensor.dtype
                        if not safe:
                            total = buffer.add_check(("out", call, where), tensor)
                        buffer.mark_output(tensor, call)
                    if buffer.logging:
                        if "activations" in self.log:
                            buffer.add_histogram(tag("activations", where), tensor, total)
                        if measure_units is not None:
                            measure_units(buffer, where, tensor, self.thresholds, self._unit_windows)
                    if pick_sample is not None and self._image_step and suffix in ("", "0"):
                        if where not in self._maps and (picked := pick_sample(tensor)) is not None:
                            self._maps[where] = picked
                    if tensor.requires_grad and (
                        buffer.checking or (buffer.logging and "activation_grads" in self.log)
                    ):
                        tensor.register_hook(self._make_output_grad_hook(buffer, call, where))
            except Exception as e:
                self._disable(name, module, e)
            return None

        return hook

    def _make_output_grad_hook(self, buffer: StepBuffer, call: int, where: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if buffer.closed or self._closed or where in self._disabled:
                return None
            try:
                total = None
                if buffer.checking:
                    if buffer.grad_check_needed(call):
                        total = buffer.add_check(("grad", call, where), grad)
                    if not buffer.callback_queued:
                        buffer.callback_queued = True
                        _queue_after_backward(lambda: self._after_backward(buffer))
                if buffer.logging and "activation_grads" in self.log:
                    values = unscale(grad, scale_tensor(self._grad_scaler))
                    # The check's sum is of this same tensor only when nothing was unscaled.
                    buffer.add_histogram(tag("activation_grads", where), values, total if values is grad else None)
            except Exception as e:
                self._disable(where, None, e)
            return None

        return hook

    def _make_param_grad_hook(self, buffer: StepBuffer, name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            if buffer.closed or param.grad is None:
                return None
            if self._ddp_sync:  # DDP averages the gradient after this hook: read it once it has
                if not self._reduced_grads:
                    _queue_after_backward(lambda: _queue_after_backward(lambda: self._take_reduced_grads(buffer)))
                self._reduced_grads[name] = param
                return None
            buffer.set_histogram(tag("grads", name), unscale(param.grad, scale_tensor(self._grad_scaler)))
            return None

        return hook

    def _take_reduced_grads(self, buffer: StepBuffer) -> None:
        """Queued from inside a callback, so it runs after DDP's end-of-backward reduction."""
        params, self._reduced_grads = self._reduced_grads, {}
        if buffer.closed:
            return
        scale = scale_tensor(self._grad_scaler)
        for name, param in params.items():
            if param.grad is not None:
                buffer.set_histogram(tag("grads", name), unscale(param.grad, scale))

    def _after_backward(self, buffer: StepBuffer) -> None:
        """Runs when a backward pass finishes, before the user's next line (``optimizer.step()``)."""
        buffer.callback_queued = False
        if buffer.closed or self._closed:
            return
        if self._ddp_sync:
            # Queued from this callback, it runs after DDP's own: on the averaged gradients, and
            # a raise cannot stop DDP from finishing its reduction (the next forward needs it).
            _queue_after_backward(lambda: self._after_reduction(buffer))
            return
        self._check_nonfinite(buffer, may_raise=True)

    def _after_reduction(self, buffer: StepBuffer) -> None:
        """Under DDP: this rank's check, plus which rank a NaN in the averaged gradients came from.

        The exchange runs only when the averaged gradients hold NaN/Inf, which DDP makes true on
        every rank at once, and once per run; see distributed.py for why it cannot hang.
        """
        if buffer.closed or self._closed:
            return
        total = None if self._rank_origin_done else reduced_gradient_sum(list(self._params.values()))
        if total is not None:
            buffer.add_check(("reduced_grads",), total)  # rides on the check's one transfer
        local = self._check_nonfinite(buffer, may_raise=False)
        buffer.sync_checks()  # a no-op unless the check above returned before its transfer
        reduced = [v for label, v in zip(buffer.check_labels, buffer.check_values) if label == ("reduced_grads",)]
        if total is not None and not math.isfinite(reduced[-1]):
            self._rank_origin_done = True
            codes = origin_ranks(origin_code(local, list(self._modules)), self._session, buffer.step)
            alert = rank_origin_alert(buffer.step, codes, list(self._modules))
            self._add_alert(alert)
            local = local or alert
        if local is not None and self.on_nonfinite == "raise":
            raise NonFiniteError(f"introspect: step {local.step}: {local.message}", local)

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
            self._take_step_number()
            return None
        if self._weights_before:
            for name, before in self._weights_before.items():
                param = self._params[name]
                delta = torch.linalg.vector_norm(param.detach() - before)
                # Undefined for a weight that was exactly zero (a zero-initialised bias, x = 0):
                # NaN here, and not written, rather than a 1e10 that flattens the chart.
                size = torch.linalg.vector_norm(before)
                ratio = torch.where(size > 0, delta / size, torch.full_like(size, float("nan")))
                buffer.add_scalar(tag("update_ratio", name), ratio)
            self._weights_before = {}
        self._end_step(may_raise=True)
        return None

    # ----------------------------------------------------------------- steps
    def _sync_step(self) -> None:
        """Open the step a training forward belongs to, ending the previous one if it is over:
        at every forward by default; with ``optimizer=`` at ``optimizer.step()``; with
        ``step_fn=`` (and no optimizer) when the external counter has moved on."""
        buffer = self._buffer
        if buffer is not None and self._optimizer is None and (
            self._step_fn is None or _read_step(self._step_fn) != buffer.step
        ):
            self._end_step(may_raise=True)
        if self._buffer is None:
            self._open_step()

    def _join_external_step(self, module: nn.Module) -> bool:
        """With ``step_fn=``, a training forward of a watched module counts even when the root is
        not called (a LightningModule's ``training_step`` often calls its children directly)."""
        if not (module.training and torch.is_grad_enabled()):
            return False
        self._sync_step()
        return True

    def _take_step_number(self) -> int:
        step = self._next_step if self._step_fn is None else _read_step(self._step_fn)
        self._step, self._next_step = step, step + 1
        return step

    def _open_step(self) -> None:
        step = self._take_step_number()
        logging_step = self._writer is not None and (step % self.every == 0 or self._force_log)
        self._force_log = False
        checking = self.check_every > 0 and step % self.check_every == 0
        self._image_step = bool(self._pickers) and step % self.image_every == 0
        buffer = StepBuffer(step=step, logging=logging_step, checking=checking)
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
        try:
            if buffer.checking:
                self._check_nonfinite(buffer, may_raise=may_raise)
        finally:
            if buffer.logging:
                host = buffer.to_host()  # one transfer for the whole step's records
                self._write(host)
                self._check_health(host)
                self._describe_nonfinite(buffer, host)
            self._write_maps(buffer.step)
            buffer.closed = True

    def _describe_nonfinite(self, buffer: StepBuffer, host: HostStep) -> None:
        """Put numbers on a NaN/Inf finding from a logged step's histograms: its own step when
        that was a logging step, else the step after it (always logged). The tensors themselves
        are gone by the time the per-step check speaks, and keeping them would cost every step."""
        for alert in self.alerts:
            if alert.kind != "nonfinite" or "nonfinite_values" in alert.numbers:
                continue
            if alert.step not in (host.step, host.step - 1) or alert.where == "input":
                continue
            module = alert.where.split("/")[0]
            calls = [c for c in buffer.calls if c.module == module]
            producers = [buffer.calls[p].module for p in calls[0].producers] if calls else []
            kind = "activations" if alert.phase == "forward" else "activation_grads"
            # Forward: the origin's output, and what it read. Backward: the gradient the culprit
            # passed back (at its producer's output), and the gradient it received.
            bad, upstream = (alert.where, producers[:1]) if alert.phase == "forward" else (
                (producers[:1] or [alert.where])[0], [alert.where])
            record = host.histograms.get(tag(kind, bad))
            if record is None or record.nonfinite <= 0:
                continue
            numbers = {"at_step": float(host.step), "nonfinite_values": record.nonfinite, "values": float(record.numel)}
            if record.finite_count > 0:
                numbers.update(finite_min=record.min, finite_max=record.max)
            source = host.histograms.get(tag(kind, upstream[0])) if upstream else None
            if source is not None and source.nonfinite == 0 and source.finite_count > 0:
                numbers.update(upstream_min=source.min, upstream_max=source.max)
            alert.numbers.update(numbers)

    def _write_maps(self, step: int) -> None:
        """Draw and write the step's feature maps, then drop the slices they were drawn from."""
        maps, self._maps = self._maps, {}
        self._image_step = False
        if self._writer is None:
            return
        for where, picked in maps.items():
            try:
                self._writer.add_image(tag("feature_maps", where), draw(picked), step)
            except Exception as e:
                self._disable(f"<feature_maps {where}>", None, e)

    def _log_inputs(self, args: tuple, kwargs: dict) -> None:
        """``log_inputs=True``: the first batch as an image grid, and the data checks as findings."""
        if self._writer is None:
            return
        tensors = [t for _, t in named_float_tensors((args, kwargs))]
        if not tensors:
            return
        try:
            alerts = log_input_batch(tensors[0], self._writer, INPUTS_TAG, self._next_step)
        except Exception as e:
            self._disable("<inputs>", None, e)
            return
        for alert in alerts:
            self._add_alert(alert)

    def _write(self, host: HostStep) -> None:
        if self._writer is None:
            return
        try:
            write_step(self._writer, host)
        except Exception as e:
            self._disable("<writer>", None, e)

    # ----------------------------------------------------------------- findings
    def _check_nonfinite(self, buffer: StepBuffer, may_raise: bool) -> Alert | None:
        """The step's NaN/Inf origin, reported (None when there is none, or it was a scaler overflow)."""
        if buffer.reported or not buffer.sync_checks():
            return None
        alert = locate_nonfinite(buffer.step, buffer.calls, buffer.check_labels, buffer.check_values)
        if alert is None:
            return None
        buffer.reported = True
        if alert.phase == "backward" and scale_tensor(self._grad_scaler) is not None:
            self._overflow_step = buffer.step
            self._add_alert(scaler_overflow(alert, self._grad_scaler))  # routine: the scaler skips the step
            return None
        alert = nonfinite_on_rank(overflow_note(alert, self._half_outputs.get(alert.where)))
        self._force_log = True  # show the next step's histograms, NaN counts included
        new = self._add_alert(alert)
        if self.on_nonfinite == "raise" and may_raise:
            raise NonFiniteError(f"introspect: step {alert.step}: {alert.message}", alert)
        if new and self.on_nonfinite == "warn":  # new: once per origin
            warn(f"introspect: step {alert.step}: {alert.message}", NonFiniteWarning)
        return alert

    def _check_health(self, host: HostStep) -> None:
        alerts = check_activation_health(host.step, host.measures, self._module_types, self.thresholds)
        layer_grads: dict[str, list[float]] = {}
        for full_tag, record in host.histograms.items():
            kind, name = tag_name(full_tag)
            if kind != "grads" or host.step == self._overflow_step:  # the scaler skips that step
                continue
            layer = name.rpartition(".")[0] or name
            entry = layer_grads.setdefault(layer, [0.0, 0.0, 0.0])
            entry[0] += record.sum_squares
            entry[1] += record.finite_count
            entry[2] = max(entry[2], abs(record.min), abs(record.max))
        if layer_grads:
            ratios = {
                tag_name(t)[1]: v for t, v in host.scalars.items() if tag_name(t)[0] == "update_ratio"
            }
            sums = {layer: (v[0], v[1]) for layer, v in layer_grads.items()}
            grad_alerts = self._grad_health.check(host.step, sums, ratios)
            self._last_layer_grads = (host.step, {k: tuple(v) for k, v in layer_grads.items()})
            # A new gradient finding gets the figure now; one that persists does not redraw it.
            if [a for a in grad_alerts if self._add_alert(a)]:
                self._draw_grad_flow()
        for alert in alerts:
            self._add_alert(alert)

    def _draw_grad_flow(self) -> None:
        """The gradient-flow figure, on a gradient alert and at the end (a figure costs ~0.2 s)."""
        if self._writer is None or self._last_layer_grads is None or not hasattr(self._writer, "add_image"):
            return
        step, layers = self._last_layer_grads
        if self._grad_flow_drawn == step:
            return

        def finite(v: float) -> float:
            return v if math.isfinite(v) else 0.0

        names = list(layers)
        rms = [finite(math.sqrt(v[0] / v[1])) if v[1] and v[0] >= 0 else 0.0 for v in layers.values()]
        max_abs = [finite(v[2]) for v in layers.values()]
        try:
            image = grad_flow_image(names, rms, max_abs, step)
            self._writer.add_image(GRAD_FLOW_TAG, image, step, dataformats="HWC")
            self._grad_flow_drawn = step
        except Exception as e:
            self._disable("<grad_flow>", None, e)

    def _add_alert(self, alert: Alert) -> bool:
        """Record a finding once per (kind, where); False when it was already known."""
        key = (alert.kind, alert.where)
        if key in self._alerted:
            return False
        self._alerted.add(key)
        self.alerts.append(alert)
        logger.warning("%s", alert)
        if self._writer is not None:
            try:
                self._writer.add_text(ALERTS_TAG, alerts_markdown(self.alerts), alert.step)
            except Exception as e:
                self._disable("<writer>", None, e)
        return True

    def _disable(self, name: str, module: nn.Module | None, error: Exception) -> None:
        """A probe that fails warns once and stops; training goes on (``strict=True``: raises)."""
        if name in self._disabled:
            return
        self._disabled.add(name)
        what = f"{name} ({type(module).__name__})" if module is not None else name
        if self._strict:
            raise ProbeError(
                f"introspect: the probe on {what} failed: {type(error).__name__}: {error} "
                "(strict=True; without it the probe would stop and training go on)", name) from error
        warn(
            f"introspect: stopped watching {what} after an error in its probe: "
            f"{type(error).__name__}: {error}", IntrospectWarning)
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
                    warn(
                        f"introspect: model summary skipped: {type(e).__name__}: {e}", IntrospectWarning)
                else:
                    print(text)
                    self._writer.add_text(SUMMARY_TAG, summary_markdown(text), 0)
            if self._graph:
                write_graph(self._writer, module, args, kwargs)
        finally:
            self._suspended = False


def _read_step(step_fn: Callable[[], int]) -> int:
    """The external counter's value, checked: a step is an integer >= 0."""
    if not callable(step_fn):
        raise ConfigError(f"step_fn must be a callable returning the current step, got {step_fn!r}")
    try:
        step = operator.index(step_fn())
    except TypeError as e:
        raise ConfigError(f"step_fn must return an integer step >= 0: {e}") from None
    if step < 0:
        raise ConfigError(f"step_fn must return an integer step >= 0, got {step}")
    return step


def watch(model: nn.Module, writer: Any = None, **options: Any) -> Watcher:
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
            "weights", "grads", "feature_maps" (conv layers' channels as an image grid; 1-D
            convolutions and RNN/attention sequence outputs as a heat map; at ``image_every``).
        image_every: draw feature maps every N steps (step 0 always); default ``10 * every``.
            Only the first sample's slice (at most 64 channels) is copied on those steps.
        log_inputs: on the first training batch, write the model's input as an image grid
            (``data/inputs``, for image-like N x C x H x W tensors) and report NaN/Inf, constant
            images, 0-255 values and duplicates in it as findings.
        include / exclude: module-name globs (``"features.*"``) or module types; default is
            every module that owns parameters plus every leaf.
        optimizer: count one step per ``optimizer.step()`` (gradient accumulation) and log
            ``update_ratio/{param}``.
        on_nonfinite: "warn" (once per origin), "raise" (``NonFiniteError``) or "ignore".
        check_every: run the non-finite check every N steps (0: never). It costs one sum per
            watched output (and per output gradient) and one host sync per backward.
        thresholds: when the debugger reports dead units, saturation, vanishing/exploding or
            stuck gradients: an ``introspect.Thresholds`` or a dict of its field names.
        summary / graph: print the torchinfo summary and write the graph on the first batch.
        hparams: the run's hyperparameters (a dict of JSON-like values) for TensorBoard's HPARAMS
            dashboard, in the same run; give the final metrics with ``w.finish(metrics={...})``.
        step_fn: follow an external step counter (a trainer's ``global_step``): training
            forwards while it returns n make step n, whether or not the root itself is called.
        ranks: under torch.distributed, "zero" (rank 0 writes) or "all" (every rank writes its
            own run in a ``rank{k}`` subdirectory of the log directory). Every rank runs the
            non-finite check on its own tensors; a NaN that DDP spreads to every rank's averaged
            gradients is reported with the rank it came from.
        grad_scaler: the ``torch.amp.GradScaler`` in use: NaN/Inf in the scaled gradients is then
            a ``grad_overflow`` finding (the scaler skips that step), not a non-finite origin, and
            gradient histograms are unscaled.
        strict: a probe that fails on a module raises ``introspect.ProbeError`` instead of
            warning once and stopping (for tests and CI).

    A compiled model (``torch.compile``, before or after ``watch``) keeps its step clock, weights,
    gradients and update ratios; its per-layer probes cannot run inside the graph and one warning
    says so.
    """
    unknown = sorted(set(options) - WATCH_OPTIONS)
    if unknown:
        raise ConfigError(f"watch() got unknown options {unknown}; the options are {sorted(WATCH_OPTIONS)}")
    return Watcher(model, writer, **options)


WATCH_OPTIONS = frozenset(inspect.signature(Watcher.__init__).parameters) - {"self", "model", "writer"}
