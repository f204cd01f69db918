"""Each module against its own past: a robust rolling baseline per statistic, and a cheap
per-parameter gradient-norm history for the every-step escalation. Numbers in, verdicts out.

Absolute thresholds (an entropy floor, a logit ceiling) fire late on a model whose statistics
start far from them: a tiny model's attention entropy fell 1.92 -> 0.11 nats in one step and
stayed above the 0.1 floor. A change of many deviations *and* a large factor against the
module's own median says "this just broke" wherever the module started.

* :class:`Baselines`: the last ``baseline_window`` logging-step values of each (statistic,
  module), their median and MAD (median absolute deviation); a value is a shift when it is at
  least ``baseline_factor`` times above (or below) the median and ``baseline_deviations``
  robust deviations away from it, once ``baseline_min_history`` values are known. The MAD has a
  floor of 1% of the median, so a history of identical values still needs the factor.
* :class:`ParamNormJumps`: the sentinel reads every parameter's gradient norm each checked step
  anyway; an exponential mean and variance of each one's log norm (numpy, a few µs for hundreds
  of parameters) say when one parameter's gradient norm jumps against its own history, which a
  global norm hides (a q/k projection scaled x30 moves its own norm ~8x, the global one < 2x).
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .alerts import Alert

__all__ = ["Shift", "Baselines", "ParamNormJumps", "MAD_TO_SIGMA", "shift_of", "judge_module_shifts"]

MAD_TO_SIGMA = 1.4826
"""MAD x this = σ of a normal distribution: the deviations are in σ-like units."""
_MAD_FLOOR = 0.01
"""The robust deviation is at least this share of |median|."""
_REFRESH = 8
"""Quiet steps between two refreshes of the per-parameter jump thresholds."""
FALL_MIN_VALUES = 8
"""A gradient of fewer values is not judged on falls (see :class:`ParamNormJumps`)."""


@dataclass(frozen=True)
class Shift:
    """A value far from its module's own median: ``factor`` times it (above for "up", below for
    "down"), ``deviations`` robust σ away, over ``history`` earlier logging steps."""

    value: float
    median: float
    deviations: float
    factor: float
    history: int

    def numbers(self, name: str) -> dict[str, float]:
        return {
            name: self.value,
            f"{name}_median": self.median,
            "deviations": self.deviations,
            "factor": self.factor,
            "history": float(self.history),
        }


class Baselines:
    """Rolling median and MAD per key (``(stat, module)``), over the last ``window`` values given.

    >>> b = Baselines(window=8, min_history=3, deviations=8.0, factor=4.0)
    >>> [b.judge("entropy", "attn", v, "down") for v in (0.9, 0.92, 0.88)]
    [None, None, None]
    >>> b.judge("entropy", "attn", 0.05, "down").factor > 17
    True
    """

    def __init__(self, window: int, min_history: int, deviations: float, factor: float) -> None:
        self.window = max(2, int(window))
        self.min_history = max(1, int(min_history))
        self.deviations = deviations
        self.factor = factor
        self._history: dict[tuple[str, str], deque[float]] = {}

    @classmethod
    def of(cls, limits: Any) -> Baselines:
        """The baselines a :class:`~introspect.debugger.health.Thresholds` asks for."""
        return cls(
            limits.baseline_window, limits.baseline_min_history, limits.baseline_deviations, limits.baseline_factor
        )

    def history(self, stat: str, where: str) -> list[float]:
        return list(self._history.get((stat, where), ()))

    def past(self, stat: str, where: str) -> Sequence[float]:
        """This key's past values, oldest first (the live window: read it, do not keep it)."""
        return self._history.get((stat, where), ())

    def add(self, stat: str, where: str, value: float) -> None:
        """``value`` joins this key's past, unjudged (a non-finite value is not kept)."""
        if not math.isfinite(value):
            return
        past = self._history.get((stat, where))
        if past is None:
            past = self._history[(stat, where)] = deque(maxlen=self.window)
        past.append(value)

    def judge(self, stat: str, where: str, value: float, direction: str) -> Shift | None:
        """Whether ``value`` is a shift ``direction`` ("up" or "down") against this key's past;
        then ``value`` joins the past. A non-finite value is not measured: no verdict, not kept."""
        if not math.isfinite(value):
            return None
        past = self._history.get((stat, where))
        if past is None:
            past = self._history[(stat, where)] = deque(maxlen=self.window)
        shift = shift_of(value, past, direction, self.min_history, self.deviations, self.factor)
        past.append(value)
        return shift


