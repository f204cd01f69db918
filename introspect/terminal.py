"""Terminal output for the command line: fixed-width tables, progress bars, and names made safe to print.

Progress bars go to stderr and appear only on a terminal and only for work that lasts more than
half a second, so piped output and tests stay clean.

Names that come from files (class folders, tensor and module names, tags, paths) may hold any
character: an escape sequence that retitles or rewrites the terminal, a newline that forges a
report line ("no problems found"). :func:`escape` shows them instead (``\\x1b``, ``\\n``);
:func:`format_table` escapes every cell, and every other line that prints such a name calls it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

__all__ = ["progress", "format_table", "number", "counted", "escape", "escape_lines", "byte_size"]

T = TypeVar("T")


# C0 and C1 controls and DEL (C1's CSI, 0x9b, is an escape sequence on its own to some terminals),
# the line and paragraph separators, the bidirectional overrides and isolates that reorder what is
# shown ("Trojan source"), and lone surrogates (undecodable bytes of a file name, as os.fsdecode
# keeps them: printing one raises UnicodeEncodeError).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _shown(match: re.Match[str]) -> str:
    c = match.group()
    if c in _NAMED:
        return _NAMED[c]
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for the byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(text: object) -> str:
    r"""``str(text)`` with every control character shown as an escape: one line, and nothing the
    terminal acts on. ``"cat<ESC>]0;owned<BEL><LF>no problems found"`` prints as
    ``cat\x1b]0;owned\x07\nno problems found``; other text is unchanged."""
    return _UNSAFE.sub(_shown, str(text))


def escape_lines(text: object) -> str:
    """Each line of ``text`` escaped, the newlines between them kept: for text that is several
    lines of its own (a table, a report) and may hold names from files."""
    return "\n".join(escape(line) for line in str(text).split("\n"))


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
    """Columns padded to their widest cell; numbers right-aligned unless ``right`` says otherwise.
    Every cell is :func:`escape`\\ d: a table row is one line, whatever its names hold."""
    cells = [[escape(h) for h in headers]] + [
        [escape(c) if isinstance(c, str) else number(c) for c in row] for row in rows
    ]
    if right is None:
        right = [not isinstance(c, str) for c in rows[0]] if rows else [False] * len(headers)
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        lines.append(
            "  ".join(c.rjust(w) if right[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
        )
    return "\n".join(lines)
