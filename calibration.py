"""Make and check an operating point on labelled directories (the ``calibrate`` and ``evaluate`` commands).

A labelled directory holds one sub-folder per class, named as the class. Both
commands run the production pipeline (``ClassifierService``) once with TTA;
view 0 of each file is the identity view, so the no-TTA figures come from the
same pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import backends
import data_loader
import inference_runner as ir
from report import UNKNOWN, utc_now, write_json_atomic

logger = logging.getLogger("calibration")

# The layer gate lets 99% of calibration files through, not the other gates' 95%: at 0.95 it cost 0.027 of
# simulated coverage (a development draw) for photographs the other gates mostly stop already (MODEL_CARD.md).
LAYER_GATE_QUANTILE = 0.99


@dataclass
class LabelledLogits:
    """Per-file TTA view logits and embeddings of a labelled directory (files that failed are left out)."""

    paths: list[str]
    view_logits: np.ndarray  # (N, V, K)
    embeddings: np.ndarray  # (N, E)
    labels: np.ndarray  # (N,) class index
    failed: list[tuple[str, str]]
    tiebreaks: np.ndarray  # (N,) each file's prediction-set tie-break (inference_runner.set_tiebreak)
    features: np.ndarray  # (N, F) scaled hand-crafted features (what the feature gate measures)
    identity_embeddings: np.ndarray  # (N, E) the untransformed view's: what a run without TTA gates on
    input_styles: list[str]  # data_loader.input_style of each file
    smooth_fractions: np.ndarray  # (N,) what the smooth-area gate measures (data_loader.smooth_fraction)
    layer_means: np.ndarray | None = None  # (N, L) the identity view's feature-map means (the layer gate's)
    whiteness: np.ndarray | None = None  # (N,) data_loader.noise_whiteness (the feature gate's last column)

    def for_tta(self, tta: bool) -> np.ndarray:
        return self.view_logits if tta else self.view_logits[:, :1]

    def embeddings_for(self, tta: bool) -> np.ndarray:
        return self.embeddings if tta else self.identity_embeddings

    def inside(self, op: ir.OperatingPoint, probs: np.ndarray, tta: bool = True) -> np.ndarray:
        """Which files every gate of ``op`` lets through, given their probabilities (the top class sets the
        radii of the gates that have one per class)."""
        return op.inside(self.embeddings_for(tta), self.features, probs.argmax(axis=1), self.smooth_fractions,
                         self.layer_means, self.whiteness)


def labelled_files(directory: Path, class_names: Sequence[str]) -> list[tuple[Path, int]]:
    """(path, class index) for every readable file (FITS, TIFF, JPEG, PNG) under ``directory/<class>/``."""
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: labelled directory not found")
    unknown_dirs = sorted(p.name for p in directory.iterdir() if p.is_dir() and p.name not in class_names)
    if unknown_dirs:
        logger.warning("%s: sub-folders %s are not classes of the model; ignored", directory, unknown_dirs)
    files = [(path, index) for index, name in enumerate(class_names) for path in
             ir.scan_paths(directory / name, suffixes=data_loader.SUPPORTED_SUFFIXES) if (directory / name).is_dir()]
    if not files:
        raise FileNotFoundError(f"{directory}: no images in sub-folders named {', '.join(class_names)}")
    return files


def collect_logits(service: ir.ClassifierService, files: list[tuple[Path, int]], batch_size: int) -> LabelledLogits:
    paths, logits, embeddings, labels, failed, tiebreaks, features, identity = [], [], [], [], [], [], [], []
    styles: list[str] = []
    smooth: list[float] = []
    means: list[np.ndarray | None] = []
    whiteness: list[float] = []
    for (path, label), scored in zip(files, service.iter_scored([p for p, _ in files], batch_size, tta=True)):
        if scored.view_logits is None:
            failed.append((str(path), scored.error or "unknown error"))
            continue
        paths.append(str(path))
        logits.append(scored.view_logits)
        embeddings.append(scored.embedding)
        labels.append(label)
        tiebreaks.append(scored.tiebreak)
        features.append(scored.features)
        identity.append(scored.identity_embedding)
        styles.append(data_loader.input_style(scored.info or {}))
        smooth.append(scored.smooth_fraction)
        means.append(scored.layer_means)
        whiteness.append(scored.noise_whiteness)
    if failed:
        logger.warning("%d labelled files could not be read and are left out", len(failed))
    return LabelledLogits(paths, np.stack(logits), np.stack(embeddings), np.array(labels), failed,
                          np.array(tiebreaks), np.stack(features), np.stack(identity), styles,
                          np.array(smooth, dtype=np.float64),
                          np.stack(means) if means and all(m is not None for m in means) else None,
                          np.array(whiteness, dtype=np.float64))


# --------------------------------------------------------------------------- commands


def add_commands(commands: Any) -> None:
    """Register ``calibrate`` and ``evaluate`` on an ``add_subparsers()`` object."""
    cal = commands.add_parser("calibrate", help="fit temperature and per-class thresholds on labelled data")
    cal.add_argument("--labelled_dir", "--labelled-dir", type=Path, required=True,
                     help="one sub-folder per class, named as the classes")
    cal.add_argument("--class_names", "--class-names", default=None,
                     help="comma-separated, in model output order (default: from --reference thresholds)")
    cal.add_argument("--reference", type=Path, default=ir.DEFAULT_THRESHOLDS_PATH,
                     help="thresholds file to take class names from when --class_names is not given")
    cal.add_argument("--temperature", type=ir.positive_float, default=ir.DEFAULT_TEMPERATURE)
    cal.add_argument("--no_class_bias", "--no-class-bias", dest="class_bias", action="store_false",
                     help="temperature scaling alone (default: also fit a per-class bias on the logits, by NLL)")
    cal.add_argument("--target_precision", "--target-precision", type=float, default=0.95)
    cal.add_argument("--precision_confidence", "--precision-confidence", type=float, default=0.9,
                     help="confidence with which each threshold's precision must reach the target (a one-sided "
                          "Clopper-Pearson bound on the calibration files; 0: the point estimate)")
    cal.add_argument("--ood_quantile", "--ood-quantile", type=float, default=0.95,
                     help="quantile of the calibration files that the Mahalanobis, feature, member and smooth-area "
                          f"gates each let through (the layer gate keeps its {LAYER_GATE_QUANTILE}; 0: no gates)")
    cal.add_argument("--feature_neighbours", "--feature-neighbours", type=int, default=20,
                     help="calibration files the feature gate averages the distance to (0: no feature gate)")
    cal.add_argument("--set_coverage", "--set-coverage", type=float, default=0.95,
                     help="coverage of the conformal prediction sets (0: no sets)")
    cal.add_argument("--class_conditional_sets", "--class-conditional-sets", action="store_true",
                     help="one conformal quantile per class (coverage per class; needs enough files of each)")
    cal.add_argument("--output", type=Path, default=ir.DEFAULT_THRESHOLDS_PATH)
    cal.add_argument("--batch_size", "--batch-size", type=ir.positive_int, default=32)
    ir.add_artifact_args(cal, thresholds=False)
    cal.set_defaults(handler=cmd_calibrate)

    ev = commands.add_parser("evaluate", help="metrics and plots of the operating point on labelled data")
    ev.add_argument("--labelled_dir", "--labelled-dir", type=Path, required=True)
    ev.add_argument("--ood_dir", "--ood-dir", type=Path, default=None, help="out-of-distribution images")
    ev.add_argument("--output_dir", "--output-dir", type=Path, required=True)
    ev.add_argument("--temperature", type=ir.positive_float, default=None, help="default: the calibrated one")
    ev.add_argument("--batch_size", "--batch-size", type=ir.positive_int, default=32)
    ir.add_artifact_args(ev)
    ev.set_defaults(handler=cmd_evaluate)


# --------------------------------------------------------------------------- metrics


def negative_log_likelihood(view_logits: np.ndarray, labels: np.ndarray, temperature: float,
                            class_bias: np.ndarray | None = None) -> float:
    probs = ir.calibrated_probs(view_logits, temperature, class_bias)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))


def fit_temperature_with_bias(view_logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature of the NLL-optimal (temperature, class bias) pair."""
    from scipy.optimize import minimize_scalar

    def loss(log_t: float) -> float:
        temperature = float(np.exp(log_t))
        return negative_log_likelihood(view_logits, labels, temperature,
                                       fit_class_bias(view_logits, labels, temperature))

    return float(np.exp(minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded").x))


def fit_temperature(view_logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the NLL of the view-averaged calibrated probabilities."""
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(lambda log_t: negative_log_likelihood(view_logits, labels, float(np.exp(log_t))),
                             bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


def fit_class_bias(view_logits: np.ndarray, labels: np.ndarray, temperature: float) -> np.ndarray:
    """Per-class biases on logits / T minimising the NLL at ``temperature`` (bias-corrected temperature scaling,
    Alexandari et al. 2020): T fixes how sharp the scores are, the biases how often each class is predicted,
    which temperature alone cannot move (measured on the shipped model's calibration files: NLL 0.334 -> 0.294,
    real validation ECE 0.034 -> 0.015). The first class's bias is 0 (softmax ignores a common shift)."""
    from scipy.optimize import minimize

    n_classes = view_logits.shape[-1]

    def loss(free: np.ndarray) -> float:
        return negative_log_likelihood(view_logits, labels, temperature, np.r_[0.0, free])

    result = minimize(loss, np.zeros(n_classes - 1), method="L-BFGS-B", bounds=[(-10.0, 10.0)] * (n_classes - 1))
    return np.r_[0.0, result.x]


def reliability_bins(probs: np.ndarray, labels: np.ndarray, bins: int) -> list[tuple[float, float, float]]:
    """(share of files, mean confidence, accuracy) of each non-empty equal-width confidence bin."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.clip(np.digitize(confidence, np.linspace(0.0, 1.0, bins + 1)[1:-1]), 0, bins - 1)
    return [(float(in_bin.mean()), float(confidence[in_bin].mean()), float(correct[in_bin].mean()))
            for in_bin in (which == b for b in range(bins)) if in_bin.any()]


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    return float(sum(share * abs(accuracy - confidence)
                     for share, confidence, accuracy in reliability_bins(probs, labels, bins)))


def precision_lower_bound(correct: np.ndarray, total: np.ndarray, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound of a precision: ``correct`` right out of ``total`` accepted."""
    from scipy.stats import beta

    correct, total = np.asarray(correct, dtype=np.float64), np.asarray(total, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(1.0 - confidence, correct, total - correct + 1.0)
    return np.where(correct > 0, bound, 0.0)


def precision_threshold(scores: np.ndarray, correct: np.ndarray, target: float,
                        confidence: float | None = None) -> float:
    """Lowest threshold whose accepted set, and every stricter one, reaches ``target`` precision.

    ``scores``/``correct`` are the top-1 scores and correctness of the files
    predicted as one class. Requiring every stricter cut to hold too keeps a
    lucky dip in a noisy tail from setting the threshold. With ``confidence``
    the cut must also have a lower confidence bound of its precision at or
    above ``target``: the precision then holds with that confidence on data
    like the calibration set, not only on the calibration files themselves
    (a point estimate from 100 files misses by several points as often as not).
    Returns a value above 1 when no cut qualifies (the class is then always
    abstained on).
    """
    if len(scores) == 0:
        return 1.01
    order = np.argsort(-scores, kind="stable")
    ranked_scores, ranked_correct = scores[order], correct[order]
    accepted, right = np.arange(1, len(scores) + 1), np.cumsum(ranked_correct)
    precision = right / accepted
    # a cut must fall between distinct scores: only the last index of a run of ties is a valid cut
    valid_cut = np.append(ranked_scores[1:] < ranked_scores[:-1], True)
    ok = (np.minimum.accumulate(np.where(valid_cut, precision, np.inf)) >= target) & valid_cut
    if confidence:
        ok &= precision_lower_bound(right, accepted, confidence) >= target
    ok_cuts = np.nonzero(ok)[0]
    if len(ok_cuts) == 0:
        return 1.01
    return float(ranked_scores[ok_cuts[-1]])


def accepted_mask(probs: np.ndarray, class_names: Sequence[str], thresholds: dict[str, float],
                  inside: np.ndarray | None = None) -> np.ndarray:
    """Files not abstained on: top score at or above its class threshold (and inside the OOD gate)."""
    cut = np.array([thresholds[class_names[p]] for p in probs.argmax(axis=1)])
    accepted = probs.max(axis=1) >= cut
    return accepted if inside is None else accepted & inside


def operating_point_metrics(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                            thresholds: dict[str, float], inside: np.ndarray | None = None) -> dict[str, Any]:
    """Per-class precision/recall/coverage/support and overall coverage, accuracy and risk at thresholds."""
    predicted = probs.argmax(axis=1)
    accepted = accepted_mask(probs, class_names, thresholds, inside)
    correct = predicted == labels
    per_class = {}
    for index, name in enumerate(class_names):
        predicted_here = predicted == index
        accepted_here = predicted_here & accepted
        support = int((labels == index).sum())
        per_class[name] = {
            "threshold": thresholds[name],
            "precision": _ratio((accepted_here & correct).sum(), accepted_here.sum()),
            "recall": _ratio((accepted_here & correct).sum(), support),
            "coverage": _ratio(accepted_here.sum(), predicted_here.sum()),
            "support": support,
            "accepted": int(accepted_here.sum()),
        }
    return {
        "per_class": per_class,
        "coverage": _ratio(accepted.sum(), len(labels)),
        "selective_accuracy": _ratio((accepted & correct).sum(), accepted.sum()),
        "selective_risk": None if not accepted.any() else 1.0 - float((accepted & correct).sum() / accepted.sum()),
        "top1_accuracy": float(correct.mean()),
        "n": len(labels),
    }


def _ratio(numerator: Any, denominator: Any) -> float | None:
    return float(numerator) / float(denominator) if denominator else None


def confusion_matrix(probs: np.ndarray, labels: np.ndarray, thresholds: dict[str, float],
                     class_names: Sequence[str], inside: np.ndarray | None = None) -> list[list[int]]:
    """Rows: true class; columns: predicted class, then ``unknown``."""
    accepted = accepted_mask(probs, class_names, thresholds, inside)
    columns = np.where(accepted, probs.argmax(axis=1), len(class_names))
    matrix = np.zeros((len(class_names), len(class_names) + 1), dtype=int)
    np.add.at(matrix, (labels, columns), 1)
    return matrix.tolist()


# --------------------------------------------------------------------------- calibrate


def calibrate(service: ir.ClassifierService, data: LabelledLogits, temperature: float | None,
              target_precision: float, ood_quantile: float | None = 0.95, set_coverage: float | None = 0.95,
              class_conditional_sets: bool = False, feature_neighbours: int = 20,
              precision_confidence: float | None = 0.9, class_bias: bool = True,
              layer_quantile: float | None = LAYER_GATE_QUANTILE) -> dict[str, Any]:
    """The thresholds document (see README 'Operating point') for ``service``'s model and scaler.

    ``temperature=None`` operates at the fitted (NLL-optimal) temperature. With ``class_bias`` a per-class bias
    is fitted at the operating temperature (:func:`fit_class_bias`), first jointly with the temperature when
    that is fitted. Prediction sets are fitted on the same files, with and without TTA, unless ``set_coverage``
    is None.

    Each class's threshold reaches ``target_precision`` with ``precision_confidence`` (see
    :func:`precision_threshold`; None: the point estimate). Thresholds are chosen on the files inside the
    Mahalanobis gate on the embedding (fitted first on the same embeddings), since the gate abstains on the
    rest anyway. The feature gate (the ``feature_neighbours`` nearest calibration files, at the same
    ``ood_quantile`` of each class's own files) only adds abstentions: the files it turns away here are hard
    in-distribution ones, and choosing thresholds without them would loosen the thresholds (measured: real
    validation accuracy of labels 0.956 instead of 0.961). So does an ensemble's member gate
    (:func:`fit_member_gate`, at the operating temperature and the same quantile), and the layer gate on the
    network's feature maps (:func:`fit_layer_gate`, at ``layer_quantile``; none when ``ood_quantile`` is None).
    """
    names = list(service.class_names)
    gate = ir.OodGate.fit(data.embeddings, data.labels, ood_quantile) if ood_quantile else None
    neighbours = min(feature_neighbours, len(data.labels) - 1)
    feature_gate = ir.FeatureGate.fit(data.features, neighbours, ood_quantile, data.labels, len(names),
                                      data.whiteness) \
        if ood_quantile and neighbours > 0 else None
    smooth_gate = ir.SmoothGate.fit(data.smooth_fractions, data.labels, len(names), ood_quantile) \
        if ood_quantile else None
    points: dict[str, Any] = {}
    sets: dict[str, Any] = {"method": ir.SET_METHOD, "coverage": set_coverage,
                            "class_conditional": class_conditional_sets, "n_calibration": len(data.labels)}
    fitted = {key: fit_temperature(data.for_tta(tta), data.labels) for key, tta in (("tta", True), ("no_tta", False))}
    if temperature is None:  # operate at the NLL-optimal temperature of the TTA scores
        temperature = round(fit_temperature_with_bias(data.for_tta(True), data.labels) if class_bias
                            else fitted["tta"], 3)
    bias = fit_class_bias(data.for_tta(True), data.labels, temperature) if class_bias else None
    for key, tta in (("tta", True), ("no_tta", False)):
        logits = data.for_tta(tta)
        # without TTA the gate sees the one view's embedding, so the thresholds are chosen on the files it lets in
        inside = ~gate.is_outside(data.embeddings_for(tta)) if gate else np.ones(len(data.labels), dtype=bool)
        probs = ir.calibrated_probs(logits, temperature, bias)
        predicted, scores = probs.argmax(axis=1), probs.max(axis=1)
        correct = predicted == data.labels
        thresholds = {name: precision_threshold(scores[inside & (predicted == i)], correct[inside & (predicted == i)],
                                                target_precision, precision_confidence)
                      for i, name in enumerate(names)}
        unreachable = [name for name, value in thresholds.items() if value > 1.0]
        if unreachable:
            logger.warning("%s: precision %.2f is not reachable for %s; they will always abstain", key,
                           target_precision, unreachable)
        points[key] = {"thresholds": thresholds,
                       "validation": operating_point_metrics(probs, data.labels, names, thresholds, inside)}
        if set_coverage is not None:
            sets[key] = fit_prediction_sets(probs, data.labels, data.tiebreaks, set_coverage, class_conditional_sets)
    model = backends.load_keras_model(Path(service.model_path)) if ood_quantile else None  # both gates read it
    member_gate = fit_member_gate(model, data.embeddings, temperature, ood_quantile)
    layer_gate = fit_layer_gate(model, data, layer_quantile) if ood_quantile else None
    return {
        "format_version": 1,
        "class_names": names,
        "temperature": temperature,
        "class_bias": None if bias is None else [float(b) for b in bias],
        "fitted_temperature": fitted,
        "target_precision": target_precision,
        "precision_confidence": precision_confidence,
        "tta_views": service.backend.tta_views,  # what "tta" below was measured with
        "operating_points": points,
        "ood_gate": gate.to_json() if gate else None,
        "feature_gate": feature_gate.to_json() if feature_gate else None,
        "member_gate": member_gate.to_json() if member_gate else None,
        "smooth_gate": smooth_gate.to_json() if smooth_gate else None,
        "layer_gate": layer_gate.to_json() if layer_gate else None,
        "prediction_sets": sets if set_coverage is not None else None,
        "model_file": service.model_path.name,
        "model_sha256": service.model_sha256,
        "scaler_file": service.scaler_path.name,
        "scaler_sha256": service.scaler_sha256,
        # {} when the model has no LiteRT export next to it
        **backends.litert_pin(service.model_path,
                              service.backend if isinstance(service.backend, backends.KerasBackend) else None),
        "calibration_data": {"n_files": len(data.labels), "n_failed": len(data.failed),
                             "per_class": {n: int((data.labels == i).sum()) for i, n in enumerate(names)}},
        "created_at": utc_now(),
        "tool_version": ir.__version__,
    }


def fit_member_gate(model: Any, embeddings: np.ndarray, temperature: float, quantile: float | None
                    ) -> ir.MemberGate | None:
    """The ensemble's disagreement gate at ``quantile`` of the calibration files (None for a single model);
    ``model``: the Keras model."""
    if not quantile:
        return None
    head = backends.ensemble_head(model)
    return ir.MemberGate.fit(embeddings, *head, temperature, quantile) if head else None


def fit_layer_gate(model: Any, data: LabelledLogits, quantile: float | None) -> ir.LayerGate | None:
    """The gate on the Keras ``model``'s feature maps at ``quantile`` of the calibration files (None when its
    outputs carried no feature-map means)."""
    if not quantile or data.layer_means is None:
        return None
    return ir.LayerGate.fit(data.layer_means, data.labels, backends.feature_map_sizes(model), quantile)


# --------------------------------------------------------------------------- conformal prediction sets
#
# Split-conformal sets with the randomised APS score (Romano et al. 2020): a file's score for a class is the
# calibrated probability mass of the classes ranked above it plus (1 - U) of its own; the set holds every class
# whose score is within the calibrated quantile. APS adapts to the file (one class when the model is sure,
# several when it hesitates). U comes from the file itself (inference_runner.set_tiebreak), so sets are
# reproducible. Why randomised: a set that always holds the top class cannot cover less than the model's top-1
# accuracy, so where that exceeds the target the coverage overshoots (measured on the shipped model: 0.935 for a
# 0.90 target and 0.972 for 0.95 on simulated files); U lets some confident files go without a class and brings
# coverage to the target (0.913 / 0.952 on the same files), at the price of empty sets on some confident files.


def true_class_scores(probs: np.ndarray, labels: np.ndarray, tiebreaks: np.ndarray) -> np.ndarray:
    """Per row: the APS score of the true class, the smallest quantile whose set holds it."""
    return ir.aps_scores(probs, tiebreaks)[np.arange(len(labels)), labels]


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The split-conformal threshold: the ceil((n + 1) * coverage)-th smallest score (above 1 when n is too
    small for the level: then every set holds every class)."""
    n = len(scores)
    rank = int(np.ceil((n + 1) * coverage))
    return float(np.sort(scores)[rank - 1]) if 0 < rank <= n else 1.0 + 1e-9


def fit_prediction_sets(probs: np.ndarray, labels: np.ndarray, tiebreaks: np.ndarray, coverage: float,
                        class_conditional: bool) -> dict[str, Any]:
    """Quantile(s) and the sorted calibration scores (kept so evaluate can draw coverage at other levels)."""
    scores = true_class_scores(probs, labels, tiebreaks)
    fitted: dict[str, Any] = {"quantile": conformal_quantile(scores, coverage),
                              "scores": np.round(np.sort(scores), 6).tolist()}
    if class_conditional:
        fitted["class_quantiles"] = [conformal_quantile(scores[labels == k], coverage)
                                     for k in range(probs.shape[1])]
        fitted["class_scores"] = [np.round(np.sort(scores[labels == k]), 6).tolist() for k in range(probs.shape[1])]
    return fitted


def set_quantiles(sets: dict[str, Any], tta: bool, coverage: float) -> np.ndarray | float:
    """The quantile(s) of a thresholds file's prediction sets at another ``coverage``, from the stored scores."""
    fitted = sets["tta" if tta else "no_tta"]
    if sets.get("class_conditional"):
        return np.array([conformal_quantile(np.asarray(s), coverage) for s in fitted["class_scores"]])
    return conformal_quantile(np.asarray(fitted["scores"]), coverage)


def set_metrics(probs: np.ndarray, labels: np.ndarray, tiebreaks: np.ndarray, quantile: np.ndarray | float,
                class_names: Sequence[str]) -> dict[str, Any]:
    """Empirical coverage and mean set size, overall, per true class and per set size."""
    masks = ir.prediction_set_masks(probs, quantile, tiebreaks)
    covered = masks[np.arange(len(labels)), labels]
    sizes = masks.sum(axis=1)
    return {
        "coverage": float(covered.mean()), "mean_set_size": float(sizes.mean()), "n": len(labels),
        "per_class": {name: {"coverage": _ratio(covered[labels == k].sum(), (labels == k).sum()),
                             "mean_set_size": _ratio(sizes[labels == k].sum(), (labels == k).sum())}
                      for k, name in enumerate(class_names)},
        "per_set_size": {str(size): {"n": int((sizes == size).sum()), "coverage": float(covered[sizes == size].mean())}
                         for size in np.unique(sizes)},
    }


SET_LEVELS = (0.8, 0.85, 0.9, 0.95, 0.99)  # coverage levels evaluate reports besides the calibrated one


def prediction_set_report(op: ir.OperatingPoint, probs: np.ndarray, data: LabelledLogits, tta: bool
                          ) -> dict[str, Any] | None:
    """Coverage and set size at the calibrated level, and at SET_LEVELS from the stored calibration scores."""
    quantile = op.set_quantile(tta)
    if quantile is None:
        return None
    sets = op.document["prediction_sets"]
    labels, tiebreaks = data.labels, data.tiebreaks
    report = {"target": sets["coverage"], **set_metrics(probs, labels, tiebreaks, quantile, op.class_names)}
    report["by_level"] = {str(level): {k: v for k, v in set_metrics(probs, labels, tiebreaks,
                                                                     set_quantiles(sets, tta, level),
                                                                     op.class_names).items()
                                       if k in ("coverage", "mean_set_size")} for level in SET_LEVELS}
    return report


def fit_ood_classifier(in_distribution: np.ndarray, ood_by_kind: dict[str, np.ndarray], keep: float = 0.98,
                       regularisation: float = 0.1) -> ir.OodClassifier:
    """A logistic gate on embeddings: in-distribution rows against out-of-distribution kinds (each kind weighs
    as much as any other, and all of them together as much as the in-distribution rows). Its threshold lets
    ``keep`` of the in-distribution rows through."""
    from sklearn.linear_model import LogisticRegression

    kinds = sorted(k for k, rows in ood_by_kind.items() if len(rows))
    if not kinds:
        raise ValueError("no out-of-distribution embeddings to fit the gate on")
    outside = np.concatenate([ood_by_kind[k] for k in kinds])
    rows = np.concatenate([in_distribution, outside])
    target = np.r_[np.zeros(len(in_distribution)), np.ones(len(outside))]
    weight = np.r_[np.full(len(in_distribution), 1.0 / len(in_distribution)),
                   np.concatenate([np.full(len(ood_by_kind[k]), 1.0 / (len(kinds) * len(ood_by_kind[k])))
                                   for k in kinds])]
    mean, scale = rows.mean(axis=0), rows.std(axis=0) + 1e-6
    model = LogisticRegression(C=regularisation, max_iter=2000)
    model.fit((rows - mean) / scale, target, sample_weight=weight * len(rows))
    gate = ir.OodClassifier(mean, scale, model.coef_[0].astype(np.float64), float(model.intercept_[0]), np.inf,
                            tuple(kinds))
    threshold = float(np.quantile(gate.logit(in_distribution), keep))
    return ir.OodClassifier(mean, scale, gate.weights, gate.bias, threshold, tuple(kinds))


def _class_names_for(args: argparse.Namespace) -> list[str]:
    if args.class_names:
        return [name.strip() for name in args.class_names.split(",") if name.strip()]
    return list(ir.OperatingPoint.load(args.reference).class_names)


def _refuses_hdu_all(args: argparse.Namespace) -> bool:
    """Labelled files are one image each: `--hdu all` (one record per HDU) is a filesystem option only."""
    if args.hdu == "all":
        print(f"error: --hdu all is for filesystem; {args.command} reads one HDU per file (give an index or "
              f"EXTNAME)", file=sys.stderr)
        return True
    return False


def cmd_calibrate(args: argparse.Namespace) -> int:
    if _refuses_hdu_all(args):
        return ir.EXIT_USAGE
    # 0 turns the sets, the confidence bound and the gates off; any other value is a share
    for flag, value in (("--target_precision", args.target_precision), ("--set_coverage", args.set_coverage or 0.5),
                        ("--precision_confidence", args.precision_confidence or 0.5),
                        ("--ood_quantile", args.ood_quantile or 0.5)):
        if not 0 < value < 1:
            print(f"error: {flag} must be in (0, 1), got {value}", file=sys.stderr)
            return ir.EXIT_USAGE
    try:
        backends.require_full_install("calibrate")
        names = _class_names_for(args)
        service = ir.service_from_args(args, operating_point=ir.OperatingPoint.uncalibrated(names))
        files = labelled_files(args.labelled_dir, names)
    except (ir.ArtifactError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ir.EXIT_ARTIFACTS
    data = collect_logits(service, files, args.batch_size)
    document = calibrate(service, data, args.temperature, args.target_precision, args.ood_quantile or None,
                         args.set_coverage or None, args.class_conditional_sets, args.feature_neighbours,
                         args.precision_confidence or None, args.class_bias)
    write_json_atomic(args.output, document)
    point = document["operating_points"]["tta"]
    print(f"wrote {args.output}: fitted temperature {document['fitted_temperature']['tta']:.3f} (TTA), "
          f"operating temperature {args.temperature}"
          f"{', class bias ' + str([round(b, 3) for b in document['class_bias']]) if document['class_bias'] else ''}"
          f"; coverage {point['validation']['coverage']:.1%} at precision "
          f">= {args.target_precision} on {len(data.labels)} files")
    return ir.EXIT_OK


# --------------------------------------------------------------------------- evaluate


def evaluate(service: ir.ClassifierService, data: LabelledLogits, temperature: float,
             ood: LabelledLogits | None) -> dict[str, Any]:
    names = list(service.class_names)
    op = service.operating_point
    result: dict[str, Any] = {"temperature": temperature, "class_names": names, "n_failed": len(data.failed)}
    for key, tta in (("tta", True), ("no_tta", False)):
        logits = data.for_tta(tta)
        probs = op.probabilities(logits, temperature)
        inside = data.inside(op, probs, tta)
        if tta:
            result["ood_gate_rejected_in_distribution"] = float(1.0 - inside.mean())
        fitted = op.document.get("fitted_temperature", {}).get(key) if op.document else None
        result[key] = {
            **operating_point_metrics(probs, data.labels, names, op.thresholds[tta], inside),
            "confusion_matrix": {"rows_true": names, "columns_predicted": [*names, UNKNOWN],
                                 "counts": confusion_matrix(probs, data.labels, op.thresholds[tta], names, inside)},
            "ece": {"temperature_1": expected_calibration_error(ir.calibrated_probs(logits, 1.0), data.labels),
                    "operating_temperature": expected_calibration_error(probs, data.labels),
                    "fitted_temperature": (expected_calibration_error(ir.calibrated_probs(logits, fitted),
                                                                      data.labels) if fitted else None),
                    "fitted_temperature_value": fitted},
            "prediction_sets": prediction_set_report(op, probs, data, tta),
        }
        if ood is not None:
            result[key]["ood"] = ood_abstention(op, names, ood, temperature, tta)
    result["per_input_style"] = by_input_style(op, data, temperature)
    result["coverage_by_gate"] = coverage_by_gate(op, data, temperature)
    return result


# each gate of an operating point, by the name figures report it under
GATE_FIELDS = {"mahalanobis_gate": "ood_gate", "learned_gate": "ood_classifier", "feature_gate": "feature_gate",
               "member_gate": "member_gate", "smooth_gate": "smooth_gate", "layer_gate": "layer_gate"}


def coverage_by_gate(op: ir.OperatingPoint, data: LabelledLogits, temperature: float) -> dict[str, float]:
    """Coverage (with TTA) with every gate, with each gate left out, and with the thresholds alone: what each gate
    costs in-distribution files (the out-of-distribution tables say what it buys)."""
    probs = op.probabilities(data.for_tta(True), temperature)

    def coverage(inside: np.ndarray | None) -> float:
        return float(accepted_mask(probs, list(op.class_names), op.thresholds[True], inside).mean())

    result = {"all_gates": coverage(data.inside(op, probs))}
    for name, field in GATE_FIELDS.items():
        if getattr(op, field) is not None:
            result[f"without_{name}"] = coverage(data.inside(dataclasses.replace(op, **{field: None}), probs))
    result["thresholds_only"] = coverage(None)
    return result


def by_input_style(op: ir.OperatingPoint, data: LabelledLogits, temperature: float) -> dict[str, Any]:
    """Operating-point figures (with TTA) per ``data_loader.input_style``, and the share the gates turned away:
    where every galaxy is a JPEG and every nebula a FITS file, the model may have learned the format."""
    names = list(op.class_names)
    probs = op.probabilities(data.for_tta(True), temperature)
    inside = data.inside(op, probs)
    styles = np.array(data.input_styles)
    result = {}
    for style in sorted(set(data.input_styles)):
        rows = styles == style
        result[style] = {**operating_point_metrics(probs[rows], data.labels[rows], names, op.thresholds[True],
                                                   inside[rows]),
                         "turned_away_by_gates": float(1.0 - inside[rows].mean())}
    return result


def ood_abstention(op: ir.OperatingPoint, class_names: Sequence[str], data: LabelledLogits, temperature: float,
                   tta: bool = True) -> dict[str, Any]:
    """Share of out-of-distribution files abstained on: by thresholds and gates, and by thresholds alone."""
    probs = op.probabilities(data.for_tta(tta), temperature)
    thresholds = op.thresholds[tta]
    return {"n": len(probs),
            "abstained_fraction": float((~accepted_mask(probs, class_names, thresholds,
                                                        data.inside(op, probs, tta))).mean()),
            "abstained_fraction_thresholds_only": float((~accepted_mask(probs, class_names, thresholds)).mean())}


def evaluated_artifacts(service: ir.ClassifierService) -> dict[str, dict[str, str | None]]:
    """The files (by name) and SHA-256 of what was evaluated, so that figures can be matched to a model."""
    return {"model": {"file": service.model_path.name, "sha256": service.model_sha256},
            "scaler": {"file": service.scaler_path.name, "sha256": service.scaler_sha256},
            "thresholds": {"file": service.thresholds_path.name if service.thresholds_path else None,
                           "sha256": service.thresholds_sha256},
            "backend": {"name": service.backend.name, "file": Path(service.backend.artifact).name,
                        "sha256": service.backend_sha256}}


def cmd_evaluate(args: argparse.Namespace) -> int:
    if _refuses_hdu_all(args):
        return ir.EXIT_USAGE
    try:
        backends.require_full_install("evaluate")
        service = ir.service_from_args(args)
        files = labelled_files(args.labelled_dir, service.class_names)
    except (ir.ArtifactError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ir.EXIT_ARTIFACTS
    temperature = args.temperature or service.operating_point.temperature
    data = collect_logits(service, files, args.batch_size)
    ood = None
    if args.ood_dir is not None:
        ood_files = ir.scan_paths(args.ood_dir, suffixes=data_loader.SUPPORTED_SUFFIXES)
        ood = collect_logits(service, [(path, -1) for path in ood_files], args.batch_size)
    result = {"artifacts": evaluated_artifacts(service), **evaluate(service, data, temperature, ood)}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.output_dir / "evaluation.json", result)
    plots = write_plots(args.output_dir, service, data, temperature)
    tta = result["tta"]
    print(f"wrote {args.output_dir / 'evaluation.json'}" + (f" and {len(plots)} plots" if plots else ""))
    print(f"top-1 {tta['top1_accuracy']:.3f}, coverage {tta['coverage']:.3f}, selective risk "
          f"{tta['selective_risk']}, ECE {tta['ece']['temperature_1']:.3f} (T=1) -> "
          f"{tta['ece']['operating_temperature']:.3f} (T={temperature})"
          + (f", OOD abstained {tta['ood']['abstained_fraction']:.1%}" if "ood" in tta else ""))
    if len(result["per_input_style"]) > 1:
        print("by input style: " + ", ".join(f"{style} {figures['n']} files, coverage {figures['coverage']:.1%}"
                                             for style, figures in result["per_input_style"].items()))
    return ir.EXIT_OK


def write_plots(directory: Path, service: ir.ClassifierService, data: LabelledLogits, temperature: float) -> list[Path]:
    """Reliability diagram, per-class risk-coverage curves and the confusion matrix as PNG (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; plots skipped (pip install '.[train]')")
        return []
    names = list(service.class_names)
    logits = data.for_tta(True)
    probs = service.operating_point.probabilities(logits, temperature)
    written = []

    fig, ax = plt.subplots(figsize=(5, 5))
    operating = f"T={temperature}" + (" + class bias" if service.operating_point.class_bias else "")
    for label, p in (("T=1", ir.calibrated_probs(logits, 1.0)), (operating, probs)):
        _, xs, ys = zip(*reliability_bins(p, data.labels, bins=10))
        ax.plot(xs, ys, marker="o", label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="confidence", ylabel="accuracy", title="Reliability (TTA)")
    ax.legend()
    written.append(_save(fig, directory / "reliability.png"))

    fig, ax = plt.subplots(figsize=(6, 5))
    predicted, scores = probs.argmax(axis=1), probs.max(axis=1)
    for index, name in enumerate(names):
        mine = predicted == index
        order = np.argsort(-scores[mine])
        wrong = (data.labels[mine][order] != index).astype(float)
        if len(wrong):
            n = np.arange(1, len(wrong) + 1)
            ax.plot(n / len(wrong), np.cumsum(wrong) / n, label=name)
    ax.set(xlabel="coverage of predictions of the class", ylabel="risk (1 - precision)", title="Risk-coverage")
    ax.legend()
    written.append(_save(fig, directory / "risk_coverage.png"))

    matrix = np.array(confusion_matrix(probs, data.labels, service.operating_point.thresholds[True], names,
                                       data.inside(service.operating_point, probs)))
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names) + 1), [*names, UNKNOWN], rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for (row, col), value in np.ndenumerate(matrix):
        ax.text(col, row, str(value), ha="center", va="center", fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion at the operating point")
    written.append(_save(fig, directory / "confusion_matrix.png"))

    sets = prediction_set_report(service.operating_point, probs, data, tta=True)
    if sets is not None:
        levels = sorted(float(level) for level in sets["by_level"])
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(levels, [sets["by_level"][str(level)]["coverage"] for level in levels], marker="o",
                label="empirical coverage")
        for level in levels:
            ax.annotate(f"{sets['by_level'][str(level)]['mean_set_size']:.2f}",
                        (level, sets["by_level"][str(level)]["coverage"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=8)
        ax.plot([min(levels), 1], [min(levels), 1], "k--", lw=1, label="target")
        ax.set(xlabel="target coverage", ylabel="empirical coverage",
               title="Prediction sets (TTA; labels: mean set size)")
        ax.legend()
        written.append(_save(fig, directory / "set_coverage.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
