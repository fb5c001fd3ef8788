"""Look at a report the way a person would: headless Chromium loads it from disk.

Used by the report test and to take the screenshot committed under figures/. Chromium runs with
networking features off (this machine has no network) and a throwaway profile.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from memprobe.errors import MemprobeError

FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


@dataclass(frozen=True)
class PageCheck:
    """What the page reported after loading: figures, broken figures, script errors, console errors."""

    checked: bool
    figures: int
    broken_figures: list[str]
    errors: list[str]
    console_errors: list[str]

    @property
    def ok(self) -> bool:
        return self.checked and not self.broken_figures and not self.errors and not self.console_errors


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise MemprobeError("no Chromium found: install it with `apt-get install chromium` (the set-up script does)")


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout)


def check_page(path: str | Path, timeout: float = 120) -> PageCheck:
    """Load `path` from disk; read the page's own checks (data-* attributes) and the console log."""
    url = Path(path).resolve().as_uri()
    done = _run(["--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", url], timeout)
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', done.stdout.split("<body", 1)[-1].split(">", 1)[0]))
    console = [m for m in re.findall(r"CONSOLE[^\]]*\] (.*)", done.stderr)
               if re.search(r"error|uncaught|failed", m, re.I)]
    return PageCheck(
        checked=attrs.get("checked") == "yes",
        figures=int(attrs.get("figures", 0)),
        broken_figures=json.loads(html.unescape(attrs.get("broken-figures", "[]"))),
        errors=json.loads(html.unescape(attrs.get("errors", "[]"))),
        console_errors=console,
    )


def screenshot(path: str | Path, png: str | Path, *, width: int = 1280, height: int = 2400, timeout: float = 120) -> Path:
    """Save a PNG of the page as Chromium renders it."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--window-size={width},{height}", "--virtual-time-budget=5000", f"--screenshot={png}",
          Path(path).resolve().as_uri()], timeout)
    if not png.exists():
        raise MemprobeError(f"Chromium wrote no screenshot of {path}")
    return png
