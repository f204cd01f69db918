"""The ``introspect`` command, through click's CliRunner and through the installed console script."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from introspect import LoadError
from introspect.cli.commands import main
from tests.support.events import read_events
from tests.support.saved_models import (
    FORMATS,
    MODEL_FORMATS,
    RESNET_ARCH,
    RESNET_PARAMS,
    SEED_ARCH,
    SEED_PARAMS,
    RefusesTracing,
    cli_env,
    console_script,
    save_as,
    save_code_running_pickle,
    seed_cnn,
)

SHAPE = ["--input-shape", "1,3,32,32"]


def run(*args: object):
    """``introspect ARGS`` in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(main, [str(a) for a in args])


def arch_for(fmt: str) -> list[str]:
    if fmt == "export":
        return []
    # a pickled module, and TorchScript run as it is, run the file's code: --unsafe
    return ["--unsafe"] if fmt in ("pickled", "torchscript", "traced") else ["--arch", SEED_ARCH]


def assert_one_line_error(result, code: int, message: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0], lines[0]


# --------------------------------------------------------------------------- summary, every format
@pytest.mark.parametrize("fmt", FORMATS)
def test_summary_of_every_format(saved, fmt):
    files, _ = saved
    result = run("summary", files[fmt], *SHAPE, *arch_for(fmt))
    assert result.exit_code == 0, result.output
    assert f"Total params: {SEED_PARAMS}" in result.stdout
    assert result.stderr == ""


def test_summary_depth_and_dtype(saved):
    files, _ = saved
    shallow = run("summary", files["state_dict"], *SHAPE, "--arch", SEED_ARCH, "--depth", "0")
    assert shallow.exit_code == 0 and "Conv2d" not in shallow.stdout and SEED_PARAMS in shallow.stdout
    double = run("summary", files["state_dict"], *SHAPE, "--arch", SEED_ARCH, "--dtype", "float64")
    assert double.exit_code == 0 and "[1, 3, 32, 32]" in double.stdout


