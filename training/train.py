"""Regenerate the shipped model, scaler and operating point (the command is in MODEL_CARD.md).

    python -m training.train --real_dir DIR [--real_dir DIR ...] [--real_val_dir DIR ...]
    python -m training.train --per-class 12 --epochs 1 --out /tmp/tiny   # smoke run, simulations only

Steps: simulate labelled frames and write them as real archive files; split
the real labelled directories by object (``training.real_data``); read
everything back through ``data_loader.load_small`` (the production path); fit
the feature scaler; train the two-input Keras model on source-balanced epochs
with style augmentation (``training.augment``), outlier exposure, RandAugment
view ops, mixup and a warmup-then-cosine learning rate; refit the final layer's
rows of the classes real data barely shows on fresh simulated frames
(``training.head_refit``); then calibrate the operating point on simulated plus
real calibration files, fit the learned OOD gate, and evaluate per real source
and class, on simulations and per OOD kind (``training.evaluation``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import calibration
import data_loader
from backends import ArtifactError, embedding_tensor, final_layer, import_keras, load_keras_model, require_full_install
from inference_runner import calibrated_probs
from training import head_refit, real_data
from training.augment import single_band, style_augment
from training.evaluation import add_ood_classifier, calibrate_to_file, evaluate_all, write_json
from training.ood import write_ood_directory
from training.real_data import LabelledFile
from training.simulator import CLASS_NAMES, FILE_VARIANTS, render_frame, write_frame

logger = logging.getLogger(__name__)

MODEL_NAME = "multimodal_classifier_mixup_warmup_randaug_2.keras"
SCALER_NAME = "feature_scaler.joblib"
THRESHOLDS_NAME = "thresholds_prod_precision.json"
FRAME_SIZES = (256, 384, 512, 640, 768, 1024)
TRAIN_SEED, CALIBRATION_SEED, TEST_SEED, HEAD_REFIT_SEED = 1, 2, 3, 4
OUTLIER_LABEL = "outlier"
# Kinds of training/ood.py used for outlier exposure and the learned gate; the others (photographs from another
# source, the Moon, planets, spectra, radio maps) are never seen before evaluation.
OUTLIER_KINDS = ("photo_skimage", "text", "noise", "checkerboard", "gradient")
OUTLIER = -1  # the label of outlier-exposure images: trained towards the uniform distribution
OOD_FIT_SEED = 8  # the evaluation OOD set uses write_ood_directory's default seed (7): other images of each kind


@dataclass
class Dataset:
    """Training planes before stretch (``data_loader.load_small``), with class and origin per sample.

    Keeping the unstretched plane lets augmentation change a frame's look and
    then recompute image *and* features through ``data_loader.sample_from_small``.
    """

    smalls: np.ndarray  # (N, 448, 448) float32
    labels: np.ndarray  # (N,) int
    groups: np.ndarray  # (N,) str: "sim" or the real source; sampling balances them within a class

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(parts: list[Dataset]) -> Dataset:
        parts = [p for p in parts if len(p)]
        return Dataset(np.concatenate([p.smalls for p in parts]), np.concatenate([p.labels for p in parts]),
                       np.concatenate([p.groups for p in parts]))


def _frame_spec(label_index: int, index: int, seed: int) -> tuple[str, int, int, str]:
    rng = np.random.default_rng([seed, label_index, index])
    size = int(rng.choice(FRAME_SIZES))
    variant = str(rng.choice(FILE_VARIANTS))
    return CLASS_NAMES[label_index], seed * 1_000_000 + index, size, variant


def write_labelled_file(directory: Path, label_index: int, index: int, seed: int) -> Path:
    """Simulate one frame and write it under ``directory/<class>/`` in a seeded file variant."""
    label, frame_seed, size, variant = _frame_spec(label_index, index, seed)
    target_dir = directory / label
    target_dir.mkdir(parents=True, exist_ok=True)
    return write_frame(render_frame(label, frame_seed, size), target_dir / f"{label}_{seed}_{index:05d}", variant,
                       seed=frame_seed)


def _simulated_small(args: tuple[int, int, int]) -> np.ndarray:
    label_index, index, seed = args
    with tempfile.TemporaryDirectory() as scratch:
        path = write_labelled_file(Path(scratch), label_index, index, seed)
        return data_loader.load_small(path)[0]  # the production path, on a real file


def _real_smalls(job: tuple[Path, int | None]) -> list[np.ndarray] | str:
    """A real file's plane, plus a single-band view of it when ``job`` carries a seed and it is colour."""
    path, band_seed = job
    try:
        smalls = [data_loader.load_small(path)[0]]
    except data_loader.ImageLoadError as exc:
        return exc.cause
    band = single_band(path, np.random.default_rng(band_seed)) if band_seed is not None else None
    return smalls if band is None else [*smalls, band]


