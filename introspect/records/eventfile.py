"""TensorBoard event records: checksums without holding the GIL for milliseconds, and a reader.

An event file is a sequence of records: ``uint64 length``, the masked CRC32C of those 8 bytes, the
serialized ``Event``, and its masked CRC32C. tensorboard's own writer (the one behind
``torch.utils.tensorboard.SummaryWriter``) computes the CRC32C in pure Python, a byte at a time:
about 0.1-0.2 us per byte on its writer thread, which holds the GIL meanwhile, so a step's 15-25 KB
event of histograms stalls training by 2-5 ms. tensorboardX uses the native ``crc32c`` package
when it is installed; this module does the same when ``crc32c`` or ``google-crc32c`` is importable,
and otherwise computes the same checksum with numpy in a few vectorised operations (about 50x
faster than the byte loop on a 20 KB event).

``speed_up(writer)`` makes one torch ``SummaryWriter``'s record writer use it. The bytes written
are identical (the tests compare them with tensorboard's own); ``restore`` undoes it.

:func:`read_records` reads them back, for ``introspect map``, from a file that may be anyone's:
one pass, both checksums verified, and no read longer than the file (a length field of 2**63
was a MemoryError); a last record cut short (a run still writing) ends the file, as TensorBoard
takes it.

How the numpy version works: CRC32C without its initial and final inversion is linear over GF(2),
so the CRC of a block of ``BLOCK`` bytes is the XOR of one table entry per byte, looked up by the
byte's value and its distance from the block's end (a ``BLOCK x 256`` table, built once). Blocks
are then chained in Python with four table lookups each (the "shift the state by ``BLOCK`` zero
bytes" operator, split by byte): a 20 KB event is 40 chained blocks.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import numpy as np

__all__ = ["crc32c", "masked_crc32c", "speed_up", "restore", "read_records", "CorruptRecordError", "BLOCK"]

POLY = 0x82F63B78  # CRC32C (Castagnoli), reflected
BLOCK = 512
"""Bytes per vectorised block: larger blocks mean fewer Python steps and a bigger table (BLOCK KB)."""
_SMALL = 64
"""Below this many bytes the byte loop is faster than numpy's per-call overhead."""


def _byte_table() -> list[int]:
    table = []
    for b in range(256):
        c = b
        for _ in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _byte_table()


class _Tables:
    """The numpy tables, built on first use (about 10 ms, once per process)."""

    def __init__(self) -> None:
        t = np.array(_TABLE, dtype=np.uint32)

        def advance(v: np.ndarray) -> np.ndarray:  # one zero byte through the raw CRC register
            return t[v & 0xFF] ^ (v >> 8)

        # by_distance[k][b]: the contribution of byte b followed by k more bytes of the block.
        rows = [t]
        for _ in range(BLOCK - 1):
            rows.append(advance(rows[-1]))
        # Flat, indexed by position * 256 + byte: one 1-D take is much faster than a 2-D gather.
        self.by_position = np.stack(rows[::-1]).reshape(-1)
        self.offsets = (np.arange(BLOCK) * 256).astype(np.uint32)
        # shift[j][v]: the register (byte j = v) after BLOCK zero bytes; linear, so a register's
        # shift is the XOR of its four bytes' shifts.
        shift = []
        for j in range(4):
            v = np.arange(256, dtype=np.uint32) << np.uint32(8 * j)
            for _ in range(BLOCK):
                v = advance(v)
            shift.append(v.tolist())
        self.shift = shift
        # The initial register 0xFFFFFFFF after r zero bytes, for a leading partial block.
        init = [0xFFFFFFFF]
        for _ in range(BLOCK):
            c = init[-1]
            init.append(_TABLE[c & 0xFF] ^ (c >> 8))
        self.init_after = init


_tables: _Tables | None = None