def trend_ratio(value: float, past: Sequence[float]) -> float:
    """``value`` over what the log-linear trend of ``past`` (positive values) predicts for the next
    step: how far it leaves the module's own course, where the median alone lags behind a steady
    growth (a fresh model's MLP output grows 2.6x over its first 150 steps, then 3.8x in 50)."""
    logs = [math.log(v) for v in past if v > 0]
    n = len(logs)
    if n < 2 or value <= 0:
        return math.inf
    mean_x, mean_y = (n - 1) / 2, math.fsum(logs) / n
    slope = math.fsum((i - mean_x) * (y - mean_y) for i, y in enumerate(logs)) / math.fsum(
        (i - mean_x) ** 2 for i in range(n)
    )
    return value / math.exp(mean_y + slope * (n - mean_x))


def shift_of(
    value: float,
    past: Sequence[float],
    direction: str,
    min_history: int,
    deviations: float,
    factor: float,
    trend: bool = False,
) -> Shift | None:
    """``value`` against ``past`` (see :class:`Baselines`); None when it is no shift. ``trend``:
    the value must also be ``factor`` away from where the past's own log-linear trend leads
    (:func:`trend_ratio`): a steady growth or decay is the module's course, not a shift."""
    if len(past) < min_history:
        return None
    median = statistics.median(past)
    if median <= 0:  # a factor against zero (or a negative statistic) says nothing
        return None
    mad = statistics.median(abs(v - median) for v in past)
    scale = max(MAD_TO_SIGMA * mad, _MAD_FLOOR * median)
    if direction == "up":
        ratio, distance = value / median, value - median
    elif direction == "down":
        ratio, distance = (median / value if value > 0 else math.inf), median - value
    else:
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    sigmas = distance / scale
    if ratio >= factor and sigmas >= deviations:
        if trend:
            along = trend_ratio(value, past)
            if (along if direction == "up" else 1.0 / along if along > 0 else math.inf) < factor:
                return None
        return Shift(value, median, sigmas, ratio, len(past))
    return None


