"""Render a study report in headless Chromium with the network off and save a screenshot: proof that the
page is self-contained and shows something. Prints one JSON object.

    python benchmarks/report_screenshot.py REPORT_DIR [--out shot.png]     (needs Debian's `chromium`)
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--height", type=int, default=2400)
    args = ap.parse_args()
    page = (args.report_dir / "report.html").resolve()
    text = page.read_text()
    # resources the page would load: src/href outside <script> bodies (plotly.js carries attribution links
    # as strings in its code, which nothing loads)
    outside = re.sub(r"<script>.*?</script>", "", text, flags=re.S)
    external = re.findall(r"""(?:src|href)\s*=\s*["'](?:https?:)?//[^"']+""", outside)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("chromium not found: apt-get install -y chromium")
    out = (args.out or args.report_dir / "screenshot.png").resolve()
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                               "--disable-component-update", "--disable-sync", "--no-first-run",
                               "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",  # no network at all
                               f"--user-data-dir={profile}", "--virtual-time-budget=15000",
                               f"--window-size=1280,{args.height}", f"--screenshot={out}", page.as_uri()],
                              capture_output=True, text=True, timeout=120)
    print(json.dumps({"page": str(page), "bytes": len(text), "external_references": len(external),
                      "screenshot": str(out), "screenshot_bytes": out.stat().st_size if out.exists() else 0,
                      "chromium_exit": proc.returncode}, indent=2))


if __name__ == "__main__":
    main()
