"""Classify FITS/TIFF archives with the multimodal Keras classifier at a calibrated operating point.

Library: ``ClassifierService`` (load once per process, ``predict_paths`` /
``iter_predict_paths`` / ``predict_arrays``). CLI: ``filesystem`` (classify a
directory tree into a JSON report); ``cli.py`` adds the commands of the modules
built on this one (``calibrate``, ``evaluate``, ``train``). See README.md.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import data_loader
from backends import (
    BACKENDS,
    FULL_TTA_VIEWS,
    ArtifactError,
    KerasBackend,
    LiteRTBackend,
    ModelBackend,
    Outputs,
    export_litert,
    gpu_visible,
    installed,
    litert_path_for,
    litert_pin,
    require_full_install,
    sha256_of,
)
from report import (
    HDU_KEY,
    OUTPUT_FORMATS,
    SCHEMA_VERSION,
    UNKNOWN,
    Checkpoint,
    CheckpointError,
    Counts,
    FileFingerprint,
    PredictionRecord,
    check_writable,
    checkpoint_path,
    format_of,
    read_report,
    sort_key,
    utc_now,
    write_json_atomic,
    write_report,
)

__version__ = "0.1.0"
logger = logging.getLogger("inference_runner")

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL_PATH = HERE / "multimodal_classifier_mixup_warmup_randaug_2.keras"
DEFAULT_SCALER_PATH = HERE / "feature_scaler.joblib"
DEFAULT_THRESHOLDS_PATH = HERE / "thresholds_prod_precision.json"
DEFAULT_TEMPERATURE = 0.7
# a class with fewer calibration files than this gets a gate's pooled radius (its own quantile would be noise)
GATE_MIN_CLASS_FILES = 20
SET_METHOD = "aps-randomised"  # the prediction sets' score and rule (aps_scores); thresholds files name it
DEFAULT_HEADER_KEYS = ("OBJECT", "DATE-OBS", "MJD-OBS", "EXPTIME", "FILTER", "INSTRUME", "TELESCOP")

EXIT_OK, EXIT_FILE_ERRORS, EXIT_USAGE, EXIT_ARTIFACTS, EXIT_OUTPUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

__all__ = [
    "ArtifactError",
    "ClassifierService",
    "FeatureGate",
    "FileFingerprint",
    "OodClassifier",
    "OodGate",
    "OperatingPoint",
    "PredictionRecord",
    "main",
    "scan_paths",
]


# --------------------------------------------------------------------------- operating point


def class_quantiles(values: np.ndarray, labels: np.ndarray, classes: Iterable[int], quantile: float,
                    fallback: float, min_files: int = 1) -> tuple[float, ...]:
    """Per class in ``classes``: the ``quantile`` of ``values`` over the rows of that class in ``labels``, or
    ``fallback`` for a class with fewer than ``min_files`` rows (a gate's limit per class)."""
    values, labels = np.asarray(values, dtype=np.float64), np.asarray(labels)
    return tuple(float(np.quantile(values[labels == c], quantile)) if (labels == c).sum() >= min_files else fallback
                 for c in classes)


@dataclass(frozen=True)
class OodGate:
    """Out-of-distribution gate: Mahalanobis distance of a file's embedding to the nearest class mean.

    Fitted on the calibration set (class means, pooled covariance); a file
    farther than ``max_distance`` (a high quantile of the calibration files'
    out-of-fold distances) abstains whatever its score.

    With ``class_max_distance`` a file nearest a class whose own files spread wider than that gets the class's
    radius instead: the pooled quantile is set by the compact classes, and it turned away 30% of the simulated
    artifact calibration files (blank frames, trails, cosmic rays), against 0.4-4% of the other classes'. The
    pooled radius stays the floor, so no class's radius is tighter than one for all.
    """

    means: np.ndarray  # (K, E)
    precision: np.ndarray  # (E, E) inverse of the pooled covariance
    max_distance: float
    quantile: float
    class_max_distance: tuple[float, ...] | None = None  # per row of ``means``: max(pooled, the class's quantile)

    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: np.ndarray, quantile: float = 0.95, ridge: float = 1e-3,
            folds: int = 10) -> OodGate:
        """Means and covariance from all files; ``max_distance`` the ``quantile`` of each file's distance under a
        gate fitted without its fold (stratified, seeded), as a new file's would be: the covariance fitted to the
        files themselves puts them closer than new ones (with a 192-wide embedding and 1,351 files: 0.95 quantile
        109 in-sample against 121 out of fold, and 11.7% of new simulated files beyond the in-sample one).
        ``folds`` < 2, or a class with a single file: in-sample distances. Each class with at least
        ``GATE_MIN_CLASS_FILES`` files gets the larger of the pooled radius and its own files' quantile."""
        gate = cls._fitted(embeddings, labels, quantile, ridge)
        folds = min(folds, int(np.unique(labels, return_counts=True)[1].min()))
        distances = cls._out_of_fold_distances(embeddings, labels, quantile, ridge, folds) if folds >= 2 \
            else gate.distance(embeddings)
        pooled = float(np.quantile(distances, quantile))
        own = class_quantiles(distances, labels, np.unique(labels), quantile, pooled, GATE_MIN_CLASS_FILES)
        return dataclasses.replace(gate, max_distance=pooled, class_max_distance=tuple(max(pooled, q) for q in own))

    @classmethod
    def _fitted(cls, embeddings: np.ndarray, labels: np.ndarray, quantile: float, ridge: float) -> OodGate:
        classes = np.unique(labels)
        means = np.stack([embeddings[labels == k].mean(axis=0) for k in classes])
        residuals = embeddings - means[np.searchsorted(classes, labels)]
        covariance = residuals.T @ residuals / len(embeddings)
        covariance += ridge * np.trace(covariance) / len(covariance) * np.eye(len(covariance))
        return cls(means, np.linalg.inv(covariance), float("inf"), quantile)

    @classmethod
    def _out_of_fold_distances(cls, embeddings: np.ndarray, labels: np.ndarray, quantile: float, ridge: float,
                               folds: int) -> np.ndarray:
        from sklearn.model_selection import StratifiedKFold

        distances = np.empty(len(labels))
        for kept, held_out in StratifiedKFold(folds, shuffle=True, random_state=0).split(embeddings, labels):
            gate = cls._fitted(embeddings[kept], labels[kept], quantile, ridge)
            distances[held_out] = gate.distance(embeddings[held_out])
        return distances

    def class_distances(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to each class mean: (rows of ``embeddings``, rows of ``means``).

        As matrix products, (x - m) P (x - m) = xPx - 2 xPm + mPm: per file, the layer gate's three maps took 0.88 ms
        through one einsum over the centred rows and take 0.19 ms so (the embedding gate 0.21 -> 0.04 ms)."""
        weighted = embeddings @ self.precision
        own = np.einsum("ne,ne->n", weighted, embeddings)[:, None]
        means = (self.means @ self.precision * self.means).sum(axis=1)[None, :]
        return own - 2.0 * weighted @ self.means.T + means

    def distance(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean, per row of ``embeddings``."""
        return self.class_distances(embeddings).min(axis=1)

    def radius(self, embeddings: np.ndarray) -> np.ndarray:
        """The radius each row of ``embeddings`` is held to: that of its nearest class mean."""
        return self._radius(self.class_distances(embeddings))

    def _radius(self, class_distances: np.ndarray) -> np.ndarray:
        if self.class_max_distance is None:
            return np.full(len(class_distances), self.max_distance)
        return np.asarray(self.class_max_distance)[class_distances.argmin(axis=1)]

    def is_outside(self, embeddings: np.ndarray) -> np.ndarray:
        class_distances = self.class_distances(embeddings)
        return class_distances.min(axis=1) > self._radius(class_distances)

    def to_json(self) -> dict[str, Any]:
        return {"kind": "mahalanobis_embedding", "quantile": self.quantile, "max_distance": self.max_distance,
                "class_max_distance": None if self.class_max_distance is None else list(self.class_max_distance),
                "means": self.means.tolist(), "precision": self.precision.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OodGate:
        per_class = data.get("class_max_distance")
        return cls(np.asarray(data["means"], dtype=np.float64), np.asarray(data["precision"], dtype=np.float64),
                   float(data["max_distance"]), float(data["quantile"]),
                   None if per_class is None else tuple(float(d) for d in per_class))


@dataclass(frozen=True)
class OodClassifier:
    """Learned out-of-distribution gate: a logistic model on the embedding, in-distribution files against
    generated out-of-distribution kinds (photographs, text, the Moon, planets, spectra, ...).

    The Mahalanobis gate only knows how far a file is from the classes; this one has seen what non-astronomical
    images look like to the model. ``threshold`` lets a set share of calibration files through.
    """

    mean: np.ndarray  # (E,) standardisation of the embedding
    scale: np.ndarray  # (E,)
    weights: np.ndarray  # (E,)
    bias: float
    threshold: float  # logit above which a file is out of distribution
    kinds: tuple[str, ...] = ()  # the out-of-distribution kinds it was fitted on

    def logit(self, embeddings: np.ndarray) -> np.ndarray:
        return ((embeddings - self.mean) / self.scale) @ self.weights + self.bias

    def is_outside(self, embeddings: np.ndarray) -> np.ndarray:
        return self.logit(embeddings) > self.threshold

    def to_json(self) -> dict[str, Any]:
        return {"kind": "logistic_embedding", "threshold": self.threshold, "bias": self.bias, "kinds": list(self.kinds),
                "mean": self.mean.tolist(), "scale": self.scale.tolist(), "weights": self.weights.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OodClassifier:
        return cls(*(np.asarray(data[k], dtype=np.float64) for k in ("mean", "scale", "weights")),
                   float(data["bias"]), float(data["threshold"]), tuple(data.get("kinds", ())))


def mean_neighbour_distance(queries: np.ndarray, reference: np.ndarray, k: int, skip_self: bool = False,
                            chunk: int = 1024) -> np.ndarray:
    """Mean Euclidean distance of each query row to its ``k`` nearest ``reference`` rows (``skip_self``: the
    queries are the reference, so each row's own zero distance is left out). ``chunk`` query rows at a time
    bound the distance matrix held in memory."""
    queries, reference = np.asarray(queries, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    reference_norms = (reference**2).sum(axis=1)[None, :]
    take = k + int(skip_self)
    means = []
    for start in range(0, len(queries), chunk):
        block = queries[start:start + chunk]
        squared = (block**2).sum(axis=1)[:, None] + reference_norms - 2.0 * block @ reference.T
        distances = np.sqrt(np.clip(squared, 0.0, None))
        nearest = np.sort(np.partition(distances, take - 1, axis=1)[:, :take], axis=1)
        means.append(nearest[:, int(skip_self):].mean(axis=1))
    return np.concatenate(means) if means else np.zeros(0)


@dataclass(frozen=True)
class FeatureGate:
    """Out-of-distribution gate on the hand-crafted features: mean distance of a file's scaled features to its
    ``k`` nearest calibration files.

    The embedding gates see only what the network learned to tell apart, and an image of a kind it never saw
    (the Moon, a planet, a radio map) lands among the classes there; its pixel statistics (noise, sources,
    power spectrum) still sit apart. Fitted on calibration files alone, it has never seen any
    out-of-distribution kind, so what it stops is not something it was fitted on.

    With ``class_max_distance`` the radius is that of the file's predicted class: the calibration files of one
    class pack closely (hundreds of survey cutouts of galaxies), those of another spread wide (simulated
    artifacts), and one radius for all would let a file labelled ``galaxy`` lie as far from everything as a
    typical artifact does.
    """

    reference: np.ndarray  # (N, F) scaled features of the calibration files (and their scaled whiteness)
    k: int
    max_distance: float  # the ``quantile`` of the calibration files' own (leave-one-out) distances
    quantile: float
    class_max_distance: tuple[float, ...] | None = None  # per class index: the same quantile over its own files
    # (mean, std) of the calibration files' data_loader.noise_whiteness, which is then the reference's last column:
    # a radio map's beam-correlated noise sets it apart from the galaxies its other features resemble
    whiteness_scale: tuple[float, float] | None = None

    @classmethod
    def fit(cls, features: np.ndarray, k: int = 20, quantile: float = 0.95, labels: np.ndarray | None = None,
            n_classes: int | None = None, whiteness: np.ndarray | None = None) -> FeatureGate:
        """With ``labels`` (class index per row), a radius per class: the ``quantile`` of that class's own
        distances, or the pooled one for a class with fewer than ``GATE_MIN_CLASS_FILES`` files. With
        ``whiteness`` (per row), that too, standardised over these files, as one more column, when at least
        ``GATE_MIN_CLASS_FILES`` of them were judged (data_loader gives 1.0 to a file it does not judge): a calibration
        set of 8-bit images alone has no spread to scale by, and a linear file would lie at any distance from it."""
        scale = None
        whiteness = None if whiteness is None else np.asarray(whiteness, dtype=np.float64)
        if whiteness is not None and np.count_nonzero(whiteness != 1.0) >= GATE_MIN_CLASS_FILES:
            scale = (round(float(whiteness.mean()), 6), round(max(float(whiteness.std()), 1e-6), 6))
        reference = np.round(_with_whiteness(np.asarray(features, dtype=np.float64), whiteness, scale), 5)
        if len(reference) <= k:
            raise ValueError(f"the feature gate needs more than k={k} calibration files, got {len(reference)}")
        own = mean_neighbour_distance(reference, reference, k, skip_self=True)
        pooled = float(np.quantile(own, quantile))
        if labels is None:
            return cls(reference, k, pooled, quantile, whiteness_scale=scale)
        labels = np.asarray(labels)
        classes = range(int(labels.max()) + 1 if n_classes is None else n_classes)
        return cls(reference, k, pooled, quantile,
                   class_quantiles(own, labels, classes, quantile, pooled, GATE_MIN_CLASS_FILES), scale)

    def distance(self, features: np.ndarray, whiteness: np.ndarray | None = None) -> np.ndarray:
        if self.whiteness_scale is not None and whiteness is None:
            raise ValueError("this feature gate measures noise whiteness: pass the files' noise_whiteness")
        return mean_neighbour_distance(_with_whiteness(features, whiteness, self.whiteness_scale), self.reference,
                                       self.k)

    def is_outside(self, features: np.ndarray, predicted: np.ndarray | None = None,
                   whiteness: np.ndarray | None = None) -> np.ndarray:
        """Per row of ``features``; ``predicted`` (class index per row) is needed when the radius is per class,
        ``whiteness`` (per row) when the gate measures it."""
        distance = self.distance(features, whiteness)
        if self.class_max_distance is None:
            return distance > self.max_distance
        if predicted is None:
            raise ValueError("this feature gate has a radius per class: pass each file's predicted class")
        return distance > np.asarray(self.class_max_distance)[np.asarray(predicted, dtype=int)]

    def to_json(self) -> dict[str, Any]:
        return {"kind": "knn_features", "k": self.k, "quantile": self.quantile, "max_distance": self.max_distance,
                "class_max_distance": None if self.class_max_distance is None else list(self.class_max_distance),
                "whiteness_scale": None if self.whiteness_scale is None else list(self.whiteness_scale),
                "reference": self.reference.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureGate:
        per_class, scale = data.get("class_max_distance"), data.get("whiteness_scale")
        return cls(np.asarray(data["reference"], dtype=np.float64), int(data["k"]), float(data["max_distance"]),
                   float(data["quantile"]), None if per_class is None else tuple(float(d) for d in per_class),
                   None if scale is None else (float(scale[0]), float(scale[1])))


def _with_whiteness(features: np.ndarray, whiteness: np.ndarray | None,
                    scale: tuple[float, float] | None) -> np.ndarray:
    """The feature gate's columns: the scaled features, then the standardised whiteness when ``scale`` is set."""
    if scale is None:
        return features
    column = (np.asarray(whiteness, dtype=np.float64) - scale[0]) / scale[1]
    return np.column_stack([np.asarray(features, dtype=np.float64), column])


def _entropy(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, 1e-12, None))).sum(axis=-1)


@dataclass(frozen=True)
class MemberGate:
    """Out-of-distribution gate of an ensemble (``training.ensemble``): how much its members disagree.

    Members trained apart agree on what they learned and disagree on what neither saw. Each member's logits
    are its block of the embedding through its block of the final layer (times the number of members, plus
    the shared bias); the disagreement is their Jensen-Shannon divergence at ``temperature`` (entropy of the
    mean distribution minus the mean entropy). Fitted on calibration files alone: ``max_divergence`` is the
    ``quantile`` of theirs.
    """

    kernel: np.ndarray  # (E, K) the final layer's kernel, member blocks in embedding order
    bias: np.ndarray  # (K,)
    sizes: tuple[int, ...]  # each member's embedding width
    temperature: float
    max_divergence: float
    quantile: float

    def divergence(self, embeddings: np.ndarray) -> np.ndarray:
        edges = np.cumsum((0, *self.sizes))
        logits = np.stack([len(self.sizes) * embeddings[:, a:b] @ self.kernel[a:b] + self.bias
                           for a, b in itertools.pairwise(edges)], axis=1)  # (N, members, K)
        members = calibrated_probs(logits[..., None, :], self.temperature)  # one "view" each: per-member softmax
        return _entropy(members.mean(axis=1)) - _entropy(members).mean(axis=1)

    def is_outside(self, embeddings: np.ndarray) -> np.ndarray:
        return self.divergence(embeddings) > self.max_divergence

    @classmethod
    def fit(cls, embeddings: np.ndarray, kernel: np.ndarray, bias: np.ndarray, sizes: Sequence[int],
            temperature: float, quantile: float = 0.95) -> MemberGate:
        if sum(sizes) != kernel.shape[0] or len(sizes) < 2:
            raise ValueError(f"member widths {list(sizes)} do not split a final layer of {kernel.shape[0]} inputs")
        unfitted = cls(np.asarray(kernel, dtype=np.float64), np.asarray(bias, dtype=np.float64), tuple(sizes),
                       temperature, np.inf, quantile)
        return dataclasses.replace(unfitted, max_divergence=float(np.quantile(unfitted.divergence(embeddings),
                                                                              quantile)))

    def to_json(self) -> dict[str, Any]:
        return {"kind": "ensemble_divergence", "sizes": list(self.sizes), "temperature": self.temperature,
                "quantile": self.quantile, "max_divergence": self.max_divergence, "bias": self.bias.tolist(),
                "kernel": self.kernel.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MemberGate:
        return cls(np.asarray(data["kernel"], dtype=np.float64), np.asarray(data["bias"], dtype=np.float64),
                   tuple(int(n) for n in data["sizes"]), float(data["temperature"]), float(data["max_divergence"]),
                   float(data["quantile"]))


@dataclass(frozen=True)
class SmoothGate:
    """Out-of-distribution gate on a file's smooth areas above the dark sky (``data_loader.smooth_fraction``).

    Photographs have them (an out-of-focus background, a petal, a wall); the areas of a sky image above its
    background carry noise or grain. A photograph can sit among the nebula photographs both in the network's
    embedding and in the hand-crafted features, and still show a smooth background no nebula has. Fitted on
    calibration files alone, like the feature gate: ``class_max_fraction`` is the ``quantile`` of each class's
    own files, and a file abstains when its share lies above that of the class it is given.
    """

    class_max_fraction: tuple[float, ...]
    quantile: float

    @classmethod
    def fit(cls, fractions: np.ndarray, labels: np.ndarray, n_classes: int, quantile: float = 0.95) -> SmoothGate:
        """Each class's ``quantile`` of its calibration files' fractions (a class without files: no limit)."""
        return cls(class_quantiles(fractions, labels, range(n_classes), quantile, 1.0), quantile)

    def is_outside(self, fractions: np.ndarray, predicted: np.ndarray) -> np.ndarray:
        """Per file: its smooth fraction lies above the limit of its ``predicted`` class (index per row)."""
        limits = np.asarray(self.class_max_fraction)[np.asarray(predicted, dtype=int)]
        return np.asarray(fractions, dtype=np.float64) > limits

    def to_json(self) -> dict[str, Any]:
        return {"kind": "smooth_fraction", "quantile": self.quantile,
                "class_max_fraction": list(self.class_max_fraction)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SmoothGate:
        return cls(tuple(float(v) for v in data["class_max_fraction"]), float(data["quantile"]))


@dataclass(frozen=True)
class LayerGate:
    """Out-of-distribution gate on the network's own feature maps (Lee et al. 2018, without tuning on any
    out-of-distribution image): the channel means of the last activation maps of the (first member's) image path,
    each map measured as the embedding gate measures the embedding (Mahalanobis distance to the nearest class
    mean, pooled covariance), the distances turned into p-values against the calibration files' own (out of fold)
    and combined as the mean of -log p over the maps.

    The embedding is what the network keeps to tell the classes apart; a photograph it places among the nebula
    photographs there can still set its earlier maps apart (measured on the shipped model: wallpapers turned away
    89.8% -> 92.7%, other photographs 93.8% -> 95.0%, at 0.003 of simulated coverage; MODEL_CARD.md).
    """

    maps: tuple[OodGate, ...]  # one per feature map: class means and pooled precision
    references: tuple[np.ndarray, ...]  # each map's calibration distances out of fold, sorted (the p-values')
    sizes: tuple[int, ...]  # each map's width in the layer-means vector
    max_score: float  # the ``quantile`` of the calibration files' combined scores (out of fold)
    quantile: float

    @classmethod
    def fit(cls, layer_means: np.ndarray, labels: np.ndarray, sizes: Sequence[int], quantile: float = 0.99,
            ridge: float = 1e-3, folds: int = 10) -> LayerGate:
        """Each map's gate from all files; the p-values' references and ``max_score`` from each file's distances
        under gates fitted without its fold (``folds`` < 2, or a class with one file: in-sample), as for
        :meth:`OodGate.fit`."""
        if sum(sizes) != layer_means.shape[1]:
            raise ValueError(f"feature-map widths {list(sizes)} do not split {layer_means.shape[1]} layer means")
        edges = np.cumsum((0, *sizes))
        blocks = [np.asarray(layer_means[:, a:b], dtype=np.float64) for a, b in itertools.pairwise(edges)]
        folds = min(folds, int(np.unique(labels, return_counts=True)[1].min()))
        maps, own = [], []  # own: each map's out-of-fold distances, in file order
        for block in blocks:
            gate = OodGate._fitted(block, labels, quantile, ridge)
            maps.append(OodGate(np.round(gate.means, 7), _round_significant(gate.precision), np.inf, quantile))
            own.append(_round_significant(OodGate._out_of_fold_distances(block, labels, quantile, ridge, folds)
                                          if folds >= 2 else maps[-1].distance(block)))
        references = tuple(np.sort(distances) for distances in own)
        unfitted = cls(tuple(maps), references, tuple(int(n) for n in sizes), np.inf, quantile)
        own_scores = unfitted._combined(own, references)
        return dataclasses.replace(unfitted, max_score=float(np.quantile(own_scores, quantile)))

    def _combined(self, distances: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> np.ndarray:
        """Mean over maps of -log p, p the share of the map's calibration distances at or beyond a file's."""
        total = 0.0
        for distance, reference in zip(distances, references):
            beyond = 1.0 - np.searchsorted(reference, distance, side="left") / (len(reference) + 1)
            total = total - np.log(np.maximum(beyond, 1.0 / (len(reference) + 1)))
        return total / len(distances)

    def score(self, layer_means: np.ndarray) -> np.ndarray:
        edges = np.cumsum((0, *self.sizes))
        distances = [gate.distance(np.asarray(layer_means[:, a:b], dtype=np.float64))
                     for gate, (a, b) in zip(self.maps, itertools.pairwise(edges))]
        return self._combined(distances, self.references)

    def is_outside(self, layer_means: np.ndarray) -> np.ndarray:
        return self.score(layer_means) > self.max_score

    def to_json(self) -> dict[str, Any]:
        return {"kind": "mahalanobis_feature_maps", "quantile": self.quantile, "max_score": self.max_score,
                "sizes": list(self.sizes), "references": [r.tolist() for r in self.references],
                "maps": [{"means": g.means.tolist(), "precision": g.precision.tolist()} for g in self.maps]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerGate:
        maps = tuple(OodGate(np.asarray(m["means"], dtype=np.float64), np.asarray(m["precision"], dtype=np.float64),
                             np.inf, float(data["quantile"])) for m in data["maps"])
        return cls(maps, tuple(np.asarray(r, dtype=np.float64) for r in data["references"]),
                   tuple(int(n) for n in data["sizes"]), float(data["max_score"]), float(data["quantile"]))


def _round_significant(values: np.ndarray, digits: int = 7) -> np.ndarray:
    """``values`` to ``digits`` significant digits: what the thresholds file keeps of a large matrix (the fitted
    gate is the one loaded back)."""
    values = np.asarray(values, dtype=np.float64)
    return np.array([float(f"{v:.{digits}g}") for v in values.ravel()]).reshape(values.shape)


@dataclass(frozen=True)
class HduRef:
    """One image HDU of a FITS file (``--hdu all``: each CCD of a mosaic is classified on its own)."""

    path: str
    index: int
    extname: str | None = None

    def __str__(self) -> str:
        return f"{self.path}[{self.index}]"  # cfitsio's extended file name


def expand_hdus(paths: Iterable[str | os.PathLike[str]]) -> Iterator[str | os.PathLike[str] | HduRef]:
    """Each FITS path as one HduRef per image HDU (headers only are read); other paths, and FITS files whose
    headers cannot be read (their record will carry the error), as they are."""
    for path in paths:
        try:
            found = data_loader.image_hdus(path)  # refuses anything but FITS by its name, before any I/O
        except data_loader.ImageLoadError as exc:
            logger.debug("%s", exc)
            found = []
        if not found:
            yield path
        for index, extname in found:
            yield HduRef(str(path), index, extname)


@dataclass(frozen=True)
class _Loaded:
    """A decoded file (or HDU) waiting for its batch (sample is None when it failed)."""

    path: str
    fingerprint: FileFingerprint | None
    sample: data_loader.Sample | None
    error: str | None
    hdu: HduRef | None = None


@dataclass(frozen=True)
class ScoredFile:
    """Model outputs for one input before postprocessing (what calibration and evaluation consume)."""

    path: str
    fingerprint: FileFingerprint | None
    view_logits: np.ndarray | None  # (V, K)
    embedding: np.ndarray | None  # (E,), mean over views
    error: str | None
    info: dict[str, Any] | None = None  # data_loader's facts about the file (FITS header cards, sky position)
    hdu: dict[str, Any] | None = None  # {"index", "extname"} of the FITS HDU read
    tiebreak: float | None = None  # the file's prediction-set tie-break (set_tiebreak of its features)
    features: np.ndarray | None = None  # (F,) the scaled hand-crafted features (the feature gate measures them)
    identity_embedding: np.ndarray | None = None  # (E,) the untransformed view's: what the gates see without TTA
    smooth_fraction: float | None = None  # what the smooth-area gate measures (data_loader.smooth_fraction)
    layer_means: np.ndarray | None = None  # (L,) the identity view's feature-map means (what the layer gate measures)
    noise_whiteness: float | None = None  # what the feature gate also measures (data_loader.noise_whiteness)


@dataclass(frozen=True)
class OperatingPoint:
    """Class order, calibrated temperature and per-class thresholds (one set with TTA, one without)."""

    class_names: tuple[str, ...]
    temperature: float
    thresholds: dict[bool, dict[str, float]]  # keyed by TTA on/off
    model_sha256: str | None = None
    scaler_sha256: str | None = None
    ood_gate: OodGate | None = None
    source: str | None = None
    document: dict[str, Any] | None = None
    ood_classifier: OodClassifier | None = None
    litert_sha256: str | None = None  # the LiteRT export of the model, checked against Keras when pinned
    feature_gate: FeatureGate | None = None
    member_gate: MemberGate | None = None  # ensembles only
    class_bias: tuple[float, ...] | None = None  # added to the logits / T before softmax (None: zeros)
    tta_views: int = FULL_TTA_VIEWS  # views per file with TTA the model was calibrated with (backends.tta_view_count)
    smooth_gate: SmoothGate | None = None
    layer_gate: LayerGate | None = None

    def probabilities(self, view_logits: np.ndarray, temperature: float | None = None) -> np.ndarray:
        """Calibrated class probabilities of (..., V, K) view logits: this point's class bias and ``temperature``
        (default: the calibrated one)."""
        return calibrated_probs(view_logits, self.temperature if temperature is None else temperature,
                                self.class_bias)

    def set_quantile(self, tta: bool) -> np.ndarray | float | None:
        """The conformal quantile(s) of the prediction sets (None when the file has none of this version)."""
        sets = (self.document or {}).get("prediction_sets")
        if not sets or sets.get("method") != SET_METHOD:
            return None
        fitted = sets["tta" if tta else "no_tta"]
        return np.asarray(fitted["class_quantiles"]) if sets.get("class_conditional") else fitted["quantile"]

    def inside(self, embeddings: np.ndarray, features: np.ndarray | None,
               predicted: np.ndarray | None = None, smooth_fractions: np.ndarray | None = None,
               layer_means: np.ndarray | None = None, whiteness: np.ndarray | None = None) -> np.ndarray:
        """Per file (rows of ``embeddings``, of the scaled ``features``, of ``predicted``, the top class
        index, which a feature gate with a radius per class and the smooth-area gate need, of
        ``smooth_fractions``, of the identity view's ``layer_means`` and of the noise ``whiteness``): inside every
        out-of-distribution gate this operating point has."""
        inside = np.ones(len(embeddings), dtype=bool)
        for gate in (self.ood_gate, self.ood_classifier, self.member_gate):
            if gate is not None:
                inside &= ~gate.is_outside(embeddings)
        if self.feature_gate is not None:
            if features is None:
                raise ValueError("this operating point has a feature gate: pass the files' scaled features")
            inside &= ~self.feature_gate.is_outside(features, predicted, whiteness)
        if self.smooth_gate is not None:
            if smooth_fractions is None or predicted is None:
                raise ValueError("this operating point has a smooth-area gate: pass the files' smooth fractions "
                                 "and predicted classes")
            inside &= ~self.smooth_gate.is_outside(smooth_fractions, predicted)
        if self.layer_gate is not None:
            if layer_means is None:
                raise ValueError("this operating point has a layer gate: pass the files' feature-map means")
            inside &= ~self.layer_gate.is_outside(layer_means)
        return inside

    @classmethod
    def uncalibrated(cls, class_names: Sequence[str]) -> OperatingPoint:
        """Temperature 1 and no thresholds: what calibration measures from."""
        zero = {name: 0.0 for name in class_names}
        return cls(tuple(class_names), 1.0, {True: zero, False: zero})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> OperatingPoint:
        try:
            with open(path, encoding="utf-8") as handle:
                document = json.load(handle)
        except FileNotFoundError as exc:
            raise ArtifactError(f"{path}: thresholds file not found") from exc
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: thresholds file is not valid JSON: {exc}") from exc
        try:
            names = tuple(document["class_names"])
            points = document["operating_points"]
            thresholds = {tta: {name: float(points[key]["thresholds"][name]) for name in names}
                          for tta, key in ((True, "tta"), (False, "no_tta"))}
            gate = OodGate.from_json(document["ood_gate"]) if document.get("ood_gate") else None
            learned = OodClassifier.from_json(document["ood_classifier"]) if document.get("ood_classifier") else None
            features = FeatureGate.from_json(document["feature_gate"]) if document.get("feature_gate") else None
            members = MemberGate.from_json(document["member_gate"]) if document.get("member_gate") else None
            smooth = SmoothGate.from_json(document["smooth_gate"]) if document.get("smooth_gate") else None
            layers = LayerGate.from_json(document["layer_gate"]) if document.get("layer_gate") else None
            sets = document.get("prediction_sets")
            if sets and sets.get("method") != SET_METHOD:
                logger.warning("%s: prediction sets of method %r are not this version's %r: records get none "
                               "until you recalibrate", path, sets.get("method"), SET_METHOD)
            bias = document.get("class_bias")
            if bias is not None and len(bias) != len(names):
                raise ArtifactError(f"{path}: class_bias has {len(bias)} values for {len(names)} classes")
            return cls(names, float(document["temperature"]), thresholds, document.get("model_sha256"),
                       document.get("scaler_sha256"), gate, str(path), document, learned,
                       document.get("litert_sha256"), features, members,
                       None if bias is None else tuple(float(b) for b in bias),
                       int(document.get("tta_views", FULL_TTA_VIEWS)), smooth, layers)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{path}: thresholds file lacks {exc} (see README 'Operating point')") from exc


def _check_pinned(kind: str, path: Path, expected: str | None, actual: str, allow_mismatch: bool) -> None:
    if expected is None or expected == actual:
        return
    message = (f"{path}: {kind} SHA-256 {actual[:12]}... does not match the {expected[:12]}... the thresholds "
               f"were calibrated for; recalibrate (inference-runner calibrate) or pass --allow-mismatch")
    if not allow_mismatch:
        raise ArtifactError(message)
    logger.warning("%s (continuing: mismatch allowed)", message)


# --------------------------------------------------------------------------- scanning


def scan_paths(root: str | os.PathLike[str], shard: tuple[int, int] | None = None,
               suffixes: tuple[str, ...] = data_loader.ARCHIVE_SUFFIXES) -> Iterator[Path]:
    """Files ending in ``suffixes`` (default FITS/TIFF) under ``root``, depth first, each directory sorted by name.

    Symlinks are followed only while they stay inside ``root``; a directory
    reached twice (a symlink cycle) is walked once. ``shard=(k, n)`` keeps the
    files whose relative path hashes to ``k`` of ``n`` (1-based): a stable,
    disjoint split that needs no coordination between machines.
    """
    root = Path(root).absolute()
    root_real = os.path.realpath(root)
    visited: set[str] = set()

    def inside(path: str) -> bool:
        real = os.path.realpath(path)
        return real == root_real or real.startswith(root_real + os.sep)

    def walk(directory: str) -> Iterator[Path]:
        real = os.path.realpath(directory)
        if real in visited:
            return
        visited.add(real)
        try:
            with os.scandir(directory) as entries:
                ordered = sorted(entries, key=lambda entry: entry.name)
        except OSError as exc:
            logger.warning("%s: cannot list directory: %s", directory, exc.strerror or exc)
            return
        for entry in ordered:
            if entry.is_symlink() and not inside(entry.path):
                logger.warning("%s: symlink leads outside %s; skipped", entry.path, root)
                continue
            try:
                if entry.is_dir():
                    yield from walk(entry.path)
                elif entry.is_file() and data_loader.is_supported(entry.name, suffixes) and (
                        shard is None or shard_of(os.path.relpath(entry.path, root), shard[1]) == shard[0]):
                    yield Path(entry.path)
            except OSError as exc:
                logger.warning("%s: skipped: %s", entry.path, exc.strerror or exc)

    yield from walk(str(root))


def shard_of(relative_path: str, shards: int) -> int:
    """1-based shard of a relative path: a hash of the path, stable across machines and runs."""
    digest = hashlib.blake2b(relative_path.replace(os.sep, "/").encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards + 1


# --------------------------------------------------------------------------- the service


class ClassifierService:
    """Load the model, scaler and operating point once; classify files or arrays many times.

    Parameters
    ----------
    model_path, scaler_path, thresholds_path : path-like, optional
        Default to the artifacts shipped next to this module.
    operating_point : OperatingPoint, optional
        Use this instead of reading ``thresholds_path`` (calibration does).
    allow_mismatch : bool
        Downgrade a model/scaler SHA-256 mismatch with the thresholds file to a warning.
    workers : int, optional
        Decode threads (default: the number of CPUs).
    intra_op_threads : int, optional
        The model runtime's compute threads: LiteRT's interpreter threads, or TensorFlow's intra-op pool
        (default: the number of CPUs; TensorFlow honours it only when this is its first use in the process).
    inter_op_threads : int, optional
        TensorFlow's inter-op pool (default 1).
    backend : "auto", "keras" or "litert"
        ``litert`` runs ``<model>.tflite`` (pinned by the thresholds file) without TensorFlow; ``keras`` runs
        the ``.keras`` model; ``auto`` takes LiteRT when its pinned export is present and no GPU is visible.
    hdu, max_pixels :
        Passed to ``data_loader.load_sample`` for every file.
    header_keys : sequence of str
        FITS header cards copied into each record's ``header`` (missing cards are left out).

    Raises
    ------
    ArtifactError
        A file is missing or unreadable, or does not match the thresholds' pins.

    Notes
    -----
    Nothing heavy happens at import; construct the service in the process that
    uses it (in a Celery prefork child, not in the parent).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        scaler_path: str | os.PathLike[str] | None = None,
        thresholds_path: str | os.PathLike[str] | None = None,
        *,
        operating_point: OperatingPoint | None = None,
        allow_mismatch: bool = False,
        workers: int | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        hdu: int | str | None = None,
        max_pixels: int = data_loader.DEFAULT_MAX_PIXELS,
        header_keys: Sequence[str] = DEFAULT_HEADER_KEYS,
        backend: str = "auto",
    ) -> None:
        self.model_path = Path(model_path or DEFAULT_MODEL_PATH)
        self.scaler_path = Path(scaler_path or DEFAULT_SCALER_PATH)
        self.thresholds_path = None if operating_point else Path(thresholds_path or DEFAULT_THRESHOLDS_PATH)
        self.workers = max(1, workers or data_loader.available_cpus())
        self.hdu = hdu
        self.max_pixels = max_pixels
        self.header_keys = tuple(key.upper() for key in header_keys)
        for kind, path in (("model", self.model_path), ("scaler", self.scaler_path)):
            if not path.is_file():
                raise ArtifactError(f"{path}: {kind} file not found")
        self.operating_point = operating_point or OperatingPoint.load(self.thresholds_path)
        self.model_sha256 = sha256_of(self.model_path)
        self.scaler_sha256 = sha256_of(self.scaler_path)
        self.thresholds_sha256 = sha256_of(self.thresholds_path) if self.thresholds_path else None
        _check_pinned("model", self.model_path, self.operating_point.model_sha256, self.model_sha256, allow_mismatch)
        _check_pinned("scaler", self.scaler_path, self.operating_point.scaler_sha256, self.scaler_sha256,
                      allow_mismatch)
        data_loader.tune_malloc()
        try:
            self.scaler = data_loader.load_scaler(self.scaler_path)
        except (ValueError, OSError) as exc:
            raise ArtifactError(str(exc)) from exc
        self.backend, self.backend_sha256 = self._load_backend(backend, intra_op_threads, inter_op_threads,
                                                               allow_mismatch)
        if self.backend.n_outputs != len(self.operating_point.class_names):
            raise ArtifactError(f"{self.backend.artifact}: model has {self.backend.n_outputs} outputs but the "
                                f"operating point names {len(self.operating_point.class_names)} classes")
        if self.operating_point.layer_gate is not None and not self.backend.has_layer_means:
            raise ArtifactError(f"{self.backend.artifact}: outputs no feature-map means, which the layer gate of "
                                f"{self.thresholds_path} measures; re-export it (inference-runner export)")
        calibrated_views = self.operating_point.tta_views
        if self.operating_point.document is not None and self.backend.tta_views != calibrated_views:
            raise ArtifactError(f"{self.thresholds_path}: calibrated with {calibrated_views} TTA views per file, but "
                                f"{self.model_path.name} takes {self.backend.tta_views}; recalibrate it")
        logger.info("loaded %s on %s, %s threads (%s outputs, %d image channels, %d TTA views)",
                    self.backend.artifact.name, self.backend.name, self.backend.threads,
                    "probability" if self.backend.outputs_probabilities else "logit", self.backend.channels,
                    self.backend.tta_views)
        self._lock = threading.Lock()  # one forward pass at a time per service (neither runtime is re-entrant)

    def _load_backend(self, requested: str, threads: int | None, inter_op_threads: int | None,
                      allow_mismatch: bool) -> tuple[ModelBackend, str]:
        """The runtime to use and the SHA-256 of the file it runs."""
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {requested!r}")
        export = litert_path_for(self.model_path)
        export_sha256 = sha256_of(export) if export.is_file() else None
        name = self._auto_backend(export, export_sha256) if requested == "auto" else requested
        if name == "keras":
            return KerasBackend(self.model_path, threads, inter_op_threads), self.model_sha256
        if export_sha256 is None:
            raise ArtifactError(f"{export}: LiteRT model not found; make it with `inference-runner export "
                                f"--model_path {self.model_path} --thresholds THRESHOLDS` (full install)")
        pinned = self.operating_point.litert_sha256
        if pinned is None and self.operating_point.document is not None:
            message = (f"{self.thresholds_path}: pins no LiteRT model, so {export.name} is not known to compute "
                       f"what {self.model_path.name} does; run `inference-runner export --model_path "
                       f"{self.model_path} --thresholds {self.thresholds_path}`, or pass --allow-mismatch")
            if not allow_mismatch:
                raise ArtifactError(message)
            logger.warning("%s (continuing: mismatch allowed)", message)
        _check_pinned("LiteRT model", export, pinned, export_sha256, allow_mismatch)
        return LiteRTBackend(export, threads, self.operating_point.tta_views), export_sha256

    def _auto_backend(self, export: Path, export_sha256: str | None) -> str:
        """LiteRT where it is installed, its export is pinned and present, and no GPU would serve Keras better."""
        if not installed("keras"):
            return "litert"
        pinned = self.operating_point.litert_sha256
        if not installed("ai_edge_litert") or gpu_visible() or pinned is None or export_sha256 is None:
            return "keras"
        if export_sha256 != pinned:
            logger.warning("%s: not the LiteRT export %s pins (re-export it); running the Keras model",
                           export, self.thresholds_path)
            return "keras"
        return "litert"

    @property
    def channels(self) -> int:
        return self.backend.channels

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.operating_point.class_names

    # ------------------------------------------------------------------ forward

    def _forward(self, images: np.ndarray, features: np.ndarray, tta: bool) -> Outputs:
        """The backend's outputs for every TTA view: (B, V, K) logits (or log-probabilities), (B, V, E)
        embeddings, the input of the model's final layer, where the out-of-distribution gates measure distances
        (on the mean over views; without TTA the one view is the mean), and (B, V, L) feature-map means (or
        None)."""
        with self._lock:
            output, embedding, means = self.backend.forward(images, features, tta)
        output = np.asarray(output, dtype=np.float64)
        if self.backend.outputs_probabilities:
            output = np.log(np.clip(output, 1e-12, None))  # softmax(log p / T) == softmax(z / T)
        return output, np.asarray(embedding, dtype=np.float64), None if means is None else np.asarray(means)

    def iter_scored(
        self, paths: Iterable[str | os.PathLike[str]], batch_size: int = 32, tta: bool = True
    ) -> Iterator[ScoredFile]:
        """Raw model outputs per path, in input order (calibration and evaluation build on this).

        Decoding runs in a thread pool ahead of inference through a bounded
        window of ``2 * batch_size`` files: memory is O(batch), not O(files).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        window: collections.deque[Future] = collections.deque()
        pending: list[_Loaded] = []
        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
            path_iter = iter(paths)
            for path in path_iter:
                window.append(pool.submit(self._load_one, path))
                if len(window) >= 2 * batch_size:
                    break
            while window:
                pending.append(window.popleft().result())
                next_path = next(path_iter, None)
                if next_path is not None:
                    window.append(pool.submit(self._load_one, next_path))
                if sum(item.sample is not None for item in pending) >= batch_size or not window:
                    yield from self._score(pending, tta)
                    pending = []

    def _score(self, pending: list[_Loaded], tta: bool) -> Iterator[ScoredFile]:
        good = [item.sample for item in pending if item.sample is not None]
        outputs: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = iter(())
        if good:
            logits, view_embeddings, view_means = self._forward(np.stack([s.image for s in good]),
                                                                np.stack([s.features for s in good]), tta)
            outputs = zip(logits, view_embeddings, view_means if view_means is not None else [None] * len(good))
        for item in pending:
            logits_one, views_one, means_one = next(outputs) if item.sample is not None else (None, None, None)
            info = item.sample.info if item.sample is not None else None
            features = item.sample.features if item.sample is not None else None
            tiebreak = set_tiebreak(features) if features is not None else None
            mean, identity = (views_one.mean(axis=0), views_one[0]) if views_one is not None else (None, None)
            smooth = item.sample.smooth_fraction if item.sample is not None else None
            whiteness = item.sample.noise_whiteness if item.sample is not None else None
            yield ScoredFile(item.path, item.fingerprint, logits_one, mean, item.error, info,
                             _hdu_of(item.hdu, info), tiebreak, features, identity, smooth,
                             None if means_one is None else means_one[0], whiteness)

    def _load_one(self, item: str | os.PathLike[str] | HduRef) -> _Loaded:
        ref = item if isinstance(item, HduRef) else None
        path, hdu = (ref.path, ref.index) if ref else (str(item), self.hdu)
        fingerprint = FileFingerprint.of(path)
        try:
            sample = data_loader.load_sample(path, self.scaler, hdu=hdu, max_pixels=self.max_pixels)
            return _Loaded(path, fingerprint, sample, None, ref)
        except data_loader.ImageLoadError as exc:
            logger.warning("%s", exc if ref is None else f"{exc} (HDU {ref.index})")
            return _Loaded(path, fingerprint, None, exc.cause, ref)
        except MemoryError:
            logger.error("%s: out of memory while decoding", item)
            return _Loaded(path, fingerprint, None, "out of memory while decoding", ref)
        except Exception as exc:  # a bad file must never cost another file its result
            logger.exception("%s: unexpected error while loading", item)
            return _Loaded(path, fingerprint, None, f"unexpected {type(exc).__name__}: {exc}", ref)

    # ------------------------------------------------------------------ postprocess

    def _record(self, scored: ScoredFile, tta: bool, temperature: float, abstain: bool) -> PredictionRecord:
        fingerprint = scored.fingerprint
        if scored.view_logits is None:
            return PredictionRecord.failure(scored.path, scored.error or "unknown error", fingerprint, scored.hdu)
        probs = self.operating_point.probabilities(scored.view_logits, temperature)
        top = int(np.argmax(probs))
        top_class = self.class_names[top]
        score = float(probs[top])
        reason = None
        if abstain:
            if not self.operating_point.inside(scored.embedding[None], scored.features[None], np.array([top]),
                                               np.array([scored.smooth_fraction]),
                                               None if scored.layer_means is None else scored.layer_means[None],
                                               np.array([scored.noise_whiteness]))[0]:
                reason = "out_of_distribution"
            elif score < self.operating_point.thresholds[tta][top_class]:
                reason = "low_score"
        quantile = self.operating_point.set_quantile(tta)
        if quantile is not None:
            members = prediction_set_masks(probs[None], quantile, np.array([scored.tiebreak]))[0]
            prediction_set = [self.class_names[k] for k in np.argsort(-probs, kind="stable") if members[k]]
        else:
            prediction_set = None
        info = scored.info or {}
        fits_header = info.get("header")
        return PredictionRecord(
            path=scored.path, label=UNKNOWN if reason else top_class, score=round(score, 6), top_class=top_class,
            abstained=reason is not None, abstain_reason=reason, prediction_set=prediction_set,
            sky=info.get("sky"), hdu=scored.hdu,
            header=None if fits_header is None else data_loader.header_values(fits_header, self.header_keys),
            probs={name: round(float(p), 6) for name, p in zip(self.class_names, probs)},
            timestamp=utc_now(), fingerprint=fingerprint.value if fingerprint else None,
            size=fingerprint.size if fingerprint else None,
            mtime=fingerprint.mtime_ns / 1e9 if fingerprint else None, error=None,
        )

    def resolve_temperature(self, temperature: float | None) -> float:
        """The temperature to apply: the calibrated one for None; warn about one the thresholds were not made at.

        (TTA on and off each have their own calibrated thresholds, so either setting is calibrated.)
        """
        calibrated = self.operating_point.temperature
        if temperature is None:
            return calibrated
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if abs(temperature - calibrated) > 1e-9:
            logger.warning("temperature %.3g differs from the calibrated %.3g: thresholds may not hold their "
                           "precision", temperature, calibrated)
        return temperature

    # ------------------------------------------------------------------ public API

    def iter_predict_paths(
        self,
        paths: Iterable[str | os.PathLike[str]],
        batch_size: int = 32,
        tta: bool = True,
        temperature: float | None = None,
        abstain: bool = True,
    ) -> Iterator[PredictionRecord]:
        """Stream one :class:`PredictionRecord` per path, in input order (generator form of predict_paths).

        ``temperature=None`` applies the calibrated temperature of the operating point.
        """
        temperature = self.resolve_temperature(temperature)
        for scored in self.iter_scored(paths, batch_size, tta):
            yield self._record(scored, tta, temperature, abstain)

    def predict_paths(
        self,
        paths: Iterable[str | os.PathLike[str]],
        batch_size: int = 32,
        tta: bool = True,
        temperature: float | None = None,
        abstain: bool = True,
    ) -> list[PredictionRecord]:
        """Classify files; one record per path in input order (failed files carry ``error``)."""
        return list(self.iter_predict_paths(paths, batch_size, tta, temperature, abstain))

    def predict_arrays(
        self,
        images: Sequence[np.ndarray],
        batch_size: int = 32,
        tta: bool = True,
        temperature: float | None = None,
        abstain: bool = True,
        names: Sequence[str] | None = None,
    ) -> list[PredictionRecord]:
        """Classify 2-D pixel arrays already in memory through the same preprocessing as files."""
        temperature = self.resolve_temperature(temperature)
        names = list(names) if names is not None else [f"<array {i}>" for i in range(len(images))]
        if len(names) != len(images):
            raise ValueError(f"got {len(names)} names for {len(images)} images")
        records: list[PredictionRecord] = []
        for start in range(0, len(images), batch_size):
            pending = []
            for name, image in zip(names[start:start + batch_size], images[start:start + batch_size]):
                try:
                    pending.append(_Loaded(name, None, data_loader.sample_from_array(image, self.scaler), None))
                except ValueError as exc:
                    pending.append(_Loaded(name, None, None, str(exc)))
            records += [self._record(scored, tta, temperature, abstain) for scored in self._score(pending, tta)]
        return records


def _hdu_of(ref: HduRef | None, info: dict[str, Any] | None) -> dict[str, Any] | None:
    """The HDU a record is about: the one asked for (``--hdu all``), else the one the FITS reader chose."""
    if ref is not None:
        return {"index": ref.index, "extname": ref.extname}
    if info and info.get("format") == "fits":
        return {"index": info["hdu"], "extname": info.get("extname")}
    return None


def calibrated_probs(view_logits: np.ndarray, temperature: float,
                     class_bias: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """Mean over the view axis of softmax(logits / T + class bias); (..., V, K) -> (..., K)."""
    scaled = np.asarray(view_logits, dtype=np.float64) / temperature
    if class_bias is not None:
        scaled = scaled + np.asarray(class_bias, dtype=np.float64)
    scaled -= scaled.max(axis=-1, keepdims=True)
    probs = np.exp(scaled)
    probs /= probs.sum(axis=-1, keepdims=True)
    return probs.mean(axis=-2)


def ranked_mass(probs: np.ndarray) -> np.ndarray:
    """(N, K): each class's probability plus that of every class ranked above it (the APS score of a class)."""
    return np.where(probs[:, None, :] >= probs[:, :, None], probs[:, None, :], 0.0).sum(axis=2)


def set_tiebreak(features: np.ndarray) -> float:
    """A number in [0, 1) fixed by a file's scaled features (a hash): the U of randomised APS, drawn from the file
    itself so that its set is the same on every run, backend and machine. Any fixed function of the file keeps
    the conformal guarantee; a hash spreads the values evenly, which makes the coverage exact."""
    digest = hashlib.blake2b(np.ascontiguousarray(features, dtype=np.float32).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def aps_scores(probs: np.ndarray, tiebreaks: np.ndarray) -> np.ndarray:
    """(N, K) randomised APS score of every class: the probability mass ranked above it plus (1 - U) of its own."""
    return ranked_mass(probs) - np.asarray(tiebreaks, dtype=np.float64)[:, None] * probs


def prediction_set_masks(probs: np.ndarray, quantile: np.ndarray | float, tiebreaks: np.ndarray) -> np.ndarray:
    """(N, K) conformal set membership: every class whose :func:`aps_scores` is within the quantile (one quantile
    per class for class-conditional sets). A set may be empty: when the model's top class is right more often
    than the coverage asks, some confident files need no class to keep the coverage exact."""
    quantiles = np.broadcast_to(np.asarray(quantile, dtype=np.float64), probs.shape[1:])
    # the tolerance keeps a class whose score equals the quantile in, whatever the summation order
    return aps_scores(probs, tiebreaks) <= quantiles + 1e-9


# --------------------------------------------------------------------------- filesystem run


class _StopRequested:
    """SIGINT/SIGTERM set a flag; the run finishes its batch, flushes the checkpoint and stops."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopRequested:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: finishing the current batch, then stopping", signal.Signals(signum).name)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _library_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("numpy", "tensorflow", "keras", "ai-edge-litert", "astropy", "tifffile", "scikit-learn", "Pillow",
                    "scipy"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            continue
    return versions


@dataclass
class RunOptions:
    """Settings of one ``filesystem`` run (what the CLI parsed, or what a caller passes)."""

    input_dir: Path
    output: Path
    batch_size: int = 32
    tta: bool = True
    temperature: float | None = None  # None: the operating point's calibrated temperature
    abstain: bool = True
    include_probs: bool = False
    output_format: str = "json"
    resume: bool = False
    previous_report: Path | None = None
    shard: tuple[int, int] | None = None
    progress: bool = True
    extensions: tuple[str, ...] = data_loader.ARCHIVE_SUFFIXES
    hdu_all: bool = False  # one record per image HDU of each FITS file

    def scan(self) -> Iterator[Path | HduRef]:
        """The files (or, with ``hdu_all``, the FITS files' image HDUs) this run covers, in scan order."""
        paths = scan_paths(self.input_dir, self.shard, self.extensions)
        return expand_hdus(paths) if self.hdu_all else paths


def _operating_point(service: ClassifierService, options: RunOptions) -> dict[str, Any]:
    """The operating point a run applies, as the report's meta spells it."""
    temperature = service.operating_point.temperature if options.temperature is None else options.temperature
    return {"thresholds": service.operating_point.thresholds[options.tta], "temperature": temperature,
            "tta": options.tta, "abstain": options.abstain}


def _run_key(service: ClassifierService, options: RunOptions) -> dict[str, Any]:
    """What must be equal for a checkpoint to be resumed."""
    return {"input_dir": str(options.input_dir), "model_sha256": service.model_sha256,
            "scaler_sha256": service.scaler_sha256, "thresholds_sha256": service.thresholds_sha256,
            "operating_point": _operating_point(service, options),
            "shard": list(options.shard) if options.shard else None, "extensions": list(options.extensions),
            "header_keys": list(service.header_keys), "hdu_all": options.hdu_all,
            "backend": {"name": service.backend.name, "sha256": service.backend_sha256}}


def _previous_records(path: Path | None, run_key: dict[str, Any], options: RunOptions) -> dict[str, dict[str, Any]]:
    """Records of an earlier report that may be carried over (same model, scaler and operating point), by key.

    Failed files are always redone; so are files without probabilities when this run reports them.
    """
    if path is None:
        return {}
    meta, records = read_report(path)
    same = (meta.get("model", {}).get("sha256") == run_key["model_sha256"]
            and meta.get("scaler", {}).get("sha256") == run_key["scaler_sha256"]
            and meta.get("thresholds_sha256") == run_key["thresholds_sha256"]
            and meta.get("operating_point") == run_key["operating_point"])
    if not same:
        logger.warning("%s: made with another model or operating point; nothing is reused", path)
        return {}
    return {_record_key(record, options.input_dir, options.hdu_all): record for record in records
            if record["error"] is None and (record.get("probs") is not None or not options.include_probs)}


def _progress_bar(enabled: bool, scan: Callable[[], Iterator[Path]]):
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    bar = tqdm(total=None, unit="file", desc="classifying", file=sys.stderr, dynamic_ncols=True)

    def count() -> None:  # the total arrives while inference already runs
        bar.total = sum(1 for _ in scan())
        bar.refresh()

    threading.Thread(target=count, daemon=True, name="count-files").start()
    return bar


def run_filesystem(service: ClassifierService, options: RunOptions) -> tuple[Counts, bool]:
    """Classify a tree into ``options.output`` via the checkpoint. Returns (counts, completed)."""
    options = dataclasses.replace(options, temperature=service.resolve_temperature(options.temperature))
    journal_path = checkpoint_path(options.output)
    run_key = _run_key(service, options)
    journal = Checkpoint(journal_path, run_key)
    if journal_path.exists() and not options.resume:
        raise CheckpointError(f"{journal_path}: an interrupted run left this checkpoint; rerun with --resume "
                              f"to continue it, or delete it to start over")
    done = journal.done_fingerprints() if options.resume else {}
    previous = _previous_records(options.previous_report, run_key, options)
    started_at = journal.first_started_at() or utc_now()
    journal.open_session(utc_now())
    bar = _progress_bar(options.progress, options.scan)
    counts = Counts()
    try:
        with _StopRequested() as stop:
            completed = _classify_into(service, options, journal, done, previous, bar, stop)
    finally:
        journal.close()
        if bar is not None:
            bar.close()
    if not completed:
        return counts, False
    for record in journal.merged_records():  # a first pass for the counts: meta comes before the results
        counts.add(record)
    meta = _report_meta(service, options, started_at, counts)
    write_report(options.output, meta, journal.merged_records(), options.output_format, options.include_probs)
    journal_path.unlink()
    return counts, True


def _classify_into(service: ClassifierService, options: RunOptions, journal: Checkpoint,
                   done: dict[str, str | None], previous: dict[str, dict[str, Any]], bar: Any,
                   stop: _StopRequested) -> bool:
    """Run inference on what is not done yet, appending each batch to the journal. False if stopped."""
    root = options.input_dir
    carried: list[tuple[str, dict[str, Any]]] = []

    def to_classify() -> Iterator[Path | HduRef]:
        for item in options.scan():
            relative = _item_key(item, root)
            fingerprint = FileFingerprint.of(item.path if isinstance(item, HduRef) else item)
            current = fingerprint.value if fingerprint else None
            if relative in done and done[relative] == current:
                _tick(bar)
                continue
            old = previous.get(relative)
            if old is not None and old["fingerprint"] == current:
                carried.append((relative, {**old, "reused": True}))
                _tick(bar)
                continue
            yield item

    batch: list[tuple[str, dict[str, Any]]] = []
    records = service.iter_predict_paths(to_classify(), options.batch_size, options.tta, options.temperature,
                                         options.abstain)
    for record in records:
        as_json = record.to_json()
        batch.append((_record_key(as_json, root, options.hdu_all), as_json))
        _tick(bar)
        if len(batch) >= options.batch_size:
            journal.append(_in_scan_order(carried, batch, final=False))
            batch = []
            if stop.requested:
                records.close()
                return False
    journal.append(_in_scan_order(carried, batch, final=True))
    return not stop.requested


def _relative_key(path: str | os.PathLike[str], root: Path, hdu_index: int | None = None) -> str:
    """A checkpoint key: the path relative to the root, with "/" separators, plus the HDU for ``--hdu all``."""
    relative = os.path.relpath(path, root).replace(os.sep, "/")
    return relative if hdu_index is None else relative + HDU_KEY.format(hdu_index)


def _item_key(item: Path | HduRef, root: Path) -> str:
    """The checkpoint key of a scanned item."""
    return _relative_key(item.path, root, item.index) if isinstance(item, HduRef) else _relative_key(item, root)


def _record_key(record: dict[str, Any], root: Path, hdu_all: bool) -> str:
    """The key of a record: the same as its item's (the HDU counts only when every HDU is a record)."""
    hdu = record.get("hdu") if hdu_all else None
    return _relative_key(record["path"], root, hdu["index"] if hdu else None)


def _in_scan_order(carried: list, batch: list, final: bool) -> list:
    """Fresh records plus the carried-over ones that sort before the batch's last, in scan order.

    The scan runs ahead of inference, so ``carried`` may hold paths beyond this
    batch; those wait for a later batch so the session stays sorted.
    """
    if final or not batch:
        ready, keep = list(carried), []
    else:
        last = sort_key(batch[-1][0])
        ready = [item for item in carried if sort_key(item[0]) < last]
        keep = [item for item in carried if sort_key(item[0]) >= last]
    carried[:] = keep
    return sorted(ready + batch, key=lambda item: sort_key(item[0]))


def _tick(bar: Any) -> None:
    if bar is not None:
        bar.update(1)


def _report_meta(service: ClassifierService, options: RunOptions, started_at: str, counts: Counts) -> dict[str, Any]:
    op = service.operating_point
    return {
        "schema_version": SCHEMA_VERSION,
        "tool_version": __version__,
        "model": {"path": str(service.model_path), "sha256": service.model_sha256},
        "scaler": {"path": str(service.scaler_path), "sha256": service.scaler_sha256},
        "backend": {"name": service.backend.name, "artifact": str(service.backend.artifact),
                    "sha256": service.backend_sha256, "threads": service.backend.threads},
        "thresholds_file": str(service.thresholds_path) if service.thresholds_path else None,
        "thresholds_sha256": service.thresholds_sha256,
        "class_names": list(op.class_names),
        "operating_point": _operating_point(service, options),
        "calibrated_temperature": op.temperature,
        "class_bias": None if op.class_bias is None else list(op.class_bias),
        "batch_size": options.batch_size,
        "include_probs": options.include_probs,
        "input_dir": str(options.input_dir),
        "extensions": list(options.extensions),
        "shard": f"{options.shard[0]}/{options.shard[1]}" if options.shard else None,
        "previous_report": str(options.previous_report) if options.previous_report else None,
        "started_at": started_at,
        "finished_at": utc_now(),
        **counts.as_json(options.abstain),
        "versions": _library_versions(),
    }


# --------------------------------------------------------------------------- CLI


def _shard_arg(text: str) -> tuple[int, int]:
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--shard takes K/N, e.g. 2/8; got {text!r}") from exc
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--shard K/N needs 1 <= K <= N; got {text!r}")
    return k, n


def _header_keys_arg(text: str) -> tuple[str, ...]:
    return tuple(key.strip().upper() for key in text.split(",") if key.strip())


def _extensions_arg(text: str) -> tuple[str, ...]:
    try:
        return data_loader.parse_suffixes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def add_artifact_args(parser: argparse.ArgumentParser, thresholds: bool = True) -> None:
    parser.add_argument("--model_path", "--model-path", type=Path, default=DEFAULT_MODEL_PATH)
    parser.add_argument("--scaler_path", "--scaler-path", type=Path, default=DEFAULT_SCALER_PATH)
    if thresholds:
        parser.add_argument("--thresholds", type=Path, default=DEFAULT_THRESHOLDS_PATH,
                            help="operating point JSON (default: the shipped one)")
        parser.add_argument("--allow-mismatch", action="store_true",
                            help="warn instead of refusing when model/scaler differ from what the thresholds pin")
    parser.add_argument("--workers", type=positive_int, default=None, help="decode threads (default: CPUs)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="model runtime: litert (the pinned <model>.tflite, no TensorFlow), keras, or auto "
                             "(litert when its pinned export is present and no GPU is visible; default)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="model runtime threads: LiteRT interpreter or TensorFlow intra-op (default: CPUs)")
    parser.add_argument("--hdu", default=None,
                        help="FITS HDU index or EXTNAME to read (default: the first image); filesystem also takes "
                             "'all': one record per image HDU (every CCD of a mosaic)")
    parser.add_argument("--header-keys", "--header_keys", type=_header_keys_arg, default=DEFAULT_HEADER_KEYS,
                        help="comma-separated FITS cards copied into each record (default: "
                             f"{','.join(DEFAULT_HEADER_KEYS)})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def add_filesystem_command(commands: Any) -> None:
    """Register ``filesystem`` on an ``add_subparsers()`` object."""
    fs = commands.add_parser("filesystem", help="classify every FITS/TIFF file under a directory")
    fs.add_argument("--input_dir", "--input-dir", type=Path, required=True)
    fs.add_argument("--output_json", "--output-json", type=Path, required=True)
    fs.add_argument("--output_format", "--output-format", choices=OUTPUT_FORMATS, default=None,
                    help="json, jsonl, or a table: ecsv, fits, votable, csv (default: from the output's extension, "
                         "else json)")
    fs.add_argument("--batch_size", "--batch-size", type=positive_int, default=32)
    fs.add_argument("--temperature", type=positive_float, default=None,
                    help="divide logits by this before softmax (default: the calibrated one)")
    fs.add_argument("--tta", action=argparse.BooleanOptionalAction, default=True,
                    help="average 4 flipped views per image (default: on)")
    fs.add_argument("--abstain_unknown", "--abstain-unknown", action=argparse.BooleanOptionalAction, default=True,
                    help="report 'unknown' below the class threshold (default: on)")
    fs.add_argument("--include-probs", "--include_probs", action="store_true", help="per-class probabilities")
    fs.add_argument("--dry-run", action="store_true", help="list what would be classified; load no model")
    fs.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    fs.add_argument("--previous_report", "--previous-report", type=Path, default=None,
                    help="reuse results of unchanged files from this earlier report")
    fs.add_argument("--shard", type=_shard_arg, default=None, help="K/N: take this machine's share of the tree")
    fs.add_argument("--fail-on-error", action="store_true", help="exit 1 when any file failed")
    fs.add_argument("--html", type=Path, default=None,
                    help="also write the HTML review page of the report here (JSON/JSONL reports)")
    fs.add_argument("--extensions", type=_extensions_arg, default=data_loader.ARCHIVE_SUFFIXES,
                    help="comma-separated file extensions to walk, e.g. .fits,.fz,.tif,.jpg,.png "
                         "(default: FITS and TIFF)")
    add_artifact_args(fs)
    fs.set_defaults(handler=_cmd_filesystem)



def _output_format(chosen: str | None, output: Path) -> str:
    """The format asked for, else the one the output's extension names, else JSON."""
    if chosen is not None:
        return chosen
    try:
        return format_of(output)
    except ValueError:
        return "json"


def add_convert_command(commands: Any) -> None:
    """Register ``convert`` (a JSON/JSONL report into any report format) on an ``add_subparsers()`` object."""
    conv = commands.add_parser("convert", help="convert a JSON/JSONL report to ECSV, FITS, VOTable, CSV or JSON")
    conv.add_argument("report", type=Path, help="a report written by filesystem (JSON or JSONL)")
    conv.add_argument("output", type=Path, help="the new file; its extension picks the format unless --format")
    conv.add_argument("--format", choices=OUTPUT_FORMATS, default=None)
    conv.add_argument("--quiet", action="store_true")
    conv.add_argument("--verbose", action="store_true")
    conv.set_defaults(handler=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    try:
        output_format = args.format or format_of(args.output)
        meta, records = read_report(args.report)
        check_writable(args.output.absolute())
        write_report(args.output.absolute(), meta, records, output_format, bool(meta.get("include_probs")))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, KeyError) as exc:
        print(f"error: {args.report} -> {args.output}: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    print(f"wrote {args.output} ({output_format})")
    return EXIT_OK


def pin_litert_export(thresholds_path: Path, model_path: Path) -> dict[str, str]:
    """Check the export next to ``model_path`` against it and pin it in the thresholds file calibrated for it."""
    try:
        document = json.loads(thresholds_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{thresholds_path}: cannot read the thresholds file: {exc}") from exc
    if document.get("model_sha256") != sha256_of(model_path):
        raise ArtifactError(f"{thresholds_path}: calibrated for another model than {model_path} (model_sha256 "
                            f"differs); pin the export in that model's thresholds file")
    pin = litert_pin(model_path)
    document.update(pin)
    write_json_atomic(thresholds_path, document)
    return pin


def add_export_command(commands: Any) -> None:
    """Register ``export`` (Keras model -> LiteRT, pinned in its thresholds file) on an ``add_subparsers()``."""
    ex = commands.add_parser("export", help="convert a Keras model to <model>.tflite for the LiteRT backend and pin "
                                            "it in its thresholds file (full install)")
    ex.add_argument("--model_path", "--model-path", type=Path, default=DEFAULT_MODEL_PATH)
    ex.add_argument("--thresholds", type=Path, default=None,
                    help="thresholds file calibrated for the model, where the export's SHA-256 is pinned (default: "
                         "the shipped one for the shipped model; without one the export is written but not pinned)")
    ex.add_argument("--quiet", action="store_true")
    ex.add_argument("--verbose", action="store_true")
    ex.set_defaults(handler=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    model_path = args.model_path.absolute()
    thresholds = args.thresholds
    if thresholds is None and model_path == DEFAULT_MODEL_PATH:
        thresholds = DEFAULT_THRESHOLDS_PATH
    try:
        require_full_install("export")
        if not model_path.is_file():
            raise ArtifactError(f"{model_path}: model file not found")
        started = time.perf_counter()
        output = export_litert(model_path)
        print(f"wrote {output} ({output.stat().st_size:,} bytes) in {time.perf_counter() - started:.1f} s")
        if thresholds is not None:
            pin = pin_litert_export(thresholds, model_path)
            print(f"pinned {pin['litert_sha256'][:12]}... in {thresholds} (outputs checked against the Keras model)")
        else:
            print("not pinned: pass --thresholds (the model's thresholds file) so the litert backend accepts it")
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ARTIFACTS
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    return EXIT_OK


CommandRegistrar = Callable[[Any], None]


def build_parser(registrars: Sequence[CommandRegistrar] = (add_filesystem_command,)) -> argparse.ArgumentParser:
    """The ``inference-runner`` parser with the subcommands each registrar adds (this module: ``filesystem``)."""
    parser = argparse.ArgumentParser(prog="inference-runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for register in registrars:
        register(commands)
    return parser


def configure_logging(quiet: bool, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def service_from_args(args: argparse.Namespace, **overrides: Any) -> ClassifierService:
    """The service a subcommand's artifact flags describe (``overrides`` go to the constructor)."""
    hdu = int(args.hdu) if args.hdu is not None and args.hdu.lstrip("-").isdigit() else args.hdu
    hdu = None if hdu == "all" else hdu  # every image HDU: the scan expands the files (RunOptions.hdu_all)
    options: dict[str, Any] = {"model_path": args.model_path, "scaler_path": args.scaler_path, "workers": args.workers,
                               "intra_op_threads": args.threads, "hdu": hdu, "header_keys": args.header_keys,
                               "backend": args.backend}
    if "operating_point" not in overrides:
        options.update(thresholds_path=args.thresholds, allow_mismatch=args.allow_mismatch)
    return ClassifierService(**options, **overrides)


def _cmd_filesystem(args: argparse.Namespace) -> int:
    input_dir = args.input_dir.absolute()
    if not input_dir.is_dir():
        print(f"error: --input_dir {input_dir}: not a directory", file=sys.stderr)
        return EXIT_USAGE
    output = args.output_json.absolute()
    if args.dry_run:
        count = 0
        for path in scan_paths(input_dir, args.shard, args.extensions):
            print(path)
            count += 1
        print(f"dry run: {count} file(s) would be classified into {output}", file=sys.stderr)
        return EXIT_OK
    output_format = _output_format(args.output_format, output)
    if args.html is not None and output_format not in ("json", "jsonl"):
        print(f"error: --html reads a json or jsonl report, not {output_format} (convert a table report with "
              f"`inference-runner convert`)", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_writable(output)
        if args.html is not None:
            check_writable(args.html.absolute())
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    try:
        service = service_from_args(args)
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ARTIFACTS
    options = RunOptions(input_dir=input_dir, output=output, batch_size=args.batch_size, tta=args.tta,
                         temperature=args.temperature, abstain=args.abstain_unknown,
                         include_probs=args.include_probs, output_format=output_format,
                         resume=args.resume,
                         previous_report=args.previous_report, shard=args.shard, progress=not args.quiet,
                         extensions=args.extensions, hdu_all=args.hdu == "all")
    started = time.perf_counter()
    try:
        counts, completed = run_filesystem(service, options)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"error: writing {output}: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    if not completed:
        print(f"interrupted: progress is saved in {checkpoint_path(output)}; rerun the same command with --resume "
              f"to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    elapsed = time.perf_counter() - started
    coverage = counts.as_json(options.abstain)["coverage"]
    print(f"wrote {output}")
    if args.html is not None:
        import review

        review.write_review(output, args.html.absolute(), workers=args.workers)
        print(f"wrote {args.html}")
    print(f"{counts.total} files in {elapsed:.1f} s: {counts.classified} classified, {counts.abstained} unknown, "
          f"{counts.errors} errors, {counts.reused} reused"
          + (f"; coverage {coverage:.1%}" if coverage is not None else ""))
    if counts.total == 0:  # an empty report is more often a wrong directory or extension list than an empty inbox
        print(f"warning: no file under {input_dir}{' in this shard' if args.shard else ''} ends in "
              f"{', '.join(args.extensions)}; other kinds of file are walked with --extensions", file=sys.stderr)
    return EXIT_FILE_ERRORS if args.fail_on_error and counts.errors else EXIT_OK


def main(argv: Sequence[str] | None = None, registrars: Sequence[CommandRegistrar] = (add_filesystem_command,)
         ) -> int:
    """Parse, set up logging, run the chosen subcommand (``cli.main`` passes every module's registrar)."""
    args = build_parser(registrars).parse_args(argv)
    configure_logging(args.quiet, args.verbose)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