class ParamNormJumps:
    """Each parameter's gradient norm against its own history, on the host numbers the sentinel
    reads every checked step: an exponential mean and variance (weight ``alpha``) of log(norm).

    A jump is a norm ``factor`` times above or below the mean *and* ``sigmas`` deviations of its
    own log norm away, after ``min_history`` steps; the parameter's history then starts again at
    its new level, so a lasting change is one escalation, not one per step. A norm that becomes exactly 0 after being
    non-zero is a fall (a dead layer's parameters get exactly zero gradient) once per
    parameter: a parameter whose gradient is sometimes 0 (an expert no token was routed to, an
    embedding row) is intermittent, and its zeros say nothing afterwards.

    A *lasting* jump (``confirm_sigmas`` > 0) needs a lower bar, twice: ``factor`` times and
    ``confirm_sigmas`` deviations away from the mean and σ the parameter had before it, on two
    consecutive steps, in the same direction, once ``confirm_history`` steps are known. A fault
    that stays (weights scaled, a channel that stays huge) keeps a gradient moved; healthy noise
    that clears a high bar once rarely clears a lower one twice in a row (the fault table's
    numbers: docs/benchmarks.md). Names in ``confirm_only`` (slices of a fused parameter, whose
    norms are small and spiky: healthy single steps reach 7x at 6σ) are judged by this rule alone.

    ``fall_min_values``: a parameter with fewer values than this (in ``sizes``) is not judged on
    falls other than to exactly 0: the gradient of a one-output classifier's bias is one signed
    mean that crosses zero now and then, so its norm falls 100x in healthy steps.
    """

    def __init__(
        self,
        factor: float,
        sigmas: float,
        min_history: int,
        alpha: float = 0.1,
        rises_only: bool = False,
        confirm_sigmas: float = 0.0,
        confirm_history: int = 0,
        confirm_only: frozenset[str] = frozenset(),
        sizes: Mapping[str, int] | None = None,
        fall_min_values: int = FALL_MIN_VALUES,
    ) -> None:
        self.rises_only = rises_only
        self.log_factor = math.log(max(factor, 1.0 + 1e-9))
        self.sigmas = sigmas
        self.min_history = max(1, int(min_history))
        self.alpha = alpha
        self.confirm_sigmas = confirm_sigmas
        self.confirm_history = max(self.min_history, int(confirm_history))
        self.confirm_only = confirm_only
        self.sizes = dict(sizes or {})
        self.fall_min_values = fall_min_values
        self._names: tuple[str, ...] = ()
        self._mean = np.zeros(0)
        self._var = np.zeros(0)
        self._count = np.zeros(0, dtype=np.int64)
        self._zero_seen = np.zeros(0, dtype=bool)
        self._never = np.zeros(0, dtype=bool)
        self._never_any = False
        self._lasting_warm = False
        """Every history is ``confirm_history`` long (or empty): the lasting rule's bar is every
        parameter's."""
        self._threshold: np.ndarray | None = None
        """Once no lasting jump is pending: how far in log norm a jump (or a first step of a
        lasting one) is, per parameter (-1 where the history is short of ``min_history``)."""
        self._quiet = 0

    def _reset(self, names: tuple[str, ...]) -> None:
        n = len(names)
        self._names = names
        self._mean, self._var = np.zeros(n), np.zeros(n)
        self._count = np.zeros(n, dtype=np.int64)
        self._zero_seen = np.zeros(n, dtype=bool)
        self._threshold = None
        self._lasting_warm = False
        self._quiet = 0
        # Per name, once per layout: judged by the lasting rule alone; judged on falls.
        self._immediate = np.array([name not in self.confirm_only for name in names], dtype=bool)
        self._falls = np.array(
            [
                not self.rises_only and self.sizes.get(name, self.fall_min_values) >= self.fall_min_values
                for name in names
            ],
            dtype=bool,
        )
        self._pending = np.zeros(n, dtype=bool)  # a first step of a lasting jump, last step
        self._pending_mean = np.zeros(n)  # the mean, bar and direction it was judged against
        self._pending_bar = np.zeros(n)
        self._pending_sign = np.zeros(n)
        self._never = np.ones(n, dtype=bool)  # no positive norm yet
        self._never_any = n > 0

    def update(self, names: tuple[str, ...], norms: Sequence[float]) -> tuple[str, float] | None:
        """The parameter whose norm jumped most this step and its factor (> 1 up, < 1 down), or
        None; then the norms join the history. ``names`` is the same tuple object step after step
        in the common case (compared by identity first: no per-step work over the names)."""
        if names is not self._names and names != self._names:
            self._reset(names)
        x = np.asarray(norms, dtype=np.float64)
        if x.shape != self._mean.shape:
            return None
        if self._threshold is not None and self._quiet_step(x):
            return None
        finite = np.isfinite(x)
        positive = finite & (x > 0)
        logs = np.log(np.where(positive, x, 1.0))
        known = self._count >= self.min_history
        delta = logs - self._mean
        sd = np.sqrt(self._var)
        size = np.where(self._falls, np.abs(delta), delta)
        jumped = known & positive & self._immediate & (size >= self.log_factor) & (size >= self.sigmas * sd)
        died = known & finite & (x == 0) & ~self._zero_seen & (not self.rises_only)
        if self.confirm_sigmas > 0:
            # The second step of a lasting jump: again past the bar of the step before, same way.
            again = logs - self._pending_mean
            lasting = (
                self._pending
                & positive
                & ~jumped
                & (np.sign(again) == self._pending_sign)
                & (np.abs(again) >= self._pending_bar)
            )
            bar = np.maximum(self.log_factor, self.confirm_sigmas * sd)
            first_step = (self._count >= self.confirm_history) & positive & ~jumped & ~self._pending & (size >= bar)
            self._pending_mean = np.where(first_step, self._mean, self._pending_mean)
            self._pending_bar = np.where(first_step, bar, self._pending_bar)
            self._pending_sign = np.where(first_step, np.sign(delta), self._pending_sign)
            self._pending = first_step
            if lasting.any():
                delta = np.where(lasting, again, delta)
                jumped = jumped | lasting
        found: tuple[str, float] | None = None
        if jumped.any() or died.any():
            if died.any():
                i = int(np.flatnonzero(died)[0])
                found = (names[i], 0.0)
            else:
                i = int(np.argmax(np.where(jumped, np.abs(delta), -np.inf)))
                found = (names[i], float(math.exp(delta[i])))
        self._zero_seen |= finite & (x == 0)
        # The history: positive norms only (a zero or NaN/Inf says nothing of the scale). A jump
        # starts the parameter's history again at its new level (it is not said again each step
        # while a mean would catch up); any other step moves it by at most the factor (one
        # outlier does not blow up the variance).
        first = positive & ((self._count == 0) | jumped)
        later = positive & ~first
        a = self.alpha
        step = np.clip(delta, -self.log_factor, self.log_factor)
        self._mean = np.where(first, logs, np.where(later, self._mean + a * step, self._mean))
        self._var = np.where(first, 0.0, np.where(later, (1 - a) * (self._var + a * step * step), self._var))
        self._count = np.where(jumped, 1, self._count + positive)
        self._pending &= ~jumped
        self._never = self._count == 0
        self._never_any = bool(self._never.any())
        warm = not self._pending.any()
        self._threshold = self._thresholds() if warm else None
        self._lasting_warm = warm and self.confirm_sigmas > 0 and self._long_enough()
        return found

    def _long_enough(self) -> bool:
        """Every history is ``confirm_history`` long, or empty (a parameter whose gradient has
        been 0 on every step so far: a dead layer's)."""
        return bool(((self._count >= self.confirm_history) | self._never).all())

    def _thresholds(self) -> np.ndarray:
        """Per parameter, how far (in log norm) is a jump: the factor, or more where it is noisy;
        where the lasting rule judges, its lower bar (a first step goes to the full pass)."""
        sd = np.sqrt(self._var)
        bar = np.where(self._immediate, np.maximum(self.log_factor, self.sigmas * sd), np.inf)
        if self.confirm_sigmas > 0:
            lasting = np.maximum(self.log_factor, self.confirm_sigmas * sd)
            bar = np.where(self._count >= self.confirm_history, np.minimum(bar, lasting), bar)
        # A history not yet ``min_history`` long: any positive norm goes to the full pass (it
        # joins the history there); a zero norm (where 0 was seen before) passes as quiet.
        bar[self._count < self.min_history] = -1.0
        return bar

    def _quiet_step(self, x: np.ndarray) -> bool:
        """The every-step path once no lasting jump is pending: when no norm is NaN, none jumped,
        none fell to 0 for the first time and none of a parameter short of ``min_history`` is
        positive, the history moves in about a dozen numpy operations and True comes back; else
        False, and :meth:`update`'s full pass decides (jumps, NaN, first zeros, young histories:
        rare). A norm of 0 where 0 was seen before (a dead layer's parameters, half of a deep
        ReLU stack's) changes nothing in the full pass, so it passes here, its history left as
        it is. The thresholds follow the variance every ``_REFRESH`` steps (it moves slowly),
        every step under the lasting rule."""
        lowest = x.min()
        if not lowest >= 0:  # (NaN)
            return False
        zero = None
        if lowest == 0:
            zero = x == 0
            if (zero & ~self._zero_seen).any():  # a first fall to exactly 0: the full pass
                return False
            x = np.where(zero, 1.0, x)
        delta = np.log(x) - self._mean
        size = np.abs(delta)  # (a fall where falls are not judged: the full pass says so)
        if zero is not None:
            size[zero] = -np.inf
            delta[zero] = 0.0
        assert self._threshold is not None
        if (size >= self._threshold).any():  # an Inf norm's delta is Inf: the full pass too
            return False
        # Below its own threshold a move is this parameter's normal; it moves the history by at
        # most the factor either way, as in the full pass (a fall where falls are not judged too).
        np.clip(delta, -self.log_factor, self.log_factor, out=delta)
        a = self.alpha
        kept = self._var[zero] if zero is not None else None
        self._mean += a * delta
        self._var *= 1 - a
        self._var += (a * (1 - a)) * (delta * delta)
        if zero is not None:
            self._var[zero] = kept
        self._quiet += 1
        if self._lasting_warm:
            # The lasting rule's bar is low (3σ against 6σ): a stale one lets its first step pass
            # as quiet (the fault table's GPT-2 q/k fault: 3.02σ against a bar 8 steps old). Once
            # every history is that long it is every parameter's bar: three in-place operations.
            np.sqrt(self._var, out=self._threshold)
            self._threshold *= self.confirm_sigmas
            np.maximum(self._threshold, self.log_factor, out=self._threshold)
            if self._never_any:
                self._threshold[self._never] = -1.0
        elif self.confirm_sigmas > 0:
            self._count += 1 if zero is None else ~zero
            self._threshold = self._thresholds()
            self._lasting_warm = self._long_enough()
        elif self._quiet % _REFRESH == 0:
            self._threshold = self._thresholds()
        return True


