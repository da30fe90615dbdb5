"""Archive-scale behaviour of the filesystem CLI: flat memory in the number of files, fast start on huge trees.

    python benchmarks/bench_scale.py [--small 1000] [--large 20000] [--tree 200000] [--size 64]
                                     [--backends litert,keras]

Files are hard links to one FITS frame (cheap to make, real to read; --size 2048 for archive-sized frames).
Peak RSS is the child process's own (os.wait4), for each model backend (default batch 32, TTA on).
Time to first result is from process start until the checkpoint holds its first record; the same
figure for a 10-file tree is the start-up cost (Python, the model runtime, model load).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.simulator import render_frame, write_frame  # noqa: E402

LINKS_PER_TEMPLATE = 50_000  # ext4 allows 65,000 links to one inode


def make_tree(root: Path, count: int, template: Path) -> Path:
    root.mkdir(parents=True)
    source = template
    for index in range(count):
        directory = root / f"night{index // 1000:04d}"
        if index % 1000 == 0:
            directory.mkdir()
        if index % LINKS_PER_TEMPLATE == 0:
            source = root / f"template{index // LINKS_PER_TEMPLATE}{template.suffix}"
            shutil.copy(template, source)
        os.link(source, directory / f"frame{index:07d}.fits")
    return root


RSS_TARGETS_MB = {"litert": 700}  # peak of a default run on the LiteRT backend


def command(tree: Path, output: Path, backend: str = "auto") -> list[str]:
    return [sys.executable, str(ROOT / "inference_runner.py"), "filesystem", "--input_dir", str(tree),
            "--output_json", str(output), "--quiet", "--backend", backend]


def run_for_peak_rss(tree: Path, output: Path, backend: str) -> tuple[float, float]:
    started = time.perf_counter()
    output.unlink(missing_ok=True)
    process = subprocess.Popen(command(tree, output, backend), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"run over {tree} failed with status {status}")
    return usage.ru_maxrss / 1024, time.perf_counter() - started


def time_to_first_record(tree: Path, output: Path) -> float:
    checkpoint = output.with_name(output.name + ".partial.jsonl")
    started = time.perf_counter()
    process = subprocess.Popen(command(tree, output), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None:
            if checkpoint.exists() and b'"kind":"record"' in checkpoint.read_bytes()[:1 << 16]:
                return time.perf_counter() - started
            time.sleep(0.01)
        return time.perf_counter() - started
    finally:
        process.kill()
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--tree", type=int, default=200000)
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels")
    parser.add_argument("--backends", default="litert,keras")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch_path = Path(scratch)
        template = write_frame(render_frame("star_field", 5, args.size), scratch_path / "template", "fits_int16")
        small, large = (make_tree(scratch_path / name, count, template)
                        for name, count in (("small", args.small), ("large", args.large)))
        for backend in args.backends.split(","):
            small_rss, small_s = run_for_peak_rss(small, scratch_path / "small.json", backend)
            large_rss, large_s = run_for_peak_rss(large, scratch_path / "large.json", backend)
            target = RSS_TARGETS_MB.get(backend)
            verdict = "" if target is None else f"; target <= {target} MB{'' if large_rss <= target else ' MISSED'}"
            print(f"{backend} peak RSS ({args.size}x{args.size} int16 FITS): {args.small} files {small_rss:.0f} MB "
                  f"({small_s:.0f} s), {args.large} files {large_rss:.0f} MB ({large_s:.0f} s): difference "
                  f"{large_rss - small_rss:+.0f} MB (target < 50 MB){verdict}")
        startup = time_to_first_record(make_tree(scratch_path / "ten", 10, template), scratch_path / "ten.json")
        huge = make_tree(scratch_path / "huge", args.tree, template)
        first = time_to_first_record(huge, scratch_path / "huge.json")
        print(f"first result after {first:.1f} s on a tree of {args.tree} files vs {startup:.1f} s on 10 files "
              f"(scan cost before inference {first - startup:+.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
