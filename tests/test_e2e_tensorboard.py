"""End to end: what the examples write is what a real TensorBoard serves and a real browser shows.

Trains two examples briefly into a temporary log directory, serves it with the environment's own
``tensorboard`` on a free 127.0.0.1 port, checks the runs and tags of every kind (scalars,
histograms, images, graph, text) through TensorBoard's HTTP data API, then loads the histogram
dashboard in headless Chromium and reads back what it rendered. Server and browser are stopped
whatever happens (their whole process groups). Chromium must be installed (Debian's ``chromium``;
``scripts/test`` installs it when it can): without it these tests fail, they do not skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from examples import quickstart, scalars
from tests.support.browser import Browser, BrowserError, stop_process_group

pytestmark = pytest.mark.slow

RUNS = ["quickstart", "scalars"]
# A busy 2-core runner: TensorBoard takes a few seconds to start and to load the event files.
TIMEOUT = 120.0


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def get(self, path: str, **query: str) -> bytes:
        url = f"{self.url}/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read()

    def json(self, path: str, **query: str) -> Any:
        return json.loads(self.get(path, **query))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, condition: Callable[[], Any], server: Server | None = None, timeout: float = TIMEOUT) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` (and the server's log)."""
    deadline = time.monotonic() + timeout
    while True:
        if server is not None and server.process.poll() is not None:
            pytest.fail(
                f"tensorboard exited ({server.process.returncode}) while waiting for {what}:\n"
                f"{server.log.read_text(errors='replace')[-3000:]}"
            )
        with contextlib.suppress(OSError, ValueError):  # not listening yet, or half-written JSON
            result = condition()
            if result:
                return result
        if time.monotonic() > deadline:
            log = server.log.read_text(errors="replace")[-3000:] if server else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{log}")
        time.sleep(0.5)


@contextlib.contextmanager
def tensorboard_server(logdir: Path) -> Iterator[Server]:
    """The environment's ``tensorboard --logdir logdir`` on a free 127.0.0.1 port, stopped on exit."""
    executable = Path(sys.executable).with_name("tensorboard")
    assert executable.exists(), f"no tensorboard next to {sys.executable}"
    port = free_port()
    log = logdir.parent / f"tensorboard-{port}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [str(executable), "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so it is stopped with all its children
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        wait_for("tensorboard to answer", lambda: server.get("data/runs"), server)
        yield server
    finally:
        stop_process_group(process)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("e2e") / "runs"
    quickstart.main(["--quick", "--logdir", str(root / "quickstart")])
    scalars.main(["--quick", "--logdir", str(root / "scalars")])
    return root


@pytest.fixture(scope="module")
def server(logdir) -> Iterator[Server]:
    with tensorboard_server(logdir) as server:
        # TensorBoard loads event files in the background: wait until both runs' histograms are in.
        wait_for(
            "both runs to load",
            lambda: set(server.json("data/plugin/histograms/tags")) == set(RUNS),
            server,
        )
        yield server


def test_runs_and_plugins_are_served(server):
    assert sorted(server.json("data/runs")) == RUNS
    plugins = server.json("data/plugins_listing")
    for name in ("scalars", "histograms", "images", "graphs", "text"):
        assert plugins[name]["enabled"], f"{name} dashboard disabled: {plugins[name]}"


def test_scalars_are_served(server):
    tags = server.json("data/plugin/scalars/tags")
    assert {"train/loss", "train/acc", "val/acc", "grad_norm/conv1.weight"} <= set(tags["quickstart"])
    assert {"x", "y", "grad_norm/x", "update_ratio/x"} <= set(tags["scalars"])
    points = server.json("data/plugin/scalars/scalars", run="scalars", tag="x")  # [wall time, step, value]
    assert len(points) == 500
    assert points[-1][1] == 499 and points[-1][2] == pytest.approx(1.0, abs=1e-4)


def test_histograms_are_served(server):
    tags = server.json("data/plugin/histograms/tags")
    for kind in ("activations", "activation_grads", "weights", "grads"):
        name = "conv1" if kind.startswith("activation") else "conv1.weight"
        assert f"{kind}/{name}" in tags["quickstart"], sorted(tags["quickstart"])
    series = server.json("data/plugin/histograms/histograms", run="quickstart", tag="weights/conv1.weight")
    assert [step for _, step, _ in series] == [0]
    buckets = series[0][2]  # [left edge, right edge, count] per bucket
    assert sum(count for _, _, count in buckets) == pytest.approx(864)  # conv1: 32 x 3 x 3 x 3


def test_images_are_served(server):
    tags = server.json("data/plugin/images/tags")
    assert "diagnostics/grad_flow" in tags["quickstart"], tags
    (entry,) = server.json("data/plugin/images/images", run="quickstart", tag="diagnostics/grad_flow", sample="0")
    png = server.get("data/plugin/images/individualImage?" + entry["query"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_graph_is_served(server):
    info = server.json("data/plugin/graphs/info")
    assert info["quickstart"]["run_graph"] is True
    graph = server.get("data/plugin/graphs/graph", run="quickstart", conceptual="false").decode()
    for layer in ("Conv2d[conv1]", "Conv2d[conv2]", "Linear[linear2]"):
        assert layer in graph


def test_text_is_served(server):
    tags = server.json("data/plugin/text/tags")
    (tag,) = [t for t in tags["quickstart"] if t.startswith("model/summary")]
    (entry,) = server.json("data/plugin/text/text", run="quickstart", tag=tag)
    assert "Total params: 54,273" in entry["text"]


def test_histogram_dashboard_renders_in_chromium(server):
    with Browser() as browser:
        browser.open(f"{server.url}/#histograms&tagFilter=activations%2F")
        text = browser.wait_for_text(["activations/conv1", "activations/linear2", "quickstart"], timeout=TIMEOUT)
        assert "No histogram data was found" not in text
        # Each chart is an SVG inside <vz-histogram-timeseries>; a drawn one holds the ridge's path.
        charts = wait_for(
            "a histogram chart to be drawn", lambda: browser.count("path", inside="vz-histogram-timeseries")
        )
        assert charts > 0


def test_server_and_browser_are_stopped_even_when_a_test_fails(logdir):
    with pytest.raises(RuntimeError, match="a failing test"):
        with tensorboard_server(logdir) as server, Browser() as browser:
            processes = [server.process, browser.process]
            groups = [p.pid for p in processes]  # each leads its own process group
            raise RuntimeError("a failing test")
    for process, group in zip(processes, groups):
        assert process.poll() is not None
        wait_for(f"process group {group} to be gone", lambda group=group: not group_alive(group), timeout=30)
    with pytest.raises(urllib.error.URLError):
        server.get("data/runs")


def group_alive(group: int) -> bool:
    """Whether any process of this process group is left (zombies not yet reaped count as left)."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_missing_chromium_fails_with_the_fix_in_the_message(tmp_path):
    with pytest.raises(BrowserError, match="apt-get install chromium"):
        with Browser(executable=str(tmp_path / "chromium")):
            pass
