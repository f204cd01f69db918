"""Terminal output for the command line: fixed-width tables and progress bars.

Progress bars go to stderr and appear only on a terminal and only for work that lasts more than
half a second, so piped output and tests stay clean.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

__all__ = ["progress", "format_table", "number", "counted", "byte_size"]

T = TypeVar("T")


def progress(items: Iterable[T], enabled: bool = True, **options: Any) -> Iterable[T]:
    """``items`` wrapped in a tqdm bar (``desc=``, ``total=``, ``unit=`` pass through)."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, file=sys.stderr, delay=0.5, leave=False, disable=None, dynamic_ncols=True, **options)


def number(value: float) -> str:
    """Four significant digits (NaN/Inf come out as nan/inf)."""
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def byte_size(count: float) -> str:
    """``"1.50 MiB"``: bytes in powers of 1024, the units ``nvidia-smi`` and ``torch.cuda`` report."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            break
        value /= 1024
    if unit == "B":
        return f"{count:,.0f} B"
    return f"{value:,.0f} {unit}" if abs(value) >= 100 else f"{value:.3g} {unit}"


def counted(count: float, noun: str, plural: str | None = None) -> str:
    """``"1 value"``, ``"3 values"``, ``"2 matches"`` (with ``plural="matches"``): a count with its noun."""
    shown = f"{count:.0f}" if isinstance(count, float) else str(count)
    return f"{shown} {noun if count == 1 else (plural or noun + 's')}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool] | None = None) -> str:
    """Columns padded to their widest cell; numbers right-aligned unless ``right`` says otherwise."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else number(c) for c in row] for row in rows]
    if right is None:
        right = [not isinstance(c, str) for c in rows[0]] if rows else [False] * len(headers)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        lines.append(
            "  ".join(c.rjust(w) if right[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        )
    return "\n".join(lines)
