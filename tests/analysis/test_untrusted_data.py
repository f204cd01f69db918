"""Untrusted data, log directories and names (issue 29, its data half): each hostile case builds
its input in tmp_path, shows the payload would act without the defence, and that it does not.

Payloads only write a marker file in tmp_path. A case that could hang runs in a child with a
timeout; one that could grow, in a child under an address-space limit (``run_limited``).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from introspect.analysis.data import PEAK_MEMORY, PREVIEW_SIDE, image_facts, image_folder, inspect_data
from introspect.analysis.health_map_render import MAX_ROWS, HealthMap, health_map_from_events
from introspect.cli.commands import main
from introspect.debugger.alerts import Alert
from introspect.errors import ConfigError, LoadError
from introspect.load.files import NotRegularFileError, open_regular, read_image, scan_logdir
from introspect.load.model_inputs import image_batches
from introspect.records.eventfile import masked_crc32c
from introspect.terminal import escape, format_table
from tests.support.saved_models import cli_env, run_limited

# --------------------------------------------------------------------------- helpers
EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 8 8
newpath 0 0 moveto 8 8 lineto stroke
showpage
%%EOF
"""


def write_images(folder: Path, n: int, seed: int, side: int = 8) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def fake_ghostscript(tmp_path: Path) -> tuple[Path, Path]:
    """A ``gs`` that only writes a marker: ``(its path, the marker)``."""
    marker = tmp_path / "ghostscript_ran"
    gs = tmp_path / "bin" / "gs"
    gs.parent.mkdir(exist_ok=True)
    gs.write_text(f"#!/bin/sh\necho ran > {marker}\nexit 1\n")
    gs.chmod(0o755)
    return gs, marker


