"""Calibrate a trained model on file lists and evaluate it where it matters: per real source and class, on the
simulated test set, and on each kind of out-of-distribution image.

Both ``python -m training.train`` and ``inference-runner train`` end here, so
the shipped model and a user's model are measured the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

import backends
import calibration
import inference_runner as ir
from report import write_json_atomic
from training.real_data import LabelledFile, labelled_pairs

logger = logging.getLogger(__name__)
BATCH_SIZE = 32


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, document)


def calibrate_to_file(model_path: Path, scaler_path: Path, class_names: list[str], files: list[tuple[Path, int]],
                      output: Path, temperature: float | None, target_precision: float,
                      data_note: dict[str, Any] | None = None, ood_quantile: float = 0.95,
                      precision_confidence: float | None = 0.9) -> calibration.LabelledLogits:
    """Export the model to LiteRT next to it, fit the operating point (temperature, thresholds at
    ``precision_confidence``, Mahalanobis and feature gates) on labelled files and write the thresholds file
    (pinning model, scaler and export); returns the calibration set's outputs (the learned gate is fitted on
    them next)."""
    backends.export_litert(model_path)
    service = ir.ClassifierService(model_path, scaler_path,
                                   operating_point=ir.OperatingPoint.uncalibrated(class_names))
    data = calibration.collect_logits(service, files, BATCH_SIZE)
    document = calibration.calibrate(service, data, temperature, target_precision, ood_quantile,
                                     precision_confidence=precision_confidence)
    document["calibration_data"].update(data_note or {})
    write_json(output, document)
    logger.info("calibrated on %d files: fitted temperature %.3f (TTA), operating at %.3f", len(data.labels),
                document["fitted_temperature"]["tta"], document["temperature"])
    return data


def ood_embeddings(service: ir.ClassifierService, ood_dir: Path) -> dict[str, calibration.LabelledLogits]:
    """Model outputs of every out-of-distribution kind (one sub-folder each)."""
    return {kind.name: calibration.collect_logits(
        service, [(path, -1) for path in ir.scan_paths(kind, suffixes=ir.data_loader.SUPPORTED_SUFFIXES)], BATCH_SIZE)
        for kind in sorted(p for p in ood_dir.iterdir() if p.is_dir())}


def add_ood_classifier(model_path: Path, scaler_path: Path, thresholds_path: Path,
                       in_distribution: calibration.LabelledLogits, ood_fit_dir: Path, kinds: Sequence[str]
                       ) -> dict[str, calibration.LabelledLogits]:
    """Fit the learned gate on the calibration set against ``kinds`` of ``ood_fit_dir`` and add it to the
    thresholds file (the model and scaler pins are unchanged). Returns the fit set's outputs per kind."""
    service = ir.ClassifierService(model_path, scaler_path, thresholds_path)
    fit_set = {kind: data for kind, data in ood_embeddings(service, ood_fit_dir).items() if kind in kinds}
    gate = calibration.fit_ood_classifier(in_distribution.embeddings, {k: v.embeddings for k, v in fit_set.items()})
    document = json.loads(thresholds_path.read_text(encoding="utf-8"))
    document["ood_classifier"] = gate.to_json()
    write_json(thresholds_path, document)
    return fit_set


def _subset(data: calibration.LabelledLogits, rows: np.ndarray) -> calibration.LabelledLogits:
    return calibration.LabelledLogits([data.paths[i] for i in rows], data.view_logits[rows], data.embeddings[rows],
                                      data.labels[rows], [], data.tiebreaks[rows], data.features[rows],
                                      data.identity_embeddings[rows], [data.input_styles[i] for i in rows],
                                      data.smooth_fractions[rows],
                                      None if data.layer_means is None else data.layer_means[rows],
                                      None if data.whiteness is None else data.whiteness[rows])


def _brief(service: ir.ClassifierService, data: calibration.LabelledLogits, temperature: float,
           tta: bool = True) -> dict[str, Any]:
    """Operating-point figures (with TTA unless ``tta`` is False) and the ECE of a (sub)set."""
    op = service.operating_point
    probs = op.probabilities(data.for_tta(tta), temperature)
    inside = data.inside(op, probs, tta)
    metrics = calibration.operating_point_metrics(probs, data.labels, list(service.class_names), op.thresholds[tta],
                                                  inside)
    metrics["ece"] = calibration.expected_calibration_error(probs, data.labels)
    metrics["prediction_sets"] = calibration.prediction_set_report(op, probs, data, tta=tta)
    metrics["confusion"] = calibration.confusion_matrix(probs, data.labels, op.thresholds[tta],
                                                        list(service.class_names), inside)
    return metrics


# the OOD table's columns: the operating-point fields each leaves out (calibration.GATE_FIELDS names the gates)
OOD_GATE_COLUMNS = {
    "mahalanobis_only": {field: None for name, field in calibration.GATE_FIELDS.items() if name != "mahalanobis_gate"},
    **{f"without_{name}": {calibration.GATE_FIELDS[name]: None}
       for name in ("feature_gate", "member_gate", "smooth_gate", "layer_gate")},
}