@pytest.fixture(scope="module")
def saved_resnet(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resnet")
    torch.manual_seed(0)
    import torchvision

    model = torchvision.models.resnet18(weights=None).eval()
    example = torch.randn(1, 3, 64, 64)
    return {fmt: save_as(model, fmt, folder, example) for fmt in FORMATS}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_summary_of_resnet18_in_every_format(saved_resnet, fmt):
    extra = [] if fmt == "export" else (["--unsafe"] if fmt in ("pickled", *MODEL_FORMATS) else ["--arch", RESNET_ARCH])
    result = run("summary", saved_resnet[fmt], "--input-shape", "1,3,64,64", "--depth", "1", *extra)
    assert result.exit_code == 0, result.output
    assert f"Total params: {RESNET_PARAMS}" in result.stdout


# --------------------------------------------------------------------------- refusing pickles
def test_pickled_module_is_refused_without_unsafe(saved):
    files, _ = saved
    result = run("summary", files["pickled"], *SHAPE)
    assert_one_line_error(result, 4, "unpickling runs arbitrary code")
    assert "--unsafe" in result.stderr


def test_code_running_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    path = save_code_running_pickle(tmp_path / "evil.pt", marker)
    for command in (["summary", path, *SHAPE, "--arch", SEED_ARCH], ["weights", path]):
        assert_one_line_error(run(*command), 4, "refusing to load")
    assert not marker.exists()
    # The same file with --unsafe does run its code (so the refusal above is what kept it out).
    result = run("weights", path, "--unsafe")
    assert result.exit_code == 0 and marker.exists()


# --------------------------------------------------------------------------- bad input
@pytest.fixture
def bad_files(tmp_path, saved):
    files, _ = saved
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(files["state_dict"].read_bytes()[:3000])
    partial = tmp_path / "partial.pt"
    state = seed_cnn().state_dict()
    del state["linear2.weight"]
    torch.save(state, partial)
    return {"missing": tmp_path / "missing.pt", "corrupt": corrupt, "partial": partial, **files}


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["summary", "{missing}", *SHAPE, "--arch", SEED_ARCH], 3, "no such file"),
        (["summary", "{corrupt}", *SHAPE, "--arch", SEED_ARCH], 3, "truncated or corrupt"),
        (["summary", "{state_dict}", *SHAPE], 5, "holds only weights"),
        (["summary", "{state_dict}", *SHAPE, "--arch", "examples.models:SeedCN"], 5, "did you mean SeedCNN"),
        (["summary", "{state_dict}", *SHAPE, "--arch", "torchvision:resnet1"], 5, "torchvision has no model 'resnet1'"),
        (["summary", "{partial}", *SHAPE, "--arch", SEED_ARCH], 6, "1 missing key (linear2.weight)"),
        (
            ["summary", "{state_dict}", "--input-shape", "1,1,32,32", "--arch", SEED_ARCH],
            7,
            "rejected an input of shape [1, 1, 32, 32] float32",
        ),
        (
            ["graph", "{torchscript}", "--input-shape", "1,3,8,8", "--logdir", "{tmp}", "--unsafe"],
            7,
            "rejected an input",
        ),
        (
            ["activations", "{export}", "--input-shape", "2,3,32,32", "--logdir", "{tmp}"],
            7,
            "to be equal to 1, but got 2",
        ),
        (
            ["activations", "{torchscript}", *SHAPE, "--logdir", "{tmp}", "--unsafe"],
            1,
            "TorchScript model runs its layers in C++",
        ),
        (
            [
                "activations",
                "{state_dict}",
                *SHAPE,
                "--arch",
                SEED_ARCH,
                "--logdir",
                "{tmp}",
                "--backward",
                "--target",
                "4",
            ],
            1,
            "target 4 is out of range",
        ),
        (
            ["activations", "{state_dict}", "--input", "{state_dict}", "--arch", SEED_ARCH, "--logdir", "{tmp}"],
            3,
            "expected a tensor or a tuple of tensors",
        ),
        (
            ["activations", "{state_dict}", "--images", "{tmp}", "--arch", SEED_ARCH, "--logdir", "{tmp}"],
            3,
            "no images",
        ),
    ],
    ids=[
        "missing",
        "corrupt",
        "no-arch",
        "unknown-class",
        "unknown-torchvision",
        "keys",
        "shape",
        "graph-shape",
        "export-shape",
        "torchscript-activations",
        "target",
        "input-file",
        "no-images",
    ],
)
def test_bad_input_is_one_line_and_its_exit_code(bad_files, tmp_path, args, code, message):
    values = {**{k: str(v) for k, v in bad_files.items()}, "tmp": str(tmp_path)}
    result = run(*[a.format(**values) for a in args])
    assert_one_line_error(result, code, message)
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["summary", "x.pt", "--input-shape", "1,three"], "comma-separated positive integers"),
        (["summary", "x.pt", *SHAPE, "--arch-kwargs", "{num_classes: 3}"], "not valid JSON"),
        (["summary", "x.pt", *SHAPE, "--arch-kwargs", "[1]"], "expected a JSON object"),
        (["activations", "x.pt", "--logdir", "d"], "give exactly one of --input-shape, --input or --images"),
        (["weights", "a.pt", "b.pt", "c.pt"], "give one MODEL, or two to compare"),
    ],
)
def test_usage_errors_exit_2(args, message):
    result = run(*args)
    assert result.exit_code == 2 and message in result.stderr and "Traceback" not in result.output


def test_debug_shows_the_traceback(tmp_path):
    result = run("summary", tmp_path / "missing.pt", *SHAPE, "--arch", SEED_ARCH, "--debug")
    assert isinstance(result.exception, LoadError)  # not caught: click's runner holds the raised error


def test_untraceable_graph_is_a_module_graph_and_a_note(tmp_path):
    torch.save(RefusesTracing().state_dict(), tmp_path / "m.pt")
    result = run(
        "graph",
        tmp_path / "m.pt",
        "--arch",
        "tests.support.saved_models:RefusesTracing",
        "--input-shape",
        "2,4",
        "--logdir",
        tmp_path / "run",
    )
    assert result.exit_code == 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("introspect: note: module-level graph written"), lines
    assert "tracing RefusesTracing failed" in lines[0]
    assert [n.name for n in read_events(tmp_path / "run").Graph().node] == ["input/0", "RefusesTracing/fc", "output/0"]


