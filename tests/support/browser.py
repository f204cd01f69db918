"""Headless Chromium driven over the DevTools protocol, with nothing but the standard library.

TensorBoard's dashboards are web components: what they render lives in shadow roots, which
``chromium --dump-dom`` does not print. So the tests ask the running page itself, through
``--remote-debugging-pipe`` (DevTools messages as NUL-terminated JSON on file descriptors 3 and 4,
no WebSocket client needed), and read back the text it shows.

>>> with Browser() as browser:                                 # doctest: +SKIP
...     browser.open("http://127.0.0.1:6006/#histograms")
...     text = browser.wait_for_text(["activations/conv1"], timeout=60)
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"

# Flags that work on a closed network as root: no sandbox (root), no GPU, and nothing that phones home.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)

# Every text node of the page, shadow roots included, in document order.
PAGE_TEXT_JS = """(() => {
  const parts = [];
  const visit = (node) => {
    if (node.nodeType === Node.TEXT_NODE) { parts.push(node.textContent); return; }
    if (node.nodeName === "STYLE" || node.nodeName === "SCRIPT") return;
    if (node.shadowRoot) visit(node.shadowRoot);
    for (const child of node.childNodes) visit(child);
  };
  visit(document);
  return parts.join(" ").replace(/\\s+/g, " ");
})()"""


# How many elements named %s sit in the shadow roots of elements named %s (nested roots included).
COUNT_JS = """(() => {
  let n = 0;
  const visit = (node, inHost) => {
    const name = (node.nodeName || "").toUpperCase();  // SVG names are lower case, HTML upper
    if (inHost && name === %s) n++;
    if (node.shadowRoot) visit(node.shadowRoot, inHost || name === %s);
    for (const child of node.children || []) visit(child, inHost);
  };
  visit(document, false);
  return n;
})()"""


class BrowserError(RuntimeError):
    """Chromium did not start, died, or did not answer in time."""


class Browser:
    """One headless Chromium with a throwaway profile; ``close()`` kills its whole process group."""

    def __init__(self, executable: str = CHROMIUM, window: tuple[int, int] = (1400, 1000)) -> None:
        self.executable = executable
        self.window = window
        self._process: subprocess.Popen | None = None
        self._profile: str | None = None
        self._to_browser: int | None = None
        self._from_browser: int | None = None
        self._buffer = b""
        self._next_id = 0
        self._session: str | None = None

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> Browser:
        if not Path(self.executable).exists():
            raise BrowserError(
                f"{self.executable} not found: install Debian's chromium (apt-get install chromium); "
                "scripts/test does so when it runs as root"
            )
        self._profile = tempfile.mkdtemp(prefix="introspect-chromium-")
        # Chromium reads commands from fd 3 and writes replies to fd 4. bash puts the pipe ends
        # there just before exec; both start at fd 10 or above, so the redirections cannot clash.
        commands_r, commands_w = os.pipe()
        replies_r, replies_w = os.pipe()
        theirs = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_r, replies_w)]
        for fd in (commands_r, replies_w):
            os.close(fd)
        args = [
            *FLAGS,
            f"--user-data-dir={self._profile}",
            f"--window-size={self.window[0]},{self.window[1]}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        shell = f'exec "$0" "$@" 3<&{theirs[0]} 4>&{theirs[1]} {theirs[0]}<&- {theirs[1]}>&-'
        try:
            self._process = subprocess.Popen(
                ["/bin/bash", "-c", shell, self.executable, *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=theirs,
                start_new_session=True,  # its own process group: close() kills renderers and all
            )
        finally:
            for fd in theirs:
                os.close(fd)
        self._to_browser, self._from_browser = commands_w, replies_r
        page = next(t for t in self._call("Target.getTargets", timeout=30)["targetInfos"] if t["type"] == "page")
        self._session = self._call("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})[
            "sessionId"
        ]
        # The page's viewport is exactly the window size (headless windows lose some to chrome).
        width, height = self.window
        metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
        self._call("Emulation.setDeviceMetricsOverride", metrics, session=True)
        return self

    @property
    def process(self) -> subprocess.Popen | None:
        """Chromium's main process (it leads its own process group); None when not running."""
        return self._process

    def close(self) -> None:
        """Kill Chromium (all of its processes) and remove the profile; safe to call twice."""
        for fd in (self._to_browser, self._from_browser):
            if fd is not None:
                os.close(fd)
        self._to_browser = self._from_browser = None
        if self._process is not None:
            stop_process_group(self._process)
            self._process = None
        if self._profile is not None:
            shutil.rmtree(self._profile, ignore_errors=True)
            self._profile = None

    def __enter__(self) -> Browser:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- the page
    def open(self, url: str) -> None:
        self._call("Page.navigate", {"url": url}, session=True)

    def evaluate(self, expression: str) -> Any:
        reply = self._call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        if "exceptionDetails" in reply:
            raise BrowserError(f"page script failed: {reply['exceptionDetails'].get('text')}")
        return reply["result"].get("value")

    def text(self) -> str:
        """All text the page shows, shadow roots included."""
        return self.evaluate(PAGE_TEXT_JS) or ""

    def click(self, x: float, y: float, times: int = 1) -> None:
        """Left-click at viewport coordinates ``times`` times in a row (2: a double-click)."""
        for count in range(1, times + 1):
            for kind in ("mousePressed", "mouseReleased"):
                event = {"type": kind, "x": x, "y": y, "button": "left", "clickCount": count}
                self._call("Input.dispatchMouseEvent", event, session=True)

    def screenshot(self, path: str | Path) -> None:
        """Save what the page shows now as a PNG of the window's size."""
        data = self._call("Page.captureScreenshot", {"format": "png"}, session=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def count(self, tag: str, inside: str) -> int:
        """How many ``tag`` elements (e.g. ``path``) the ``inside`` elements' shadow roots hold."""
        return int(self.evaluate(COUNT_JS % (json.dumps(tag.upper()), json.dumps(inside.upper()))) or 0)

    def wait_for_text(self, needles: list[str], timeout: float = 60.0) -> str:
        """Poll the page's text until it holds every needle; returns it, or raises with what was missing."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            missing = [n for n in needles if n not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise BrowserError(f"after {timeout:.0f} s the page still lacks {missing}; it shows: {text[:600]!r}")
            time.sleep(0.5)

    # ----------------------------------------------------------------- protocol
    def _call(self, method: str, params: dict | None = None, session: bool = False, timeout: float = 30.0) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            # anything else is an event we did not subscribe to usefully; drop it

    def _read_message(self, deadline: float, method: str) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"chromium did not answer {method} in time")
            ready, _, _ = select.select([self._from_browser], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                code = self._process.poll() if self._process else None
                raise BrowserError(f"chromium closed the DevTools pipe (exit status {code})")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return json.loads(raw)


def stop_process_group(process: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group ``process`` leads (started with ``start_new_session=True``), then SIGKILL."""
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        pgid = None
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)  # the leader may be gone while children live on
        except ProcessLookupError:
            pass
    process.wait(timeout=grace)
