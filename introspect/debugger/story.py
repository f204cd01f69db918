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
  within ``window`` steps either way, and logit divergence in s..s+window.

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
    # Growing q/k (the projection's output: activation_shift at attn.c_attn or q_proj) is what the
    # logit growth is made of: the attention finding, with its advice, is the root.
    "attention_logit_growth": Rule(
        frozenset({"attention_entropy_collapse", "logit_divergence", "activation_shift"}),
        1,
        1,
        downstream=frozenset({"attention_entropy_collapse", "activation_shift"}),
    ),
}


_ADOPTABLE = frozenset().union(*(r.kinds for r in RULES.values() if r.before))
"""Kinds a root named later may adopt (only rules that look back can)."""


class Story:
    """Links findings to their root cause as they arrive (see the module's docstring).

    ``order``: module names in forward order (the watched modules, as ``named_modules`` lists them);
    ``window``: how many steps apart a root and its consequence may be (see ``story_window``).
    """

    def __init__(self, order: Iterable[str] = (), window: int = 10) -> None:
        self._position = {name: i for i, name in enumerate(order)}
        self.window = max(int(window), 0)
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
        cause = self._cause_of(alert)
        if cause is not None:
            self._attach(alert, cause)
            return cause
        object.__setattr__(alert, "cause", None)
        self._roots[id(alert)] = alert
        self.consequences[id(alert)] = []
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
        if alert.kind in rule.downstream and not self._after(alert.where, root.where):
            return False
        return True

    def _attach(self, alert: Alert, root: Alert) -> None:
        object.__setattr__(alert, "cause", root)
        self.consequences.setdefault(id(root), []).append(alert)

    def _adopt(self, root: Alert) -> None:
        """A root named after findings it explains (the dead layer after its gradients) takes them,
        and what they had taken, as its consequences."""
        if RULES[root.kind].before == 0:
            return  # explains nothing earlier than itself: nothing to look back for
        for other in list(self._recent.values()):
            if other is not root and self.explains(root, other) and not self._explains_back(other, root):
                moved = self.consequences.pop(id(other), [])
                del self._roots[id(other)], self._recent[id(other)]
                if other.kind in RULES:
                    self._open.remove(other)
                self._attach(other, root)
                for alert in moved:
                    self._attach(alert, root)

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
