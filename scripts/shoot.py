"""Photograph one TensorBoard dashboard with headless Chromium; used by scripts/screenshots.

    python scripts/shoot.py URL OUT.png [--wait TEXT ...] [--expand NODE] [--click TEXT]

Opens URL, waits until the page shows every ``--wait`` text (tag names: proof the dashboard
rendered this run's data, not an empty page) and its text stops changing, then optionally
double-clicks the graph node labelled ``--expand`` (the GRAPHS tab shows a model as one collapsed
box otherwise) and clicks the control labelled ``--click`` (e.g. "Fit to screen"), and saves the
picture. The browser is the one the end-to-end test drives (tests/support/browser.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout root: tests.support

from tests.support.browser import Browser, BrowserError  # noqa: E402

# Centre of the first element whose own text is exactly the given label, searched through shadow
# roots: SVG <text class="nodelabel"> for graph nodes, any element for buttons and links.
FIND_JS = """((label, graphNode) => {
  let found = null;
  const own = (el) => Array.from(el.childNodes).filter(n => n.nodeType === 3).map(n => n.textContent).join('').trim();
  const visit = (node) => {
    if (found) return;
    if (node.nodeType === 1 && own(node) === label &&
        (!graphNode || (node.nodeName === 'text' && node.classList.contains('nodelabel')))) {
      const r = node.getBoundingClientRect();
      if (r.width > 0 && r.height > 0) { found = [r.x + r.width / 2, r.y + r.height / 2]; return; }
    }
    if (node.shadowRoot) visit(node.shadowRoot);
    for (const child of node.children || []) visit(child);
  };
  visit(document);
  return found;
})(%s, %s)"""


def locate(browser: Browser, label: str, graph_node: bool, timeout: float = 60.0) -> tuple[float, float]:
    deadline = time.monotonic() + timeout
    while True:
        where = browser.evaluate(FIND_JS % (json.dumps(label), json.dumps(graph_node)))
        if where:
            return where[0], where[1]
        if time.monotonic() > deadline:
            raise BrowserError(f"nothing labelled {label!r} on the page after {timeout:.0f} s")
        time.sleep(0.5)


def settle(browser: Browser, quiet: float = 2.0, timeout: float = 30.0) -> None:
    """Wait until the page's text has not changed for ``quiet`` seconds (charts load lazily)."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        text = browser.text()
        if text != last:
            last, since = text, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.25)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out", type=Path)
    parser.add_argument("--wait", action="append", default=[], help="text the page must show first (repeatable)")
    parser.add_argument("--expand", help="double-click the graph node with this label")
    parser.add_argument("--click", help="then click the control with this label")
    parser.add_argument("--size", default="1400x1000", help="window size (default: %(default)s)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the browser (default: %(default)s)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))

    with Browser(executable=args.chromium, window=(width, height)) as browser:
        browser.open(args.url)
        if args.wait:
            browser.wait_for_text(args.wait, timeout=120)
        settle(browser)
        if args.expand:
            browser.click(*locate(browser, args.expand, graph_node=True), times=2)
            settle(browser)
        if args.click:
            browser.click(*locate(browser, args.click, graph_node=False))
            time.sleep(2)  # the graph's fit-to-screen is animated
        browser.screenshot(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
