"""``inference-runner train``: a model for the user's own labelled archive, calibrated and evaluated.

The labelled directory has one sub-folder per class (any names, two or more
classes). Files are split by object into train, calibration and test sets
(stratified by class, seeded, reported). ``--from default`` fine-tunes the
shipped model (with a new final layer when the classes differ from the shipped
ones) and keeps its feature scaler; ``--from scratch`` trains a new model and
scaler. Then the operating point is calibrated on the calibration set and
everything is evaluated on the test set and on out-of-distribution images.
OUT then holds what ``filesystem --model_path/--scaler_path/--thresholds`` takes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import backends
import calibration
import data_loader
import inference_runner as ir
from training import real_data, train
from training.evaluation import add_ood_classifier, calibrate_to_file, evaluate_all, write_json
from training.ood import write_ood_directory
from training.real_data import LabelledFile

logger = logging.getLogger(__name__)

MIN_FILES_PER_CLASS = 10
MODEL_FILE, SCALER_FILE, THRESHOLDS_FILE = "model.keras", "scaler.joblib", "thresholds.json"
TRAINING_BASE_BYTES = 2_500_000_000  # measured: TensorFlow, the model and its training steps (2.77 GB peak, 195 files)
# --from default keeps each member's stem and first separable block as shipped: on 1,000 real files, 2 cores, the whole
# command 396 -> 344 s against the stems alone, test top-1 0.889 either way
FROZEN_BLOCKS = 1


class TrainingInputError(ValueError):
    """The labelled directory cannot train a model; the message says what to fix."""


def add_command(commands: Any) -> None:
    """Register ``train`` on an ``add_subparsers()`` object."""
    parser = commands.add_parser("train", help="train a model on your own labelled directory, calibrated and evaluated")
    parser.add_argument("--labelled_dir", "--labelled-dir", type=Path, required=True,
                        help="one sub-folder per class (FITS, TIFF, JPEG, PNG files)")
    parser.add_argument("--output_dir", "--output-dir", type=Path, required=True)
    parser.add_argument("--from", dest="start", choices=("default", "scratch"), default="default",
                        help="fine-tune the shipped model (default) or train a new one")
    parser.add_argument("--epochs", type=ir.positive_int, default=None,
                        help="default: 16 from default, 40 from scratch")
    parser.add_argument("--target_precision", "--target-precision", type=float, default=0.95)
    parser.add_argument("--precision_confidence", "--precision-confidence", type=float, default=0.0,
                        help="confidence with which each class's threshold must show the target precision on the "
                             "calibration files (default 0: the point estimate; 0.9 as the shipped model needs "
                             "about 45 right calibration files per class, or the class always abstains)")
    parser.add_argument("--test_fraction", "--test-fraction", type=float, default=0.15)
    parser.add_argument("--calibration_fraction", "--calibration-fraction", type=float, default=0.2)
    parser.add_argument("--max_files_per_class", "--max-files-per-class", type=ir.positive_int, default=2000,
                        help="train on at most this many files of each class, a seeded choice (memory: about 0.8 "
                             "MB per file, 1.6 per colour photograph); calibration and test sets are not capped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.set_defaults(handler=cmd_train)


def check_classes(files: list[LabelledFile], unreadable: list[tuple[str, str]]) -> list[str]:
    """The class names (sorted) if every class has enough readable files; else TrainingInputError."""
    bad = {path for path, _ in unreadable}
    counts: dict[str, int] = {}
    for item in files:
        counts[item.label] = counts.get(item.label, 0) + (str(item.path) not in bad)
    if len(counts) < 2:
        raise TrainingInputError(f"need at least 2 class sub-folders, found {len(counts)} ({', '.join(counts)})")
    small = {name: n for name, n in counts.items() if n < MIN_FILES_PER_CLASS}
    if small:
        listed = "".join(f"\n  unreadable: {path}: {cause}" for path, cause in unreadable)
        raise TrainingInputError("classes with fewer than {} readable files: {}{}".format(
            MIN_FILES_PER_CLASS, ", ".join(f"{name} ({n})" for name, n in sorted(small.items())), listed))
    return sorted(counts)


def _class_order(names: list[str], shipped: list[str]) -> list[str]:
    """The shipped order when fine-tuning on exactly the shipped classes (the shipped head is kept), else
    ``names``."""
    return shipped if shipped and sorted(shipped) == names else names


def _recipe(start: str, epochs: int | None, train_counts: list[int], seed: int) -> train.Recipe:
    per_class = int(np.clip(np.median(train_counts), 64, 300))
    if start == "default":
        return train.Recipe(epochs=epochs or 16, per_class=per_class, peak_lr=5e-4, seed=seed, real_share=1.0,
                            frozen_blocks=FROZEN_BLOCKS)
    return train.Recipe(epochs=epochs or train.Recipe.epochs, per_class=per_class, seed=seed, real_share=1.0)


def train_on_directory(args: argparse.Namespace) -> dict[str, Any]:
    """The whole command; returns the evaluation. Raises TrainingInputError on unusable input."""
    started = time.perf_counter()
    files = real_data.stratified_split(real_data.discover(args.labelled_dir), args.test_fraction,
                                       args.calibration_fraction, args.seed)
    label_names = check_classes(files, [])  # one class, or too few files: refused before any decoding
    confounds = real_data.format_confounds(files)
    for message in confounds:
        logger.warning("%s; mix formats within each class where you can, and read the test figures by input style",
                       message)
    training_files = cap_training_files([f for f in files if f.split == "train"], args.max_files_per_class, args.seed)
    with tempfile.TemporaryDirectory(prefix="astro-ood-") as scratch:
        ood_dir = write_ood_directory(Path(scratch) / "evaluation", per_photo=2, per_synthetic=8)
        ood_fit_dir = write_ood_directory(Path(scratch) / "fit", seed=train.OOD_FIT_SEED, per_photo=2,
                                          per_synthetic=8)
        outliers = train.outlier_files(ood_fit_dir, train.OUTLIER_KINDS)
        check_memory(training_files + outliers, args.max_files_per_class)
        data, unreadable = read_files(training_files, outliers, [f for f in files if f.split != "train"],
                                      label_names)
        check_classes(files, unreadable)  # the same class names; refused if too few are readable
        bad = {path for path, _ in unreadable}
        usable = [f for f in files if str(f.path) not in bad]
        check_splits(usable, label_names)
        # the classes the start model already has ([] from scratch)
        shipped = list(ir.OperatingPoint.load(ir.DEFAULT_THRESHOLDS_PATH).class_names) if args.start == "default" \
            else []
        ordered = _class_order(label_names, shipped)
        data.labels = np.array([train.OUTLIER if k == len(label_names) else ordered.index(label_names[k])
                                for k in data.labels], dtype=int)
        recipe = _recipe(args.start, args.epochs,
                         [int((data.labels == k).sum()) for k in range(len(ordered))], args.seed)
        _fit_and_save(args, data, ordered, shipped, recipe)
        del data  # the decoded planes: calibration and evaluation stream their files
        evaluation = _calibrate_and_evaluate(args, usable, ordered, ood_dir, ood_fit_dir)
    trained = [f for f in training_files if str(f.path) not in bad]
    evaluation.update(split=real_data.summarise(usable), format_confounds=confounds,
                      unreadable=[{"path": p, "error": c} for p, c in unreadable],
                      trained_per_class={name: sum(f.label == name for f in trained) for name in ordered},
                      recipe=vars(recipe), start=args.start, seconds=round(time.perf_counter() - started, 1))
    write_json(args.output_dir / "evaluation" / "evaluation.json", evaluation)
    (args.output_dir / "MODEL_CARD.md").write_text(model_card(args, ordered, evaluation), encoding="utf-8")
    return evaluation


def read_files(training: list[LabelledFile], outliers: list[LabelledFile], others: list[LabelledFile],
               label_names: list[str]) -> tuple[train.Dataset, list[tuple[str, str]]]:
    """The training planes (labelled files, then outliers, labelled ``len(label_names)``) and every unreadable
    file, calibration and test files included. All decoding happens here, before TensorFlow starts (the process
    pools fork)."""
    data, unreadable = train.real_dataset(training + outliers, [*label_names, train.OUTLIER_LABEL], single_bands=True)
    unreadable += train.unreadable_files(others)
    for path, cause in unreadable:
        logger.warning("%s: unreadable, skipped: %s", path, cause)
    return data, unreadable


def cap_training_files(files: list[LabelledFile], cap: int, seed: int) -> list[LabelledFile]:
    """At most ``cap`` training files of each class, a seeded choice (the rest are logged, not decoded): the
    recipe draws at most 300 files per class per epoch, so more add little and cost memory."""
    kept = []
    for label in sorted({f.label for f in files}):
        group = [f for f in files if f.label == label]
        if len(group) > cap:
            chosen = np.random.default_rng([seed, len(group)]).choice(len(group), cap, replace=False)
            logger.warning("%s: %d training files, training on %d of them (--max_files_per_class)", label,
                           len(group), cap)
            group = [group[i] for i in sorted(chosen)]
        kept += group
    return kept


def available_memory() -> int | None:
    """Bytes this process can still take: MemAvailable, or the cgroup's limit less its use when lower; None when
    the system does not say (not Linux)."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = [int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")]
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            found.append(int(limit) - used)
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(files: list[LabelledFile], cap: int) -> None:
    """Refuse, before hours of decoding and training, a training set whose planes cannot fit in memory."""
    needed = TRAINING_BASE_BYTES + train.planes_at_most(files, single_bands=True) * train.PLANE_BYTES
    available = available_memory()
    logger.info("training set: %d files, about %.1f GB of memory needed, %s available", len(files), needed / 1e9,
                "unknown" if available is None else f"{available / 1e9:.1f} GB")
    if available is not None and needed > available:
        raise TrainingInputError(
            f"training on {len(files)} files needs about {needed / 1e9:.1f} GB of memory ({train.PLANE_BYTES / 1e6:.1f}"
            f" MB per decoded plane, two for a colour photograph), {available / 1e9:.1f} GB is available: lower "
            f"--max_files_per_class (now {cap})")


