"""Conformal prediction sets: the quantile, the APS score and set rule, coverage on a problem with a known
answer, and the sets the service puts in records (ordered, TTA on and off)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

import calibration
import inference_runner as ir
from report import load_schema
from training.simulator import CLASS_NAMES


def test_quantile_is_the_hand_computed_order_statistic() -> None:
    scores = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6])  # n = 9
    assert calibration.conformal_quantile(scores, 0.8) == pytest.approx(0.8)  # ceil(10 * 0.8) = 8th smallest
    assert calibration.conformal_quantile(scores, 0.5) == pytest.approx(0.5)  # ceil(10 * 0.5) = 5th
    assert calibration.conformal_quantile(scores, 0.95) > 1.0, "too few files for the level: every class"


def test_aps_score_and_set_rule_on_a_small_example() -> None:
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    scores = calibration.aps_scores(np.repeat(probs, 4, axis=0), np.arange(4))
    np.testing.assert_allclose(scores, [0.0, 0.8, 0.95, 1.0])  # the top class scores 0: it is always in the set
    for quantile, expected in ((0.0, [True, False, False, False]), (0.8, [True, True, False, False]),
                               (0.95, [True, True, True, False]), (1.0, [True, True, True, True])):
        np.testing.assert_array_equal(ir.prediction_set_masks(probs, quantile)[0], expected)
    per_class = np.array([0.0, 0.0, 1.0, 0.0])  # class-conditional: class 2 always in, class 1 never
    np.testing.assert_array_equal(ir.prediction_set_masks(probs, per_class)[0], [True, False, True, False])


def _calibrated_problem(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that are right by construction: each label is drawn from its row."""
    logits = rng.normal(0.0, 2.0, (n, 5))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return probs, labels


@pytest.mark.parametrize("target", [0.9, 0.95])
def test_coverage_holds_where_the_answer_is_known(target: float) -> None:
    rng = np.random.default_rng(3)
    calibration_probs, calibration_labels = _calibrated_problem(4000, rng)
    test_probs, test_labels = _calibrated_problem(40000, rng)
    fitted = calibration.fit_prediction_sets(calibration_probs, calibration_labels, target, class_conditional=True)
    marginal = calibration.set_metrics(test_probs, test_labels, fitted["quantile"], list("abcde"))
    assert abs(marginal["coverage"] - target) <= 0.02
    assert 1.0 < marginal["mean_set_size"] < 5.0, "adaptive: neither always one class nor always all"
    per_class = calibration.set_metrics(test_probs, test_labels, np.array(fitted["class_quantiles"]), list("abcde"))
    assert all(abs(v["coverage"] - target) <= 0.03 for v in per_class["per_class"].values())


def _thresholds_with_sets(tiny: dict[str, Path], directory: Path, tta_quantile: float, plain_quantile: float
                          ) -> Path:
    document = json.loads(tiny["thresholds"].read_text())
    document["prediction_sets"] = {"method": "aps", "coverage": 0.9, "class_conditional": False, "n_calibration": 9,
                                   "tta": {"quantile": tta_quantile, "scores": []},
                                   "no_tta": {"quantile": plain_quantile, "scores": []}}
    path = directory / "with_sets.json"
    path.write_text(json.dumps(document))
    return path


def test_records_carry_ordered_sets_for_tta_on_and_off(tiny_artifacts: dict[str, Path], mixed_dir: Path,
                                                       tmp_path: Path) -> None:
    thresholds = _thresholds_with_sets(tiny_artifacts, tmp_path, tta_quantile=0.0, plain_quantile=1.0)
    service = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], thresholds)
    paths = list(ir.scan_paths(mixed_dir))
    with_tta = service.predict_paths(paths, tta=True)
    without = service.predict_paths(paths, tta=False)
    for record in with_tta:
        assert record.prediction_set == (None if record.error else [record.top_class])
    for record in without:
        if record.error:
            assert record.prediction_set is None
            continue
        assert sorted(record.prediction_set) == sorted(CLASS_NAMES)
        ranked = [record.probs[name] for name in record.prediction_set]
        assert ranked == sorted(ranked, reverse=True) and record.prediction_set[0] == record.top_class
    schema = load_schema()
    result_schema = {"$schema": schema["$schema"], "$defs": schema["$defs"], "$ref": "#/$defs/result"}
    for record in [*with_tta, *without]:
        jsonschema.validate(record.to_json(), result_schema)


def test_no_sets_without_a_calibrated_set(tiny_artifacts: dict[str, Path], mixed_dir: Path, tmp_path: Path) -> None:
    document = json.loads(tiny_artifacts["thresholds"].read_text())
    del document["prediction_sets"]  # a thresholds file from before prediction sets
    (tmp_path / "old.json").write_text(json.dumps(document))
    service = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tmp_path / "old.json")
    assert all(r.prediction_set is None for r in service.predict_paths(ir.scan_paths(mixed_dir)))
