"""Look at a report as a reader does: write it, then screenshot it in headless Chromium.

    .venv/bin/python benchmarks/report_screenshot.py EXPERIMENT_DIR [--out DIR] [--width 1400]

The experiment dir is only read: the report goes to ``--out`` (default a temp dir), the
screenshot to ``OUT/report_<width>.png`` (full page height). Needs ``chromium`` on PATH
(``apt-get install -y chromium``); not part of the test suite, because a browser is neither
fast nor everywhere.
"""

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment_dir")
    parser.add_argument("--out", default=None)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=None,
                        help="viewport height; default: a guess at the whole page")
    args = parser.parse_args()
    from qworld_analysis import write_report

    out = Path(args.out or tempfile.mkdtemp(prefix="qworld_report_"))
    t0 = time.perf_counter()
    page = write_report(args.experiment_dir, out)
    print(f"report: {page} ({time.perf_counter() - t0:.1f} s)")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    # Headless Chromium shoots the viewport only: make it tall enough for the whole page,
    # guessed from the embedded figures (the bulk of the height) and the table rows.
    text = page.read_text(encoding="utf-8")
    height = args.height or 1200 + 900 * text.count("<img") + 24 * text.count("<tr>")
    shot = out / f"report_{args.width}.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", f"--window-size={args.width},{height}",
                    page.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    print(f"screenshot: {shot} ({args.width} x {height})")


if __name__ == "__main__":
    main()