def record(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", masked_crc32c(header)) + payload + struct.pack("<I", masked_crc32c(payload))


def event(step: int = 0, histograms=(), scalars=(), start: bool = False) -> bytes:
    """One event record: ``histograms`` are (tag, sum_squares, num), ``scalars`` (tag, value)."""
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog
    from tensorboard.compat.proto.summary_pb2 import HistogramProto, Summary

    values = [
        Summary.Value(tag=t, histo=HistogramProto(min=-1.0, max=1.0, num=n, sum=0.0, sum_squares=sq))
        for t, sq, n in histograms
    ] + [Summary.Value(tag=t, simple_value=v) for t, v in scalars]
    e = Event(wall_time=1.0, step=step, summary=Summary(value=values))
    if start:
        e = Event(wall_time=1.0, step=step, session_log=SessionLog(status=SessionLog.START))
    return record(e.SerializeToString())


def event_file(path: Path, *records: bytes) -> Path:
    from tensorboard.compat.proto.event_pb2 import Event

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(record(Event(wall_time=1.0, file_version="brain.Event:2").SerializeToString()) + b"".join(records))
    return path


def blocks_a_plain_open(path: Path) -> bool:
    """Whether a plain ``open(path).read()`` waits forever (what Pillow or tensorboard would do)."""
    code = f"import sys; print('opening', flush=True); open({str(path)!r}, 'rb').read(1); print('read')"
    try:
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return "opening" in out and "read" not in out.replace("opening", "")
    return False


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """``introspect ARGS`` in a child (a hang is a TimeoutExpired, not a stuck suite)."""
    return subprocess.run(
        [sys.executable, "-m", "introspect", *args], capture_output=True, text=True, env=cli_env(), timeout=timeout
    )


# --------------------------------------------------------------------------- EPS: Ghostscript never starts
def test_an_eps_file_named_png_would_start_ghostscript(tmp_path, monkeypatch):
    """The payload acts without the allowlist: Pillow takes the .png for EPS and runs ``gs``."""
    from PIL import EpsImagePlugin

    gs, marker = fake_ghostscript(tmp_path)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", str(gs))
    path = tmp_path / "cat.png"
    path.write_bytes(EPS)
    with Image.open(path) as image:
        assert image.format == "EPS"
        with pytest.raises(Exception):  # noqa: B017 - our gs writes no picture: Pillow fails after running it
            image.load()
    assert marker.exists()


def test_no_eps_is_read_and_no_process_starts(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    gs, marker = fake_ghostscript(tmp_path)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", str(gs))
    started = []
    real_popen_init = subprocess.Popen.__init__

    def recording(self, *args, **kwargs):
        started.append(args[0] if args else kwargs.get("args"))
        return real_popen_init(self, *args, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", recording)
    root = tmp_path / "data"
    write_images(root / "cat", 2, seed=0)
    write_images(root / "dog", 2, seed=1)
    (root / "dog" / "2.png").write_bytes(EPS)
    with pytest.raises(OSError, match="cannot identify image file .* as one of PNG, JPEG"):
        read_image(root / "dog" / "2.png")
    with pytest.raises(LoadError, match="cannot read image"):  # activations --images
        list(image_batches([root / "dog" / "2.png"], batch_size=1))
    report = inspect_data(image_folder(root), tmp_path / "run", show_progress=False, verbose=False)
    assert [a.kind for a in report.alerts] == ["data_unreadable"] and report.samples == 4
    assert not marker.exists() and started == []


# --------------------------------------------------------------------------- memory bounded by the grid, not the images
def test_statistics_from_8_bit_pixels_equal_the_full_float_ones(tmp_path):
    """image_facts never makes the full float image, yet its sums are those of ToTensor's floats;
    only the preview is downscaled (to PREVIEW_SIDE)."""
    from torchvision.transforms.functional import to_tensor

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (300, 700, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.png")
    facts = image_facts(tmp_path / "big.png")

    def sums(x: torch.Tensor) -> torch.Tensor:
        x = x.double().flatten(1)
        return torch.stack([x.sum(1), x.square().sum(1), x.amin(1), x.amax(1)])

    exact = sums(torch.from_numpy(pixels).permute(2, 0, 1).double() / 255)
    torch.testing.assert_close(facts.sums, exact, rtol=1e-12, atol=0)
    torch.testing.assert_close(facts.sums, sums(to_tensor(Image.fromarray(pixels))), rtol=1e-6, atol=0)  # float32's
    assert facts.shape == (3, 300, 700)
    assert max(facts.preview.shape[1:]) == PREVIEW_SIDE and facts.preview.dtype == torch.float32


def test_previews_of_any_dataset_are_kept_downscaled(tmp_path):
    """A user's own dataset of large tensors: the 64 kept previews are small copies."""
    images = torch.rand(3, 3, 600, 900)
    report = inspect_data((images, torch.tensor([0, 1, 0])), tmp_path / "run", show_progress=False, verbose=False)
    assert report.image_shape == (3, 600, 900) and report.samples == 3
    mean = images.double().mean(dim=(0, 2, 3))
    assert [c.mean for c in report.channels] == pytest.approx(mean.tolist(), rel=1e-9)

    from introspect.analysis.data import _Scan

    scan = _Scan(None, 3)
    for i, x in enumerate(images):
        scan.add(i, x, None)
    assert all(max(p.shape[1:]) <= PREVIEW_SIDE for _, p, _ in scan.preview)


@pytest.mark.slow
def test_data_on_four_4096_pngs_stays_under_its_memory_bound(tmp_path):
    """Four 4096x4096 PNGs (a few hundred KB) peaked at 5.8 GB: float32 previews at full size. Now
    under PEAK_MEMORY (1.5 GB, torch's own ~0.6 GB included), in a child under a 6 GB cap."""
    root = tmp_path / "data"
    for i in range(4):
        folder = root / ("a" if i < 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        x = np.zeros((4096, 4096, 3), np.uint8)
        x[:, :, i % 3] = 40 * (i + 1)
        x[i * 100 : i * 100 + 50, :50] = 255
        Image.fromarray(x).save(folder / f"{i}.png", compress_level=9)
    assert sum(p.stat().st_size for p in root.rglob("*.png")) < 400_000
    code = (
        "from introspect.cli import main\n"
        f"try:\n    main(['data', {str(root)!r}, '--logdir', {str(tmp_path / 'run')!r}])\n"
        "except SystemExit as e:\n    print('exit', e.code)\n"
    )
    result = run_limited(code, address_space=6 * 2**30, timeout=600)
    assert "exit 0" in result["stdout"], (result["stdout"], result["stderr"][-2000:])
    assert "no problems found in 4 images (3x4096x4096, float32)" in result["stdout"]
    assert result["peak_rss"] < PEAK_MEMORY, f"peak {result['peak_rss'] / 2**30:.2f} GB"


# --------------------------------------------------------------------------- special files: nothing blocks
def test_open_regular_refuses_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    (tmp_path / "link.png").symlink_to(fifo)
    assert blocks_a_plain_open(tmp_path / "link.png")  # what the payload does to a plain reader
    for path in (fifo, tmp_path / "link.png", tmp_path):
        with pytest.raises(NotRegularFileError, match="not a regular file"):
            open_regular(path)
    with pytest.raises(NotRegularFileError, match="a character device"):
        open_regular("/dev/zero")  # reads forever: never a file of a data set
    (tmp_path / "ok").write_bytes(b"x")
    with open_regular(tmp_path / "ok") as f:
        assert f.read() == b"x"


@pytest.mark.slow
def test_data_with_a_fifo_and_a_link_to_one_finishes_with_a_finding(tmp_path):
    root = tmp_path / "data"
    write_images(root / "cat", 2, seed=0)
    write_images(root / "dog", 2, seed=1)
    os.mkfifo(tmp_path / "pipe")
    (root / "cat" / "9.png").symlink_to(tmp_path / "pipe")
    os.mkfifo(root / "dog" / "9.png")
    assert blocks_a_plain_open(root / "cat" / "9.png")
    result = cli("data", str(root), "--logdir", str(tmp_path / "run"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "data_unreadable" in result.stdout and "a FIFO, not a regular file" in result.stdout


@pytest.mark.slow
def test_images_with_a_link_to_a_fifo_is_one_error(tmp_path):
    """``activations --images``: the image reader in a child, as the command runs it."""
    root = tmp_path / "images"
    write_images(root, 2, seed=0)
    os.mkfifo(tmp_path / "pipe")
    (root / "2.png").symlink_to(tmp_path / "pipe")
    code = (
        "from introspect.load.model_inputs import image_batches, image_files\n"
        f"try:\n    list(image_batches(image_files({str(root)!r}), 4))\n"
        "except Exception as e:\n    print(f'{type(e).__name__}: {e}')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert result.stdout.startswith("LoadError: cannot read image") and "a FIFO" in result.stdout, result


@pytest.mark.slow
def test_map_with_a_fifo_named_like_an_event_file_finishes(tmp_path):
    run = tmp_path / "run"
    event_file(run / "events.out.tfevents.1.a", event(0, [("activations/fc", 4.0, 4)]))
    os.mkfifo(run / "events.out.tfevents.2.b")
    assert blocks_a_plain_open(run / "events.out.tfevents.2.b")
    result = cli("map", str(run), "--out", str(tmp_path / "map.png"), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "warning: skipped" in result.stderr and "a FIFO" in result.stderr
    assert "1 modules x 1 logging steps" in result.stderr


def test_a_broken_link_in_a_data_folder_is_a_finding(tmp_path):
    root = tmp_path / "data"
    write_images(root / "cat", 2, seed=0)
    write_images(root / "dog", 2, seed=1)
    (root / "dog" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    report = inspect_data(image_folder(root), tmp_path / "run", show_progress=False, verbose=False)
    assert [a.kind for a in report.alerts] == ["data_unreadable"]
    assert "FileNotFoundError" in report.alerts[0].message


# --------------------------------------------------------------------------- board: links leaving the logdir
def test_board_refuses_a_logdir_with_a_link_out_of_it(tmp_path):
    """tensorboard follows links: its walk finds a run outside the logdir through one (a link to
    ``/`` made it read the whole filesystem). ``introspect board`` refuses before starting it."""
    from tensorboard.backend.event_processing.io_wrapper import GetLogdirSubdirectories

    outside = tmp_path / "outside"
    event_file(outside / "events.out.tfevents.1.x")
    logdir = tmp_path / "logs"
    event_file(logdir / "run" / "events.out.tfevents.1.x")
    (logdir / "escape").symlink_to(outside)
    assert str(logdir / "escape") in set(GetLogdirSubdirectories(str(logdir)))  # it would go there
    result = CliRunner().invoke(main, ["board", "--logdir", str(logdir), "--port", "0"])
    assert result.exit_code == 1 and result.stdout == ""  # no URL: nothing served
    assert result.stderr.startswith(f"error: not serving {logdir}: {logdir / 'escape'} -> {outside}: leads outside")
    (logdir / "escape").unlink()
    (logdir / "root").symlink_to("/")
    (logdir / "run" / "loop").symlink_to("..")
    refused = scan_logdir(logdir).refused
    assert [line.split(" -> ")[0] for line in refused] == [str(logdir / "root"), str(logdir / "run" / "loop")]
    assert "a loop" in refused[1]


def test_board_says_the_port_is_taken(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["board", "--logdir", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() == (
        f"error: port {port} on 127.0.0.1 is taken (another TensorBoard?); give another --port, or --port 0 for a free one"
    )


# --------------------------------------------------------------------------- linear time and memory
@pytest.mark.slow
def test_a_zip_with_80k_copies_of_one_name_is_refused_at_once(tmp_path):
    """``list.count`` per member took 57 s on this file; a Counter takes a pass."""
    import warnings

    path = tmp_path / "dup.pt"
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        warnings.simplefilter("ignore")  # "Duplicate name": the payload
        for _ in range(80_000):
            z.writestr("archive/data.pkl", b"")
    code = (
        "from pathlib import Path\nfrom introspect.load.formats import detect_format\n"
        f"try:\n    detect_format(Path({str(path)!r}))\nexcept Exception as e:\n    print(e)\n"
    )
    result = run_limited(code, timeout=60)
    assert "holds 'archive/data.pkl' more than once" in result["stdout"], result


def hostile_logdir(root: Path, tags: int = 20_000, files: int = 1) -> Path:
    """``tags`` histogram tags (half activations, half gradients) at step 0 in one file, or one
    event in each of ``files`` files."""
    if files > 1:
        for i in range(files):
            event_file(
                root / f"events.out.tfevents.{1_000_000 + i}.host",
                event(i, [("activations/fc", 1.0, 4), ("activation_grads/fc", 1.0, 4)]),
            )
        return root
    half = tags // 2
    records = [event(0, [(f"activations/m{i}", 1.0, 4)]) for i in range(half)]
    records += [event(0, [(f"activation_grads/m{i}", 1.0, 4)]) for i in range(half)]
    event_file(root / "events.out.tfevents.1.host", *records)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("tags, files, shape", [(20_000, 1, "10000 modules x 1"), (0, 5000, "1 modules x 400")])
def test_map_of_a_large_logdir_is_linear_and_bounded(tmp_path, tags, files, shape):
    """20,000 tags (2.5 MB) took 96 s and 1.4 GB per statistic; 5,000 one-event files 50 s."""
    logdir = hostile_logdir(tmp_path / "run", tags, files)
    code = (
        "from introspect.cli import main\n"
        f"try:\n    main(['map', {str(logdir)!r}, '--stat', 'grad_rms', '--out', {str(tmp_path / 'm.png')!r}])\n"
        "except SystemExit as e:\n    print('exit', e.code)\n"
    )
    result = run_limited(code, address_space=6 * 2**30, timeout=300)
    assert "exit 0" in result["stdout"], (result["stdout"], result["stderr"][-2000:])
    assert shape in result["stderr"]
    assert result["peak_rss"] < 1.5 * 2**30, f"peak {result['peak_rss'] / 2**30:.2f} GB"
    with Image.open(tmp_path / "m.png") as image:
        assert image.size[1] < 4100  # at most MAX_ROWS rows drawn


def test_a_map_of_many_modules_draws_max_rows_and_every_finding():
    hm = HealthMap()
    rows = [f"block{i}.conv" for i in range(MAX_ROWS * 3)]
    hm.add_values(0, {"grad_rms": {r: 1.0 for r in rows}}, rows)
    hm.add_findings([Alert("vanishing_gradient", rows[-1], 0, "x"), Alert("dead_units", rows[1], 0, "y")])
    drawn = hm.drawn_rows()
    assert len(drawn) == MAX_ROWS and {1, len(rows) - 1} <= set(drawn) and drawn == sorted(drawn)
    assert hm.matrix("grad_rms").shape == (len(rows), 1)  # the data keeps every row
    image = hm.render("grad_rms")
    assert image.shape[0] < 4100
    assert len(HealthMap(max_rows=10).drawn_rows()) == 0
    with pytest.raises(ConfigError, match="max_rows"):
        HealthMap(max_rows=0)


def test_a_scalar_of_another_name_is_no_row(tmp_path):
    """``nonfinite/max_logit_heads/fc`` is not a module: it made ``map`` draw such rows."""
    event_file(
        tmp_path / "run" / "events.out.tfevents.1.x",
        event(0, [("activations/fc", 4.0, 4)], [("nonfinite/max_logit_heads/fc", 3.0), ("nonfinite/fc", 2.0)]),
        event(0, scalars=[("update_ratio/not_a_module.weight", 0.1), ("update_ratio/fc.weight", 0.01)]),
    )
    hm = health_map_from_events(tmp_path / "run")
    assert hm.rows == ["fc"]
    assert hm.matrix("nonfinite").tolist() == [[2.0]] and hm.matrix("update_ratio").tolist() == [[pytest.approx(0.01)]]


def test_the_event_reader_agrees_with_tensorboard_on_a_restarted_run(tmp_path):
    """A START at step 3 (a run resumed from a checkpoint) drops the older steps >= 3, as
    TensorBoard's EventAccumulator does; the newer values of those steps are kept."""
    from tests.support.events import read_events

    run = tmp_path / "run"
    first = [event(s, [("activation_grads/fc", float(s + 1), 1)]) for s in range(6)]
    resumed = [event(3, start=True)] + [event(s, [("activation_grads/fc", 100.0 + s, 1)]) for s in (3, 4)]
    event_file(run / "events.out.tfevents.1.a", *first)
    event_file(run / "events.out.tfevents.2.b", *resumed)
    hm = health_map_from_events(run)
    acc = read_events(run)
    expected = {e.step: e.histogram_value.sum_squares**0.5 for e in acc.Histograms("activation_grads/fc")}
    assert hm.steps == sorted(expected) == [0, 1, 2, 3, 4]
    assert hm.matrix("grad_rms")[0].tolist() == pytest.approx([expected[s] for s in hm.steps])


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda d: d.mkdir() or d.joinpath("events.out.tfevents.1.x").mkdir(), "no TensorBoard event files"),
        (
            lambda d: (
                event_file(d / "events.out.tfevents.1.x")
                .open("ab")
                .write(struct.pack("<Q", 2**63) + struct.pack("<I", masked_crc32c(struct.pack("<Q", 2**63))))
            ),
            "not a run watch() wrote",
        ),
        (lambda d: d.mkdir() or d.joinpath("events.out.tfevents.1.x").write_bytes(os.urandom(4000)), "fails its"),
        (lambda d: event_file(d / "events.out.tfevents.1.x", record(b"\xff" * 64)), "not a TensorBoard event"),
    ],
    ids=["a directory", "a length of 2**63", "random bytes", "not an Event"],
)
def test_a_bad_event_file_is_one_line_and_exit_3(tmp_path, make, words):
    """These printed a raw IsADirectoryError, MemoryError or OverflowError."""
    make(tmp_path / "run")
    result = CliRunner().invoke(main, ["map", str(tmp_path / "run"), "--out", str(tmp_path / "m.png")])
    assert result.exit_code == 3, result.output
    assert words in result.stderr and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1].startswith("error: ")


# --------------------------------------------------------------------------- names reach the terminal escaped
def test_escape_shows_every_control_character():
    assert escape("cat\x1b]0;owned\x07\nno problems found") == "cat\\x1b]0;owned\\x07\\nno problems found"
    assert escape("a\tb\rc\x7f\x9b\u202e\u2028") == "a\\tb\\rc\\x7f\\x9b\\u202e\\u2028"
    assert escape(os.fsdecode(b"caf\xe9")) == "caf\\xe9"  # an undecodable byte, not a UnicodeEncodeError
    assert escape("résumé 猫 🐈") == "résumé 猫 🐈"
    assert format_table(["name"], [["x\ny"]]).splitlines() == ["name", "x\\ny"]


def test_a_class_folder_cannot_write_to_the_terminal_or_forge_a_line(tmp_path):
    root = tmp_path / "data"
    forged = "dog\x1b]0;owned\x07\x1b[2J\nintrospect: no problems found"
    write_images(root / "cat", 2, seed=0)
    write_images(root / forged, 2, seed=1)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cat" / "black.png")  # a real finding
    assert forged in os.listdir(root)  # the name reaches us as it is
    result = CliRunner().invoke(main, ["data", str(root), "--logdir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert not any(line.startswith("introspect: no problems found") for line in result.stdout.splitlines())
    assert "dog\\x1b]0;owned\\x07\\x1b[2J\\nintrospect: no problems found 2" in result.stdout


def test_tensor_names_in_weights_are_escaped(tmp_path):
    name = "fc\x1b[2J\x1b]52;c;cm0gLXJmIH4=\x07\nweight"
    torch.save({name: torch.ones(2, 2), "fc.bias": torch.zeros(2)}, tmp_path / "w.pt")
    assert name in torch.load(tmp_path / "w.pt", weights_only=True)
    result = CliRunner().invoke(main, ["weights", str(tmp_path / "w.pt")])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "fc\\x1b[2J\\x1b]52;c;cm0gLXJmIH4=\\x07\\nweight" in result.stdout


def test_an_error_naming_a_file_is_one_escaped_line(tmp_path):
    result = CliRunner().invoke(main, ["weights", str(tmp_path / "a\x1b[31m\nb.pt")])
    assert result.exit_code == 3
    assert result.stderr.count("\n") == 1 and "\x1b" not in result.stderr and "a\\x1b[31m" in result.stderr


def test_a_dollar_in_a_class_folder_does_not_fail_the_pictures(tmp_path):
    """Two ``$`` make matplotlib parse a label as TeX; a bad one failed ``introspect data``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    name = "a$\\frac$"
    figure = Figure()
    figure.text(0, 0, name)
    with pytest.raises(ValueError, match="frac"):
        FigureCanvasAgg(figure).draw()  # what the payload does to a label taken as it is
    root = tmp_path / "data"
    write_images(root / name, 2, seed=0)
    write_images(root / "b", 2, seed=1)
    result = CliRunner().invoke(main, ["data", str(root), "--logdir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert f"classes: {name} 2, b 2" in result.stdout
