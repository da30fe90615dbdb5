"""Operating point: temperature fit, per-class thresholds, OOD gate, calibrate/evaluate commands, training smoke."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import backends
import calibration
import cli
import inference_runner as ir
from training.simulator import CLASS_NAMES
from training.train import write_labelled_directory


def test_precision_threshold_is_the_lowest_cut_that_holds_for_every_stricter_cut() -> None:
    scores = np.array([0.99, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5])
    correct = np.array([1, 1, 1, 0, 1, 1, 0, 0], dtype=bool)
    # precision from the top: 1, 1, 1, .75, .8, .83, .71, .625
    assert calibration.precision_threshold(scores, correct, 0.95) == 0.9
    assert calibration.precision_threshold(scores, correct, 0.75) == 0.7
    assert calibration.precision_threshold(scores, correct, 0.6) == 0.5
    assert calibration.precision_threshold(scores[:0], correct[:0], 0.9) > 1.0
    assert calibration.precision_threshold(np.array([0.9, 0.8]), np.array([False, True]), 0.95) > 1.0


def test_precision_threshold_never_splits_ties() -> None:
    scores = np.array([0.9, 0.8, 0.8, 0.8])
    correct = np.array([True, True, False, False])
    assert calibration.precision_threshold(scores, correct, 0.9) == 0.9


def test_precision_lower_bound_by_hand() -> None:
    # all right: the bound solves p ** n = 1 - confidence; none right: 0
    np.testing.assert_allclose(calibration.precision_lower_bound(np.array([22, 0]), np.array([22, 5]), 0.9),
                               [0.1 ** (1 / 22), 0.0])
    # 95 of 100: the bound sits below the point estimate, and lower at higher confidence
    at_90, at_99 = calibration.precision_lower_bound(np.array([95, 95]), np.array([100, 100]), np.array([0.9, 0.99]))
    assert 0.85 < at_99 < at_90 < 0.95


def test_precision_threshold_with_confidence_needs_enough_files_to_show_it() -> None:
    # 100 files, wrong at ranks 60 and 85: the point precision stays >= 0.95 to the last cut (98 of 100)
    scores = np.linspace(1.0, 0.5, 100)
    correct = np.ones(100, dtype=bool)
    correct[[60, 85]] = False
    assert calibration.precision_threshold(scores, correct, 0.95) == scores[-1]
    # with 90% confidence: 84 right of 85 still bounds the precision above 0.95; 85 of 86 and beyond do not
    bounds = calibration.precision_lower_bound(np.cumsum(correct), np.arange(1, 101), 0.9)
    assert bounds[84] >= 0.95 and (bounds[85:] < 0.95).all()
    assert calibration.precision_threshold(scores, correct, 0.95, confidence=0.9) == scores[84]
    # ten right files cannot show 0.95 with 90% confidence (0.1 ** 0.1 = 0.79): the class always abstains
    ten = np.linspace(0.99, 0.9, 10)
    assert calibration.precision_threshold(ten, np.ones(10, dtype=bool), 0.95, confidence=0.9) > 1.0
    assert calibration.precision_threshold(ten, np.ones(10, dtype=bool), 0.95) == ten[-1]


def test_fit_temperature_recovers_the_true_temperature() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4000, 1, 5))
    true_t = 1.8
    probs = ir.calibrated_probs(logits, true_t)
    labels = np.array([rng.choice(5, p=p) for p in probs])
    assert calibration.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.1)
    before = calibration.expected_calibration_error(ir.calibrated_probs(logits, 1.0), labels)
    after = calibration.expected_calibration_error(probs, labels)
    assert after < before and after < 0.03


def test_class_bias_recovers_a_shift_temperature_alone_cannot() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, (6000, 1, 4))
    true_t, true_bias = 1.5, np.array([0.0, 1.0, -0.5, -1.5])
    probs = ir.calibrated_probs(logits, true_t, true_bias)
    labels = np.array([rng.choice(4, p=p) for p in probs])
    assert calibration.fit_temperature_with_bias(logits, labels) == pytest.approx(true_t, rel=0.1)
    bias = calibration.fit_class_bias(logits, labels, true_t)
    assert bias[0] == 0.0
    np.testing.assert_allclose(bias, true_bias, atol=0.15)
    t_only = calibration.fit_temperature(logits, labels)
    assert calibration.negative_log_likelihood(logits, labels, true_t, bias) \
        < calibration.negative_log_likelihood(logits, labels, t_only)


def test_operating_point_applies_its_class_bias(tiny_artifacts: dict[str, Path], tmp_path: Path,
                                                mixed_dir: Path) -> None:
    document = json.loads(tiny_artifacts["thresholds"].read_text())
    plain = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tiny_artifacts["thresholds"])
    assert plain.operating_point.class_bias is None
    bias = [0.0, 3.0, 0.0, -2.0, 0.0]
    biased_path = tmp_path / "biased.json"
    biased_path.write_text(json.dumps({**document, "class_bias": bias}))
    biased = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], biased_path)
    assert biased.operating_point.class_bias == tuple(bias)
    paths = [p for p in ir.scan_paths(mixed_dir)]
    for scored, record in zip(plain.iter_scored(paths, 8, tta=True), biased.predict_paths(paths, 8, tta=True)):
        if scored.view_logits is None:
            continue
        expected = ir.calibrated_probs(scored.view_logits, document["temperature"], np.array(bias))
        assert [record.probs[name] for name in CLASS_NAMES] == pytest.approx(expected.tolist(), abs=1e-5)
        # the bias moves mass towards the second class and away from the fourth
        unbiased = ir.calibrated_probs(scored.view_logits, document["temperature"])
        assert expected[1] > unbiased[1] and expected[3] <= unbiased[3]
    biased_path.write_text(json.dumps({**document, "class_bias": [0.0, 1.0]}))
    with pytest.raises(ir.ArtifactError, match="class_bias has 2 values for 5 classes"):
        ir.OperatingPoint.load(biased_path)


def test_ood_gate_flags_far_points_at_the_chosen_quantile() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 10, (3, 8))
    labels = rng.integers(0, 3, 3000)
    embeddings = centres[labels] + rng.normal(0, 1, (3000, 8))
    gate = ir.OodGate.fit(embeddings, labels, quantile=0.99)
    assert gate.is_outside(embeddings).mean() == pytest.approx(0.01, abs=0.005)
    far = rng.normal(0, 1, (200, 8)) + 60
    assert gate.is_outside(far).all()
    fresh = centres[labels[:500]] + rng.normal(0, 1, (500, 8))
    assert gate.is_outside(fresh).mean() < 0.03
    restored = ir.OodGate.from_json(json.loads(json.dumps(gate.to_json())))
    np.testing.assert_allclose(restored.distance(far), gate.distance(far))


def test_ood_gate_radius_holds_for_new_files_where_the_embedding_is_wide() -> None:
    # 40 dimensions, 600 files: the covariance fitted to the files puts them closer than new files of the same
    # distribution, so an in-sample quantile would turn away far more than 5% of new in-distribution files
    rng = np.random.default_rng(2)
    centres = rng.normal(0, 10, (3, 40))
    labels = np.repeat(np.arange(3), 200)
    embeddings = centres[labels] + rng.normal(0, 1, (600, 40))
    fresh_labels = rng.integers(0, 3, 4000)
    fresh = centres[fresh_labels] + rng.normal(0, 1, (4000, 40))
    in_sample = ir.OodGate.fit(embeddings, labels, quantile=0.95, folds=1)
    assert in_sample.is_outside(embeddings).mean() == pytest.approx(0.05, abs=0.01)
    assert in_sample.is_outside(fresh).mean() > 0.1
    gate = ir.OodGate.fit(embeddings, labels, quantile=0.95)
    assert gate.max_distance > in_sample.max_distance
    assert gate.is_outside(fresh).mean() == pytest.approx(0.05, abs=0.02)
    np.testing.assert_array_equal(gate.means, in_sample.means)  # only the radius comes from the folds
    # a class with a single file cannot be held out: in-sample, as with folds=1
    single = ir.OodGate.fit(embeddings[:401], labels[:401], quantile=0.95)
    assert single.max_distance == ir.OodGate.fit(embeddings[:401], labels[:401], quantile=0.95, folds=1).max_distance


def test_ood_gate_widens_the_radius_for_a_class_that_spreads_wide_and_never_narrows_it() -> None:
    # class 0 packs closely and has most files (survey cutouts), class 1 spreads three times wider (simulated
    # artifacts): the pooled quantile is set by class 0 and would turn away far more than 5% of class 1's new files
    rng = np.random.default_rng(3)
    centres = np.array([np.zeros(6), np.full(6, 40.0), np.full(6, -40.0)])
    spread = np.array([1.0, 3.0, 1.0])
    labels = np.repeat(np.arange(3), [1200, 400, ir.GATE_MIN_CLASS_FILES - 1])  # class 2: too few for its own radius
    embeddings = centres[labels] + rng.normal(0, 1, (len(labels), 6)) * spread[labels][:, None]
    gate = ir.OodGate.fit(embeddings, labels, quantile=0.95)
    radius = gate.class_max_distance
    assert radius is not None and len(radius) == 3
    assert radius[0] == radius[2] == gate.max_distance, "a compact class, and one with too few files: pooled"
    assert radius[1] > gate.max_distance
    pooled = dataclasses.replace(gate, class_max_distance=None)
    fresh = centres[1] + rng.normal(0, 3.0, (2000, 6))
    assert pooled.is_outside(fresh).mean() > 0.15
    assert gate.is_outside(fresh).mean() == pytest.approx(0.05, abs=0.02)
    # a file nearest the compact class is held to the pooled radius, however wide class 1 is
    compact_outlier = centres[0][None, :] + 4.0
    assert gate.max_distance < gate.distance(compact_outlier)[0] < radius[1]
    assert gate.is_outside(compact_outlier).all() and (gate.radius(compact_outlier) == gate.max_distance).all()
    restored = ir.OodGate.from_json(json.loads(json.dumps(gate.to_json())))
    assert restored.class_max_distance == radius
    np.testing.assert_array_equal(restored.is_outside(fresh), gate.is_outside(fresh))
    # a thresholds file written before the gate had radii per class: one radius for all
    old = gate.to_json()
    del old["class_max_distance"]
    np.testing.assert_array_equal(ir.OodGate.from_json(old).is_outside(fresh), pooled.is_outside(fresh))


def test_coverage_by_gate_says_what_each_gate_costs() -> None:
    # four files of class 0: one labelled, one beyond the Mahalanobis radius only, one above the smooth-area limit
    # only, one below its threshold (the gates do not matter for it)
    logits = np.array([[4.0, 0.0], [4.0, 0.0], [4.0, 0.0], [0.1, 0.0]])
    embeddings = np.array([[0.0], [5.0], [0.0], [0.0]])
    data = calibration.LabelledLogits([f"f{i}" for i in range(4)], logits[:, None, :], embeddings, np.zeros(4, int),
                                      [], np.zeros(4), np.zeros((4, 1)), embeddings, ["fits float32"] * 4,
                                      np.array([0.0, 0.0, 0.5, 0.0]))
    op = ir.OperatingPoint(("a", "b"), 1.0, {True: {"a": 0.9, "b": 0.9}, False: {"a": 0.9, "b": 0.9}},
                           ood_gate=ir.OodGate(np.zeros((2, 1)), np.eye(1), 1.0, 0.95),
                           smooth_gate=ir.SmoothGate((0.1, 0.1), 0.95))
    assert calibration.coverage_by_gate(op, data, 1.0) == {
        "all_gates": 0.25, "without_mahalanobis_gate": 0.5, "without_smooth_gate": 0.5, "thresholds_only": 0.75}


def test_mean_neighbour_distance_by_hand() -> None:
    reference = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    queries = np.array([[0.0, 0.0], [3.0, 0.0]])
    # (0,0): nearest 0 and 5 -> 2.5; (3,0): 3 and 4 -> 3.5
    np.testing.assert_allclose(ir.mean_neighbour_distance(queries, reference, 2), [2.5, 3.5])
    # each reference row without its own zero: (0,0) 5 and 10; (3,4) 5 and 5; (6,8) 5 and 10
    np.testing.assert_allclose(ir.mean_neighbour_distance(reference, reference, 2, skip_self=True), [7.5, 5.0, 7.5])
    # in chunks of one query row: the same figures
    np.testing.assert_allclose(ir.mean_neighbour_distance(reference, reference, 2, skip_self=True, chunk=1),
                               [7.5, 5.0, 7.5])


def test_feature_gate_keeps_its_quantile_and_stops_what_lies_apart() -> None:
    rng = np.random.default_rng(4)
    features = rng.normal(0, 1, (2000, 15))
    gate = ir.FeatureGate.fit(features[:1000], k=20, quantile=0.95)
    # the threshold is the quantile of leave-one-out distances, so new files of the same kind are stopped at
    # about 1 - quantile (the calibration files themselves less: each is its own nearest neighbour)
    assert gate.is_outside(features[1000:]).mean() == pytest.approx(0.05, abs=0.02)
    assert gate.is_outside(features[:1000]).mean() < 0.05
    shifted = rng.normal(0, 1, (200, 15))
    shifted[:, 3] += 10  # one statistic far from anything calibrated
    assert gate.is_outside(shifted).all()
    restored = ir.FeatureGate.from_json(json.loads(json.dumps(gate.to_json())))
    np.testing.assert_array_equal(restored.distance(shifted), gate.distance(shifted))
    assert restored.k == 20 and restored.quantile == 0.95
    with pytest.raises(ValueError, match="more than k=20"):
        ir.FeatureGate.fit(features[:20], k=20)


def test_feature_gate_radius_per_class_is_each_class_own_quantile() -> None:
    rng = np.random.default_rng(6)
    tight = rng.normal(0, 0.1, (300, 2))  # files of class 0 pack closely (survey cutouts)
    wide = rng.normal(0, 2.0, (300, 2)) + np.array([20.0, 0.0])  # class 1 spreads wide (simulated artifacts)
    few = rng.normal(0, 1.0, (ir.GATE_MIN_CLASS_FILES - 1, 2)) + np.array([0.0, 40.0])  # class 2: few
    features, labels = np.vstack([tight, wide, few]), np.repeat([0, 1, 2], [300, 300, len(few)])
    pooled = ir.FeatureGate.fit(features, k=10, quantile=0.95)
    gate = ir.FeatureGate.fit(features, k=10, quantile=0.95, labels=labels, n_classes=4)
    radius = gate.class_max_distance
    assert radius is not None and len(radius) == 4
    assert radius[0] < pooled.max_distance < radius[1], "one radius for all is too wide for 0, too narrow for 1"
    assert radius[2] == radius[3] == pooled.max_distance == gate.max_distance, "too few files (or none): pooled"
    own = ir.mean_neighbour_distance(features, features, 10, skip_self=True)
    for c in (0, 1):  # each class keeps its quantile of its own files
        assert (own[labels == c] <= radius[c]).mean() == pytest.approx(0.95, abs=0.01)
    near_class_0 = np.array([[0.6, 0.0]])  # farther from class 0 than its files lie, nearer than class 1's do
    assert not pooled.is_outside(near_class_0)[0]
    assert gate.is_outside(near_class_0, np.array([0]))[0], "labelled class 0, it lies outside class 0's radius"
    assert not gate.is_outside(near_class_0, np.array([1]))[0]
    with pytest.raises(ValueError, match="predicted class"):
        gate.is_outside(near_class_0)
    restored = ir.FeatureGate.from_json(json.loads(json.dumps(gate.to_json())))
    assert restored.class_max_distance == radius
    legacy = pooled.to_json()
    del legacy["class_max_distance"]  # a thresholds file written before radii per class
    assert ir.FeatureGate.from_json(legacy).class_max_distance is None
    point = ir.OperatingPoint(("a", "b", "c", "d"), 1.0, {True: dict.fromkeys("abcd", 0.0),
                                                          False: dict.fromkeys("abcd", 0.0)}, feature_gate=gate)
    assert point.inside(np.zeros((2, 3)), np.vstack([near_class_0] * 2), np.array([0, 1])).tolist() == [False, True]


def test_feature_gate_with_whiteness_turns_away_correlated_noise_among_look_alike_features() -> None:
    rng = np.random.default_rng(11)
    features, labels = rng.normal(0, 1, (400, 3)), np.repeat([0, 1], 200)
    whiteness = np.clip(rng.normal(0.9, 0.08, 400), None, 1.0)  # calibration files: white noise or not judged
    gate = ir.FeatureGate.fit(features, k=10, quantile=0.95, labels=labels, n_classes=2, whiteness=whiteness)
    assert gate.reference.shape == (400, 4) and gate.whiteness_scale is not None
    typical = np.zeros((2, 3))  # features any galaxy could have; the second file's noise follows a beam
    assert gate.is_outside(typical, np.array([0, 0]), np.array([0.95, 0.25])).tolist() == [False, True]
    with pytest.raises(ValueError, match="noise_whiteness"):
        gate.is_outside(typical, np.array([0, 0]))
    restored = ir.FeatureGate.from_json(json.loads(json.dumps(gate.to_json())))
    assert restored.whiteness_scale == gate.whiteness_scale
    assert restored.is_outside(typical, np.array([0, 0]), np.array([0.95, 0.25])).tolist() == [False, True]
    eight_bit = np.ones(400)  # calibration files none of which is judged: no spread, so no column
    eight_bit[:ir.GATE_MIN_CLASS_FILES - 1] = 0.9
    assert ir.FeatureGate.fit(features, k=10, whiteness=eight_bit).whiteness_scale is None
    legacy = ir.FeatureGate.fit(features, k=10).to_json()
    del legacy["whiteness_scale"]  # a thresholds file written before the gate measured whiteness
    assert ir.FeatureGate.from_json(legacy).whiteness_scale is None
    point = ir.OperatingPoint(("a", "b"), 1.0, {True: {"a": 0, "b": 0}, False: {"a": 0, "b": 0}}, feature_gate=gate)
    assert point.inside(np.zeros((2, 3)), typical, np.array([0, 0]), whiteness=np.array([0.95, 0.25])).tolist() \
        == [True, False]


def test_operating_point_with_a_feature_gate_needs_features() -> None:
    rng = np.random.default_rng(5)
    gate = ir.FeatureGate.fit(rng.normal(0, 1, (100, 4)), k=5, quantile=0.9)
    point = ir.OperatingPoint(("a", "b"), 1.0, {True: {"a": 0, "b": 0}, False: {"a": 0, "b": 0}}, feature_gate=gate)
    embeddings = np.zeros((2, 3))
    inside = point.inside(embeddings, np.array([[0.0, 0, 0, 0], [9.0, 9, 9, 9]]))
    assert inside.tolist() == [True, False]
    with pytest.raises(ValueError, match="feature gate"):
        point.inside(embeddings, None)


def test_smooth_gate_limit_is_each_class_own_quantile() -> None:
    rng = np.random.default_rng(9)
    labels = np.repeat([0, 1], 400)
    fractions = np.r_[rng.uniform(0.0, 0.1, 400), np.zeros(400)]  # class 1: no smooth area in any file
    gate = ir.SmoothGate.fit(fractions, labels, 3, quantile=0.95)
    assert gate.class_max_fraction[0] == pytest.approx(np.quantile(fractions[:400], 0.95))
    assert gate.class_max_fraction[1] == 0.0 and gate.class_max_fraction[2] == 1.0  # class 2 had no files: no limit
    assert gate.is_outside(fractions[:400], labels[:400]).mean() == pytest.approx(0.05, abs=0.005)
    # the same share turned away or let in depending on the class the file is given
    assert gate.is_outside(np.array([0.05, 0.05, 0.05]), np.array([0, 1, 2])).tolist() == [False, True, False]
    restored = ir.SmoothGate.from_json(json.loads(json.dumps(gate.to_json())))
    assert restored == gate
    point = ir.OperatingPoint(("a", "b", "c"), 1.0, {True: dict.fromkeys("abc", 0.0), False: dict.fromkeys("abc", 0.0)},
                              smooth_gate=gate)
    embeddings = np.zeros((2, 3))
    assert point.inside(embeddings, None, np.array([1, 1]), np.array([0.0, 0.01])).tolist() == [True, False]
    with pytest.raises(ValueError, match="smooth-area gate"):
        point.inside(embeddings, None, np.array([1, 1]))


def test_layer_gate_keeps_its_quantile_and_stops_a_file_apart_in_one_map() -> None:
    rng = np.random.default_rng(11)
    sizes = (3, 5)
    labels = np.repeat([0, 1], 600)
    centres = np.zeros((2, 8))
    centres[1] = 4.0

    def draw(rows: np.ndarray) -> np.ndarray:
        return centres[rows] + rng.normal(0, 1, (len(rows), 8))

    gate = ir.LayerGate.fit(draw(labels), labels, sizes, quantile=0.9)
    assert len(gate.maps) == 2 and [len(r) for r in gate.references] == [1200, 1200]
    # the cut is a quantile of out-of-fold scores, so new files like the calibration files go at about 1 - 0.9
    fresh = np.repeat([0, 1], 2000)
    assert gate.is_outside(draw(fresh)).mean() == pytest.approx(0.10, abs=0.02)
    apart = draw(np.zeros(50, int))
    apart[:, 3:] += 8.0  # the second map alone far from both classes (the first one ordinary)
    assert gate.is_outside(apart).all()
    restored = ir.LayerGate.from_json(json.loads(json.dumps(gate.to_json())))
    probe = draw(fresh[:300])
    np.testing.assert_array_equal(restored.score(probe), gate.score(probe))
    assert restored.max_score == gate.max_score and restored.sizes == sizes
    with pytest.raises(ValueError, match="do not split"):
        ir.LayerGate.fit(draw(labels), labels, (3, 4))
    point = ir.OperatingPoint(("a", "b"), 1.0, {True: {"a": 0, "b": 0}, False: {"a": 0, "b": 0}}, layer_gate=gate)
    at_class_mean_and_apart = np.vstack([centres[:1], apart[:1]])
    assert point.inside(np.zeros((2, 3)), None, None, None, at_class_mean_and_apart).tolist() == [True, False]
    with pytest.raises(ValueError, match="layer gate"):
        point.inside(np.zeros((2, 3)), None)


def test_smooth_gate_abstains_on_the_class_it_limits(tiny_artifacts: dict[str, Path], tmp_path: Path,
                                                     mixed_dir: Path) -> None:
    service = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tiny_artifacts["thresholds"])
    plain = [r for r in service.predict_paths(ir.scan_paths(mixed_dir)) if not r.error]
    scored = [s for s in service.iter_scored(list(ir.scan_paths(mixed_dir)), 8) if s.features is not None]
    assert all(s.smooth_fraction is not None and 0.0 <= s.smooth_fraction <= 1.0 for s in scored)
    chosen = service.class_names.index(plain[0].top_class)
    document = json.loads(tiny_artifacts["thresholds"].read_text())
    gated = tmp_path / "smooth_gated.json"
    # every other class may have any smooth share; the chosen class none above -1, so all of its files go
    limits = tuple(-1.0 if c == chosen else 1.0 for c in range(len(service.class_names)))
    document["smooth_gate"] = ir.SmoothGate(limits, 0.95).to_json()
    gated.write_text(json.dumps(document))
    records = [r for r in ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], gated)
               .predict_paths(ir.scan_paths(mixed_dir)) if not r.error]
    assert [r.top_class for r in records] == [r.top_class for r in plain]
    for record, before in zip(records, plain):
        if record.top_class == plain[0].top_class:
            assert record.abstain_reason == "out_of_distribution" and record.label == "unknown", record.path
        else:
            assert record.abstain_reason == before.abstain_reason, record.path


def test_feature_gate_abstains_on_files_far_from_calibration(tiny_artifacts: dict[str, Path], tmp_path: Path,
                                                             mixed_dir: Path) -> None:
    service = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tiny_artifacts["thresholds"])
    scored = [s for s in service.iter_scored(list(ir.scan_paths(mixed_dir)), 8, tta=False) if s.features is not None]
    features = np.stack([s.features for s in scored])
    assert features.shape == (len(scored), ir.data_loader.N_FEATURES)
    document = json.loads(tiny_artifacts["thresholds"].read_text())
    # a reference far from every file: each one is out of distribution, for the features alone
    document["feature_gate"] = ir.FeatureGate(features + 1000.0, k=2, max_distance=1.0, quantile=0.99).to_json()
    gated = tmp_path / "feature_gated.json"
    gated.write_text(json.dumps(document))
    gated_service = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], gated)
    records = [r for r in gated_service.predict_paths(ir.scan_paths(mixed_dir)) if not r.error]
    assert records and all(r.abstain_reason == "out_of_distribution" and r.label == "unknown" for r in records)
    # a reference holding the files themselves lets them through the feature gate
    document["feature_gate"] = ir.FeatureGate(features, k=1, max_distance=1e-3, quantile=0.99).to_json()
    gated.write_text(json.dumps(document))
    records = [r for r in ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], gated)
               .predict_paths(ir.scan_paths(mixed_dir)) if not r.error]
    assert all(r.abstain_reason != "out_of_distribution" for r in records)


def test_feature_gate_radius_is_that_of_the_class_each_record_is_given(tiny_artifacts: dict[str, Path],
                                                                       tmp_path: Path, mixed_dir: Path) -> None:
    service = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tiny_artifacts["thresholds"])
    scored = [s for s in service.iter_scored(list(ir.scan_paths(mixed_dir)), 8, tta=True) if s.features is not None]
    plain = [r for r in service.predict_paths(ir.scan_paths(mixed_dir)) if not r.error]
    chosen = service.class_names.index(plain[0].top_class)
    document = json.loads(tiny_artifacts["thresholds"].read_text())
    gated = tmp_path / "class_radius.json"
    for inside_radius, outside_radius in ((1e9, -1.0), (-1.0, 1e9)):  # the chosen class let in, then turned away
        radii = tuple(inside_radius if c == chosen else outside_radius for c in range(len(service.class_names)))
        gate = ir.FeatureGate(np.stack([s.features for s in scored]), k=1, max_distance=1.0, quantile=0.95,
                              class_max_distance=radii)
        document["feature_gate"] = gate.to_json()
        gated.write_text(json.dumps(document))
        records = [r for r in ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], gated)
                   .predict_paths(ir.scan_paths(mixed_dir)) if not r.error]
        assert [r.top_class for r in records] == [r.top_class for r in plain]
        for record in records:
            turned_away = (record.top_class == plain[0].top_class) == (inside_radius < 0)
            assert (record.abstain_reason == "out_of_distribution") == turned_away, record.path


def test_gate_abstains_with_its_reason(tiny_artifacts: dict[str, Path], tmp_path: Path, mixed_dir: Path) -> None:
    document = json.loads(tiny_artifacts["thresholds"].read_text())
    service = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tiny_artifacts["thresholds"])
    size = ir.data_loader.IMAGE_SIZE
    width = service._forward(np.zeros((1, size, size), np.float32), np.zeros((1, ir.data_loader.N_FEATURES),
                                                                             np.float32), tta=False)[1].shape[-1]
    document["ood_gate"] = ir.OodGate(np.zeros((5, width)), np.eye(width), -1.0, 0.99).to_json()  # all outside
    gated = tmp_path / "gated.json"
    gated.write_text(json.dumps(document))
    gated_service = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], gated)
    records = [r for r in gated_service.predict_paths(ir.scan_paths(mixed_dir)) if not r.error]
    assert records and all(r.abstained and r.abstain_reason == "out_of_distribution" for r in records)
    assert all(r.label == "unknown" and r.top_class in CLASS_NAMES for r in records)
    plain = [r for r in service.predict_paths(ir.scan_paths(mixed_dir)) if not r.error]
    assert {r.abstain_reason for r in plain} <= {None, "low_score"}


def _views_apart(service: ir.ClassifierService) -> ir.ClassifierService:
    """The service with each TTA view's embedding shifted by its view index: the untrained tiny model's
    embeddings barely change under a flip, so without this the gates would decide alike on any view."""
    forward = service.backend.forward

    def shifted(images: np.ndarray, features: np.ndarray, tta: bool) -> backends.Outputs:
        scores, embeddings, means = forward(images, features, tta)
        return scores, np.asarray(embeddings) + 0.5 * np.arange(np.shape(embeddings)[1])[None, :, None], means

    service.backend.forward = shifted
    return service


def _service(artifacts: dict[str, Path], thresholds: Path) -> ir.ClassifierService:
    return _views_apart(ir.ClassifierService(artifacts["model"], artifacts["scaler"], thresholds))


def _run_coverage(service: ir.ClassifierService, paths: list[str], tta: bool) -> float:
    return float(np.mean([not r.abstained for r in service.predict_paths(paths, 8, tta=tta)]))


def test_figures_without_tta_are_what_a_run_without_tta_gives(tiny_artifacts: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """Without TTA the gates see the untransformed view's embedding: in calibration and evaluation as in a run."""
    labelled = write_labelled_directory(tmp_path / "labelled", per_class=4, seed=9, workers=1)
    service = _service(tiny_artifacts, tiny_artifacts["thresholds"])
    data = calibration.collect_logits(service, calibration.labelled_files(labelled, CLASS_NAMES), 8)
    one_view = np.stack([s.embedding for s in service.iter_scored(data.paths, 8, tta=False)])
    np.testing.assert_allclose(data.identity_embeddings, one_view, atol=1e-5)
    np.testing.assert_allclose(data.embeddings, one_view + 0.75, atol=1e-5)  # the mean of views 0-3

    gate = ir.OodGate.fit(data.identity_embeddings, data.labels, 0.5)  # half the files in, on their one view
    document = json.loads(tiny_artifacts["thresholds"].read_text())
    document["ood_gate"] = gate.to_json()
    for point in document["operating_points"].values():
        point["thresholds"] = dict.fromkeys(CLASS_NAMES, 0.0)  # only the gate abstains
    gated = tmp_path / "gated.json"
    gated.write_text(json.dumps(document))
    evaluated = calibration.evaluate(_service(tiny_artifacts, gated), data, 0.7, data)
    calibrated = calibration.calibrate(service, data, 0.7, 0.0, precision_confidence=None)  # accept all
    # the validation figures of calibrate count the embedding gate only
    calibrated["feature_gate"] = calibrated["smooth_gate"] = None
    recalibrated = tmp_path / "calibrated.json"
    recalibrated.write_text(json.dumps(calibrated))
    for key, tta in (("tta", True), ("no_tta", False)):
        covered = _run_coverage(_service(tiny_artifacts, gated), data.paths, tta)
        assert evaluated[key]["coverage"] == pytest.approx(covered), key
        assert evaluated[key]["ood"]["abstained_fraction"] == pytest.approx(1 - covered), key
        assert calibrated["operating_points"][key]["validation"]["coverage"] == pytest.approx(
            _run_coverage(_service(tiny_artifacts, recalibrated), data.paths, tta)), key
    assert evaluated["tta"]["coverage"] != evaluated["no_tta"]["coverage"]