_SHIFT_WORDS = {"up": ("rose", "above"), "down": ("fell", "below")}


def judge_module_shifts(
    baselines: Baselines,
    step: int,
    grad_rms: Mapping[str, float],
    activation_rms: Mapping[str, float],
    update_ratios: Mapping[str, float],
    update_ratio_floor: float = 0.0,
    update_ratio_factor: float | None = None,
) -> list[Alert]:
    """A logging step's per-output activation RMS (either way; also against its own log-linear
    trend, see :func:`trend_ratio`) and per-parameter update/weight ratio (rises: a learning rate
    that jumped), each against its own baseline. Falls of the
    update ratio are healthy (schedules decay the learning rate). Layer gradient RMS is kept in
    its baseline but not judged by ``baseline_factor``: healthy gradients swing both ways by 4-6x
    against their own median (gradients shrink 6x in 40 steps of a small CNN as its loss falls;
    a tiny Mixtral's layers rise 4-6x in healthy steps); gradients against their own past are
    :class:`~introspect.debugger.health.GradientHealth`'s ``exploding_jump`` (100x), the
    per-parameter escalation (:class:`ParamNormJumps`) and the spike score. The caller leaves out what
    holds NaN/Inf (an RMS over the finite rest says nothing). An update ratio that stays below
    ``update_ratio_floor`` before and after is noise (a conv bias under BatchNorm gets ~1e-9
    updates), never a shift; an update ratio's rise must reach ``update_ratio_factor`` (None:
    ``baseline_factor``), Adam's updates being noisier than outputs."""
    alerts: list[Alert] = []
    floors = {"update_ratio": update_ratio_floor}
    for stat, values, directions in (
        ("grad_rms", grad_rms, ()),  # kept as a baseline (the health map's), judged by exploding_jump
        ("activation_rms", activation_rms, ("up", "down")),
        ("update_ratio", update_ratios, ("up",)),
    ):
        factor = update_ratio_factor if stat == "update_ratio" and update_ratio_factor else baselines.factor
        shifted: list[tuple[str, str, Shift]] = []
        if directions and values:
            wheres = list(values)
            pasts = [baselines.past(stat, where) for where in wheres]
            # Every module at once (numpy over a matrix of pasts) says which ones could be a shift;
            # only those (rare) are judged one by one, by the same shift_of as ever.
            candidates = _shift_candidates(baselines, list(values.values()), pasts, directions, factor)
            for i in np.flatnonzero(candidates.any(axis=0)).tolist():
                where, value = wheres[i], values[wheres[i]]
                for d, direction in enumerate(directions):
                    if not candidates[d, i]:
                        continue
                    shift = shift_of(
                        value,
                        pasts[i],
                        direction,
                        baselines.min_history,
                        baselines.deviations,
                        factor,
                        trend=stat == "activation_rms",
                    )
                    if shift is not None and max(shift.value, shift.median) >= floors.get(stat, 0.0):
                        shifted.append((where, direction, shift))
                        break
        for where, value in values.items():
            baselines.add(stat, where, value)  # joins the history
        if shifted:
            # One finding per statistic and step: the first (in execution or parameter order) is
            # where it began; the others that moved with it (every layer after a learning-rate
            # jump) are counted in it, not listed as findings of their own.
            where, direction, shift = shifted[0]
            alerts.append(_shift_alert(stat, direction, where, step, shift, len(shifted) - 1))
    return alerts