def check_splits(usable: list[LabelledFile], names: list[str]) -> None:
    """Every class needs calibration and test files; else TrainingInputError."""
    for split in ("calibration", "validation"):
        thin = [name for name in names if not any(f.split == split and f.label == name for f in usable)]
        if thin:
            raise TrainingInputError(f"no {split} files for {', '.join(thin)}: their files show too few distinct "
                                     f"objects (files named after one object are kept together; see README)")
    logger.info("split: %s", json.dumps(real_data.summarise(usable)))


def _fit_and_save(args: argparse.Namespace, data: train.Dataset, names: list[str], shipped: list[str],
                  recipe: train.Recipe) -> None:
    """Fine-tune the shipped model (its scaler kept) or train from scratch; save model and scaler into OUT."""
    import joblib

    if args.start == "default":
        scaler = data_loader.load_scaler(ir.DEFAULT_SCALER_PATH)
        model = backends.load_keras_model(ir.DEFAULT_MODEL_PATH)
        initial = model if names == shipped else train.with_head(model, names, shipped)
    else:  # the scaler is fitted on the labelled files, not on the outlier images
        scaler, initial = train.fit_scaler(train.raw_features(data)[data.labels != train.OUTLIER]), None
    model = train.train_model(data, scaler, names, recipe, initial_model=initial, progress=not args.quiet)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    model.save(args.output_dir / MODEL_FILE)
    joblib.dump(scaler, args.output_dir / SCALER_FILE)