def ood_by_kind(service: ir.ClassifierService, ood_dir: Path, temperature: float,
                loko: tuple[np.ndarray, dict[str, calibration.LabelledLogits]] | None) -> dict[str, Any]:
    """Abstention on each held-out kind: with the shipped gates and, given the learned gate's fit data, with a
    learned gate refitted without that kind (leave one kind out: the figure for a kind nobody fitted on)."""
    op, names = service.operating_point, list(service.class_names)
    result = {}
    for kind, data in ood_embeddings(service, ood_dir).items():
        result[kind] = calibration.ood_abstention(op, names, data, temperature)
        for column, gates_left_out in OOD_GATE_COLUMNS.items():
            result[kind][f"abstained_fraction_{column}"] = calibration.ood_abstention(
                dataclasses.replace(op, **gates_left_out), names, data, temperature)["abstained_fraction"]
        result[kind]["held_out"] = op.ood_classifier is None or kind not in op.ood_classifier.kinds
        if loko is not None:
            in_distribution, fit_set = loko
            others = {k: v.embeddings for k, v in fit_set.items() if k != kind}
            refitted = dataclasses.replace(op, ood_classifier=calibration.fit_ood_classifier(in_distribution, others))
            result[kind]["abstained_fraction_leave_one_kind_out"] = calibration.ood_abstention(
                refitted, names, data, temperature)["abstained_fraction"]
    return result


def real_breakdown(service: ir.ClassifierService, files: Sequence[LabelledFile], temperature: float,
                   seen_objects: set[str]) -> tuple[dict[str, Any], calibration.LabelledLogits]:
    """Figures on real validation files (overall, per source, per source x class, on unseen objects only) and
    the model outputs they were computed from."""
    names = list(service.class_names)
    data = calibration.collect_logits(service, labelled_pairs(files, names), BATCH_SIZE)
    by_path = {str(f.path): f for f in files}
    sources = np.array([by_path[p].source for p in data.paths])
    unseen = np.array([by_path[p].object_key not in seen_objects for p in data.paths])
    result: dict[str, Any] = {"overall": _brief(service, data, temperature),
                              "overall_no_tta": _brief(service, data, temperature, tta=False),  # --no-tta
                              "n_failed": len(data.failed),
                              "unseen_objects": _brief(service, _subset(data, np.nonzero(unseen)[0]), temperature)
                              if unseen.any() else None, "per_source": {},
                              "per_input_style": calibration.by_input_style(service.operating_point, data, temperature),
                              "coverage_by_gate": calibration.coverage_by_gate(service.operating_point, data,
                                                                               temperature)}
    for source in sorted(set(sources)):
        rows = np.nonzero(sources == source)[0]
        result["per_source"][source] = _brief(service, _subset(data, rows), temperature)
        if not unseen[rows].all():
            fresh = rows[unseen[rows]]
            result["per_source"][source]["unseen_objects"] = (
                _brief(service, _subset(data, fresh), temperature) if len(fresh) else None)
    return result, data


def evaluate_all(model_path: Path, scaler_path: Path, thresholds_path: Path, class_names: list[str], *,
                 simulated_test: list[tuple[Path, int]], real_validation: Sequence[LabelledFile],
                 ood_dir: Path | None, output_dir: Path, seen_objects: set[str] | None = None,
                 loko: tuple[np.ndarray, dict[str, calibration.LabelledLogits]] | None = None) -> dict[str, Any]:
    """Everything the model card reports, as one document (plots go into ``output_dir``)."""
    service = ir.ClassifierService(model_path, scaler_path, thresholds_path)
    temperature = service.operating_point.temperature
    output_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"artifacts": calibration.evaluated_artifacts(service), "temperature": temperature,
                              "tta_views": service.backend.tta_views, "class_names": class_names}
    if simulated_test:
        data = calibration.collect_logits(service, simulated_test, BATCH_SIZE)
        result["simulated_test"] = calibration.evaluate(service, data, temperature, None)
        calibration.write_plots(output_dir, service, data, temperature)
    if real_validation:
        result["real_validation"], data = real_breakdown(service, real_validation, temperature, seen_objects or set())
        calibration.write_plots(_mkdir(output_dir / "real"), service, data, temperature)
    if ood_dir is not None:
        result["ood_by_kind"] = ood_by_kind(service, ood_dir, temperature, loko)
    result["summary"] = summary(result)
    return result


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _figures(metrics: dict[str, Any]) -> dict[str, Any]:
    sets = metrics.get("prediction_sets")
    return {"n": metrics["n"], "coverage": metrics["coverage"], "selective_accuracy": metrics["selective_accuracy"],
            "ece": metrics.get("ece"),
            "set_coverage": {level: v["coverage"] for level, v in sets["by_level"].items()} if sets else None,
            "mean_set_size": {level: v["mean_set_size"] for level, v in sets["by_level"].items()} if sets else None,
            "precision": {k: v["precision"] for k, v in metrics["per_class"].items()},
            "support": {k: v["support"] for k, v in metrics["per_class"].items()}}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The headline figures: what the issue's targets are checked against."""
    out: dict[str, Any] = {}
    if "simulated_test" in result:
        sim = result["simulated_test"]["tta"]
        out["simulated_test"] = {**_figures(sim), "ece": sim["ece"]["operating_temperature"]}
    if "real_validation" in result:
        out["real_validation"] = _figures(result["real_validation"]["overall"])
        out["real_validation_no_tta"] = _figures(result["real_validation"]["overall_no_tta"])
        if result["real_validation"]["unseen_objects"]:
            out["real_validation_unseen_objects"] = _figures(result["real_validation"]["unseen_objects"])
    if "ood_by_kind" in result:
        out["ood_abstained_by_kind"] = {k: v["abstained_fraction"] for k, v in result["ood_by_kind"].items()}
        out["ood_abstained_by_kind_leave_one_kind_out"] = {
            k: v.get("abstained_fraction_leave_one_kind_out") for k, v in result["ood_by_kind"].items()}
    return out
