"""Render a report's HTML in headless Chromium and save a PNG screenshot, to check it displays offline.

Usage: python benchmarks/report_screenshot.py REPORT_DIR/report.html OUT.png [--height 2400]

Needs Debian's ``chromium`` (apt-get install chromium); exits 0 with a message when it is absent.
The page is loaded from a file:// URL with networking features off, so any image that is not
embedded would show as broken in the screenshot.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def screenshot(html: Path, out: Path, width: int = 1200, height: int = 2400) -> Path:
    """Screenshot ``html`` with headless Chromium; returns ``out``."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise FileNotFoundError("chromium not found (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--screenshot={out.resolve()}", f"--window-size={width},{height}",
               html.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot to {out}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args()
    try:
        path = screenshot(args.html, args.out, args.width, args.height)
    except FileNotFoundError as exc:
        print(f"skipped: {exc}")
        return 0
    print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