def _calibrate_and_evaluate(args: argparse.Namespace, usable: list[LabelledFile], names: list[str], ood_dir: Path,
                            ood_fit_dir: Path) -> dict[str, Any]:
    out = args.output_dir
    model_path, scaler_path, thresholds_path = out / MODEL_FILE, out / SCALER_FILE, out / THRESHOLDS_FILE
    calibration_files = real_data.labelled_pairs([f for f in usable if f.split == "calibration"], names)
    calibrated = calibrate_to_file(model_path, scaler_path, names, calibration_files,
                                   thresholds_path, None, args.target_precision,
                                   {"labelled_dir": str(args.labelled_dir.absolute()), "split_seed": args.seed},
                                   precision_confidence=args.precision_confidence or None)
    fit_set = add_ood_classifier(model_path, scaler_path, thresholds_path, calibrated, ood_fit_dir,
                                 train.OUTLIER_KINDS)
    return evaluate_all(model_path, scaler_path, thresholds_path, names, simulated_test=[],
                        real_validation=[f for f in usable if f.split == "validation"], ood_dir=ood_dir,
                        output_dir=out / "evaluation", loko=(calibrated.embeddings, fit_set),
                        seen_objects={f.object_key for f in usable if f.split == "train"})


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def model_card(args: argparse.Namespace, names: list[str], evaluation: dict[str, Any]) -> str:
    """A short generated model card: data, recipe, test figures per class, OOD abstention, how to use it."""
    test, one_view = evaluation["real_validation"]["overall"], evaluation["real_validation"]["overall_no_tta"]
    trained = evaluation["trained_per_class"]
    per_class = test["per_class"]
    rows = "\n".join(f"| {name} | {trained[name]} | {per_class[name]['support']} "
                     f"| {_percent(per_class[name]['precision'])} | {_percent(per_class[name]['recall'])} |"
                     for name in names)
    styles = _style_rows(evaluation["real_validation"]["per_input_style"], names)
    ood = ", ".join(f"{kind} {_percent(v['abstained_fraction'])}"
                    for kind, v in evaluation.get("ood_by_kind", {}).items())
    return f"""# Model card (generated by `inference-runner train`)

* Data: `{args.labelled_dir}`; classes {", ".join(names)}; split by object (seed {args.seed}):
  `{json.dumps(evaluation["split"])}`. Unreadable files skipped: {len(evaluation["unreadable"])}.
* Format confounds: {"; ".join(evaluation["format_confounds"]) or "none found"}.
* Start: `{evaluation["start"]}`; recipe `{json.dumps(evaluation["recipe"])}`; {evaluation["seconds"]:.0f} s.
* Operating point (`{THRESHOLDS_FILE}`): temperature {evaluation["temperature"]} and a per-class bias (fitted),
  target precision {args.target_precision} on the calibration files ({_precision_rule(args)}), a Mahalanobis
  out-of-distribution gate at the 0.95 quantile, a learned gate against {", ".join(train.OUTLIER_KINDS)} and a
  feature gate (20 nearest calibration files, on the features and, when 20 or more calibration files are linear
  FITS or TIFF of at least 224 pixels a side, their noise whiteness; the radius of the class a file is given, for
  classes with 20 or more calibration files), a smooth-area gate (the 0.95 quantile of each class's calibration
  files) and a layer gate on the network's feature maps (the {calibration.LAYER_GATE_QUANTILE} quantile of the
  calibration files).

## Test set (held-out objects), with TTA

Coverage {_percent(test["coverage"])}, accuracy of what is labelled {_percent(test["selective_accuracy"])},
ECE {test["ece"]:.3f}.

| class | train files | test files | precision | recall |
| --- | --- | --- | --- | --- |
{rows}

By how the files store their pixels (a class that comes in one format only may be learned by its format):

| input | test files per class | coverage | accuracy of what is labelled |
| --- | --- | --- | --- |
{styles}

Without TTA (`--no-tta`: one view instead of {evaluation["tta_views"]}, its own thresholds):
coverage {_percent(one_view["coverage"])}, accuracy of what is labelled {_percent(one_view["selective_accuracy"])},
ECE {one_view["ece"]:.3f}.

Out-of-distribution images abstained on, per kind: {ood}.

## Use it

```bash
inference-runner filesystem --input_dir DIR --output_json report.json --model_path {args.output_dir / MODEL_FILE} \\
    --scaler_path {args.output_dir / SCALER_FILE} --thresholds {args.output_dir / THRESHOLDS_FILE}
```

The figures hold for data like the test set; a test set this small gives wide error bars, so check a labelled
sample of new data with `inference-runner evaluate` before relying on it.
"""


