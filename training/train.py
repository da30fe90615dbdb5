"""Regenerate the shipped model, scaler and operating point from scratch.

    python -m training.train                      # full recipe (about 15 min on 2 cores)
    python -m training.train --per-class 12 --epochs 1 --out /tmp/tiny   # smoke run

Steps: simulate labelled frames and write them as real archive files, read
them back through ``data_loader.load_sample`` (the production path), fit the
feature scaler, train the two-input Keras model with RandAugment-style
augmentation, mixup and a warmup-then-cosine learning rate, then calibrate
the operating point and evaluate on a held-out set with another seed, through
``inference_runner`` on labelled directories.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import data_loader
from training.ood import write_ood_directory
from training.simulator import CLASS_NAMES, FILE_VARIANTS, render_frame, write_frame

logger = logging.getLogger(__name__)

MODEL_NAME = "multimodal_classifier_mixup_warmup_randaug_2.keras"
SCALER_NAME = "feature_scaler.joblib"
THRESHOLDS_NAME = "thresholds_prod_precision.json"
FRAME_SIZES = (256, 384, 512, 640, 768, 1024)
TRAIN_SEED, CALIBRATION_SEED, TEST_SEED = 1, 2, 3


@dataclass
class Dataset:
    """Preprocessed samples, compact: images as float16, raw (unscaled) features as float32."""

    images: np.ndarray  # (N, 448, 448) float16
    features: np.ndarray  # (N, N_FEATURES) float32
    labels: np.ndarray  # (N,) int


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


def _sample_worker(args: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, int]:
    label_index, index, seed = args
    with tempfile.TemporaryDirectory() as scratch:
        path = write_labelled_file(Path(scratch), label_index, index, seed)
        sample = data_loader.load_sample(path)  # the production path, on a real file
    return sample.image.astype(np.float16), sample.features, label_index


def build_dataset(per_class: int, seed: int, workers: int = os.cpu_count() or 1) -> Dataset:
    """Simulate ``per_class`` files of each class and preprocess them through data_loader."""
    jobs = [(label_index, index, seed) for index in range(per_class) for label_index in range(len(CLASS_NAMES))]
    with ProcessPoolExecutor(max_workers=workers, initializer=data_loader.tune_malloc) as pool:
        results = list(pool.map(_sample_worker, jobs, chunksize=8))
    images, features, labels = zip(*results)
    return Dataset(np.stack(images), np.stack(features), np.array(labels))


def load_or_build_dataset(cache: Path | None, per_class: int) -> Dataset:
    """Reuse a cached npz of preprocessed samples when it matches ``per_class``, else build (and cache) it."""
    if cache is not None and cache.exists():
        with np.load(cache) as stored:
            if int(stored["per_class"]) == per_class:
                return Dataset(stored["images"], stored["features"], stored["labels"])
    data = build_dataset(per_class, TRAIN_SEED)
    if cache is not None:
        np.savez(cache, images=data.images, features=data.features, labels=data.labels, per_class=per_class)
    return data


def write_labelled_directory(directory: Path, per_class: int, seed: int, workers: int = os.cpu_count() or 1) -> Path:
    """A labelled directory (one sub-folder per class) for calibration and evaluation."""
    jobs = [(label_index, index) for index in range(per_class) for label_index in range(len(CLASS_NAMES))]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(write_labelled_file, [directory] * len(jobs), *zip(*jobs), [seed] * len(jobs), chunksize=8))
    return directory


# --------------------------------------------------------------------------- model


def build_model(n_classes: int, n_features: int, image_size: int = data_loader.IMAGE_SIZE, width: int = 1):
    """Two-input CNN sized for CPU serving; outputs logits (temperature is applied outside)."""
    import keras
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


def warmup_cosine(peak: float, warmup_steps: int, total_steps: int):
    """Linear warmup to ``peak`` then cosine decay to zero."""
    import keras

    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak * 0.02,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=peak,
        warmup_steps=warmup_steps,
    )


def rand_augment(images: np.ndarray, rng: np.random.Generator, magnitude: float = 0.5) -> np.ndarray:
    """RandAugment-style: a random dihedral view plus two random photometric/geometric ops per image."""
    out = np.empty(images.shape, dtype=np.float32)
    for i, image in enumerate(images.astype(np.float32)):
        image = np.rot90(image, int(rng.integers(4)))
        if rng.random() < 0.5:
            image = image[:, ::-1]
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


def _batches(data: Dataset, scaled: np.ndarray, batch_size: int, rng: np.random.Generator, mixup_alpha: float):
    """One epoch of augmented, mixed-up batches (inputs dict, soft labels)."""
    order = rng.permutation(len(data.labels))
    n_classes = len(CLASS_NAMES)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        images = rand_augment(data.images[idx], rng)[..., None]
        features = scaled[idx]
        targets = np.eye(n_classes, dtype=np.float32)[data.labels[idx]]
        if mixup_alpha > 0:
            lam = rng.beta(mixup_alpha, mixup_alpha, size=(batch_size, 1)).astype(np.float32)
            perm = rng.permutation(batch_size)
            images = lam[:, :, None, None] * images + (1 - lam[:, :, None, None]) * images[perm]
            features = lam * features + (1 - lam) * features[perm]
            targets = lam * targets + (1 - lam) * targets[perm]
        yield {"image": images, "features": features}, targets


def train_model(data: Dataset, scaler, epochs: int, batch_size: int = 32, peak_lr: float = 2e-3,
                mixup_alpha: float = 0.2, seed: int = 0, width: int = 1):
    """Train the two-input model with augmentation, mixup and warmup-then-cosine decay."""
    import keras

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    scaled = data_loader.apply_scaler(data.features, scaler)
    model = build_model(len(CLASS_NAMES), data_loader.N_FEATURES, width=width)
    steps_per_epoch = max(len(data.labels) // batch_size, 1)
    schedule = warmup_cosine(peak_lr, warmup_steps=steps_per_epoch, total_steps=steps_per_epoch * epochs)
    model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    for epoch in range(epochs):
        started = time.perf_counter()
        losses = [model.train_on_batch(x, y, return_dict=True) for x, y in
                  _batches(data, scaled, batch_size, rng, mixup_alpha)]
        logger.info("epoch %d/%d loss %.4f acc %.3f (%.0f s)", epoch + 1, epochs,
                    float(np.mean([m["loss"] for m in losses])), float(losses[-1]["accuracy"]),
                    time.perf_counter() - started)
    return model


def fit_scaler(features: np.ndarray):
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit(features)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent,
                        help="where the model, scaler and thresholds go (default: the repo root)")
    parser.add_argument("--per-class", type=int, default=700, help="training frames per class")
    parser.add_argument("--calibration-per-class", type=int, default=300)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--width", type=int, default=1, help="channel multiplier of the CNN")
    parser.add_argument("--work-dir", type=Path, default=None, help="keeps the labelled directories (default: temp)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="npz of preprocessed training samples: reused when present, written otherwise")
    parser.add_argument("--skip-train", action="store_true",
                        help="keep the model and scaler in --out; only recalibrate and evaluate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    data_loader.tune_malloc()
    import joblib

    import inference_runner

    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_path, scaler_path = args.out / MODEL_NAME, args.out / SCALER_NAME
    # All simulation (process pools) happens before TensorFlow starts: forking after it is unsafe.
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="astro-train-"))
    calibration_dir = write_labelled_directory(work / "calibration", args.calibration_per_class, CALIBRATION_SEED)
    test_dir = write_labelled_directory(work / "test", args.test_per_class, TEST_SEED)
    ood_dir = write_ood_directory(work / "ood")
    if not args.skip_train:
        data = load_or_build_dataset(args.cache, args.per_class)
        logger.info("%d training samples ready after %.0f s", len(data.labels), time.perf_counter() - started)
        scaler = fit_scaler(data.features)
        model = train_model(data, scaler, args.epochs, seed=args.seed, width=args.width)
        model.save(model_path)
        joblib.dump(scaler, scaler_path)
    thresholds_path = args.out / THRESHOLDS_NAME
    artifacts = ["--model_path", str(model_path), "--scaler_path", str(scaler_path)]
    steps = [
        ["calibrate", "--labelled_dir", str(calibration_dir), "--class_names", ",".join(CLASS_NAMES),
         "--output", str(thresholds_path), *artifacts, "--quiet"],
        ["evaluate", "--labelled_dir", str(test_dir), "--ood_dir", str(ood_dir), "--thresholds", str(thresholds_path),
         "--output_dir", str(args.out / "evaluation"), *artifacts, "--quiet"],
    ]
    for step in steps:
        code = inference_runner.main(step)
        if code != 0:
            logger.error("%s failed with exit code %d", step[0], code)
            return code
    logger.info("done in %.0f s; evaluation in %s", time.perf_counter() - started, args.out / "evaluation")
    print(json.dumps({"model": str(model_path), "scaler": str(scaler_path), "thresholds": str(thresholds_path)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