# --------------------------------------------------------------------------- graph, weights
@pytest.mark.parametrize("fmt", ["checkpoint", "export"])
def test_graph_is_written(saved, tmp_path, fmt):
    files, _ = saved
    result = run("graph", files[fmt], *SHAPE, *arch_for(fmt), "--logdir", tmp_path)
    assert result.exit_code == 0, result.output
    graph = read_events(tmp_path).Graph()
    names = " ".join(n.name for n in graph.node)
    assert "conv1" in names and "linear2" in names


def test_weights_table_and_histograms(saved, tmp_path):
    files, _ = saved
    model = seed_cnn()
    result = run("weights", files["safetensors"], "--logdir", tmp_path)
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if line.startswith("conv1.weight "))
    w = model.conv1.weight.detach().double()
    cells = row.split()
    assert cells[1:5] == ["[32,", "3,", "3,", "3]"]
    assert [float(c) for c in cells[5:9]] == pytest.approx(
        [float(w.mean()), float(w.std(correction=0)), float(w.min()), float(w.max())], rel=1e-3
    )
    assert cells[9:] == ["0.0%", "0"]
    assert "8 tensors, 54,273 values" in result.stdout
    tags = set(read_events(tmp_path).Tags()["histograms"])
    assert tags == {f"weights/{n}" for n, _ in model.named_parameters()}