def _style_rows(per_style: dict[str, Any], names: list[str]) -> str:
    rows = []
    for style, figures in per_style.items():
        counts = ", ".join(f"{name} {figures['per_class'][name]['support']}" for name in names
                           if figures["per_class"][name]["support"])
        rows.append(f"| {style} | {counts} | {_percent(figures['coverage'])} "
                    f"| {_percent(figures['selective_accuracy'])} |")
    return "\n".join(rows)


def _precision_rule(args: argparse.Namespace) -> str:
    return f"with {args.precision_confidence:.0%} confidence" if args.precision_confidence else "point estimate"


def always_abstaining(thresholds_path: Path) -> list[str]:
    """Classes whose threshold no score reaches (calibration could not show the target precision for them)."""
    thresholds = ir.OperatingPoint.load(thresholds_path).thresholds[True]
    return [name for name, value in thresholds.items() if value > 1.0]


def cmd_train(args: argparse.Namespace) -> int:
    for name, value in (("--target_precision", args.target_precision), ("--test_fraction", args.test_fraction),
                        ("--calibration_fraction", args.calibration_fraction),
                        ("--precision_confidence", args.precision_confidence or 0.5)):
        if not 0 < value < 1:
            print(f"error: {name} must be in (0, 1), got {value}", file=sys.stderr)
            return ir.EXIT_USAGE
    try:
        backends.require_full_install("train")
        evaluation = train_on_directory(args)
    except (TrainingInputError, FileNotFoundError) as exc:
        print(f"error: {args.labelled_dir}: {exc}", file=sys.stderr)
        return ir.EXIT_USAGE
    except ir.ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ir.EXIT_ARTIFACTS
    summary = evaluation["summary"]["real_validation"]
    out = args.output_dir
    if evaluation["unreadable"]:
        print(f"skipped {len(evaluation['unreadable'])} unreadable file(s):", file=sys.stderr)
        for item in evaluation["unreadable"]:
            print(f"  {item['path']}: {item['error']}", file=sys.stderr)
    print(f"wrote {out / MODEL_FILE}, {out / SCALER_FILE}, {out / THRESHOLDS_FILE}, {out / 'MODEL_CARD.md'} and "
          f"{out / 'evaluation'}")
    print(f"test set: {summary['n']} files, coverage {_percent(summary['coverage'])}, precision "
          + ", ".join(f"{k} {_percent(v)}" for k, v in summary["precision"].items()))
    silent = always_abstaining(out / THRESHOLDS_FILE)
    if silent:
        remedy = " or pass --precision_confidence 0 (the point estimate)" if args.precision_confidence else ""
        print(f"warning: {', '.join(silent)} always abstain: too few of their calibration files are right to show "
              f"precision {args.target_precision} ({_precision_rule(args)}); label more files of them{remedy}",
              file=sys.stderr)
    print(f"use it: inference-runner filesystem --input_dir DIR --output_json report.json --model_path "
          f"{out / MODEL_FILE} --scaler_path {out / SCALER_FILE} --thresholds {out / THRESHOLDS_FILE}")
    return ir.EXIT_OK
