"""The fast record checksums: the same bytes as tensorboard's own writer, read back by TensorBoard."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import (
    masked_crc32c as tb_masked_crc32c,
)
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from introspect import watch
from introspect.records import eventfile
from tests.support import QUIET
from tests.support.events import hist_at, read_events


@pytest.mark.parametrize(
    "n",
    [
        0,
        1,
        7,
        8,
        63,
        64,
        65,
        eventfile.BLOCK - 1,
        eventfile.BLOCK,
        eventfile.BLOCK + 1,
        3 * eventfile.BLOCK + 17,
        20_000,
    ],
)
def test_checksum_matches_tensorboard(n):
    data = random.Random(n).randbytes(n)
    assert eventfile.masked_crc32c(data) == tb_masked_crc32c(data)
    # both implementations, whichever crc32c() picks here
    assert eventfile._crc32c_numpy(data) == eventfile._crc32c_bytes(data)


def test_known_crc32c_value():
    # RFC 3720, B.4: 32 bytes of zeros
    assert eventfile._crc32c_numpy(bytes(32)) == eventfile._crc32c_bytes(bytes(32)) == 0x8A9136AA
    assert eventfile._crc32c_numpy(b"123456789" * 100) == eventfile._crc32c_bytes(b"123456789" * 100)


def _records(path: Path) -> list[bytes]:
    """Each record's raw bytes (header, its CRC, payload, its CRC)."""
    data = path.read_bytes()
    out, i = [], 0
    while i < len(data):
        length = int.from_bytes(data[i : i + 8], "little")
        out.append(data[i : i + 16 + length])
        i += 16 + length
    return out


def test_sped_up_writer_writes_the_same_bytes(tmp_path):
    writers = {k: SummaryWriter(str(tmp_path / k)) for k in ("plain", "fast")}
    assert eventfile.speed_up(writers["fast"])
    assert not eventfile.speed_up(writers["fast"])  # once
    counts = [float(c) for c in range(32)]
    for w in writers.values():
        for step in range(3):
            w.add_histogram_raw(
                "h",
                min=0.0,
                max=1.0,
                num=496,
                sum=10.0,
                sum_squares=5.0,
                bucket_limits=[i / 32 for i in range(1, 33)],
                bucket_counts=counts,
                global_step=step,
                walltime=1000.0 + step,
            )
            w.add_scalar("s", step * 0.5, step, walltime=1000.0 + step)
        w.flush()
    files = {k: next((tmp_path / k).glob("events.out.tfevents.*")) for k in writers}
    plain, fast = _records(files["plain"]), _records(files["fast"])
    # The first record (file_version) carries the wall time of the writer's creation.
    assert len(plain) == len(fast) == 7
    assert plain[1:] == fast[1:]
    eventfile.restore(writers["fast"])
    assert "write" not in vars(writers["fast"].file_writer.event_writer._async_writer._writer)
    for w in writers.values():
        w.close()
    acc = read_events(tmp_path / "fast")
    assert [e.step for e in acc.Histograms("h")] == [0, 1, 2]


def test_watch_speeds_up_its_writer_and_restores_it(tmp_path):
    model = nn.Sequential(nn.Linear(4, 300), nn.ReLU(), nn.Linear(300, 1))
    writer = SummaryWriter(str(tmp_path))
    record_writer = writer.file_writer.event_writer._async_writer._writer
    with watch(model, writer, every=1, **QUIET):
        assert "write" in vars(record_writer)
        for _ in range(2):
            model(torch.randn(8, 4)).sum().backward()
    assert "write" not in vars(record_writer)
    writer.close()
    acc = read_events(tmp_path)  # TensorBoard's reader checks every CRC
    assert hist_at(acc, "activations/0", 1).num == 8 * 300
    assert hist_at(acc, "weights/0.weight", 0).num == 4 * 300


def test_other_writers_are_left_alone():
    class Custom:
        pass

    assert not eventfile.speed_up(Custom())
    eventfile.restore(Custom())


def test_native_package_is_used_when_installed():
    native = eventfile._native()
    if native is None:
        pytest.skip("neither crc32c nor google-crc32c is installed (the numpy path is tested above)")
    data = os.urandom(5000)
    assert native(data) == eventfile._crc32c_bytes(data)