def test_weights_of_two_checkpoints(tmp_path):
    model = seed_cnn()
    torch.save(model.state_dict(), tmp_path / "a.pt")
    with torch.no_grad():
        model.linear2.weight.mul_(1.5)
    torch.save({"model": model.state_dict()}, tmp_path / "b.pt")
    result = run("weights", tmp_path / "a.pt", tmp_path / "b.pt", "--logdir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line and line.split()[0].count(".") == 1}
    assert "5.000e-01" in rows["linear2.weight"]
    assert "0.000e+00" in rows["conv1.weight"]
    assert "8 tensors compared, 1 changed; most: linear2.weight (5.000e-01 relative)" in result.stdout
    acc = read_events(tmp_path / "run")
    assert [e.step for e in acc.Histograms("weights/linear2.weight")] == [0, 1]


# --------------------------------------------------------------------------- activations
def test_activations_from_a_shape_with_backward(saved, tmp_path):
    files, _ = saved
    result = run(
        "activations",
        files["checkpoint"],
        "--arch",
        SEED_ARCH,
        "--input-shape",
        "4,3,32,32",
        "--batches",
        "2",
        "--backward",
        "--target",
        "0",
        "--logdir",
        tmp_path,
    )
    assert result.exit_code == 0, result.output
    assert "2 step(s) of 10 modules written" in result.stdout
    assert "introspect: no problems found in 2 steps" in result.stdout
    acc = read_events(tmp_path)
    tags = set(acc.Tags()["histograms"])
    assert {"activations/conv1", "activation_grads/linear1", "grads/conv2.weight"} <= tags
    assert [e.step for e in acc.Histograms("activations/relu")] == [0, 1]


def test_activations_from_images_and_a_tensor_file(saved, tmp_path):
    from examples.data import write_image_folder

    files, _ = saved
    write_image_folder(tmp_path / "images", n_per_class=5)
    result = run(
        "activations", files["export"], "--images", tmp_path / "images", "--batch-size", "1", "--logdir", tmp_path / "a"
    )
    assert result.exit_code == 0, result.output
    acc = read_events(tmp_path / "a")
    assert [e.step for e in acc.Histograms("activations/conv1")] == list(range(10))

    torch.save(torch.rand(3, 3, 32, 32), tmp_path / "x.pt")
    result = run(
        "activations",
        files["state_dict"],
        "--arch",
        SEED_ARCH,
        "--input",
        tmp_path / "x.pt",
        "--logdir",
        tmp_path / "b",
    )
    assert result.exit_code == 0, result.output
    assert read_events(tmp_path / "b").Histograms("activations/conv1")[0].histogram_value.num == 3 * 32 * 30 * 30


def test_activations_report_the_debuggers_findings(tmp_path):
    model = seed_cnn()
    with torch.no_grad():
        model.linear1.bias.fill_(-100.0)  # every ReLU unit after linear1 is dead
    torch.save(model.state_dict(), tmp_path / "dead.pt")
    result = run(
        "activations",
        tmp_path / "dead.pt",
        "--arch",
        SEED_ARCH,
        "--input-shape",
        "64,3,32,32",
        "--logdir",
        tmp_path / "run",
    )
    assert result.exit_code == 0, result.output
    assert "dead" in result.stdout and "relu" in result.stdout


# --------------------------------------------------------------------------- help, board
@pytest.mark.parametrize("command", ["summary", "graph", "weights", "activations", "board"])
def test_every_help_shows_an_example(command):
    result = run(command, "--help")
    assert result.exit_code == 0
    assert re.search(r"Examples?:\n\s+introspect " + command, result.stdout)
    assert "--debug" in result.stdout


# --------------------------------------------------------------------------- the console script
def script(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [console_script(), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=cli_env(), timeout=300
    )


@pytest.mark.slow
def test_console_script_round_trips_and_refuses(saved, tmp_path):
    files, _ = saved
    ok = script("summary", files["checkpoint"], *SHAPE, "--arch", SEED_ARCH, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert f"Total params: {SEED_PARAMS}" in ok.stdout

    marker = tmp_path / "marker.txt"
    evil = save_code_running_pickle(tmp_path / "evil.pt", marker)
    refused = script("summary", evil, *SHAPE, "--arch", SEED_ARCH, cwd=tmp_path)
    assert refused.returncode == 4
    assert refused.stderr.startswith("error: refusing to load") and len(refused.stderr.strip().splitlines()) == 1
    assert "Traceback" not in refused.stderr + refused.stdout
    assert not marker.exists()


@pytest.mark.slow
def test_console_script_reads_every_format_alike(saved, saved_resnet, tmp_path):
    """Pairs of formats compared by `introspect weights A B`: the same weights, no tensor changed."""
    files, _ = saved
    pairs = [
        ("state_dict", "safetensors"),
        ("checkpoint", "compiled_checkpoint"),
        ("torchscript", "export"),
        ("traced", "pickled"),
    ]
    for a, b in pairs:
        result = script("weights", files[a], files[b], "--arch", SEED_ARCH, "--unsafe", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "8 tensors compared, 0 changed" in result.stdout
    resnet = script("summary", saved_resnet["export"], "--input-shape", "1,3,64,64", "--depth", "1", cwd=tmp_path)
    assert resnet.returncode == 0, resnet.stderr
    assert f"Total params: {RESNET_PARAMS}" in resnet.stdout


@pytest.mark.slow
def test_console_script_bad_shape_and_python_dash_m(saved, tmp_path):
    files, _ = saved
    bad = script("summary", files["safetensors"], "--input-shape", "1,3,32", "--arch", SEED_ARCH, cwd=tmp_path)
    assert bad.returncode == 7 and "Traceback" not in bad.stderr
    assert "it expects [N, 3, H, W]" in bad.stderr
    debug = script(
        "summary", files["safetensors"], "--input-shape", "1,3,32", "--arch", SEED_ARCH, "--debug", cwd=tmp_path
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "InputShapeError" in debug.stderr
    version = subprocess.run(
        [sys.executable, "-m", "introspect", "--version"], capture_output=True, text=True, env=cli_env(), timeout=300
    )
    assert version.returncode == 0 and "introspect, version" in version.stdout


def test_installed_version_is_the_package_version():
    """pyproject.toml reads its version from ``introspect.__version__`` (one place): the installed
    distribution's metadata says the same as the package and ``introspect --version``."""
    import importlib.metadata

    import introspect

    assert importlib.metadata.version("torch-introspect") == introspect.__version__
    assert CliRunner().invoke(main, ["--version"]).output.strip() == f"introspect, version {introspect.__version__}"


@pytest.mark.slow
def test_board_prints_its_url_and_serves_it(tmp_path):
    proc = subprocess.Popen(
        [console_script(), "board", "--logdir", str(tmp_path), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=cli_env(),
        start_new_session=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url), url
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert proc.poll() is None, "tensorboard exited"
                assert time.monotonic() < deadline, f"nothing served at {url}"
                time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


# --------------------------------------------------------------------------- directories, unreadable files, refusals
def _unreadable(tmp_path: Path, kind: str) -> Path:
    if kind == "directory":
        (tmp_path / "model_dir").mkdir()
        return tmp_path / "model_dir"
    if kind == "socket":  # open() fails even for root
        import socket

        path = tmp_path / "model.sock"
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()
        return path
    if kind == "fifo":  # open() would wait for a writer forever
        path = tmp_path / "model.fifo"
        os.mkfifo(path)
        return path
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, path)
    path.chmod(0)
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("directory", "is a directory but not a Hugging Face save_pretrained folder"),
        ("socket", "is not a regular file"),
        ("fifo", "is not a regular file"),
        ("no-permission", "cannot read"),
    ],
)
def test_a_directory_or_unreadable_model_is_one_line_and_exit_3(saved, tmp_path, kind, message):
    files, _ = saved
    path = _unreadable(tmp_path, kind)
    for args in (
        ["summary", path, *SHAPE, "--arch", SEED_ARCH],
        ["weights", path],
        ["activations", files["state_dict"], "--arch", SEED_ARCH, "--input", path, "--logdir", tmp_path / "run"],
    ):
        assert_one_line_error(run(*args), 3, message)


def test_input_files_are_read_like_models(saved, tmp_path):
    files, _ = saved
    notes = tmp_path / "notes.txt"
    notes.write_text("the inputs are in the other folder\n")
    result = run(
        "activations", files["state_dict"], "--arch", SEED_ARCH, "--input", notes, "--logdir", tmp_path / "run"
    )
    assert_one_line_error(result, 3, "is not a file we can read")
    marker = tmp_path / "marker.txt"
    evil = save_code_running_pickle(tmp_path / "evil_input.pt", marker)
    result = run("activations", files["state_dict"], "--arch", SEED_ARCH, "--input", evil, "--logdir", tmp_path / "run")
    assert_one_line_error(result, 4, "pass --unsafe")
    assert not marker.exists()


class TensorByCall:
    """Unpickles to a tensor by calling ``torch.full``: harmless, but only ``weights_only=False``
    (``--unsafe``) reads it."""

    def __reduce__(self):
        return (torch.full, ((2, 3, 32, 32), 0.5))


@pytest.mark.parametrize("command", ["activations", "compare"])
def test_unsafe_applies_to_the_input_file_of_every_command(tmp_path, command):
    # compare used to read --input safely whatever --unsafe said; both now go through batches_from.
    model = tmp_path / "seed.pt"
    torch.save(seed_cnn().state_dict(), model)
    x = tmp_path / "x.pt"
    torch.save(TensorByCall(), x)
    args = (
        ["activations", model, "--logdir", tmp_path / "run"] if command == "activations" else ["compare", model, model]
    )
    refused = run(*args, "--arch", SEED_ARCH, "--input", x)
    assert_one_line_error(refused, 4, "pass --unsafe")
    read = run(*args, "--arch", SEED_ARCH, "--input", x, "--unsafe")
    assert read.exit_code == 0, read.output
    assert ("1 step(s)" if command == "activations" else "exactly equal") in read.stdout


def test_batches_from_takes_exactly_one_source(tmp_path):
    from introspect import ConfigError
    from introspect.load.model_inputs import InputSpec, batches_from

    with pytest.raises(ConfigError, match="exactly one"):
        InputSpec(shape=(1, 3, 32, 32), file=tmp_path / "x.pt")
    with pytest.raises(ConfigError, match="exactly one"):
        InputSpec()
    fed = batches_from(seed_cnn(), InputSpec(shape=(2, 3, 32, 32), dtype="float64"), unsafe=False, seed=3, count=2)
    assert fed.total == 2 and next(fed.model.parameters()).dtype == torch.float64
    first, second = (b[0] for b in fed.batches)
    assert first.dtype == torch.float64 and not torch.equal(first, second)  # seeds 3 and 4


@pytest.mark.parametrize(
    "content",
    [
        b"\x80\x02\x00\x00",  # a pickle header, then an opcode torch's weights-only unpickler does not know
        b"\x80\x02cposix\nsystem\nq\x00.",  # a global outside the allowlist
    ],
)
def test_weights_only_messages_never_advise_weights_only_false(tmp_path, content):
    path = tmp_path / "odd.pt"
    path.write_bytes(content)
    result = run("weights", path)
    assert result.exit_code in (3, 4)
    text = result.stderr.replace(str(path), "PATH")  # the test's own name holds "weights_only"
    assert "weights_only" not in text and "Weights only load failed" not in text
    if result.exit_code == 4:
        assert "--unsafe" in text and "arbitrary code" in text
    else:
        assert "Unsupported operand" in text