def _crc32c_bytes(data: bytes) -> int:
    crc = 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _crc32c_numpy(data: bytes) -> int:
    global _tables
    if _tables is None:
        _tables = _Tables()
    tb = _tables
    n = len(data)
    head = n % BLOCK
    values = np.frombuffer(data, dtype=np.uint8)
    # The leading partial block: the initial register shifted through it, plus its bytes.
    crc = tb.init_after[head]
    if head:
        where = np.add(tb.offsets[BLOCK - head :], values[:head], dtype=np.uint32)
        crc ^= int(np.bitwise_xor.reduce(tb.by_position[where]))
    if n > head:
        where = np.add(tb.offsets, values[head:].reshape(-1, BLOCK), dtype=np.uint32)
        parts = np.bitwise_xor.reduce(tb.by_position[where], axis=1).tolist()
        s0, s1, s2, s3 = tb.shift
        for part in parts:
            crc = s0[crc & 0xFF] ^ s1[(crc >> 8) & 0xFF] ^ s2[(crc >> 16) & 0xFF] ^ s3[crc >> 24] ^ part
    return crc ^ 0xFFFFFFFF


def _native() -> Callable[[bytes], int] | None:
    """The native CRC32C of an optional package (as tensorboardX does), when one is installed."""
    try:
        import crc32c as _crc32c_pkg

        return _crc32c_pkg.crc32c
    except (ImportError, AttributeError):
        pass
    try:
        import google_crc32c

        return google_crc32c.value
    except (ImportError, AttributeError):
        return None


_NATIVE = _native()


def crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli) of ``data``, as TensorFlow's record format uses it."""
    if _NATIVE is not None:
        return _NATIVE(data)
    if len(data) < _SMALL:
        return _crc32c_bytes(data)
    return _crc32c_numpy(data)


def masked_crc32c(data: bytes) -> int:
    """The masked CRC32C of a TFRecord header or payload."""
    x = crc32c(data)
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc32c(header)) + data + struct.pack("<I", masked_crc32c(data))


def _record_writer(writer: Any) -> Any | None:
    """tensorboard's ``RecordWriter`` behind a torch SummaryWriter, or None when it has none."""
    try:
        from tensorboard.summary.writer.record_writer import RecordWriter

        record_writer = writer.file_writer.event_writer._async_writer._writer
    except Exception:  # another writer class, or tensorboard changed its insides: leave it alone
        return None
    return record_writer if type(record_writer) is RecordWriter else None


def speed_up(writer: Any) -> bool:
    """Make this writer's records use the fast checksum (same bytes); False when not applicable.

    Only the one writer object is changed (its record writer gets a ``write`` of its own), never
    tensorboard's module or class, and ``restore`` takes it away again.
    """
    record_writer = _record_writer(writer)
    if record_writer is None or "write" in vars(record_writer):
        return False
    out = record_writer._writer  # the open file

    def write(data: bytes) -> None:
        out.write(_record(data))

    record_writer.write = write
    return True


def restore(writer: Any) -> None:
    """Undo ``speed_up`` (no-op when it was not applied)."""
    record_writer = _record_writer(writer)
    if record_writer is not None:
        vars(record_writer).pop("write", None)


# --------------------------------------------------------------------------- reading
class CorruptRecordError(ValueError):
    """A record whose length or data fails its checksum: nothing after it in the file can be
    trusted to start where a record starts. ``offset`` is the record's first byte."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


def read_records(stream: BinaryIO, size: int) -> Iterator[bytes]:
    """The payload of each record of an event file, in order, read from ``stream`` (``size``
    bytes long, as ``fstat`` gave it when it was opened).

    Stops at a truncated last record (its length or data not all there yet); raises
    :class:`CorruptRecordError` at a checksum that does not match. A record's length is trusted
    only once its checksum matches, and never beyond the bytes left in the file, so no read is
    larger than the file.
    """
    offset = 0
    while True:
        header = stream.read(12)
        if len(header) < 12:
            return
        length_bytes, (length_crc,) = header[:8], struct.unpack("<I", header[8:])
        if masked_crc32c(length_bytes) != length_crc:
            raise CorruptRecordError(f"the length of the record at byte {offset} fails its checksum", offset)
        (length,) = struct.unpack("<Q", length_bytes)
        if length + 16 > size - offset:
            return  # not all written yet
        body = stream.read(length + 4)
        if len(body) < length + 4:
            return
        data, (data_crc,) = body[:length], struct.unpack("<I", body[length:])
        if masked_crc32c(data) != data_crc:
            raise CorruptRecordError(f"the data of the record at byte {offset} fails its checksum", offset)
        yield data
        offset += length + 16