_SLACK = 1.0 - 1e-9
"""The vectorised pre-test's margin: it may let through a value ``shift_of`` then turns down
(rounding), never the other way round."""


def _shift_candidates(
    baselines: Baselines, values: list[float], pasts: list[Sequence[float]], directions: tuple[str, ...], factor: float
) -> np.ndarray:
    """``(len(directions), len(values))`` bool: which values may be a shift in each direction
    (``shift_of``'s median, MAD and tests, for all modules at once per history length)."""
    n = len(values)
    found = np.zeros((len(directions), n), dtype=bool)
    v = np.asarray(values, dtype=np.float64)
    lengths = np.fromiter(map(len, pasts), dtype=np.int64, count=n)
    eligible = (lengths >= baselines.min_history) & np.isfinite(v)
    if not eligible.any():
        return found
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for length in np.unique(lengths[eligible]).tolist():
            rows = np.flatnonzero(eligible & (lengths == length))
            past = np.array([pasts[i] for i in rows.tolist()], dtype=np.float64).reshape(len(rows), length)
            median = np.median(past, axis=1)
            mad = np.median(np.abs(past - median[:, None]), axis=1)
            scale = np.maximum(MAD_TO_SIGMA * mad, _MAD_FLOOR * median)
            x = v[rows]
            positive = median > 0
            for d, direction in enumerate(directions):
                if direction == "up":
                    ratio, distance = x / median, x - median
                else:
                    ratio, distance = np.where(x > 0, median / x, np.inf), median - x
                found[d, rows] = (
                    positive & (ratio >= factor * _SLACK) & (distance / scale >= baselines.deviations * _SLACK)
                )
    return found


def _shift_alert(stat: str, direction: str, where: str, step: int, shift: Shift, others: int) -> Alert:
    verb, side = _SHIFT_WORDS[direction]
    message = (
        f"{_STAT_WORDS[stat]} {verb} to {shift.value:.3g}, {shift.factor:.3g}x {side} its own median "
        f"{shift.median:.3g} over its last {shift.history} logging steps ({shift.deviations:.0f} deviations)"
    )
    if others:
        what = "later module outputs" if stat == "activation_rms" else "other parameters"
        message += f"; {others} {what} moved with it" + (" (a learning-rate change?)" if stat == "update_ratio" else "")
    numbers = shift.numbers(stat) | {"others": float(others)}
    if stat == "activation_rms":
        return Alert("activation_shift", where, step, message, numbers)
    return Alert("update_ratio_shift", where, step, message, numbers)


_STAT_WORDS = {
    "grad_rms": "its RMS gradient",
    "activation_rms": "the RMS of its output",
    "update_ratio": "its update/weight ratio",
}
