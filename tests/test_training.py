"""Training on real labelled directories: object keys and splits, source-balanced sampling, style augmentation,
and ``inference-runner train`` end to end on a tiny tree of FITS, PNG and JPEG files."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import joblib
import numpy as np
import pytest
from PIL import Image

import cli
import data_loader
import inference_runner as ir
from backends import final_layer, load_keras_model
from report import load_schema
from training import real_data, train, user_train
from training.augment import style_augment
from training.simulator import render_frame, write_frame
from training.train import Dataset, build_model, epoch_indices, with_head


@pytest.mark.parametrize(("name", "key"), [
    ("giusnico_M031.jpg", "M31"), ("M031_wikipedia.jpg", "M31"), ("benland_m100_mirror_galaxy_crop.jpg", "M100"),
    ("spiral_NGC1234.jpg", "NGC1234"), ("elliptical_IC0495.jpg", "IC495"),
    ("10_cutout_m317_g_ccd_21_13.86708333333333_43.99194444444444.png", "sky:13.867,+43.992"),
    ("frame-g-004510-4-0030.fits.bz2", "sdss:004510-4-0030"), ("frame-r-004510-4-0030.fits.bz2", "sdss:004510-4-0030"),
    ("dark_barnard_147-2.jpg", "name:dark_barnard_147"), ("Atom.fits", "name:atom"), ("img_07.png", "name:img_07"),
])
def test_object_key_groups_copies_of_one_object(name: str, key: str) -> None:
    assert real_data.object_key(name) == key


def _files(n_objects: int, per_object: int, label: str = "galaxy", source: str = "s") -> list[real_data.LabelledFile]:
    return [real_data.LabelledFile(Path(f"{label}_{o}_{k}.png"), label, source, f"{label}{o}")
            for o in range(n_objects) for k in range(per_object)]


def test_splits_keep_each_object_on_one_side() -> None:
    files = _files(200, 3) + _files(50, 2, "nebula")
    hashed = real_data.assign_splits(files, (0.6, 0.2), seed=1)
    assert not real_data.leaked_objects(hashed)
    shares = {s: sum(f.split == s for f in hashed) / len(hashed) for s in real_data.SPLITS}
    assert 0.5 < shares["train"] < 0.7 and 0.1 < shares["calibration"] < 0.3
    assert real_data.assign_splits(files, (0.6, 0.2), seed=1) == hashed, "seeded: the same split every time"

    stratified = real_data.stratified_split(_files(12, 1) + _files(4, 3, "nebula"), 0.2, 0.2, seed=0)
    assert not real_data.leaked_objects(stratified)
    for label in ("galaxy", "nebula"):
        assert {f.split for f in stratified if f.label == label} == set(real_data.SPLITS), label


def _as(label: str, suffixes: list[str]) -> list[real_data.LabelledFile]:
    return [real_data.LabelledFile(Path(f"{label}/{label}_{i}{suffix}"), label, "mine", f"{label}_{i}")
            for i, suffix in enumerate(suffixes)]


def test_format_confounds_name_classes_told_apart_by_file_format() -> None:
    apart = _as("spirals", [".png"] * 10) + _as("clouds", [".fits.fz"] * 9 + [".jpg"])
    assert real_data.format_confounds(apart) == [
        "class clouds: 90% of its files are FITS against 0% of the spirals files: the model can tell them apart by "
        "file format",
        "class spirals: 100% of its files are PNG against 0% of the clouds files: the model can tell them apart by "
        "file format"]
    # a third class, half PNG and half TIFF: the spirals stand apart from the clouds by format, not from the trails
    with_trails = real_data.format_confounds(apart + _as("trails", [".png"] * 5 + [".tif"] * 5))
    assert with_trails == [
        "class clouds: 90% of its files are FITS against 0% of the spirals files, 0% of the trails files: the model "
        "can tell them apart by file format",
        "class spirals: 100% of its files are PNG against 0% of the clouds files: the model can tell them apart by "
        "file format"]
    mixed = _as("spirals", [".png", ".fits", ".jpg"] * 4) + _as("clouds", [".jpg", ".png", ".fits"] * 4)
    assert real_data.format_confounds(mixed) == []
    assert real_data.format_confounds(_as("spirals", [".fits"] * 5) + _as("clouds", [".fit"] * 5)) == [], \
        "one format for every class is no confound"


def test_epochs_balance_sources_within_a_class_and_mix_real_with_simulated() -> None:
    labels = np.array([0] * 900 + [0] * 100 + [0] * 50 + [1] * 200)
    groups = np.array(["survey"] * 900 + ["photos"] * 100 + ["sim"] * 50 + ["sim"] * 200)
    data = Dataset(np.zeros((len(labels), 1, 1), np.float32), labels, groups)
    order = epoch_indices(data, 2, per_class=1000, real_share=0.6, rng=np.random.default_rng(0))
    picked = groups[order]
    assert len(order) == 2000
    assert (labels[order] == 0).sum() == 1000, "class balance"
    assert abs((picked == "survey").sum() - 300) < 60 and abs((picked == "photos").sum() - 300) < 60
    assert ((picked == "sim") & (labels[order] == 0)).sum() == 400


def test_a_source_of_a_few_real_files_is_not_drawn_over_and_over() -> None:
    labels = np.array([0] * 600 + [0] * 3 + [0] * 400 + [1] * 5 + [1] * 50)
    groups = np.array(["survey"] * 600 + ["frames"] * 3 + ["sim"] * 400 + ["photos"] * 5 + ["other"] * 50)
    data = Dataset(np.zeros((len(labels), 1, 1), np.float32), labels, groups)
    rng = np.random.default_rng(0)
    epochs = [groups[epoch_indices(data, 2, per_class=500, real_share=0.6, rng=rng, draws_per_real_file=4)]
              for _ in range(20)]
    assert all(len(picked) == 1000 for picked in epochs)
    mean = {group: np.mean([(picked == group).sum() for picked in epochs]) for group in set(groups)}
    assert abs(mean["frames"] - 12) < 2, "three files, at most four draws each"
    assert abs(mean["survey"] - 150) < 10, "the large source keeps its even share of the real draws"
    assert mean["sim"] == 500 - 162, "the rest of the class goes to the simulations"
    # a class without simulations keeps every draw real: nothing else could take the rest
    assert mean["photos"] + mean["other"] == 500 and abs(mean["photos"] - 250) < 25


def test_learning_rate_decays_over_every_batch_outlier_draws_included() -> None:
    """Outlier draws add batches to each epoch; the cosine schedule must span them, or the last ones run at a
    learning rate of zero."""
    rng = np.random.default_rng(0)
    labels = np.array([0] * 8 + [1] * 8 + [train.OUTLIER] * 8)
    groups = np.array(["sim"] * 16 + ["noise"] * 8)
    data = Dataset(rng.normal(100, 5, (len(labels), 448, 448)).astype(np.float32), labels, groups)
    recipe = train.Recipe(epochs=2, per_class=8, batch_size=8, outlier_share=1.0, width=1)
    model = train.train_model(data, None, ["a", "b"], recipe)  # 24 draws an epoch: 3 batches, not 16 // 8
    optimizer = model.optimizer
    assert int(optimizer.iterations) == 6
    optimizer.iterations.assign(5)  # the last batch's step
    assert float(optimizer.learning_rate) > 0


def _small_inputs(n: int, size: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.random((n, size, size, 1), dtype=np.float32),
            "features": rng.normal(size=(n, data_loader.N_FEATURES)).astype(np.float32)}


def test_distillation_gives_real_planes_the_teachers_softmax_and_keeps_the_other_targets() -> None:
    teacher = build_model(3, data_loader.N_FEATURES, image_size=32)
    is_real = np.array([True, False, True, False, False])
    distiller = train.Distiller(teacher, is_real, embedding_weight=0.0)
    inputs, idx = _small_inputs(4), np.array([0, 1, 2, 4])  # dataset samples 0 and 2 are real
    labels = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    targets = distiller.soft_targets(inputs, labels, idx)
    logits = np.asarray(teacher.predict(inputs, verbose=0), dtype=np.float64)
    softmax = np.exp(logits - logits.max(axis=1, keepdims=True))
    softmax /= softmax.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(targets[[0, 2]], softmax[[0, 2]], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(targets[[1, 3]], labels[[1, 3]])
    assert not np.allclose(targets[0], labels[0]), "a real plane's label is replaced"


def test_embedding_term_is_zero_at_the_teacher_and_weighted_by_the_real_share() -> None:
    teacher = build_model(3, data_loader.N_FEATURES, image_size=32)
    distiller = train.Distiller(teacher, np.ones(4, bool), embedding_weight=2.0)
    inputs, share = _small_inputs(4), np.array([1.0, 0.5, 0.0, 1.0], np.float32)
    y_true = distiller.embedding_targets(inputs, share)
    embedding = np.asarray(train.with_embedding_output(teacher).predict(inputs, verbose=0)[1])
    assert y_true.shape == (4, embedding.shape[1] + 1)
    np.testing.assert_allclose(y_true[:, -1], 2.0 * share / np.mean(np.square(embedding)), rtol=1e-5)
    at_teacher = np.asarray(train.weighted_embedding_error(y_true, embedding))
    np.testing.assert_allclose(at_teacher, 0.0, atol=1e-6)
    moved = np.asarray(train.weighted_embedding_error(y_true, embedding + 1.0))
    np.testing.assert_allclose(moved, y_true[:, -1], rtol=1e-5)  # squared error 1 everywhere, times the weight
    assert moved[2] == 0.0, "a simulated input is not held"


def test_distilled_fine_tuning_trains_and_needs_a_teacher() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 8)
    groups = np.array(["sim"] * 8 + ["survey"] * 8)
    data = Dataset(rng.normal(100, 5, (len(labels), 448, 448)).astype(np.float32), labels, groups)
    model = build_model(2, data_loader.N_FEATURES, width=1)
    teacher = build_model(2, data_loader.N_FEATURES, width=1)
    teacher.set_weights(model.get_weights())
    before = [w.copy() for w in model.get_weights()]
    recipe = train.Recipe(epochs=1, per_class=8, batch_size=8, width=1, distill=1.0)
    tuned = train.train_model(data, None, ["a", "b"], recipe, initial_model=model, teacher=teacher)
    assert tuned is model
    assert any(not np.allclose(a, b) for a, b in zip(before, model.get_weights())), "the student's weights moved"
    assert all(np.allclose(a, b) for a, b in zip(before, teacher.get_weights())), "the teacher's did not"
    with pytest.raises(ValueError, match="teacher"):
        train.train_model(data, None, ["a", "b"], recipe, initial_model=model)


def test_planes_shown_as_served_get_a_dihedral_view_and_nothing_else() -> None:
    smalls = data_loader.resize_finite(render_frame("galaxy", 3))[0][None].repeat(4, axis=0)
    served = data_loader.sample_from_small(smalls[0])
    as_served = np.array([True, True, False, False])
    images, features = train.augmented_inputs(smalls, None, np.random.default_rng(0), 1.0, as_served)
    views = [np.rot90(served.image, k)[:, ::flip] for k in range(4) for flip in (1, -1)]
    for image, expected in zip(images, as_served):
        assert any(np.allclose(image, view) for view in views) == expected
    np.testing.assert_allclose(features[as_served], np.stack([served.features] * 2), rtol=1e-6)


def test_fine_tuning_with_batch_norm_frozen_keeps_its_statistics_and_trains_the_rest() -> None:
    rng = np.random.default_rng(1)
    labels = np.array([0, 1] * 8)
    data = Dataset(rng.normal(100, 5, (len(labels), 448, 448)).astype(np.float32), labels, np.array(["sim"] * 16))
    model = build_model(2, data_loader.N_FEATURES, width=1)
    norms = [layer for layer in model.layers if layer.__class__.__name__ == "BatchNormalization"]

    def statistics_now() -> list[np.ndarray]:
        return [w.numpy() for layer in norms for w in layer.non_trainable_weights]

    statistics = statistics_now()
    kernels = [w.copy() for w in model.get_layer("logits").get_weights()]
    recipe = train.Recipe(epochs=1, per_class=8, batch_size=8, width=1, freeze_batch_norm=True)
    train.train_model(data, None, ["a", "b"], recipe, initial_model=model)
    assert len(norms) == 6
    assert all(np.array_equal(a, b) for a, b in zip(statistics, statistics_now())), "moving statistics kept"
    assert any(not np.allclose(a, b) for a, b in zip(kernels, model.get_layer("logits").get_weights()))
    assert all(layer.trainable for layer in norms), "trainable again once trained, for a later fine-tuning"

    train.train_model(data, None, ["a", "b"], train.Recipe(epochs=1, per_class=8, batch_size=8, width=1),
                      initial_model=model)
    assert any(not np.array_equal(a, b) for a, b in zip(statistics, statistics_now())), "without it they move"


@pytest.mark.parametrize("option", [["--distill-real", "1"], ["--freeze-batch-norm"],
                                    ["--distill-as-served", "0.5"]])
def test_fine_tuning_options_need_the_model_they_fine_tune(tmp_path: Path, option: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train.main([*option, "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_new_head_keeps_what_the_model_knew_of_classes_it_already_has() -> None:
    model = build_model(3, data_loader.N_FEATURES, image_size=32)
    rng = np.random.default_rng(0)
    inputs = {"image": rng.random((4, 32, 32, 1), dtype=np.float32),
              "features": rng.normal(size=(4, data_loader.N_FEATURES)).astype(np.float32)}
    before = np.asarray(model.predict(inputs, verbose=0))
    # the user's classes: "b" the model has (its second output), "new" it does not
    tuned = with_head(model, ["b", "new"], known=["a", "b", "c"])
    after = np.asarray(tuned.predict(inputs, verbose=0))
    assert after.shape == (4, 2)
    np.testing.assert_allclose(after[:, 0], before[:, 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(after[:, 1], before[:, 0]) and not np.allclose(after[:, 1], before[:, 2])


def test_style_augmentation_gives_model_ready_planes() -> None:
    plane, _ = data_loader.resize_finite(render_frame("galaxy", 3, 512))
    rng = np.random.default_rng(0)
    looks = [style_augment(plane, rng) for _ in range(24)]
    assert all(look.shape == (448, 448) and look.dtype == np.float32 and np.isfinite(look).all() for look in looks)
    assert sum(not np.array_equal(look, plane) for look in looks) >= 12, "most draws change the frame"
    assert any(len(np.unique(look)) <= 256 for look in looks), "some draws are 8-bit display renders"
    for look in looks[:6]:
        sample = data_loader.sample_from_small(look)
        assert sample.image.min() >= 0 and sample.image.max() <= 1 and np.isfinite(sample.features).all()


def test_single_band_views_of_colour_photographs(tmp_path: Path) -> None:
    from training.augment import single_band

    rgb = np.zeros((96, 128, 3), np.uint8)
    rgb[..., 0], rgb[20:40, 30:60, 2] = 200, 255  # red everywhere, a blue block
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    views = [single_band(tmp_path / "colour.png", np.random.default_rng(seed)) for seed in range(12)]
    assert all(v.shape == (448, 448) and np.isfinite(v).all() for v in views)
    luminance = data_loader.load_small(tmp_path / "colour.png")[0]
    assert any(not np.allclose(v, luminance, rtol=0.05) for v in views), "bands differ from the luminance"
    assert single_band(tmp_path / "grey.png", np.random.default_rng(0)) is None
    write_frame(render_frame("galaxy", 1, 64), tmp_path / "frame", "fits_float32")
    assert single_band(tmp_path / "frame.fits", np.random.default_rng(0)) is None


def test_real_dataset_reads_a_plane_per_file_and_a_band_per_colour_photograph(tmp_path: Path) -> None:
    rgb = np.zeros((96, 128, 3), np.uint8)
    rgb[..., 1], rgb[20:40, 30:60, 0] = 120, 255
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    Image.fromarray(rgb[..., 1]).save(tmp_path / "grey.png")
    write_frame(render_frame("galaxy", 1, 64), tmp_path / "frame", "fits_float32")
    (tmp_path / "broken.fits").write_bytes(b"<html>")
    files = [real_data.LabelledFile(tmp_path / name, label, source, name) for name, label, source in (
        ("colour.png", "b", "web"), ("broken.fits", "a", "web"), ("grey.png", "a", "web"), ("frame.fits", "b", "sdss"))]
    assert train.planes_at_most(files, single_bands=True) == 6 and train.planes_at_most(files, False) == 4
    data, failed = train.real_dataset(files, ["a", "b"], single_bands=True, workers=1)
    assert [path for path, _ in failed] == [str(tmp_path / "broken.fits")]
    assert data.smalls.shape == (4, 448, 448) and np.isfinite(data.smalls).all()
    assert data.labels.tolist() == [1, 1, 0, 1] and data.groups.tolist() == ["web", "web", "web", "sdss"]
    np.testing.assert_array_equal(data.smalls[3], data_loader.load_small(tmp_path / "frame.fits")[0])
    assert train.unreadable_files(files, workers=1) == failed


def test_training_files_are_capped_per_class_by_a_seeded_choice() -> None:
    files = [real_data.LabelledFile(Path(f"{label}/{i}.fits"), label, "tree", f"{label}{i}")
             for label, count in (("a", 30), ("b", 5)) for i in range(count)]
    kept = user_train.cap_training_files(files, 10, seed=0)
    assert sum(f.label == "a" for f in kept) == 10 and [f for f in kept if f.label == "b"] == files[30:]
    assert kept == user_train.cap_training_files(files, 10, seed=0)
    assert kept != user_train.cap_training_files(files, 10, seed=1)


def test_available_memory_is_read_from_the_system() -> None:
    available = user_train.available_memory()
    assert available is not None and 0 < available < 1 << 50


# --------------------------------------------------------------------------- inference-runner train


def _write_class(directory: Path, name: str, simulated_as: str, count: int, start_seed: int) -> None:
    """``count`` frames of a simulated class under ``directory/name``, a third each as FITS, PNG and JPEG."""
    folder = directory / name
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        frame = render_frame(simulated_as, start_seed + index, 192)
        stem = folder / f"{name}_{index:02d}"
        if index % 3 == 0:
            write_frame(frame, stem, "fits_float32", seed=index)
            continue
        display = (data_loader.preprocess(frame) * 255).astype(np.uint8)
        Image.fromarray(display).save(stem.with_suffix(".png" if index % 3 == 1 else ".jpg"))


@pytest.fixture(scope="module")
def custom_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    for offset, (name, simulated_as) in enumerate((("spirals", "galaxy"), ("clouds", "nebula"),
                                                   ("trails", "artifact"))):
        _write_class(root, name, simulated_as, 12, 100 * offset)
    (root / "trails" / "broken.fits").write_bytes(b"<html>not found</html>")
    return root


def test_train_command_end_to_end_on_custom_classes(custom_tree: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model"
    code = cli.main(["train", "--labelled_dir", str(custom_tree), "--output_dir", str(out), "--epochs", "1",
                    "--precision_confidence", "0.9", "--max_files_per_class", "5", "--quiet"])
    printed = capsys.readouterr()
    assert code == ir.EXIT_OK, printed.err
    assert "broken.fits" in printed.err, "unreadable files are listed"
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert thresholds["class_names"] == ["clouds", "spirals", "trails"], "a new head for the user's classes"
    from backends import load_keras_model

    fine_tuned, shipped = load_keras_model(out / "model.keras"), load_keras_model(ir.DEFAULT_MODEL_PATH)
    import keras

    for member in ("member_0", "member_1"):  # fine-tuned from default: stem and first block kept as they are
        tuned, original = fine_tuned.get_layer(member), shipped.get_layer(member)
        first_block = next(layer for layer in tuned.layers if isinstance(layer, keras.layers.SeparableConv2D))
        for name in ("stem", first_block.name):
            assert not tuned.get_layer(name).trainable, name
            np.testing.assert_array_equal(tuned.get_layer(name).get_weights()[0],
                                          original.get_layer(name).get_weights()[0])
    assert thresholds["model_sha256"] == ir.sha256_of(out / "model.keras")
    assert thresholds["scaler_sha256"] == ir.sha256_of(out / "scaler.joblib")
    assert thresholds["litert_sha256"] == ir.sha256_of(out / "model.tflite"), "exported and pinned"
    # a handful of calibration files per class cannot show 0.95 precision with 90% confidence: every class
    # abstains, and the command says so and what to do
    assert thresholds["precision_confidence"] == 0.9
    assert all(v > 1 for v in thresholds["operating_points"]["tta"]["thresholds"].values())
    assert "clouds, spirals, trails always abstain" in printed.err and "--precision_confidence 0" in printed.err
    evaluation = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert set(evaluation["split"]) == set(real_data.SPLITS)
    in_split = {name: sum(counts.get(name, 0) for counts in evaluation["split"]["train"].values())
                for name in ("clouds", "spirals", "trails")}
    trained = evaluation["trained_per_class"]
    assert in_split["clouds"] > 5 and in_split["spirals"] > 5, "--max_files_per_class 5 has something to cap"
    assert trained["clouds"] == trained["spirals"] == 5 and trained["trails"] <= 5  # broken.fits may be chosen
    assert {k: v["sha256"] for k, v in evaluation["artifacts"].items()} == {
        "model": thresholds["model_sha256"], "scaler": thresholds["scaler_sha256"],
        "thresholds": ir.sha256_of(out / "thresholds.json"), "backend": thresholds["litert_sha256"]}, \
        "the evaluation names what it evaluated: the files written, on LiteRT"
    assert evaluation["unreadable"][0]["path"].endswith("broken.fits")
    assert evaluation["ood_by_kind"] and all(0 <= v["abstained_fraction"] <= 1
                                             for v in evaluation["ood_by_kind"].values())
    assert (out / "evaluation" / "real" / "reliability.png").exists()
    card = (out / "MODEL_CARD.md").read_text()
    assert "clouds" in card
    assert evaluation["format_confounds"] == [] and "* Format confounds: none found." in card
    by_style = evaluation["real_validation"]["per_input_style"]
    assert set(by_style) <= {"fits float32", "png uint8", "jpeg uint8"}
    assert sum(f["n"] for f in by_style.values()) == evaluation["real_validation"]["overall"]["n"]
    for style, figures in by_style.items():  # a row per style, with its test files per class
        counts = ", ".join(f"{name} {figures['per_class'][name]['support']}" for name in ("clouds", "spirals", "trails")
                           if figures["per_class"][name]["support"])
        assert f"| {style} | {counts} | {figures['coverage']:.1%} |" in card
    start_views = json.loads(ir.DEFAULT_THRESHOLDS_PATH.read_text())["tta_views"]
    assert evaluation["tta_views"] == start_views == json.loads((out / "thresholds.json").read_text())["tta_views"]
    assert (f"Without TTA (`--no-tta`: one view instead of {start_views}, its own thresholds):\ncoverage "
            f"{evaluation['summary']['real_validation_no_tta']['coverage']:.1%}") in card

    report = tmp_path / "report.json"
    assert cli.main(["filesystem", "--input_dir", str(custom_tree), "--output_json", str(report), "--extensions",
                    ".fits,.png,.jpg", "--model_path", str(out / "model.keras"), "--scaler_path",
                    str(out / "scaler.joblib"), "--thresholds", str(out / "thresholds.json"), "--quiet"]) == ir.EXIT_OK
    document = json.loads(report.read_text())
    import jsonschema

    jsonschema.validate(document, load_schema())
    assert len(document["results"]) == 37
    assert {r["top_class"] for r in document["results"] if r["error"] is None} <= {"clouds", "spirals", "trails"}
    assert document["meta"]["operating_point"]["temperature"] == thresholds["temperature"]
    assert document["meta"]["backend"]["name"] == "litert", "the pinned export runs by default on CPU"


def test_train_refuses_one_class_and_thin_classes(custom_tree: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    single = tmp_path / "single"
    _write_class(single, "spirals", "galaxy", 3, 0)
    assert cli.main(["train", "--labelled_dir", str(single), "--output_dir", str(tmp_path / "o1"), "--quiet"]) == 2
    assert "at least 2 class" in capsys.readouterr().err

    thin = tmp_path / "thin"
    _write_class(thin, "spirals", "galaxy", 10, 0)
    _write_class(thin, "clouds", "nebula", 9, 0)
    (thin / "clouds" / "bad.fits").write_bytes(b"")
    assert cli.main(["train", "--labelled_dir", str(thin), "--output_dir", str(tmp_path / "o2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "fewer than 10 readable files: clouds (9)" in err and "bad.fits" in err
    assert not (tmp_path / "o2" / "model.keras").exists()


def test_train_refuses_what_cannot_fit_in_memory_before_decoding(custom_tree: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(user_train, "available_memory", lambda: 1_000_000_000)
    decoded = []
    monkeypatch.setattr(train, "real_dataset", lambda *args, **kwargs: decoded.append(args))
    out = tmp_path / "out"
    assert cli.main(["train", "--labelled_dir", str(custom_tree), "--output_dir", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "GB of memory" in err and "1.0 GB is available" in err and "--max_files_per_class (now 2000)" in err
    assert not decoded and not out.exists()


def _trained_body(model) -> list[np.ndarray]:
    """The trainable weights but the final layer's (whose simulation-only rows every run refits)."""
    head = {id(weight) for weight in final_layer(model).weights}
    return [np.asarray(weight) for weight in model.trainable_weights if id(weight) not in head]


