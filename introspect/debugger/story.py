"""One story per fault: which finding follows from which.

A fault rarely makes one finding. A BatchNorm whose bias went to -100 kills the ReLU after it, and
every layer before it then gets no gradient: one dead layer, thirty gradient findings. A NaN step
leaves NaN weights, and every statistic after it is read off NaN. The user needs the first one,
with the rest attached to it. :class:`Story` links each finding, as it arrives, to the *root*
finding it follows from (``Alert.cause``), by the rules in :data:`RULES`:

* a **non-finite** origin (``nonfinite``, ``nonfinite_rank``) at step s explains every later or
  same-step finding of any other kind (gradients, units, attention, drift), and later non-finite
  findings (NaN weights after the NaN step); nothing before s;
* a **dead or saturated layer** at module M, step s explains vanishing gradients of any module
  (exploding ones too for a dead layer: the layers after it see a sudden change), and dead/saturated units of other modules at or after M in forward order, within ``window`` steps
  before or after s: the dead-unit verdict waits for enough samples (``dead_min_samples``), so it
  is often named a few steps *after* the gradients it silenced, and then adopts them;
* a **gradient-norm spike** (an LR jump) at step s explains, within s..s+window, exploding
  gradients, attention logit growth or collapse, logit divergence, massive activations, router
  logit growth and a NaN that follows it;
* **attention logit growth** at module M explains entropy collapse of M or of a module after it,
  within ``window`` steps either way, logit divergence in s..s+window, and activation shifts of
  M's own projections or modules after it from s on (those named before it at s too);
* a **specific finding at one module** (``attention_logit_growth``, ``massive_activation``) named
  within ``lookback`` steps after a gradient-norm spike (the escalation's logging steps: at
  ``every=50`` the per-module views only look once the spike made the next steps log) is the
  spike's *cause*, not its consequence, while the spike has no model-wide consequence yet
  (``exploding_gradient``, ``update_ratio_shift``, ``logit_divergence``, a NaN: an LR jump moves
  every layer; q/k scaled ×30 or one channel ×1e4 moves one place): the finding becomes the root
  and adopts the spike with what it had. A massive activation also explains the massive
  activations of the blocks after it (the residual stream carries it), activation shifts, and a
  gradient-norm spike at a later step;
* an **exploding init** (a layer whose RMS(W) x √fan_in is far above 1 at the first logging step)
  explains, in s..s+window, vanishing/exploding gradients, dead/saturated units, activation and
  update-ratio shifts, massive activations and a gradient-norm spike;
* an **update-ratio shift** (an update far above the parameter's own past: the learning rate
  jumped, with no gradient-norm spike where normalisation keeps the gradients' scale) at step s
  explains, in s..s+window, activation and update-ratio shifts, dead or saturated units,
  vanishing or exploding gradients and logit divergence.

A massive activation and an update-ratio shift also adopt the findings they explain that were
named before them at their own step (one step's findings arrive in the probes' order).

A root is the earliest finding (by step, then arrival) that explains the new one; a finding that a
later root explains (the dead layer named after its gradients) moves, with its own consequences,
under that root. ``cause`` always names a root, never a consequence. Findings of kinds no rule
mentions stand alone as their own roots.

Cost: each new finding is checked against the open roots that can explain something (at most a
few per fault), and a new explaining root looks back over the roots of its window; roots whose
window has passed are dropped from the open list. Nothing rescans all findings.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .alerts import Alert

__all__ = ["Story", "RULES", "Rule"]

GRADIENTS = frozenset({"vanishing_gradient", "exploding_gradient"})
UNITS = frozenset({"dead_units", "saturated_units"})
ATTENTION = frozenset({"attention_entropy_collapse", "attention_logit_growth"})
DRIFT = frozenset(
    {
        "logit_divergence",
        "massive_activation",
        "router_logit_growth",
        "expert_collapse",
        "grad_norm_spike",
        "stuck_parameter",
        "activation_shift",
        "update_ratio_shift",
    }
)
NONFINITE = frozenset({"nonfinite", "nonfinite_rank"})


@dataclass(frozen=True)
class Rule:
    """What a root of one kind explains: ``kinds`` at steps ``before`` .. ``after`` steps around it
    (None: unbounded; in units of the story's window), ``downstream`` kinds only at modules after the
    root's in forward order, ``same_step_kinds`` only from the root's step on (not before)."""

    kinds: frozenset[str]
    before: float | None  # how far back (in windows) a consequence may lie
    after: float | None  # how far ahead (in windows); None: forever
    downstream: frozenset[str] = frozenset()
    strictly_later: frozenset[str] = frozenset()  # kinds explained only at steps > the root's
    from_step: frozenset[str] = frozenset()  # kinds explained only at steps >= the root's


RULES: dict[str, Rule] = {
    "nonfinite": Rule(GRADIENTS | UNITS | ATTENTION | DRIFT | NONFINITE, 0, None, strictly_later=NONFINITE),
    "nonfinite_rank": Rule(GRADIENTS | UNITS | ATTENTION | DRIFT | NONFINITE, 0, None, strictly_later=NONFINITE),
    # A dead layer's own output and those after it fall: their activation_shift follows from it.
    "dead_units": Rule(GRADIENTS | UNITS | {"activation_shift"}, 1, 1, downstream=UNITS | {"activation_shift"}),
    # A saturated sigmoid/tanh has a slope of ~0: gradients vanish through it (they do not explode:
    # large weights saturate it and explode gradients alike, neither causing the other).
    "saturated_units": Rule(frozenset({"vanishing_gradient"}) | UNITS, 1, 1, downstream=UNITS),
    "grad_norm_spike": Rule(
        frozenset(
            {
                "exploding_gradient",
                "logit_divergence",
                "massive_activation",
                "router_logit_growth",
                "activation_shift",
                "update_ratio_shift",
            }
        )
        | ATTENTION
        | NONFINITE,
        0,
        1,
        strictly_later=NONFINITE,
    ),
    # Its own q/k projections' outputs (inside it, after it in forward order) and what follows it
    # shift with the logits: from its step on (at its step, named before it too).
    "attention_logit_growth": Rule(
        frozenset({"attention_entropy_collapse", "logit_divergence", "activation_shift"}),
        1,
        1,
        downstream=frozenset({"attention_entropy_collapse", "activation_shift"}),
        from_step=frozenset({"activation_shift"}),
    ),
    # One block's residual stream carries its massive value to every block after it.
    "massive_activation": Rule(
        frozenset({"massive_activation", "activation_shift", "grad_norm_spike"}),
        0,
        1,
        downstream=frozenset({"massive_activation", "activation_shift"}),
        strictly_later=frozenset({"grad_norm_spike"}),
    ),
    # A layer initialised far too large: everything it feeds, and its gradients, follow.
    "exploding_init": Rule(
        frozenset({"activation_shift", "update_ratio_shift", "grad_norm_spike", "massive_activation"})
        | GRADIENTS
        | UNITS,
        0,
        1,
    ),
    # An update far above its own past (the learning rate or the optimizer's state jumped; no
    # gradient-norm spike where normalisation keeps the gradients' scale, as in a ResNet): the
    # weights moved, so outputs shift, units die, gradients change after it.
    "update_ratio_shift": Rule(
        frozenset({"activation_shift", "update_ratio_shift", "logit_divergence"}) | GRADIENTS | UNITS,
        0,
        1,
    ),
}

SPECIFIC = frozenset({"attention_logit_growth", "massive_activation"})
"""Findings at one module that, named just after a gradient-norm spike, are its cause."""
SAME_STEP = SPECIFIC | {"update_ratio_shift"}
"""Roots that adopt the findings they explain named before them at their own step."""
MODEL_WIDE = frozenset({"exploding_gradient", "update_ratio_shift", "logit_divergence"}) | NONFINITE
"""Consequences that show a spike moved the whole model (an LR jump): then it stays the root."""


_ADOPTABLE = frozenset().union(*(r.kinds for r in RULES.values() if r.before))
"""Kinds a root named later may adopt (only rules that look back can)."""


class Story:
    """Links findings to their root cause as they arrive (see the module's docstring).

    ``order``: module names in forward order (the watched modules, as ``named_modules`` lists them);
    ``window``: how many steps apart a root and its consequence may be (see ``story_window``).
    """

    def __init__(self, order: Iterable[str] = (), window: int = 10, lookback: int = 3) -> None:
        self._position = {name: i for i, name in enumerate(order)}
        self.window = max(int(window), 0)
        self.lookback = max(int(lookback), 0)
        """How many steps after a spike a specific finding may be its cause (``escalate_steps``)."""
        self._roots: dict[int, Alert] = {}  # id -> root, in arrival order
        self.consequences: dict[int, list[Alert]] = {}
        """id(root) -> the findings that follow from it, in arrival order."""
        self._open: list[Alert] = []  # roots with a rule, whose window may still take findings
        self._recent: dict[int, Alert] = {}  # roots a later-named root may still adopt, oldest first
        self._latest: int | None = None

    @property
    def roots(self) -> list[Alert]:
        """Every root, in arrival order (the report sorts them by step)."""
        return list(self._roots.values())

    # ------------------------------------------------------------------ linking
    def link(self, alert: Alert) -> Alert | None:
        """Attach ``alert`` to the root it follows from (returned, also set as ``alert.cause``), or
        make it a root (None). A new root may adopt recent roots it explains."""
        if self._latest is None or alert.step > self._latest:
            self._latest = alert.step
            self._prune()  # once per new step, not per finding
        spike = self._spike_caused_by(alert)
        cause = None if spike is not None else self._cause_of(alert)
        if cause is not None:
            self._attach(alert, cause)
            return cause
        object.__setattr__(alert, "cause", None)
        self._roots[id(alert)] = alert
        self.consequences[id(alert)] = []
        if spike is not None:
            self._take_root(spike, alert)
        if alert.kind in RULES:
            self._adopt(alert)
            self._open.append(alert)
        if alert.kind in _ADOPTABLE:
            self._recent[id(alert)] = alert
        return None

    def followers(self, root: Alert) -> list[Alert]:
        """The findings that follow from ``root`` (empty for a consequence or an unknown finding)."""
        return self.consequences.get(id(root), [])

    def _cause_of(self, alert: Alert) -> Alert | None:
        best: Alert | None = None
        for root in self._open:
            if root is not alert and self.explains(root, alert):
                if best is None or root.step < best.step:
                    best = root
        return best

    def explains(self, root: Alert, alert: Alert) -> bool:
        """Whether ``alert`` follows from ``root`` by :data:`RULES`."""
        rule = RULES.get(root.kind)
        if rule is None or alert.kind not in rule.kinds:
            return False
        if alert.kind == root.kind and alert.where == root.where:
            return False
        delta = alert.step - root.step
        if rule.before is not None and delta < -rule.before * self.window:
            return False
        if rule.after is not None and delta > rule.after * self.window:
            return False
        if alert.kind in rule.strictly_later and delta <= 0:
            return False
        if alert.kind in rule.from_step and delta < 0:
            return False
        if alert.kind in rule.downstream and not self._after(alert.where, root.where):
            return False
        return True

    def _spike_caused_by(self, alert: Alert) -> Alert | None:
        """The open gradient-norm spike ``alert`` (a specific finding) caused: at most ``lookback``
        steps before it, with no model-wide consequence (see the module's docstring)."""
        if alert.kind not in SPECIFIC:
            return None
        for root in self._open:
            if (
                root.kind == "grad_norm_spike"
                and 0 <= alert.step - root.step <= self.lookback
                and not any(a.kind in MODEL_WIDE for a in self.consequences.get(id(root), []))
            ):
                return root
        return None

    def _take_root(self, old: Alert, root: Alert) -> None:
        """``old`` (a root) and what it had move under ``root``."""
        moved = self.consequences.pop(id(old), [])
        del self._roots[id(old)]
        self._recent.pop(id(old), None)
        self._open = [r for r in self._open if r is not old]
        self._attach(old, root)
        for alert in moved:
            self._attach(alert, root)

    def _attach(self, alert: Alert, root: Alert) -> None:
        object.__setattr__(alert, "cause", root)
        self.consequences.setdefault(id(root), []).append(alert)

    def _adopt(self, root: Alert) -> None:
        """A root named after findings it explains (the dead layer after its gradients) takes them,
        and what they had taken, as its consequences."""
        if RULES[root.kind].before == 0 and root.kind not in SAME_STEP:
            return  # explains nothing earlier than itself: nothing to look back for
        # (A massive activation, an update jump, takes what it explains named at its own step.)
        for other in list(self._recent.values()):
            if other is not root and self.explains(root, other) and not self._explains_back(other, root):
                self._take_root(other, root)

    def _explains_back(self, other: Alert, root: Alert) -> bool:
        """``other`` explains ``root`` too (two dead layers at one step): the earlier one stays root."""
        return self.explains(other, root) and (other.step, self._pos(other.where)) <= (root.step, self._pos(root.where))

    def _prune(self) -> None:
        """Drop roots whose window lies behind the latest step (an unbounded rule stays open). Runs
        when the step moves on; a root that arrived late with an old step goes at the next move."""
        assert self._latest is not None
        horizon = self._latest - 2 * self.window
        self._open = [r for r in self._open if RULES[r.kind].after is None or r.step >= horizon]
        for key, alert in list(self._recent.items()):
            if alert.step >= horizon:
                break  # roughly oldest first: the rest are recent
            del self._recent[key]

    # ------------------------------------------------------------------ module order
    def _pos(self, where: str) -> int:
        """Forward position of a finding's module: its own name, else the longest dotted prefix
        that is a module (``fc1.weight`` -> ``fc1``, ``lstm/0`` -> ``lstm``); unknown: -1."""
        name = where.split("/")[0]
        while True:
            if name in self._position:
                return self._position[name]
            if "." not in name:
                return -1
            name = name.rsplit(".", 1)[0]

    def _after(self, where: str, root_where: str) -> bool:
        if where == root_where:
            return True
        a, b = self._pos(where), self._pos(root_where)
        return a >= b >= 0  # the module itself or one after it; an unknown module is not known to be