def test_calibrate_and_evaluate_commands_end_to_end(tiny_artifacts: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    labelled = write_labelled_directory(tmp_path / "labelled", per_class=4, seed=9, workers=1)
    (labelled / "galaxy" / "broken.fits").write_text("not fits")
    output = tmp_path / "thresholds.json"
    artifacts = ["--model_path", str(tiny_artifacts["model"]), "--scaler_path", str(tiny_artifacts["scaler"])]
    assert cli.main(["calibrate", "--labelled_dir", str(labelled), "--class_names", ",".join(CLASS_NAMES),
                    "--output", str(output), "--quiet", *artifacts]) == 0
    document = json.loads(output.read_text())
    assert document["class_names"] == list(CLASS_NAMES) and document["temperature"] == 0.7
    assert len(document["class_bias"]) == 5 and document["class_bias"][0] == 0.0
    assert document["tta_views"] == 4  # a single model sees every view (an ensemble's members split them)
    assert document["model_sha256"] == ir.sha256_of(tiny_artifacts["model"])
    assert document["calibration_data"] == {"n_files": 20, "n_failed": 1, "per_class": dict.fromkeys(CLASS_NAMES, 4)}
    for key in ("tta", "no_tta"):
        validation = document["operating_points"][key]["validation"]
        assert set(validation["per_class"]) == set(CLASS_NAMES)
        for name, figures in validation["per_class"].items():
            assert figures["precision"] is None or figures["precision"] >= 0.95, name
    assert document["ood_gate"]["kind"] == "mahalanobis_embedding"
    feature_gate = document["feature_gate"]  # 20 files: k falls to 19, and its quantile is the gate's
    assert feature_gate["kind"] == "knn_features" and feature_gate["k"] == 19 and feature_gate["quantile"] == 0.95
    # fewer than 20 of these files are judged for noise whiteness, so the gate reads the scaled features alone
    whiteness = np.array([ir.data_loader.load_sample(path).noise_whiteness for path, _ in
                          calibration.labelled_files(labelled, CLASS_NAMES) if path.name != "broken.fits"])
    assert 0 < np.count_nonzero(whiteness != 1.0) < ir.GATE_MIN_CLASS_FILES
    assert feature_gate["whiteness_scale"] is None
    assert np.asarray(feature_gate["reference"]).shape == (20, ir.data_loader.N_FEATURES)
    smooth_gate = document["smooth_gate"]  # each class's 0.95 quantile of its own files' smooth fractions
    readable = [(path, label) for path, label in calibration.labelled_files(labelled, CLASS_NAMES)
                if path.name != "broken.fits"]
    fractions = np.array([ir.data_loader.load_sample(path).smooth_fraction for path, _ in readable])
    labels = np.array([label for _, label in readable])
    assert smooth_gate["kind"] == "smooth_fraction" and smooth_gate["quantile"] == 0.95
    for index, limit in enumerate(smooth_gate["class_max_fraction"]):
        assert limit == pytest.approx(np.quantile(fractions[labels == index], 0.95)), CLASS_NAMES[index]
    sets = document["prediction_sets"]
    assert sets["method"] == ir.SET_METHOD and sets["coverage"] == 0.95 and sets["n_calibration"] == 20
    assert len(sets["tta"]["scores"]) == len(sets["no_tta"]["scores"]) == 20
    service = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], output)
    assert service.operating_point.ood_gate is not None and service.operating_point.feature_gate is not None
    assert service.operating_point.smooth_gate is not None
    assert service.operating_point.class_bias == tuple(document["class_bias"])
    plain = tmp_path / "plain.json"
    assert cli.main(["calibrate", "--labelled_dir", str(labelled), "--class_names", ",".join(CLASS_NAMES),
                    "--output", str(plain), "--no_class_bias", "--quiet", *artifacts]) == 0
    assert json.loads(plain.read_text())["class_bias"] is None

    out_dir = tmp_path / "eval"
    assert cli.main(["evaluate", "--labelled_dir", str(labelled), "--ood_dir", str(labelled / "nebula"),
                    "--thresholds", str(output), "--output_dir", str(out_dir), "--quiet", *artifacts]) == 0
    result = json.loads((out_dir / "evaluation.json").read_text())
    assert result["artifacts"]["model"] == {"file": tiny_artifacts["model"].name,
                                            "sha256": ir.sha256_of(tiny_artifacts["model"])}
    assert result["artifacts"]["thresholds"]["sha256"] == ir.sha256_of(output)
    assert result["tta"]["n"] == 20 and len(result["tta"]["confusion_matrix"]["counts"]) == 5
    assert sum(map(sum, result["tta"]["confusion_matrix"]["counts"])) == 20
    assert 0 <= result["tta"]["ood"]["abstained_fraction"] <= 1
    styles = {path.name: ir.data_loader.input_style(ir.data_loader.load_sample(path).info)
              for path in labelled.rglob("*") if path.is_file() and path.name != "broken.fits"}
    by_style = result["per_input_style"]
    assert {style: figures["n"] for style, figures in by_style.items()} == {
        style: list(styles.values()).count(style) for style in set(styles.values())}
    assert sum(f["per_class"][name]["accepted"] for f in by_style.values() for name in CLASS_NAMES) == sum(
        result["tta"]["per_class"][name]["accepted"] for name in CLASS_NAMES), "the styles split the labels"
    assert all(0 <= f["turned_away_by_gates"] <= 1 for f in by_style.values())
    by_gate = result["coverage_by_gate"]
    assert by_gate["all_gates"] == pytest.approx(result["tta"]["coverage"])
    assert all(by_gate["all_gates"] <= value <= by_gate["thresholds_only"] for value in by_gate.values())
    for key in ("tta", "no_tta"):
        report = result[key]["prediction_sets"]
        assert report["target"] == 0.95 and report["n"] == 20 and 1 <= report["mean_set_size"] <= 5
        assert set(report["by_level"]) == {"0.8", "0.85", "0.9", "0.95", "0.99"}
        assert sum(v["n"] for v in report["per_set_size"].values()) == 20
    for plot in ("reliability.png", "risk_coverage.png", "confusion_matrix.png", "set_coverage.png"):
        assert (out_dir / plot).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "top-1" in printed
    assert len(by_style) > 1 and "by input style: " + ", ".join(
        f"{style} {f['n']} files, coverage {f['coverage']:.1%}" for style, f in by_style.items()) in printed


