"""Time and size of the HTML review page for a large report.

    python benchmarks/bench_review.py [--records 20000] [--per-gallery 200]

Writes a report of N records (5 classes, 15% abstained, 1% failed) over a few hundred real FITS files
(thumbnails are made only for the files the page shows), renders it, and prints the time and the page
size against the targets (a few seconds to open in a browser: the page's weight is what a browser
parses; under ~50 MB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import review  # noqa: E402
from training.simulator import CLASS_NAMES, render_frame, write_frame  # noqa: E402


def make_report(directory: Path, records: int, files: int) -> Path:
    rng = np.random.default_rng(0)
    paths = [str(write_frame(render_frame(CLASS_NAMES[i % 5], i, 512), directory / f"f{i:04d}", "fits_float32"))
             for i in range(files)]
    results = []
    for index in range(records):
        top = CLASS_NAMES[index % 5]
        failed, abstained = rng.random() < 0.01, rng.random() < 0.15
        score = None if failed else float(rng.uniform(0.3, 1.0))
        label = None if failed else "unknown" if abstained else top
        results.append({"path": paths[index % files], "class": label, "score": score,
                        "top_class": None if failed else top, "abstained": None if failed else abstained,
                        "abstain_reason": "low_score" if abstained and not failed else None,
                        "prediction_set": None if failed else [top], "sky": None, "header": None,
                        "timestamp": "2026-01-01T00:00:00Z", "fingerprint": None, "size": None, "mtime": None,
                        "error": "not a FITS file" if failed else None, "reused": False})
    report = directory / "report.json"
    report.write_text(json.dumps({"meta": {"class_names": list(CLASS_NAMES), "model": {"path": "m"}},
                                  "results": results}))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--per-gallery", type=int, default=review.DEFAULT_PER_GALLERY)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        report = make_report(Path(scratch), args.records, files=300)
        page = Path(scratch) / "review.html"
        started = time.perf_counter()
        states = review.write_review(report, page, args.per_gallery)
        elapsed = time.perf_counter() - started
        size = page.stat().st_size / 1e6
        print(f"review of {args.records} records ({states}): {elapsed:.1f} s, page {size:.1f} MB "
              f"(target < 50 MB{'' if size < 50 else ': MISSED'}), "
              f"{page.read_text().count('<figure')} thumbnails")
        browser = shutil.which("chromium")
        if browser:
            opened, start = (_chromium_seconds(browser, target, Path(scratch)) for target in (page.as_uri(),
                                                                                             "about:blank"))
            print(f"opened and scripted in headless Chromium in {opened:.2f} s (of which browser start {start:.2f} s)")
    return 0


def _chromium_seconds(browser: str, url: str, scratch: Path) -> float:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={scratch / 'profile'}", "--dump-dom"]
    started = time.perf_counter()
    subprocess.run([browser, *flags, url], capture_output=True, check=True, timeout=300)
    return time.perf_counter() - started


if __name__ == "__main__":
    raise SystemExit(main())
