"""Headless Chromium for the dashboard tests: find (or install) it, dump a page's DOM after
its scripts ran, take a screenshot, read the values a page shows.

Debian's `chromium` package is the browser (no browser download of its own, as playwright
would need); as root, a missing one is installed with apt-get. Not a test module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

INSTALL_TIMEOUT = 900.0
RUN_TIMEOUT = 120.0
# Virtual time lets the page's 1 s poll timer fire several times before the dump; the
# background-networking flags keep it from dialling Google's hosts, which a closed network
# refuses many at a time.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--hide-scrollbars", "--virtual-time-budget=8000",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-quic"]  # fmt: skip


def chromium() -> tuple[str | None, str]:
    """(path to chromium, "") or (None, why it could not be had)."""
    found = shutil.which("chromium")
    if found:
        return found, ""
    if os.geteuid() != 0:
        return None, "chromium is not installed and installing it needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        try:
            done = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"{' '.join(argv)} failed: {exc}"
        if done.returncode != 0:
            return None, f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}"
    found = shutil.which("chromium")
    return (found, "") if found else (None, "apt-get installed chromium but it is not on PATH")


def _run(binary: str, args: list[str], profile: Path) -> str:
    done = subprocess.run(
        [binary, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def dump_dom(binary: str, url: str, profile: Path) -> str:
    """The page's DOM as serialized HTML once its scripts have run."""
    return _run(binary, ["--dump-dom", url], profile)


def screenshot(binary: str, url: str, path: Path, profile: Path) -> None:
    """A 1280 x 1000 PNG of the page at `path`."""
    _run(binary, [f"--screenshot={path}", "--window-size=1280,1000", url], profile)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot at {path}")


def pixel_spread(path: Path) -> tuple[float, int]:
    """(standard deviation of the pixel values, number of distinct colours) of a PNG."""
    from matplotlib.image import imread

    pixels = imread(path)[..., :3]  # floats in [0, 1]
    distinct = np.unique(pixels.reshape(-1, 3), axis=0)
    return float(pixels.std()), len(distinct)


VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                  "source", "track", "wbr"})  # fmt: skip


class PageValues(HTMLParser):
    """What a dashboard DOM shows: element id -> (text, data-value), and its worker rows
    (worker id -> cell class -> text, and "<class>.value" -> the cell's data-value)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.by_id: dict[str, tuple[str, str | None]] = {}
        self.workers: dict[str, dict[str, str]] = {}
        self.body: dict[str, str | None] = {}
        self._stack: list[tuple[str, str, str | None]] = []  # (tag, id or cell key, value)
        self._row: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "tr" and a.get("data-worker-id"):
            self._row = a["data-worker-id"]
            self.workers[self._row] = {}
        key = a.get("id") or ""
        if tag == "td" and self._row is not None:
            key = "cell:" + (a.get("class") or "").split(" ")[0]
            if a.get("data-value") is not None:
                self.workers[self._row][key[5:] + ".value"] = a["data-value"] or ""
        if tag not in VOID:
            self._stack.append((tag, key, a.get("data-value")))

    def handle_endtag(self, tag: str) -> None:
        while self._stack:
            if self._stack.pop()[0] == tag:
                break
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        text = data.strip()
        owner = next(((k, v) for _, k, v in reversed(self._stack) if k), None)
        if not text or owner is None:
            return
        key, value = owner
        if key.startswith("cell:") and self._row is not None:
            self.workers[self._row][key[5:]] = text
        elif not key.startswith("cell:"):
            self.by_id[key] = (text, value)

    def value(self, element: str) -> str | None:
        """The raw number behind an element (its data-value), None when it shows none."""
        return self.by_id.get(element, ("", None))[1] or None