def simulated_dataset(per_class: int, seed: int, workers: int = data_loader.available_cpus()) -> Dataset:
    """Simulate ``per_class`` files of each class, write them as archive files and read them back."""
    jobs = [(label_index, index, seed) for index in range(per_class) for label_index in range(len(CLASS_NAMES))]
    with ProcessPoolExecutor(max_workers=workers, initializer=data_loader.tune_malloc) as pool:
        smalls = list(pool.map(_simulated_small, jobs, chunksize=8))
    return Dataset(np.stack(smalls), np.array([label for label, _, _ in jobs]), np.full(len(jobs), "sim"))


PLANE_BYTES = data_loader.IMAGE_SIZE**2 * np.dtype(np.float32).itemsize  # one training plane in memory


def planes_at_most(files: list[LabelledFile], single_bands: bool) -> int:
    """How many planes ``real_dataset`` can make of ``files``: two of a colour photograph with ``single_bands``."""
    return sum(2 if single_bands and f.path.name.lower().endswith(data_loader.PHOTO_SUFFIXES) else 1 for f in files)


def real_dataset(files: list[LabelledFile], class_names: list[str], single_bands: bool = False,
                 workers: int = data_loader.available_cpus()) -> tuple[Dataset, list[tuple[str, str]]]:
    """Read real labelled files (and, with ``single_bands``, one single-band view of each colour photograph);
    unreadable ones are returned as (path, cause) and left out."""
    jobs = [(f.path, index if single_bands else None) for index, f in enumerate(files)]
    # Planes go straight into one array sized for the most there can be: stacking a list would hold every plane
    # twice, and pages never written (grey photographs, unreadable files) are never resident.
    smalls = np.empty((planes_at_most(files, single_bands), data_loader.IMAGE_SIZE, data_loader.IMAGE_SIZE),
                      np.float32)
    labels: list[int] = []
    groups: list[str] = []
    failed: list[tuple[str, str]] = []
    with ProcessPoolExecutor(max_workers=workers, initializer=data_loader.tune_malloc) as pool:
        for item, loaded in zip(files, pool.map(_real_smalls, jobs, chunksize=8)):
            if isinstance(loaded, str):
                failed.append((str(item.path), loaded))
                continue
            for small in loaded:
                smalls[len(labels)] = small
                labels.append(class_names.index(item.label))
                groups.append(item.source)
    return Dataset(smalls[:len(labels)], np.array(labels, dtype=int), np.array(groups, dtype=str)), failed


def _read_error(path: Path) -> str | None:
    try:
        data_loader.load_small(path)
    except data_loader.ImageLoadError as exc:
        return exc.cause
    return None


def unreadable_files(files: list[LabelledFile], workers: int = data_loader.available_cpus()) -> list[tuple[str, str]]:
    """(path, cause) of the files that cannot be read, each decoded once and let go (memory flat in their number)."""
    with ProcessPoolExecutor(max_workers=workers, initializer=data_loader.tune_malloc) as pool:
        causes = pool.map(_read_error, [f.path for f in files], chunksize=8)
        return [(str(f.path), cause) for f, cause in zip(files, causes) if cause is not None]


def outlier_files(ood_dir: Path, kinds: list[str] | tuple[str, ...]) -> list[LabelledFile]:
    """The out-of-distribution images of ``kinds`` (sub-folders of ``ood_dir``), labelled ``OUTLIER_LABEL``."""
    return [LabelledFile(path, OUTLIER_LABEL, kind, path.name) for kind in kinds
            for path in sorted((ood_dir / kind).iterdir())]


def outlier_dataset(ood_dir: Path, kinds: list[str], workers: int = data_loader.available_cpus()) -> Dataset:
    """Out-of-distribution images of ``kinds`` (sub-folders of ``ood_dir``) for outlier exposure."""
    data, failed = real_dataset(outlier_files(ood_dir, kinds), [OUTLIER_LABEL], workers=workers)
    for path, cause in failed:
        logger.warning("%s: outlier image unreadable: %s", path, cause)
    return Dataset(data.smalls, np.full(len(data), OUTLIER), data.groups)


def cap_per_source_class(files: list[LabelledFile], cap: int, seed: int = 0) -> list[LabelledFile]:
    """At most ``cap`` files of each (source, class), a seeded random choice: no source drowns the others."""
    rng = np.random.default_rng(seed)
    by_group: dict[tuple[str, str], list[LabelledFile]] = {}
    for item in files:
        by_group.setdefault((item.source, item.label), []).append(item)
    kept = []
    for group in by_group.values():
        kept += [group[i] for i in sorted(rng.choice(len(group), min(cap, len(group)), replace=False))]
    return kept


def write_labelled_directory(directory: Path, per_class: int, seed: int,
                             workers: int = data_loader.available_cpus()) -> Path:
    """A labelled directory (one sub-folder per class) for calibration and evaluation."""
    jobs = [(label_index, index) for index in range(per_class) for label_index in range(len(CLASS_NAMES))]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(write_labelled_file, [directory] * len(jobs), *zip(*jobs), [seed] * len(jobs), chunksize=8))
    return directory


# --------------------------------------------------------------------------- model