def test_calibrate_and_evaluate_refuse_hdu_all(tiny_artifacts: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    artifacts = ["--model_path", str(tiny_artifacts["model"]), "--scaler_path", str(tiny_artifacts["scaler"])]
    assert cli.main(["calibrate", "--labelled_dir", str(tmp_path), "--class_names", "a,b", "--hdu", "all",
                     "--output", str(tmp_path / "t.json"), *artifacts]) == ir.EXIT_USAGE
    assert cli.main(["evaluate", "--labelled_dir", str(tmp_path), "--output_dir", str(tmp_path / "e"), "--hdu", "all",
                     *artifacts]) == ir.EXIT_USAGE
    assert capsys.readouterr().err.count("--hdu all is for filesystem") == 2


@pytest.mark.parametrize(("flag", "value"), [("--ood_quantile", "1.5"), ("--ood_quantile", "-0.1"),
                                           ("--target_precision", "1"), ("--set_coverage", "2")])
def test_calibrate_refuses_a_share_outside_0_1_before_loading_anything(flag: str, value: str, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    code = cli.main(["calibrate", "--labelled_dir", str(tmp_path / "absent"), "--class_names", "a,b",
                     "--model_path", str(tmp_path / "absent.keras"), "--output", str(tmp_path / "t.json"),
                     flag, value])
    assert code == ir.EXIT_USAGE and not (tmp_path / "t.json").exists()
    assert f"error: {flag} must be in (0, 1), got {float(value)}" in capsys.readouterr().err


def test_calibrate_refuses_a_directory_without_class_folders(tiny_artifacts: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code = cli.main(["calibrate", "--labelled_dir", str(tmp_path / "empty"), "--class_names", "a,b,c,d,e",
                    "--model_path", str(tiny_artifacts["model"]), "--scaler_path", str(tiny_artifacts["scaler"]),
                    "--output", str(tmp_path / "t.json"), "--quiet"])
    assert code == ir.EXIT_ARTIFACTS and not (tmp_path / "t.json").exists()


def test_training_smoke_run_produces_a_servable_model(tmp_path: Path) -> None:
    import joblib

    from training.train import Recipe, fit_scaler, rand_augment, raw_features, simulated_dataset, train_model

    data = simulated_dataset(per_class=6, seed=11, workers=1)
    assert data.smalls.shape == (30, 448, 448) and data.smalls.dtype == np.float32
    images = np.stack([ir.data_loader.sample_from_small(small).image for small in data.smalls[:4]])
    augmented = rand_augment(images, np.random.default_rng(0))
    assert augmented.shape == (4, 448, 448) and augmented.min() >= 0 and augmented.max() <= 1
    scaler = fit_scaler(raw_features(data))
    model = train_model(data, scaler, list(CLASS_NAMES), Recipe(epochs=1, per_class=8, batch_size=8))
    model.save(tmp_path / "m.keras")
    joblib.dump(scaler, tmp_path / "s.joblib")
    service = ir.ClassifierService(tmp_path / "m.keras", tmp_path / "s.joblib",
                                   operating_point=ir.OperatingPoint.uncalibrated(CLASS_NAMES))
    record = service.predict_arrays([data.smalls[0]])[0]
    assert record.error is None and record.top_class in CLASS_NAMES