@pytest.mark.parametrize("quantile", ["0", "1", "1.5"])
def test_training_refuses_a_gate_quantile_outside_0_1_before_any_work(quantile: str, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from training import train

    with pytest.raises(SystemExit) as exited:
        train.main(["--out", str(tmp_path / "out"), "--ood-quantile", quantile])
    assert exited.value.code == 2
    assert f"--ood-quantile must be in (0, 1), got {float(quantile)}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_default_recipe_with_real_directories_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m training.train --real_dir ... --real_val_dir ...`` at toy sizes: every stage runs and the
    validation-only source is evaluated, never trained or calibrated on."""
    from training import train

    survey, photos = tmp_path / "survey", tmp_path / "photos"
    for offset, name in enumerate(("galaxy", "nebula", "star_cluster")):
        _write_class(survey, name, name, 6, 10 * offset)
        _write_class(photos, name, name, 3, 50 + 10 * offset)
    out = tmp_path / "out"
    code = train.main(["--out", str(out), "--work-dir", str(tmp_path / "work"), "--per-class", "3",
                       "--calibration-per-class", "2", "--test-per-class", "2", "--epochs", "1",
                       "--epoch-per-class", "8", "--real_dir", str(survey), "--real_val_dir", str(photos)])
    assert code == 0
    evaluation = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert evaluation["real_data"]["validation"]["photos"] == {"galaxy": 3, "nebula": 3, "star_cluster": 3}
    assert "photos" not in evaluation["real_data"].get("train", {})
    assert "photos" not in evaluation["real_data"].get("calibration", {})
    assert set(evaluation["real_validation"]["per_source"]) <= {"survey", "photos"}
    assert "photos" in evaluation["real_validation"]["per_source"]
    with_tta, without = evaluation["summary"]["real_validation"], evaluation["summary"]["real_validation_no_tta"]
    assert without["n"] == with_tta["n"] > 0 and set(without["precision"]) == set(with_tta["precision"])
    assert {"moon", "photo_other", "text", "planet", "spectrum", "radio_map"} <= set(evaluation["ood_by_kind"])
    # a handful of real files per class: every class counts as learned from simulations and has its row refitted
    assert evaluation["head_refit"]["classes"] == list(train.CLASS_NAMES)
    assert evaluation["head_refit"]["files"] == 2 * len(train.CLASS_NAMES)
    thresholds = json.loads((out / train.THRESHOLDS_NAME).read_text())
    assert thresholds["calibration_data"]["simulated_per_class"] == 2
    assert "photos" not in thresholds["calibration_data"]["real"], "validation-only data never calibrates"

    assert (tmp_path / "work" / "calibration").is_dir(), "--work-dir keeps the labelled directories"

    # fine-tuning that model: it starts from its weights, keeps its scaler and is calibrated and evaluated anew;
    # without --work-dir its frames go to a temporary directory that is gone afterwards
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    tuned = tmp_path / "tuned"
    assert train.main(["--out", str(tuned), "--per-class", "3",
                       "--calibration-per-class", "2", "--test-per-class", "2", "--epochs", "1",
                       "--epoch-per-class", "8", "--real_dir", str(survey), "--real_val_dir", str(photos),
                       "--init-model", str(out / train.MODEL_NAME), "--peak-lr", "1e-4", "--model-seed", "5",
                       "--ood-quantile", "0.9"]) == 0
    assert not list(scratch.glob("astro-train-*")), "the default work directory is removed after the run"
    scalers = [joblib.load(d / train.SCALER_NAME) for d in (out, tuned)]
    np.testing.assert_array_equal(scalers[0].mean_, scalers[1].mean_)
    np.testing.assert_array_equal(scalers[0].scale_, scalers[1].scale_)
    before, after = (_trained_body(load_keras_model(d / train.MODEL_NAME)) for d in (out, tuned))
    moved = max(float(np.abs(a - b).max()) for a, b in zip(before, after, strict=True))
    assert 0 < moved < 0.01, "a small step from the given weights, not a fresh model of another seed"
    assert (tuned / "evaluation" / "evaluation.json").is_file()
    # --ood-quantile reaches every gate calibration fits; the learned gate keeps its own
    for directory, quantile in ((out, 0.95), (tuned, 0.9)):
        document = json.loads((directory / train.THRESHOLDS_NAME).read_text())
        assert {document[gate]["quantile"] for gate in ("ood_gate", "feature_gate", "smooth_gate")} == {quantile}