def build_model(n_classes: int, n_features: int, image_size: int = data_loader.IMAGE_SIZE, width: int = 1):
    """Two-input CNN sized for CPU serving; outputs logits (temperature is applied outside)."""
    keras = import_keras()
    from keras import layers

    image_in = keras.Input((image_size, image_size, 1), name="image")
    feature_in = keras.Input((n_features,), name="features")
    x = layers.Conv2D(24 * width, 4, strides=4, use_bias=False, name="stem")(image_in)  # 448 -> 112
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    for filters, stride in ((32, 2), (64, 2), (64, 1), (128, 2), (128, 1)):
        x = layers.SeparableConv2D(filters * width, 3, strides=stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.Activation("relu")(x)
    pooled = layers.Concatenate()([layers.GlobalAveragePooling2D()(x), layers.GlobalMaxPooling2D()(x)])
    f = layers.Dense(32, activation="relu")(feature_in)
    joint = layers.Concatenate()([pooled, f])
    joint = layers.Dropout(0.3)(layers.Dense(96, activation="relu")(joint))
    logits = layers.Dense(n_classes, name="logits")(joint)
    return keras.Model({"image": image_in, "features": feature_in}, logits, name="multimodal_classifier")


def freeze_stems(model, blocks: int = 0) -> int:
    """Freeze each network's layers before its first separable convolution (the stem and its batch norm; in an
    ensemble, each member's), and the first ``blocks`` separable blocks after it; returns how many layers.
    Their weights stay as trained and no gradient is computed through them: the stem's backward pass over the
    full-resolution image is half of a training step on CPU (measured on the shipped ensemble, 2 cores, batches of
    32: 1.73 s per step, 0.90 s with the stems frozen, 0.71 s with the first block too)."""
    keras = import_keras()
    networks = [layer for layer in model.layers if hasattr(layer, "layers")] or [model]
    frozen = 0
    for network in networks:
        separable = 0
        for layer in network.layers:
            if isinstance(layer, keras.layers.SeparableConv2D):
                separable += 1
                if separable > blocks:
                    break
            if layer.weights:
                layer.trainable = False
                frozen += 1
    return frozen


def set_batch_norm_trainable(model, trainable: bool) -> int:
    """Set ``trainable`` on every BatchNormalization layer, nested networks' included; returns how many.

    Keras runs a batch norm that is not trainable in inference mode: it normalises by its moving statistics and
    leaves them as they are, so a fine-tuning trains the function the model is served with."""
    keras = import_keras()
    count = 0
    for layer in model.layers:
        if hasattr(layer, "layers"):
            count += set_batch_norm_trainable(layer, trainable)
        elif isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = trainable
            count += 1
    return count


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int):
    """Linear warmup to ``peak`` then cosine decay to zero."""
    keras = import_keras()

    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak * 0.02,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=peak,
        warmup_steps=warmup_steps,
    )


def rand_augment(images: np.ndarray, rng: np.random.Generator, magnitude: float = 0.5,
                 views_only: np.ndarray | None = None) -> np.ndarray:
    """RandAugment-style: a random dihedral view plus two random photometric/geometric ops per image (the view
    alone where ``views_only`` is true)."""
    out = np.empty(images.shape, dtype=np.float32)
    for i, image in enumerate(images.astype(np.float32)):
        image = np.rot90(image, int(rng.integers(4)))
        if rng.random() < 0.5:
            image = image[:, ::-1]
        if views_only is not None and views_only[i]:
            out[i] = image
            continue
        for op in rng.choice(6, size=2, replace=False):
            image = _AUGMENT_OPS[op](image, rng, magnitude)
        out[i] = np.clip(image, 0.0, 1.0)
    return out


def _brightness(image: np.ndarray, rng: np.random.Generator, m: float) -> np.ndarray:
    return image + rng.uniform(-0.15, 0.15) * m


def _contrast(image: np.ndarray, rng: np.random.Generator, m: float) -> np.ndarray:
    return (image - image.mean()) * (1.0 + rng.uniform(-0.4, 0.4) * m) + image.mean()


def _gamma(image: np.ndarray, rng: np.random.Generator, m: float) -> np.ndarray:
    return np.clip(image, 0, 1) ** np.exp(rng.uniform(-0.5, 0.5) * m)


def _noise(image: np.ndarray, rng: np.random.Generator, m: float) -> np.ndarray:
    return image + rng.normal(0, 0.04 * m, image.shape).astype(np.float32)


