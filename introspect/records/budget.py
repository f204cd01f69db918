"""Which per-module tags a run writes: all of them on a small model, a budget on a large one.

TensorBoard stops scaling long before models do: ~4 histogram tags per module (efficientnet_b0
alone wrote 1,298 tags) and minutes to load ~10k tags. Above ``max_modules`` watched modules
(``watch(..., max_modules=100)`` by default), per-module histograms and scalars are written for
a budget of modules only, chosen deterministically:

1. the user's own selection: every module ``include=`` named (it was asked for);
2. the modules named in findings, as they are found (up to ``max_modules - max_modules // 2``);
3. an evenly spaced sample of ``max_modules // 2`` modules in definition order
   (``named_modules()``), the first and the last included.

Every module stays in view all the same: the statistics of every module are still computed on
logging steps, feed the debugger and the health map (``diagnostics/health_map/{stat}``, whose
numbers for every module are written as one text per logging step, ``diagnostics/health_data``,
so ``introspect map`` draws them from the event files), and roll up per block
(``blocks/{stat}/{block}``, see :func:`block_of`). On top of the budget a hard ceiling,
``TAG_CEILING`` distinct tags per run, is kept whatever the model: a tag past it is not written
(one warning says so and how to get everything: ``max_modules=None``).

>>> budget = TagBudget(modules, params, max_modules=100, explicit=False)   # doctest: +SKIP
>>> written = budget.select(host)          # the HostStep to write: budgeted tags + block roll-ups
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..debugger.alerts import Alert
from ..errors import IntrospectWarning, warn
from .step import HostStep
from .tags import block_tag, tag, tag_name

__all__ = [
    "DEFAULT_MAX_MODULES",
    "TAG_CEILING",
    "RUN_LEVEL_RESERVE",
    "MAX_BLOCKS",
    "OTHER_BLOCK",
    "TagBudget",
    "block_of",
    "blocks_of",
    "evenly_spaced",
    "health_data_text",
    "parse_health_data",
]

DEFAULT_MAX_MODULES = 100
"""Above this many watched modules, per-module tags go to a budget of this many modules."""

TAG_CEILING = 2000
"""The most distinct tags a budgeted run writes, whatever the model."""

RUN_LEVEL_RESERVE = 100
"""Of ``TAG_CEILING``, the room kept for the run's own tags (summary, findings, health maps,
grad flow, hparams, ...: a few dozen): per-module and per-block tags stop at the rest."""

MAX_BLOCKS = 32
"""The most roll-up blocks per numbered family (``model.layers.{i}``); more indices are grouped
into this many ranges of consecutive indices (``0-24``)."""

OTHER_BLOCK = "_other"
"""The block of modules outside any numbered family (``lm_head``, ``model.norm``)."""

_TagFacts = tuple[str | None, str, str | None, tuple[str, ...], tuple[str, ...]]
"""Of one tag: its owner as ``keeps`` finds it, its kind, its owner as ``rollups`` finds it, and
the scalars ``write_step`` writes beside it (its finite case, then its NaN/Inf case)."""

_PARAM_KINDS = ("weights", "grads", "grad_norm", "update_ratio")
_MODULE_KINDS = ("activations", "activation_grads", "feature_maps")
_NUMBER = re.compile(r"\d+")


def _family_and_index(module: str) -> tuple[str, int] | None:
    """``("model.layers", 3)`` for ``model.layers.3.mlp.fc1``; ``("", 7)`` for ``7``; None for a
    name without a numbered part."""
    parts = module.split(".")
    for i, part in enumerate(parts):
        if _NUMBER.fullmatch(part):
            return ".".join(parts[:i]), int(part)
    return None


def blocks_of(modules: Iterable[str]) -> dict[str, str]:
    """module -> its roll-up block, for every module given.

    A module's block is its name up to the first numbered part (``model.layers.3.mlp`` ->
    ``model.layers.3``): the repeated unit of a stack. A family with more than ``MAX_BLOCKS``
    indices is grouped into ``MAX_BLOCKS`` ranges of consecutive indices (``layers.0-24``); the
    modules of no family, and of families past the first ``MAX_BLOCKS``, form ``OTHER_BLOCK``.
    """
    modules = list(modules)
    indices: dict[str, set[int]] = {}
    for m in modules:
        found = _family_and_index(m)
        if found is not None:
            indices.setdefault(found[0], set()).add(found[1])
    families = list(indices)[:MAX_BLOCKS]
    ranges: dict[str, list[tuple[int, int]]] = {}
    for family in families:
        ordered = sorted(indices[family])
        size = -(-len(ordered) // MAX_BLOCKS)
        ranges[family] = [
            (chunk[0], chunk[-1]) for chunk in (ordered[k : k + size] for k in range(0, len(ordered), size))
        ]
    out: dict[str, str] = {}
    for m in modules:
        found = _family_and_index(m)
        if found is None or found[0] not in ranges:
            out[m] = OTHER_BLOCK
            continue
        family, index = found
        lo, hi = next(r for r in ranges[family] if r[0] <= index <= r[1])
        number = str(lo) if lo == hi else f"{lo}-{hi}"
        out[m] = f"{family}.{number}" if family else number
    return out


def block_of(module: str, blocks: Mapping[str, str]) -> str:
    """The block of ``module`` in ``blocks`` (``blocks_of``), ``OTHER_BLOCK`` when not there."""
    return blocks.get(module, OTHER_BLOCK)


def evenly_spaced(names: Sequence[str], count: int) -> list[str]:
    """``count`` of ``names`` at even spacing, the first and the last included (all when fewer)."""
    n = len(names)
    if count >= n:
        return list(names)
    if count <= 1:
        return list(names[:count])
    return [names[round(k * (n - 1) / (count - 1))] for k in range(count)]


@dataclass
class TagBudget:
    """Which per-module tags one watch writes (see the module's docstring).

    Args:
        modules: the watched modules' names, in definition order.
        params: the watched parameters' names -> the module that owns each.
        max_modules: the budget; None: every module, no ceiling.
        explicit: the modules were chosen by the user (``include=``): all of them are kept.
    """

    modules: Sequence[str]
    params: Mapping[str, str]
    max_modules: int | None = DEFAULT_MAX_MODULES
    explicit: bool = False
    ceiling: int = TAG_CEILING - RUN_LEVEL_RESERVE
    kept: set[str] = field(default_factory=set)
    """The modules whose per-module tags are written."""
    written: set[str] = field(default_factory=set)
    dropped: int = 0
    """Tags not written because the ceiling was reached."""
    _findings_room: int = 0
    _alerts_seen: int = 0
    _warned: bool = False

    def __post_init__(self) -> None:
        self._module_set = set(self.modules)
        self._facts: dict[str, _TagFacts] = {}
        self.active = self.max_modules is not None and len(self.modules) > self.max_modules
        """Whether the budget applies (a large model and a limit); else every tag is written."""
        self.blocks = blocks_of(self.modules) if self.active else {}
        if not self.active:
            return
        limit = self.max_modules or 0
        sample = limit // 2
        self.kept = set(self.modules) if self.explicit else set(evenly_spaced(self.modules, sample))
        self._findings_room = limit - sample

    # ----------------------------------------------------------------- membership
    def owner(self, kind: str, name: str) -> str | None:
        """The watched module a per-module tag (kind, name) belongs to; None for another tag."""
        name = name.partition("/")[0]  # an output's suffix: lstm/0
        if kind in _PARAM_KINDS:
            return self.params.get(name)
        if kind in _MODULE_KINDS or name in self._module_set:
            return name if name in self._module_set else None
        return self.params.get(name)

    def _scalar_owner(self, full_tag: str) -> str | None:
        """A probe's or pack's per-module scalar names its module last (``attention/entropy/{m}``)."""
        kind, name = tag_name(full_tag)
        owner = self.owner(kind, name)
        if owner is not None:
            return owner
        last = full_tag.rpartition("/")[2]
        return last if last in self._module_set else None

    def admit(self, alerts: Sequence[Alert]) -> None:
        """The modules named by findings not seen yet join the budget (while it has room)."""
        if not self.active:
            return
        for alert in alerts[self._alerts_seen :]:
            if self._findings_room <= 0:
                break
            module = self._module_of_finding(alert.where)
            if module is not None and module not in self.kept:
                self.kept.add(module)
                self._findings_room -= 1
        self._alerts_seen = len(alerts)

    def _module_of_finding(self, where: str) -> str | None:
        base = where.partition("/")[0]
        if base in self._module_set:
            return base
        return self.params.get(base) or self.params.get(where)

    def watches(self, module: str) -> bool:
        """Whether ``module``'s own tags are written (in the budget, or no budget applies)."""
        return not self.active or module in self.kept

    def keeps(self, full_tag: str, *with_it: str) -> bool:
        """Whether ``full_tag`` is written (counting it, and the tags ``with_it`` written beside
        it, against the ceiling when new)."""
        if not self.active:
            return True
        owner = self._scalar_owner(full_tag)
        if owner is not None and owner not in self.kept:
            return False
        return self._room_for(full_tag, *with_it)

    def _room_for(self, *full_tags: str) -> bool:
        """Whether every one of ``full_tags`` (a tag and the tags written with it) fits; all are
        counted as written, or none is."""
        new = [t for t in dict.fromkeys(full_tags) if t not in self.written]
        if not new:
            return True
        if len(self.written) + len(new) > self.ceiling:
            self.dropped += 1
            if not self._warned:
                self._warned = True
                warn(
                    f"introspect: this run reached its ceiling of {self.ceiling} tags; later new tags are not "
                    "written (watch(..., max_modules=None) writes every tag)",
                    IntrospectWarning,
                )
            return False
        self.written.update(new)
        return True

    # ----------------------------------------------------------------- one step
    def select(self, host: HostStep) -> HostStep:
        """The part of ``host`` to write, with the block roll-ups added (``host`` is unchanged)."""
        if not self.active:
            return host
        kept, written, learn = self.kept, self.written, self._tag_facts
        known = self._facts
        histograms = {}
        for t, r in host.histograms.items():
            facts = known.get(t) or learn(t)
            owner = facts[0]
            if owner is not None and owner not in kept:
                continue
            # The tag and its derived scalars (write_step's grad_norm, nonfinite), as keeps() does.
            derived = facts[4] if r.nonfinite > 0 else facts[3]
            if t in written and all(d in written for d in derived):
                histograms[t] = r  # nothing new: nothing to count
            elif self._room_for(t, *derived):
                histograms[t] = r
        scalars = {t: v for t, v in host.scalars.items() if self.keeps(t)}
        for t, v in self.rollups(host).items():
            if self._room_for(t):
                scalars[t] = v
        return HostStep(step=host.step, histograms=histograms, scalars=scalars, measures=host.measures)

    def _tag_facts(self, full_tag: str) -> _TagFacts:
        """What ``select`` and ``rollups`` need to know of a tag, worked out once per tag (the same
        tags come back every logging step: on the 201-module stack, parsing them again was ~3 ms
        of each logging step's close)."""
        kind, name = tag_name(full_tag)
        grad_norm = (tag("grad_norm", name),) if kind == "grads" else ()
        facts = (
            self._scalar_owner(full_tag),
            kind,
            self.owner(kind, name),
            grad_norm,
            grad_norm + (tag("nonfinite", name),),
        )
        self._facts[full_tag] = facts
        return facts

    def rollups(self, host: HostStep) -> dict[str, float]:
        """``blocks/{stat}/{block}`` of one step: per block, the RMS of its modules' outputs
        (``activation_rms``) and of the gradients w.r.t. them (``grad_rms``), pooled over every
        value; the norm of its parameters' gradients (``grad_norm``); its NaN/Inf count
        (``nonfinite``, when not zero)."""
        sums: dict[tuple[str, str], list[float]] = {}

        def pool(stat: str, block: str, squares: float, count: float) -> None:
            cell = sums.setdefault((stat, block), [0.0, 0.0])
            cell[0] += squares
            cell[1] += count

        known, learn, blocks = self._facts, self._tag_facts, self.blocks
        for full_tag, record in host.histograms.items():
            _, kind, owner, _, _ = known.get(full_tag) or learn(full_tag)
            if owner is None:
                continue
            block = block_of(owner, blocks)
            if kind == "activations":
                pool("activation_rms", block, record.sum_squares, record.finite_count)
            elif kind == "activation_grads":
                pool("grad_rms", block, record.sum_squares, record.finite_count)
            elif kind == "grads":
                pool("grad_norm", block, record.sum_squares, 1.0)
            if record.nonfinite > 0 and kind in ("activations", "activation_grads", "grads"):
                pool("nonfinite", block, record.nonfinite, 1.0)
        out: dict[str, float] = {}
        for (stat, block), (squares, count) in sums.items():
            if stat == "nonfinite":
                out[block_tag(stat, block)] = squares
            elif stat == "grad_norm":
                out[block_tag(stat, block)] = math.sqrt(squares)
            elif count > 0:
                out[block_tag(stat, block)] = math.sqrt(squares / count)
        return out


HEALTH_DATA_HEAD = "| module | "


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def health_data_text(values: Mapping[str, Mapping[str, float]], order: Sequence[str]) -> str:
    """A markdown table, one row per module (execution order), one column per statistic:
    what the health map draws, for every module, in one text event (``HEALTH_DATA_TAG``)."""
    stats = [s for s in values if values[s]]
    lines = [HEALTH_DATA_HEAD + " | ".join(stats) + " |", "| --- |" + " ---: |" * len(stats)]
    for row in order:
        lines.append(f"| {row} | " + " | ".join(_fmt(values[s].get(row)) for s in stats) + " |")
    return "\n".join(lines)


def parse_health_data(text: str) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(rows in order, values[stat][row]) from a ``diagnostics/health_data`` text."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    if not lines or not lines[0].startswith(HEALTH_DATA_HEAD.strip()):
        return [], {}
    stats = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    values: dict[str, dict[str, float]] = {s: {} for s in stats}
    rows: list[str] = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(stats) + 1:
            continue
        rows.append(cells[0])
        for stat, cell in zip(stats, cells[1:]):
            if cell:
                try:
                    values[stat][cells[0]] = float(cell)
                except ValueError:
                    continue
    return rows, values
