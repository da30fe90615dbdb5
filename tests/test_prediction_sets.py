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
    half = np.array([0.5])
    # mass ranked above the class plus (1 - U) of its own, U = 0.5: 0 + 0.25, 0.5 + 0.15, 0.8 + 0.075, 0.95 + 0.025
    np.testing.assert_allclose(ir.aps_scores(probs, half)[0], [0.25, 0.65, 0.875, 0.975])
    np.testing.assert_allclose(calibration.true_class_scores(np.repeat(probs, 4, axis=0), np.arange(4),
                                                             np.full(4, 0.5)), [0.25, 0.65, 0.875, 0.975])
    for quantile, expected in ((0.2, [False] * 4), (0.25, [True, False, False, False]),
                               (0.7, [True, True, False, False]), (0.9, [True, True, True, False]),
                               (1.0, [True] * 4)):
        np.testing.assert_array_equal(ir.prediction_set_masks(probs, quantile, half)[0], expected)
    # U near 1 lets the top class in at a quantile near 0; U near 0 needs its whole mass
    assert ir.prediction_set_masks(probs, 0.01, np.array([0.99]))[0][0]
    assert not ir.prediction_set_masks(probs, 0.45, np.array([0.0]))[0][0]
    per_class = np.array([0.0, 0.0, 1.0, 0.0])  # class-conditional: class 2 always in, the others never
    np.testing.assert_array_equal(ir.prediction_set_masks(probs, per_class, half)[0], [False, False, True, False])


def test_tiebreak_is_fixed_by_the_features_and_spread_evenly() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5000, 15)).astype(np.float32)
    values = np.array([ir.set_tiebreak(row) for row in features])
    assert ((values >= 0) & (values < 1)).all()
    assert ir.set_tiebreak(features[0].copy()) == values[0]
    assert ir.set_tiebreak(features[0].astype(np.float64)) == values[0], "the same file on any dtype path"
    assert np.histogram(values, bins=10, range=(0, 1))[0].min() > 400  # uniform: 500 expected per bin


def _calibrated_problem(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that are right by construction: each label is drawn from its row."""
    logits = rng.normal(0.0, 2.0, (n, 5))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = (probs.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return probs, labels


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_coverage_holds_where_the_answer_is_known(target: float) -> None:
    rng = np.random.default_rng(3)
    calibration_probs, calibration_labels = _calibrated_problem(4000, rng)
    test_probs, test_labels = _calibrated_problem(40000, rng)
    calibration_u, test_u = rng.random(4000), rng.random(40000)
    fitted = calibration.fit_prediction_sets(calibration_probs, calibration_labels, calibration_u, target,
                                             class_conditional=True)
    marginal = calibration.set_metrics(test_probs, test_labels, test_u, fitted["quantile"], list("abcde"))
    assert abs(marginal["coverage"] - target) <= 0.015, "exact, not merely at least the target"
    assert 1.0 < marginal["mean_set_size"] < 5.0, "adaptive: neither always one class nor always all"
    per_class = calibration.set_metrics(test_probs, test_labels, test_u, np.array(fitted["class_quantiles"]),
                                        list("abcde"))
    assert all(abs(v["coverage"] - target) <= 0.03 for v in per_class["per_class"].values())


def test_coverage_is_exact_even_where_the_top_class_alone_would_exceed_it() -> None:
    """A model right 97% of the time: sets that always hold the top class would cover >= 0.97 at a 0.90 target."""
    rng = np.random.default_rng(4)

    def confident(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 5, n)
        probs = np.full((n, 5), 0.0075)
        probs[np.arange(n), labels] = 0.97
        wrong = rng.random(n) < 0.03  # the top class is wrong 3% of the time
        probs[wrong] = np.roll(probs[wrong], 1, axis=1)
        return probs, labels

    (calibration_probs, calibration_labels), (test_probs, test_labels) = confident(4000), confident(40000)
    fitted = calibration.fit_prediction_sets(calibration_probs, calibration_labels, rng.random(4000), 0.9, False)
    metrics = calibration.set_metrics(test_probs, test_labels, rng.random(40000), fitted["quantile"], list("abcde"))
    assert abs(metrics["coverage"] - 0.9) <= 0.015
    assert "0" in metrics["per_set_size"], "some confident files get an empty set"


def _thresholds_with_sets(tiny: dict[str, Path], directory: Path, tta_quantile: float, plain_quantile: float
                          ) -> Path:
    document = json.loads(tiny["thresholds"].read_text())
    document["prediction_sets"] = {"method": ir.SET_METHOD, "coverage": 0.9, "class_conditional": False,
                                   "n_calibration": 9,
                                   "tta": {"quantile": tta_quantile, "scores": []},
                                   "no_tta": {"quantile": plain_quantile, "scores": []}}
    path = directory / "with_sets.json"
    path.write_text(json.dumps(document))
    return path


def test_records_carry_ordered_sets_for_tta_on_and_off(tiny_artifacts: dict[str, Path], mixed_dir: Path,
                                                       tmp_path: Path) -> None:
    thresholds = _thresholds_with_sets(tiny_artifacts, tmp_path, tta_quantile=-1.0, plain_quantile=1.0)
    service = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], thresholds)
    paths = list(ir.scan_paths(mixed_dir))
    with_tta = service.predict_paths(paths, tta=True)
    without = service.predict_paths(paths, tta=False)
    for record in with_tta:
        assert record.prediction_set == (None if record.error else [])  # below every score: empty, not missing
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


def test_no_sets_without_a_calibrated_set(tiny_artifacts: dict[str, Path], mixed_dir: Path, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    document = json.loads(tiny_artifacts["thresholds"].read_text())
    del document["prediction_sets"]  # a thresholds file from before prediction sets
    (tmp_path / "old.json").write_text(json.dumps(document))
    service = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tmp_path / "old.json")
    assert all(r.prediction_set is None for r in service.predict_paths(ir.scan_paths(mixed_dir)))
    # sets fitted with another rule (the deterministic APS of earlier versions) are not applied with this one
    document = json.loads(_thresholds_with_sets(tiny_artifacts, tmp_path, 0.5, 0.5).read_text())
    document["prediction_sets"]["method"] = "aps"
    (tmp_path / "older.json").write_text(json.dumps(document))
    service = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tmp_path / "older.json")
    assert "recalibrate" in caplog.text
    assert all(r.prediction_set is None for r in service.predict_paths(ir.scan_paths(mixed_dir)))