def _blur(image: np.ndarray, rng: np.random.Generator, m: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.uniform_filter(image, size=3) if rng.random() < m * 2 else image


def _shift(image: np.ndarray, rng: np.random.Generator, m: float) -> np.ndarray:
    limit = int(image.shape[0] * 0.08 * m) + 1
    return np.roll(image, (int(rng.integers(-limit, limit)), int(rng.integers(-limit, limit))), axis=(0, 1))


_AUGMENT_OPS = (_brightness, _contrast, _gamma, _noise, _blur, _shift)


def epoch_indices(data: Dataset, n_classes: int, per_class: int, real_share: float, rng: np.random.Generator,
                  outlier_share: float = 0.0, draws_per_real_file: float | None = None) -> np.ndarray:
    """One epoch's sample indices: ``per_class`` draws per class, ``real_share`` of them real where a class has
    real files, and the real draws spread evenly over the sources of that class (then over its files).

    Balancing sources within a class is what keeps a few hundred processed photographs from being drowned by
    thousands of survey cutouts, and keeps style from standing in for class. With ``draws_per_real_file``, a
    source of a class that also has simulated files gets at most that many draws per file (the rest go to the
    simulations): an even share of 300 draws for a source of two images would show each 75 times an epoch.
    Outliers (label ``OUTLIER``) add ``outlier_share * per_class`` draws, their kinds balanced.
    """
    picks = []
    outliers = np.nonzero(data.labels == OUTLIER)[0]
    if len(outliers) and outlier_share > 0:
        _, inverse, counts = np.unique(data.groups[outliers], return_inverse=True, return_counts=True)
        weights = 1.0 / counts[inverse]
        picks.append(rng.choice(outliers, round(outlier_share * per_class), p=weights / weights.sum()))
    for label in range(n_classes):
        in_class = data.labels == label
        sim = np.nonzero(in_class & (data.groups == "sim"))[0]
        real = np.nonzero(in_class & (data.groups != "sim"))[0]
        n_real = per_class if not len(sim) else round(per_class * real_share) if len(real) else 0
        if n_real and len(real):
            sources, inverse, counts = np.unique(data.groups[real], return_inverse=True, return_counts=True)
            quota = np.full(len(sources), n_real / len(sources))
            if len(sim) and draws_per_real_file is not None:
                quota = np.minimum(quota, draws_per_real_file * counts)
                n_real = round(quota.sum())
            weights = quota[inverse] / counts[inverse]
            picks.append(rng.choice(real, n_real, p=weights / weights.sum()))
        if len(sim) and per_class > n_real:
            picks.append(rng.choice(sim, per_class - n_real, replace=len(sim) < per_class - n_real))
    return rng.permutation(np.concatenate(picks)) if picks else np.empty(0, int)


def augmented_inputs(smalls: np.ndarray, scaler, rng: np.random.Generator, style_strength: float,
                     as_served: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Style-augment planes, preprocess them as production does, then the RandAugment view ops on the images; a
    plane marked in ``as_served`` only gets a dihedral view (what test-time augmentation shows the model)."""
    as_served = np.zeros(len(smalls), bool) if as_served is None else as_served
    images, features = [], []
    for small, served in zip(smalls, as_served):
        styled = style_strength and not served
        sample = data_loader.sample_from_small(style_augment(small, rng, style_strength) if styled else small)
        images.append(sample.image)
        features.append(sample.features)
    return (rand_augment(np.stack(images), rng, views_only=as_served),
            data_loader.apply_scaler(np.stack(features), scaler))


def with_embedding_output(model):
    """``model`` (the same layers and weights) with its embedding as a second output."""
    return import_keras().Model(model.inputs, [model.output, embedding_tensor(model)])


class Distiller:
    """Holds a teacher's outputs on the real training planes while a fine-tuning learns the simulated frames
    ("learning without forgetting", Li and Hoiem 2016; MODEL_CARD.md, "Fine-tunings that keep the shipped model's
    outputs on real files"): a real plane's target is the teacher's softmax on the same augmented input instead of its
    label, and with ``embedding_weight`` > 0 the student's embedding is held to the teacher's on each mixed input, in
    proportion to the input's real share."""

    def __init__(self, teacher, is_real: np.ndarray, embedding_weight: float, as_served_share: float = 0.0) -> None:
        self.teacher = with_embedding_output(teacher)
        self.is_real = is_real  # per sample of the Dataset
        self.embedding_weight = embedding_weight
        # of the real planes, the share shown as served (no style or photometric augmentation): the view the
        # teacher's behaviour is to be kept on
        self.as_served_share = as_served_share
        self.mean_square: float | None = None  # of the teacher's embedding (first batch): the term's scale

    def soft_targets(self, inputs: dict[str, np.ndarray], targets: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """``targets`` with the rows of real planes replaced by the teacher's softmax on their inputs."""
        real = self.is_real[idx]
        if not real.any():
            return targets
        logits, _ = self.teacher.predict_on_batch({name: value[real] for name, value in inputs.items()})
        targets = targets.copy()
        targets[real] = calibrated_probs(np.asarray(logits)[:, None, :], 1.0)
        return targets

    def embedding_targets(self, inputs: dict[str, np.ndarray], real_share: np.ndarray) -> np.ndarray:
        """The teacher's embedding of each input and, as a last column, the weight of the student's squared error."""
        _, embedding = self.teacher.predict_on_batch(inputs)
        embedding = np.asarray(embedding, dtype=np.float32)
        if self.mean_square is None:
            self.mean_square = float(np.mean(np.square(embedding))) or 1.0
        weight = self.embedding_weight * real_share / self.mean_square
        return np.concatenate([embedding, weight[:, None]], axis=1).astype(np.float32)


def weighted_embedding_error(y_true, y_pred):
    """Mean squared difference from the target embedding (``y_true`` but its last column), times that column."""
    ops = import_keras().ops
    return y_true[:, -1] * ops.mean(ops.square(y_pred - y_true[:, :-1]), axis=-1)


def _batch(data: Dataset, idx: np.ndarray, scaler, n_classes: int, seed: int, mixup_alpha: float,
           style_strength: float, distiller: Distiller | None = None) -> tuple[dict[str, np.ndarray], Any]:
    rng = np.random.default_rng(seed)
    as_served = None
    if distiller is not None and distiller.as_served_share > 0:
        as_served = distiller.is_real[idx] & (rng.random(len(idx)) < distiller.as_served_share)
    images, features = augmented_inputs(data.smalls[idx], scaler, rng, style_strength, as_served)
    images = images[..., None]
    # outlier exposure: a non-astronomical image's target is "no class", the uniform distribution
    targets = np.vstack([np.eye(n_classes, dtype=np.float32), np.full((1, n_classes), 1.0 / n_classes,
                                                                      dtype=np.float32)])[data.labels[idx]]
    real_share = np.zeros(len(idx), np.float32)
    if distiller is not None:
        targets = distiller.soft_targets({"image": images, "features": features}, targets, idx)
        real_share = distiller.is_real[idx].astype(np.float32)
    if mixup_alpha > 0:
        lam = rng.beta(mixup_alpha, mixup_alpha, size=(len(idx), 1)).astype(np.float32)
        perm = rng.permutation(len(idx))
        images = lam[:, :, None, None] * images + (1 - lam[:, :, None, None]) * images[perm]
        features = lam * features + (1 - lam) * features[perm]
        targets = lam * targets + (1 - lam) * targets[perm]
        real_share = lam[:, 0] * real_share + (1 - lam[:, 0]) * real_share[perm]
    inputs = {"image": images, "features": features}
    if distiller is not None and distiller.embedding_weight > 0:
        return inputs, [targets, distiller.embedding_targets(inputs, real_share)]
    return inputs, targets


def _batches(data: Dataset, order: np.ndarray, scaler, n_classes: int, batch_size: int, rng: np.random.Generator,
             mixup_alpha: float, style_strength: float, distiller: Distiller | None = None):
    """The epoch's batches, the next one prepared in a thread while the model trains on this one."""
    jobs = iter([(order[start:start + batch_size], int(seed)) for start, seed in
                 zip(range(0, len(order) - batch_size + 1, batch_size), rng.integers(2**63, size=len(order)))])
    with ThreadPoolExecutor(1, thread_name_prefix="augment") as pool:
        def submit(job: tuple[np.ndarray, int]):
            return pool.submit(_batch, data, job[0], scaler, n_classes, job[1], mixup_alpha, style_strength,
                               distiller)

        pending = [submit(job) for job in itertools.islice(jobs, 1)]
        while pending:
            current = pending.pop()
            following = next(jobs, None)
            if following is not None:
                pending.append(submit(following))
            yield current.result()


def with_head(model, class_names: Sequence[str], known: Sequence[str] = ()):
    """``model`` with a new final layer of one logit per name in ``class_names`` on the same embedding.

    A class the model already has (its name in ``known``, the model's output order) starts from the model's
    own weights for it; the others start fresh. Fine-tuning from a random head for classes the model already
    tells apart costs what it knew (measured on 922 real files in four of the shipped classes, 16 epochs:
    test top-1 0.51 from a fresh head, 0.84 from the carried weights).
    """
    keras = import_keras()
    old_head = final_layer(model)
    head = keras.layers.Dense(len(class_names), name=f"logits_{len(class_names)}")
    logits = head(embedding_tensor(model))
    kernel, bias = head.get_weights()
    old_kernel, old_bias = old_head.get_weights()
    known = list(known)
    for index, name in enumerate(class_names):
        if name in known:
            kernel[:, index], bias[index] = old_kernel[:, known.index(name)], old_bias[known.index(name)]
    head.set_weights([kernel, bias])
    return keras.Model(model.inputs, logits, name=model.name)


@dataclass
class Recipe:
    """Training settings (defaults: the shipped model's recipe)."""

    epochs: int = 40
    per_class: int = 500  # draws per class per epoch
    real_share: float = 0.6  # of a class's draws, when it has both real and simulated files
    draws_per_real_file: float | None = None  # per epoch, for a class with simulated files too (epoch_indices)
    outlier_share: float = 0.5  # outlier-exposure draws per epoch, as a share of per_class (when there are any)
    batch_size: int = 32
    peak_lr: float = 2e-3
    mixup_alpha: float = 0.2
    style_strength: float = 1.0
    width: int = 2  # channel multiplier of a model built from scratch
    seed: int = 0
    # fine-tuning: None trains every layer; 0 keeps each network's stem (first convolution, batch norm) as it is, and
    # n > 0 its first n separable blocks too
    frozen_blocks: int | None = None
    # fine-tuning: None trains real planes on their labels; w >= 0 on the teacher's outputs instead (Distiller), w
    # weighting the embedding term (0: the softmax alone)
    distill: float | None = None
    # with distill: the share of real planes distilled as served (Distiller.as_served_share)
    distill_as_served: float = 0.0
    # fine-tuning: keep every batch norm in inference mode with its moving statistics (set_batch_norm_trainable)
    freeze_batch_norm: bool = False


def train_model(data: Dataset, scaler, class_names: list[str], recipe: Recipe, initial_model=None,
                progress: bool = False, teacher=None):
    """Train (or fine-tune ``initial_model``) with style augmentation, mixup and warmup-then-cosine decay; with
    ``recipe.distill``, real planes learn ``teacher``'s outputs (:class:`Distiller`)."""
    keras = import_keras()

    keras.utils.set_random_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    n_classes = len(class_names)
    model = initial_model if initial_model is not None else build_model(n_classes, data_loader.N_FEATURES,
                                                                        width=recipe.width)
    if recipe.frozen_blocks is not None:
        logger.info("stems and %d separable blocks kept as they are: %d layers frozen", recipe.frozen_blocks,
                    freeze_stems(model, recipe.frozen_blocks))
    if recipe.freeze_batch_norm:
        logger.info("%d batch norms kept in inference mode", set_batch_norm_trainable(model, False))
    distiller = None
    if recipe.distill is not None:
        if teacher is None:
            raise ValueError("distillation needs a teacher model")
        distiller = Distiller(teacher, (data.groups != "sim") & (data.labels != OUTLIER), recipe.distill,
                              recipe.distill_as_served)
    # the embedding term trains the model through a view of it that also outputs its embedding
    trained = with_embedding_output(model) if distiller is not None and recipe.distill > 0 else model

    def draw() -> np.ndarray:
        return epoch_indices(data, n_classes, recipe.per_class, recipe.real_share, rng, recipe.outlier_share,
                             recipe.draws_per_real_file)

    # the schedule spans the batches actually run: outlier draws add to the classes' (every epoch draws as many)
    first_order = draw()
    steps_per_epoch = max(len(first_order) // recipe.batch_size, 1)
    schedule = warmup_cosine(recipe.peak_lr, warmup_steps=steps_per_epoch, total_steps=steps_per_epoch * recipe.epochs)
    class_loss = keras.losses.CategoricalCrossentropy(from_logits=True)
    trained.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4),
                    loss=class_loss if trained is model else [class_loss, weighted_embedding_error],
                    metrics=["accuracy"] if trained is model else None)
    bar = _progress(progress, recipe.epochs * steps_per_epoch)
    for epoch in range(recipe.epochs):
        started = time.perf_counter()
        order = first_order if epoch == 0 else draw()
        losses = []
        for x, y in _batches(data, order, scaler, n_classes, recipe.batch_size, rng, recipe.mixup_alpha,
                             recipe.style_strength, distiller):
            losses.append(trained.train_on_batch(x, y, return_dict=True))
            if bar is not None:
                bar.update(1)
        accuracy = f" acc {float(losses[-1]['accuracy']):.3f}" if "accuracy" in losses[-1] else ""
        logger.info("epoch %d/%d loss %.4f%s (%.0f s)", epoch + 1, recipe.epochs,
                    float(np.mean([m["loss"] for m in losses])), accuracy, time.perf_counter() - started)
    if bar is not None:
        bar.close()
    if recipe.freeze_batch_norm:  # the saved model trains as usual if fine-tuned again
        set_batch_norm_trainable(model, True)
    return model


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="batch", desc="training", file=sys.stderr, dynamic_ncols=True)


def raw_features(data: Dataset) -> np.ndarray:
    """Unaugmented features of every training plane (what the scaler is fitted on)."""
    return np.stack([data_loader.sample_from_small(small).features for small in data.smalls])


def fit_scaler(features: np.ndarray):
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit(features)


def real_splits(train_dirs: list[Path], validation_dirs: list[Path], class_names: list[str], seed: int,
                fractions: tuple[float, float] = (0.6, 0.2)) -> list[LabelledFile]:
    """Real files split by object (see ``training.real_data``); validation-only sources go to validation whole."""
    files = real_data.assign_splits([f for d in train_dirs for f in real_data.discover(d, class_names)], fractions,
                                    seed)
    files += real_data.validation_only([f for d in validation_dirs for f in real_data.discover(d, class_names)])
    leaked = real_data.leaked_objects(files)
    if leaked:  # a validation-only source may show objects other sources train on: reported, not hidden
        logger.info("%d validation objects also appear in training sources (e.g. %s)", len(leaked),
                    ", ".join(sorted(leaked)[:5]))
    return files


@contextmanager
def work_directory(kept: Path | None) -> Iterator[Path]:
    """Where the simulated labelled directories go: ``kept`` (--work-dir) stays after the run; the default temporary
    one (about 3 GB of frames) is removed when the run ends, failed runs included."""
    if kept is not None:
        kept.mkdir(parents=True, exist_ok=True)
        yield kept
        return
    with tempfile.TemporaryDirectory(prefix="astro-train-") as scratch:
        yield Path(scratch)


def train_calibrate_evaluate(args: argparse.Namespace, work: Path, real: list[LabelledFile],
                             outlier_kinds: list[str], started: float) -> dict:
    """Train (unless --skip-train), refit the head, calibrate and evaluate into ``args.out``; the evaluation."""
    import joblib

    names = list(CLASS_NAMES)
    model_path, scaler_path = args.out / MODEL_NAME, args.out / SCALER_NAME
    # All simulation and decoding (process pools) happens before TensorFlow starts: forking after it is unsafe.
    calibration_dir = write_labelled_directory(work / "calibration", args.calibration_per_class, CALIBRATION_SEED)
    test_dir = write_labelled_directory(work / "test", args.test_per_class, TEST_SEED)
    ood_dir = write_ood_directory(work / "ood")  # evaluation kinds
    ood_fit_dir = write_ood_directory(work / "ood_fit", seed=OOD_FIT_SEED, per_synthetic=20)  # the learned gate's
    train_files = cap_per_source_class([f for f in real if f.split == "train"], args.max_real_per_source_class,
                                       args.seed)
    simulation_rows = head_refit.simulation_classes(Counter(f.label for f in train_files), names, args.head_refit_below)
    # every class: the other classes' frames are what the refitted rows must not claim
    head_dir = write_labelled_directory(work / "head_refit", args.calibration_per_class, HEAD_REFIT_SEED) \
        if simulation_rows else None
    if not args.skip_train:
        real_train, unreadable = real_dataset(train_files, names, single_bands=True)
        for path, cause in unreadable:
            logger.warning("%s: unreadable, left out: %s", path, cause)
        data = Dataset.concat([simulated_dataset(args.per_class, TRAIN_SEED), real_train])
        # a model fine-tuned keeps the scaler it was trained with
        scaler = (data_loader.load_scaler(args.init_model.parent / SCALER_NAME) if args.init_model
                  else fit_scaler(raw_features(data)))
        data = Dataset.concat([data, outlier_dataset(ood_fit_dir, outlier_kinds)])
        logger.info("%d training planes (%d real, %d outliers) ready after %.0f s", len(data), len(real_train),
                    int((data.labels == OUTLIER).sum()), time.perf_counter() - started)
        recipe = Recipe(epochs=args.epochs, per_class=args.epoch_per_class, real_share=args.real_share,
                        draws_per_real_file=args.draws_per_real_file, peak_lr=args.peak_lr, width=args.width,
                        seed=args.seed if args.model_seed is None else args.model_seed, distill=args.distill_real,
                        freeze_batch_norm=args.freeze_batch_norm, distill_as_served=args.distill_as_served)
        model = train_model(data, scaler, names, recipe,
                            initial_model=load_keras_model(args.init_model) if args.init_model else None,
                            teacher=load_keras_model(args.init_model) if args.distill_real is not None else None)
        del data
        model.save(model_path)
        joblib.dump(scaler, scaler_path)
    refitted = head_refit.refit_model_head(model_path, scaler_path, calibration.labelled_files(head_dir, names),
                                           names, simulation_rows) if head_dir else None
    real_calibration = cap_per_source_class([f for f in real if f.split == "calibration"],
                                            max(args.max_real_per_source_class // 3, 1), args.seed)
    thresholds_path = args.out / THRESHOLDS_NAME
    calibrated = calibrate_to_file(model_path, scaler_path, names,
                                   calibration.labelled_files(calibration_dir, names)
                                   + real_data.labelled_pairs(real_calibration, names),
                                   thresholds_path, args.temperature, 0.95,
                                   {"simulated_per_class": args.calibration_per_class,
                                    "real": real_data.summarise(real_calibration).get("calibration", {})},
                                   ood_quantile=args.ood_quantile)
    fit_set = add_ood_classifier(model_path, scaler_path, thresholds_path, calibrated, ood_fit_dir, outlier_kinds)
    evaluation = evaluate_all(model_path, scaler_path, thresholds_path, names,
                              simulated_test=calibration.labelled_files(test_dir, names),
                              real_validation=[f for f in real if f.split == "validation"],
                              ood_dir=ood_dir, output_dir=args.out / "evaluation",
                              seen_objects={f.object_key for f in real if f.split == "train"},
                              loko=(calibrated.embeddings, fit_set))
    evaluation["real_data"] = real_data.summarise(real)
    evaluation["head_refit"] = refitted
    return evaluation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="where the model, scaler and thresholds go (default: the repo root)")
    parser.add_argument("--real_dir", "--real-dir", type=Path, action="append", default=[],
                        help="a real labelled directory (one sub-folder per class), split by object into train, "
                             "calibration and validation; repeat for each source")
    parser.add_argument("--real_val_dir", "--real-val-dir", type=Path, action="append", default=[],
                        help="a real labelled directory used for validation only (never trained or calibrated on)")
    parser.add_argument("--per-class", type=int, default=400, help="simulated training frames per class")
    parser.add_argument("--calibration-per-class", type=int, default=150, help="simulated calibration frames")
    parser.add_argument("--test-per-class", type=int, default=200, help="simulated test frames")
    parser.add_argument("--max-real-per-source-class", type=int, default=600,
                        help="cap of real training files per (source, class); calibration takes a third of it")
    parser.add_argument("--epochs", type=int, default=Recipe.epochs)
    parser.add_argument("--epoch-per-class", type=int, default=Recipe.per_class, help="draws per class per epoch")
    parser.add_argument("--real-share", type=float, default=Recipe.real_share)
    parser.add_argument("--draws-per-real-file", type=float, default=Recipe.draws_per_real_file,
                        help="most draws per epoch of each real file of a source, in a class with simulated files")
    parser.add_argument("--width", type=int, default=Recipe.width, help="channel multiplier of the CNN")
    parser.add_argument("--init-model", type=Path, default=None,
                        help=f"fine-tune this model (a merged ensemble too), with the {SCALER_NAME} beside it, instead "
                             "of training one from scratch")
    parser.add_argument("--peak-lr", type=float, default=Recipe.peak_lr, help="learning rate after warmup")
    parser.add_argument("--distill-real", type=float, default=None, metavar="W",
                        help="with --init-model: real training planes learn that model's outputs instead of their "
                             "labels, and W (0 for none) weights holding its embedding (MODEL_CARD.md: measured, "
                             "not shipped)")
    parser.add_argument("--distill-as-served", type=float, default=0.0, metavar="SHARE",
                        help="with --distill-real: this share of the real planes is shown as served (a dihedral view, "
                             "no style or photometric augmentation) (MODEL_CARD.md: measured, not shipped)")
    parser.add_argument("--freeze-batch-norm", action="store_true",
                        help="with --init-model: keep every batch norm in inference mode, its moving statistics as "
                             "they are (MODEL_CARD.md: measured, not shipped)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="operating temperature to calibrate at (default: the fitted one)")
    parser.add_argument("--ood-quantile", type=float, default=0.95,
                        help="quantile of the calibration files that the Mahalanobis, feature, member and smooth-area "
                             f"gates let through; the layer gate keeps its {calibration.LAYER_GATE_QUANTILE} "
                             "(MODEL_CARD.md: what it trades)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="writes the simulated labelled directories there and keeps them (default: a temporary "
                             "directory, about 3 GB, removed when the run ends)")
    parser.add_argument("--skip-train", action="store_true",
                        help="keep the model and scaler in --out; only recalibrate and evaluate")
    parser.add_argument("--outlier-kinds", default=",".join(OUTLIER_KINDS),
                        help="out-of-distribution kinds (training/ood.py) shown in training and fitted by the learned "
                             "gate; the other kinds stay held out for evaluation ('' for none)")
    parser.add_argument("--head-refit-below", type=int, default=head_refit.SIMULATION_CLASS_MAX_REAL,
                        help="refit the final layer's rows of classes with fewer real training files than this on "
                             "fresh simulated frames (training/head_refit.py; 0: never)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the real-data split (and of training unless "
                                                              "--model-seed is given)")
    parser.add_argument("--model-seed", type=int, default=None,
                        help="seed of initialisation and sampling only: members of an ensemble differ in it and "
                             "share the split (training.ensemble)")
    args = parser.parse_args(argv)
    if not 0 < args.ood_quantile < 1:
        parser.error(f"--ood-quantile must be in (0, 1), got {args.ood_quantile}")
    if args.distill_real is not None and (args.init_model is None or args.distill_real < 0):
        parser.error("--distill-real needs --init-model (the teacher) and a weight >= 0")
    if not 0 <= args.distill_as_served <= 1 or (args.distill_as_served and args.distill_real is None):
        parser.error("--distill-as-served needs --distill-real and a share in [0, 1]")
    if args.freeze_batch_norm and args.init_model is None:
        parser.error("--freeze-batch-norm needs --init-model (a model built from scratch has no statistics to keep)")
    try:
        require_full_install("training")
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    outlier_kinds = [kind.strip() for kind in args.outlier_kinds.split(",") if kind.strip()]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    data_loader.tune_malloc()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    real = real_splits(args.real_dir, args.real_val_dir, list(CLASS_NAMES), args.seed)
    logger.info("real files per split, source and class: %s", json.dumps(real_data.summarise(real)))
    with work_directory(args.work_dir) as work:
        evaluation = train_calibrate_evaluate(args, work, real, outlier_kinds, started)
    write_json(args.out / "evaluation" / "evaluation.json", evaluation)
    logger.info("done in %.0f s; evaluation in %s", time.perf_counter() - started, args.out / "evaluation")
    print(json.dumps({"model": str(args.out / MODEL_NAME), "scaler": str(args.out / SCALER_NAME),
                      "thresholds": str(args.out / THRESHOLDS_NAME),
                      "summary": evaluation["summary"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
