"""End-to-end throughput of ClassifierService on each model backend, against its stages and the naive loop.

    python benchmarks/bench_pipeline.py [--files 96] [--size 2048] [--repeats 3] [--variant fits_rice]
        [--litert-threads 2:1,1:2]

The files are written once; each backend (and each LiteRT thread setting) is measured in its own process on the
same files (in the page cache), so one runtime's thread pools cannot slow the other's. Per backend:
* decode-only: data_loader.load_sample over all files with the service's decode threads;
* model-only: forward passes on preprocessed batches (TTA views included when on);
* CPU-bound limit: 1 / (1/decode + 1/model), both stages sharing the same cores;
* end-to-end: ClassifierService.predict_paths (pipelined decode + batched inference);
* naive: per file, load_sample then the model on that file alone, its TTA views included when on (Keras:
  model.predict; LiteRT: one run), so that each end-to-end figure is set against a loop doing the same work;
* peak RSS of that process.
Decode-only, model-only and end-to-end are measured ``--repeats`` times, interleaved (decode, then per TTA
setting model and end to end, then again), and each figure is the median with the range beside it: one pass
over 96 files lasts one to six seconds, and on a shared machine one slow second moves a single pass by 10-20%.
The ratios are of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
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
from backends import KerasBackend, tta_views  # noqa: E402
from training.simulator import FILE_VARIANTS, render_frame, write_frame  # noqa: E402

TARGETS = {"litert_vs_keras_model": 3.0, "litert_vs_keras_end_to_end": 1.3, "of_limit": 0.85, "speed_floor": 1.0,
           "over_naive": 5.0}


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


def naive_rate(service: ir.ClassifierService, paths: list[Path], tta: bool) -> float:
    """Per file, load it and run the model on it (and its TTA views) alone, as a first script would (Keras:
    ``model.predict``)."""
    backend = service.backend
    started = time.perf_counter()
    for path in paths:
        sample = data_loader.load_sample(path, service.scaler)
        if isinstance(backend, KerasBackend):
            views = np.concatenate(tta_views(sample.image[None], backend.tta_views if tta else 1))
            backend._model.predict({backend._image_input: views[..., None],
                                    backend._feature_input: np.repeat(sample.features[None], len(views), 0)},
                                   verbose=0)
        else:
            backend.forward(sample.image[None], sample.features[None], tta=tta)
    return rate(len(paths), time.perf_counter() - started)


def measure(args: argparse.Namespace, paths: list[Path]) -> dict:
    """One backend's figures (run in a child process): lists of ``args.repeats`` rates, naive loop once."""
    service = ir.ClassifierService(args.model_path, args.scaler_path, args.thresholds, backend=args.measure,
                                   intra_op_threads=args.threads, workers=args.workers)
    decode_rate(service, paths[:8])  # page cache and allocator warm
    sample = data_loader.load_sample(paths[0], service.scaler)
    result = {"backend": service.backend.name, "threads": service.backend.threads, "workers": service.workers,
              "decode": [], "no_tta": {"model": [], "end_to_end": []}, "tta": {"model": [], "end_to_end": []}}
    for tta in (False, True):
        service.predict_paths(paths[: args.batch_size], args.batch_size, tta=tta)  # warm each path
    for _ in range(args.repeats):
        result["decode"].append(decode_rate(service, paths))
        for tta in (False, True):
            row = result["tta" if tta else "no_tta"]
            row["model"].append(model_rate(service, sample, max(len(paths), 4 * args.batch_size), args.batch_size,
                                           tta))
            started = time.perf_counter()
            service.predict_paths(paths, args.batch_size, tta=tta)
            row["end_to_end"].append(rate(len(paths), time.perf_counter() - started))
    for tta in (False, True):
        result["tta" if tta else "no_tta"]["naive"] = naive_rate(service, paths[: max(16, len(paths) // 4)], tta)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def median(rates: list[float]) -> float:
    return float(np.median(rates))


def spread(rates: list[float]) -> str:
    """'median (min-max)' of a figure's repeats."""
    return f"{median(rates):6.1f} ({min(rates):.1f}-{max(rates):.1f})" if len(rates) > 1 else f"{rates[0]:6.1f}"


def limit(result: dict, key: str) -> float:
    """Files/s if decoding and the model shared the cores with no overlap loss: 1 / (1/decode + 1/model)."""
    return 1.0 / (1.0 / median(result["decode"]) + 1.0 / median(result[key]["model"]))


def run_child(args: argparse.Namespace, directory: Path, backend: str, workers: int | None = None,
              threads: int | None = None) -> dict:
    command = [sys.executable, __file__, "--measure", backend, "--files_dir", str(directory),
               "--batch_size", str(args.batch_size), "--repeats", str(args.repeats),
               "--model_path", str(args.model_path), "--scaler_path", str(args.scaler_path),
               "--thresholds", str(args.thresholds)]
    for flag, value in (("--workers", workers), ("--threads", threads)):
        if value:
            command += [flag, str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _target(value: float, target: float) -> str:
    return f" (target >= {target}){'' if value >= target else f'  MISSED ({value:.3f})'}"


def print_result(result: dict, with_targets: bool) -> None:
    print(f"{result['backend']:>6} ({result['threads']} model threads, {result['workers']} decode threads): "
          f"decode-only {spread(result['decode'])} files/s, peak RSS {result['peak_rss_mb']:.0f} MB")
    for key in ("no_tta", "tta"):
        row = result[key]
        end_to_end = median(row["end_to_end"])
        of_limit, over_naive = end_to_end / limit(result, key), end_to_end / row["naive"]
        print(f"    TTA {'on ' if key == 'tta' else 'off'}: model-only {spread(row['model'])} files/s, CPU-bound limit "
              f"{limit(result, key):6.1f}, end-to-end {spread(row['end_to_end'])} files/s = {of_limit:.2f} of the limit"
              f"{_target(of_limit, TARGETS['of_limit']) if with_targets else ''}, naive loop {row['naive']:6.1f} "
              f"files/s: {over_naive:.1f}x"
              f"{_target(over_naive, TARGETS['over_naive']) if with_targets and result['backend'] == 'keras' else ''}")
    floor = median(result["tta"]["model"]) / median(result["decode"])
    print(f"    speed floor: model-only with TTA / decode-only = {floor:.2f}{_target(floor, TARGETS['speed_floor'])}")


def compare(keras: dict, litert: dict) -> None:
    model = median(litert["tta"]["model"]) / median(keras["tta"]["model"])
    end_to_end = median(litert["tta"]["end_to_end"]) / median(keras["tta"]["end_to_end"])
    of_limit = median(litert["tta"]["end_to_end"]) / limit(litert, "tta")
    for label, value, target in (("LiteRT / Keras model-only (TTA)", model, TARGETS["litert_vs_keras_model"]),
                                 ("LiteRT / Keras end-to-end (TTA)", end_to_end, TARGETS["litert_vs_keras_end_to_end"]),
                                 ("LiteRT end-to-end / its CPU-bound limit (TTA)", of_limit, TARGETS["of_limit"])):
        print(f"{label}: {value:.2f}{_target(value, target)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=96)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="passes per figure; the median is reported")
    parser.add_argument("--variant", choices=FILE_VARIANTS, default="fits_float32", help="file format written")
    parser.add_argument("--model_path", type=Path, default=ir.DEFAULT_MODEL_PATH)
    parser.add_argument("--scaler_path", type=Path, default=ir.DEFAULT_SCALER_PATH)
    parser.add_argument("--thresholds", type=Path, default=ir.DEFAULT_THRESHOLDS_PATH)
    parser.add_argument("--litert-threads", default="",
                        help="also measure LiteRT with these DECODE:MODEL thread counts, e.g. 2:1,1:2,1:1")
    parser.add_argument("--measure", choices=("keras", "litert"), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--files_dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args, sorted(args.files_dir.iterdir()))))
        return 0
    print(f"pipeline benchmark: {data_loader.available_cpus()} CPUs, {args.files} files of "
          f"{args.size}x{args.size} {args.variant}, batch {args.batch_size}, model {args.model_path.name}; "
          f"median (min-max) of {args.repeats} passes")
    targets = args.variant == "fits_float32"  # the service's targets are set on float32 FITS
    with tempfile.TemporaryDirectory() as scratch:
        make_files(Path(scratch), args.files, args.size, args.variant)
        os.sync()  # no write-back of these files during the measurement
        results = {backend: run_child(args, Path(scratch), backend) for backend in ("keras", "litert")}
        for backend in ("keras", "litert"):
            print_result(results[backend], targets)
        compare(results["keras"], results["litert"])
        for setting in filter(None, args.litert_threads.split(",")):
            workers, threads = (int(part) for part in setting.split(":"))
            print_result(run_child(args, Path(scratch), "litert", workers, threads), targets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
