"""End-to-end throughput of ClassifierService against its stages and the naive per-file loop.

    python benchmarks/bench_pipeline.py [--files 96] [--size 2048] [--variant fits_rice]

Measured in one process on the same files (in the page cache):
* decode-only: data_loader.load_sample over all files with the service's decode threads;
* model-only: forward passes on preprocessed batches (TTA views included when on);
* CPU-bound limit: 1 / (1/decode + 1/model), both stages sharing the same cores;
* end-to-end: ClassifierService.predict_paths (pipelined decode + batched inference);
* naive: per file, load_sample then model.predict on a batch of one.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import data_loader  # noqa: E402
import inference_runner as ir  # noqa: E402
from training.simulator import FILE_VARIANTS, render_frame, write_frame  # noqa: E402


def make_files(directory: Path, count: int, size: int, variant: str) -> list[Path]:
    base = render_frame("star_field", 1, 512)
    frame = np.kron(base, np.ones((size // 512, size // 512), np.float32)) if size >= 512 else base[:size, :size]
    first = write_frame(frame, directory / "f0000", variant)
    paths = [first]
    for index in range(1, count):  # same pixels, distinct files: decode cost is what matters
        target = directory / f"f{index:04d}{''.join(first.suffixes)}"
        target.write_bytes(first.read_bytes())
        paths.append(target)
    return paths


def rate(count: int, seconds: float) -> float:
    return count / seconds


def decode_rate(service: ir.ClassifierService, paths: list[Path]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(service.workers) as pool:
        list(pool.map(lambda p: data_loader.load_sample(p, service.scaler), paths))
    return rate(len(paths), time.perf_counter() - started)


def model_rate(service: ir.ClassifierService, sample: data_loader.Sample, files: int, batch: int, tta: bool) -> float:
    images = np.repeat(sample.image[None], batch, axis=0)
    features = np.repeat(sample.features[None], batch, axis=0)
    service._forward(images, features, tta)  # trace once
    started = time.perf_counter()
    done = 0
    while done < files:
        service._forward(images, features, tta)
        done += batch
    return rate(done, time.perf_counter() - started)


def naive_rate(service: ir.ClassifierService, paths: list[Path]) -> float:
    started = time.perf_counter()
    for path in paths:
        sample = data_loader.load_sample(path, service.scaler)
        service.model.predict({service._image_input: sample.image[None, ..., None],
                               service._feature_input: sample.features[None]}, verbose=0)
    return rate(len(paths), time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=96)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--variant", choices=FILE_VARIANTS, default="fits_float32", help="file format written")
    parser.add_argument("--model_path", type=Path, default=ir.DEFAULT_MODEL_PATH)
    parser.add_argument("--scaler_path", type=Path, default=ir.DEFAULT_SCALER_PATH)
    parser.add_argument("--thresholds", type=Path, default=ir.DEFAULT_THRESHOLDS_PATH)
    args = parser.parse_args()
    service = ir.ClassifierService(args.model_path, args.scaler_path, args.thresholds)
    print(f"pipeline benchmark: {os.cpu_count()} CPUs, {args.files} files of {args.size}x{args.size} {args.variant}, "
          f"batch {args.batch_size}, {service.workers} decode threads, model {args.model_path.name} "
          f"({service.model.count_params():,} parameters)")
    with tempfile.TemporaryDirectory() as scratch:
        paths = make_files(Path(scratch), args.files, args.size, args.variant)
        os.sync()  # no write-back of these files during the measurement
        decode_rate(service, paths[:8])  # page cache and allocator warm
        decode = decode_rate(service, paths)
        sample = data_loader.load_sample(paths[0], service.scaler)
        naive = naive_rate(service, paths[: max(16, args.files // 4)])
        print(f"decode-only {decode:7.1f} files/s; naive per-file predict loop {naive:6.1f} files/s")
        for tta in (False, True):
            model = model_rate(service, sample, max(args.files, 4 * args.batch_size), args.batch_size, tta)
            limit = 1.0 / (1.0 / decode + 1.0 / model)
            service.predict_paths(paths[: args.batch_size], args.batch_size, tta=tta)  # warm this path
            started = time.perf_counter()
            service.predict_paths(paths, args.batch_size, tta=tta)
            end_to_end = rate(len(paths), time.perf_counter() - started)
            targets = args.variant == "fits_float32"  # the service's targets are set on float32 FITS
            print(f"TTA {'on ' if tta else 'off'}: model-only {model:7.1f} files/s, CPU-bound limit {limit:6.1f}, "
                  f"end-to-end {end_to_end:6.1f} files/s = {end_to_end / limit:.2f} of the limit"
                  f"{' (target >= 0.85)' if targets else ''}, {end_to_end / naive:.1f}x the naive loop"
                  f"{' (target >= 5)' if targets else ''}")
            if tta:  # the model must never become the bottleneck of the pipeline
                print(f"speed floor: model-only with TTA / decode-only = {model / decode:.2f} (target >= 1.00)"
                      f"{'' if model >= decode else '  MISSED'}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
