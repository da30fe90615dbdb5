"""The two model runtimes: export and pinning, choosing one, and their equivalence on the shipped model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import backends
import inference_runner as ir
from tests.conftest import ROOT, artifact_args
from training.simulator import CLASS_NAMES, FILE_VARIANTS, render_frame, write_frame

SAMPLE_DATA = ROOT / "examples" / "sample_data"
PROB_TOLERANCE = 1e-4


def copy_artifacts(artifacts: dict[str, Path], directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    return {key: Path(shutil.copy(path, directory / path.name)) for key, path in artifacts.items()}


def scored(service: ir.ClassifierService, paths: list[Path], tta: bool = True) -> list[ir.ScoredFile]:
    return list(service.iter_scored(paths, batch_size=8, tta=tta))


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Frames of every class in every file variant."""
    root = tmp_path_factory.mktemp("synthetic")
    paths = []
    for index, name in enumerate(CLASS_NAMES):
        for seed in range(4):
            variant = FILE_VARIANTS[(index * 4 + seed) % len(FILE_VARIANTS)]
            paths.append(write_frame(render_frame(name, 100 + seed, 256), root / f"{name}_{seed}", variant, seed))
    return paths


@pytest.fixture(scope="module")
def shipped() -> dict[str, ir.ClassifierService]:
    return {name: ir.ClassifierService(backend=name, workers=2) for name in ("keras", "litert")}


def test_shipped_thresholds_pin_the_shipped_export() -> None:
    document = json.loads(ir.DEFAULT_THRESHOLDS_PATH.read_text())
    export = backends.litert_path_for(ir.DEFAULT_MODEL_PATH)
    assert document["litert_file"] == export.name
    assert document["litert_sha256"] == backends.sha256_of(export)


def test_tta_views_are_the_first_of_identity_flips_and_rotation() -> None:
    planes = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    four = backends.tta_views(planes, 4)
    np.testing.assert_array_equal(four[1], planes[:, :, ::-1])
    np.testing.assert_array_equal(four[3], np.rot90(planes, 2, axes=(1, 2)))
    for count in (1, 2):
        assert all(np.array_equal(a, b) for a, b in zip(backends.tta_views(planes, count), four[:count]))
        assert len(backends.tta_views(planes, count)) == count
    with pytest.raises(ValueError, match="1, 2 or 4"):
        backends.tta_views(planes, 3)


def test_shipped_ensemble_runs_two_views_on_both_runtimes(shipped: dict[str, ir.ClassifierService]) -> None:
    assert json.loads(ir.DEFAULT_THRESHOLDS_PATH.read_text())["tta_views"] == 2
    for service in shipped.values():
        assert service.backend.tta_views == 2  # its second member sees them rotated: four views in all


def test_thresholds_calibrated_with_other_tta_views_are_refused(tiny_artifacts: dict[str, Path],
                                                                tmp_path: Path) -> None:
    document = json.loads(tiny_artifacts["thresholds"].read_text())  # a single model: four views
    document["tta_views"] = 2
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps(document))
    with pytest.raises(ir.ArtifactError, match=r"calibrated with 2 TTA views per file, but .* takes 4; recalibrate"):
        ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], thresholds, backend="keras")


@pytest.mark.parametrize("tta", [True, False])
def test_litert_decides_what_keras_decides_on_the_shipped_model(shipped: dict[str, ir.ClassifierService],
                                                                synthetic_set: list[Path], tta: bool) -> None:
    paths = sorted(ir.scan_paths(SAMPLE_DATA)) + synthetic_set
    records = {name: service.predict_paths(paths, batch_size=8, tta=tta) for name, service in shipped.items()}
    outputs = {name: scored(service, paths, tta) for name, service in shipped.items()}
    largest = 0.0
    for keras_record, lite_record in zip(records["keras"], records["litert"]):
        assert keras_record.path == lite_record.path
        assert keras_record.error == lite_record.error
        if keras_record.error:
            continue
        assert (keras_record.label, keras_record.abstain_reason) == (lite_record.label, lite_record.abstain_reason)
        assert keras_record.prediction_set == lite_record.prediction_set
        largest = max(largest, *(abs(keras_record.probs[c] - lite_record.probs[c]) for c in CLASS_NAMES))
    assert largest <= PROB_TOLERANCE
    good = [i for i, item in enumerate(outputs["keras"]) if item.error is None]
    assert len(good) >= 70  # 60 readable sample files and 20 synthetic ones
    embeddings = {name: np.stack([outputs[name][i].embedding for i in good]) for name in outputs}
    features = {name: np.stack([outputs[name][i].features for i in good]) for name in outputs}
    np.testing.assert_array_equal(features["keras"], features["litert"])  # decoded the same, whatever the backend
    smooth = {name: np.array([outputs[name][i].smooth_fraction for i in good]) for name in outputs}
    np.testing.assert_array_equal(smooth["keras"], smooth["litert"])
    means = {name: np.stack([outputs[name][i].layer_means for i in good]) for name in outputs}
    whiteness = {name: np.array([outputs[name][i].noise_whiteness for i in good]) for name in outputs}
    np.testing.assert_array_equal(whiteness["keras"], whiteness["litert"])
    op = shipped["keras"].operating_point
    assert op.ood_gate is not None and op.ood_classifier is not None and op.feature_gate is not None
    assert op.smooth_gate is not None and op.layer_gate is not None
    assert op.feature_gate.whiteness_scale is not None  # the shipped feature gate measures noise whiteness
    assert op.member_gate is not None  # the shipped model is a two-member ensemble
    predicted = {name: op.probabilities(np.stack([outputs[name][i].view_logits for i in good])).argmax(axis=1)
                 for name in outputs}
    np.testing.assert_array_equal(predicted["keras"], predicted["litert"])
    np.testing.assert_array_equal(
        op.inside(embeddings["keras"], features["keras"], predicted["keras"], smooth["keras"], means["keras"],
                  whiteness["keras"]),
        op.inside(embeddings["litert"], features["litert"], predicted["litert"], smooth["litert"], means["litert"],
                  whiteness["litert"]))
    assert np.abs(embeddings["keras"] - embeddings["litert"]).max() < 1e-3
    # the gates' scores, not only their decisions, agree far more closely than their margins
    np.testing.assert_allclose(op.ood_classifier.logit(embeddings["litert"]), op.ood_classifier.logit(
        embeddings["keras"]), atol=1e-3)
    np.testing.assert_allclose(op.member_gate.divergence(embeddings["litert"]),
                               op.member_gate.divergence(embeddings["keras"]), atol=1e-4)
    np.testing.assert_allclose(op.layer_gate.score(means["litert"]), op.layer_gate.score(means["keras"]), atol=1e-3)


def _patch_convolutions(model) -> int:
    """Convolutions whose kernel size equals their stride, in ``model`` and the models nested in it."""
    import keras

    count = 0
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            count += _patch_convolutions(layer)
        elif type(layer) is keras.layers.Conv2D and tuple(layer.kernel_size) == tuple(layer.strides):
            count += 1
    return count


@pytest.mark.parametrize("keras_op", [True, False], ids=["space_to_depth_op", "transpose_before_keras_3_14"])
def test_export_runs_the_stem_as_space_to_depth_with_the_same_sums(tiny_artifacts: dict[str, Path], keras_op: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import keras

    if not keras_op:
        monkeypatch.delattr(keras.ops, "space_to_depth", raising=False)
    model = backends.load_keras_model(tiny_artifacts["model"])
    rewritten = backends.with_space_to_depth_stems(model)
    assert _patch_convolutions(model) == 1 and _patch_convolutions(rewritten) == 0
    rng = np.random.default_rng(3)
    # pixel noise alone would hide pixels misplaced within a block (pooling averages it out): add structure that
    # differs across and along the rows of every 4 x 4 block
    column, row = np.meshgrid(np.arange(448) % 4, np.arange(448) % 8, indexing="xy")
    pattern = (0.2 * column + 0.05 * row)[None, :, :, None].astype(np.float32)
    inputs = {"image": pattern + 0.05 * rng.random((3, 448, 448, 1), dtype=np.float32),
              "features": rng.standard_normal((3, ir.data_loader.N_FEATURES)).astype(np.float32)}
    # the stem itself (an untrained model's outputs barely depend on it), then the whole model's wiring
    np.testing.assert_allclose(np.asarray(rewritten.get_layer("stem")(inputs["image"])),
                               np.asarray(model.get_layer("stem")(inputs["image"])), atol=1e-5)
    for expected, actual in zip(backends.forward_model(model)(inputs, training=False),
                                backends.forward_model(rewritten)(inputs, training=False)):
        np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=1e-5)


def test_softmax_head_exports_as_probabilities(tiny_artifacts: dict[str, Path], tmp_path: Path,
                                               mixed_dir: Path) -> None:
    import keras

    logit_model = keras.saving.load_model(tiny_artifacts["model"], compile=False)
    softmax_model = keras.Model(logit_model.inputs, keras.layers.Softmax()(logit_model.outputs[0]))
    path = tmp_path / "softmax.keras"
    softmax_model.save(path)
    backends.export_litert(path)
    lite = backends.LiteRTBackend(path.with_suffix(".tflite"), threads=1)
    assert lite.outputs_probabilities and lite.n_outputs == len(CLASS_NAMES)
    twin = ir.ClassifierService(path, tiny_artifacts["scaler"], tiny_artifacts["thresholds"], allow_mismatch=True,
                                backend="litert")
    reference = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tiny_artifacts["thresholds"],
                                     backend="keras")
    paths = [p for p in ir.scan_paths(mixed_dir) if p.name != "corrupt.fits"][:4]
    for a, b in zip(twin.predict_paths(paths), reference.predict_paths(paths)):
        for name in CLASS_NAMES:
            assert a.probs[name] == pytest.approx(b.probs[name], abs=PROB_TOLERANCE)


def test_auto_takes_litert_only_for_a_pinned_export_and_no_gpu(tiny_artifacts: dict[str, Path],
                                                               tiny_lite_artifacts: dict[str, Path], tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    lite = tiny_lite_artifacts
    args = (lite["model"], lite["scaler"], lite["thresholds"])
    assert ir.ClassifierService(*args).backend.name == "litert"
    assert ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"],
                                tiny_artifacts["thresholds"]).backend.name == "keras"  # no export at all
    monkeypatch.setattr(ir, "gpu_visible", lambda: True)
    assert ir.ClassifierService(*args).backend.name == "keras"
    monkeypatch.undo()
    stale = copy_artifacts(lite, tmp_path / "stale")
    with open(stale["litert"], "ab") as handle:
        handle.write(b"\0")
    with caplog.at_level(logging.WARNING, logger="inference_runner"):
        service = ir.ClassifierService(stale["model"], stale["scaler"], stale["thresholds"])
    assert service.backend.name == "keras" and "re-export" in caplog.text
    with pytest.raises(ir.ArtifactError, match="LiteRT model SHA-256"):
        ir.ClassifierService(stale["model"], stale["scaler"], stale["thresholds"], backend="litert")


def test_gpu_visibility_honours_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not backends.gpu_visible()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert not backends.gpu_visible()


def test_litert_refuses_an_unpinned_or_missing_export(tiny_artifacts: dict[str, Path],
                                                      tiny_lite_artifacts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ir.ArtifactError, match=r"LiteRT model not found.*inference-runner export"):
        ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tiny_artifacts["thresholds"],
                             backend="litert")
    unpinned = copy_artifacts(tiny_lite_artifacts, tmp_path / "unpinned")
    document = json.loads(unpinned["thresholds"].read_text())
    del document["litert_sha256"]
    unpinned["thresholds"].write_text(json.dumps(document))
    args = (unpinned["model"], unpinned["scaler"], unpinned["thresholds"])
    with pytest.raises(ir.ArtifactError, match="pins no LiteRT model"):
        ir.ClassifierService(*args, backend="litert")
    assert ir.ClassifierService(*args, backend="litert", allow_mismatch=True).backend.name == "litert"
    assert ir.ClassifierService(*args).backend.name == "keras"  # auto does not take an export it cannot trust


def test_export_command_writes_checks_and_pins(tiny_artifacts: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    own = copy_artifacts(tiny_artifacts, tmp_path / "own")
    assert ir.main(["export", "--model_path", str(own["model"]), "--thresholds", str(own["thresholds"])],
                   (ir.add_export_command,)) == ir.EXIT_OK
    export = own["model"].with_suffix(".tflite")
    document = json.loads(own["thresholds"].read_text())
    assert document["litert_sha256"] == backends.sha256_of(export)
    assert document["model_sha256"] == backends.sha256_of(own["model"])  # the rest of the file is unchanged
    assert ir.ClassifierService(own["model"], own["scaler"], own["thresholds"]).backend.name == "litert"
    capsys.readouterr()
    # the thresholds of another model are refused
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**document, "model_sha256": "0" * 64}))
    assert ir.main(["export", "--model_path", str(own["model"]), "--thresholds", str(other)],
                   (ir.add_export_command,)) == ir.EXIT_ARTIFACTS
    assert "calibrated for another model" in capsys.readouterr().err


def test_a_stale_export_is_never_pinned(tiny_artifacts: dict[str, Path], tiny_lite_artifacts: dict[str, Path],
                                        tmp_path: Path) -> None:
    import keras

    own = copy_artifacts(tiny_artifacts, tmp_path / "own")
    keras.utils.set_random_seed(1)  # other weights, same architecture: the old export no longer matches
    model = keras.saving.load_model(own["model"], compile=False)
    model.set_weights([w + np.float32(0.1) for w in model.get_weights()])
    model.save(own["model"])
    shutil.copy(tiny_lite_artifacts["litert"], own["model"].with_suffix(".tflite"))
    with pytest.raises(ir.ArtifactError, match="outputs differ"):
        backends.litert_pin(own["model"])


def test_report_meta_names_the_backend_and_artifact_used(tiny_lite_artifacts: dict[str, Path], mixed_dir: Path,
                                                         tmp_path: Path) -> None:
    for backend in ("litert", "keras"):
        output = tmp_path / f"{backend}.json"
        assert ir.main(["filesystem", "--input_dir", str(mixed_dir), "--output_json", str(output), "--quiet",
                        "--backend", backend, "--threads", "1", *artifact_args(tiny_lite_artifacts)]) == ir.EXIT_OK
        meta = json.loads(output.read_text())["meta"]
        artifact = tiny_lite_artifacts["litert" if backend == "litert" else "model"]
        assert meta["backend"] == {"name": backend, "artifact": str(artifact), "sha256": backends.sha256_of(artifact),
                                   "threads": 1}
        assert meta["model"]["sha256"] == backends.sha256_of(tiny_lite_artifacts["model"])


def test_training_calibration_and_export_name_the_full_install(tiny_artifacts: dict[str, Path], mixed_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    import calibration

    monkeypatch.setattr(backends, "installed", lambda module: module not in ("tensorflow", "keras"))
    assert ir.main(["export", "--model_path", str(tiny_artifacts["model"])], (ir.add_export_command,)) \
        == ir.EXIT_ARTIFACTS
    assert ir.main(["calibrate", "--labelled_dir", str(mixed_dir), "--output", "unused.json",
                    *artifact_args(tiny_artifacts)[:4]], (calibration.add_commands,)) == ir.EXIT_ARTIFACTS
    errors = capsys.readouterr().err
    assert errors.count("needs the full install") == 2 and "requirements.txt" in errors


def test_a_three_channel_model_sees_the_grey_plane_in_every_channel_on_both_backends(
        tiny_artifacts: dict[str, Path], tmp_path: Path, mixed_dir: Path) -> None:
    import keras

    size, n_features = ir.data_loader.IMAGE_SIZE, ir.data_loader.N_FEATURES
    keras.utils.set_random_seed(2)
    image_in = keras.Input((size, size, 3), name="image")
    feature_in = keras.Input((n_features,), name="features")
    x = keras.layers.Conv2D(4, 8, strides=8)(image_in)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(8, activation="relu")(keras.layers.Concatenate()([x, feature_in]))
    model = keras.Model([image_in, feature_in], keras.layers.Dense(len(CLASS_NAMES))(x))
    path = tmp_path / "rgb.keras"
    model.save(path)
    backends.export_litert(path)
    args = (path, tiny_artifacts["scaler"], tiny_artifacts["thresholds"])
    keras_service = ir.ClassifierService(*args, allow_mismatch=True, backend="keras")
    lite_service = ir.ClassifierService(*args, allow_mismatch=True, backend="litert")
    assert keras_service.channels == lite_service.channels == 3
    paths = [p for p in ir.scan_paths(mixed_dir) if p.name != "corrupt.fits"][:4]
    for a, b in zip(keras_service.predict_paths(paths), lite_service.predict_paths(paths)):
        assert a.label == b.label
        assert max(abs(a.probs[c] - b.probs[c]) for c in CLASS_NAMES) <= PROB_TOLERANCE


ONE_CPU_SCRIPT = """
import json, os
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # as `taskset -c 0` or a container's cpuset would
import data_loader, inference_runner as ir
service = ir.ClassifierService(backend="litert")
print(json.dumps({"host": os.cpu_count(), "usable": data_loader.available_cpus(),
                  "workers": service.workers, "threads": service.backend.threads}))
"""


def test_default_threads_follow_the_cpus_the_process_may_use_not_the_host() -> None:
    done = subprocess.run([sys.executable, "-c", ONE_CPU_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["host"] == os.cpu_count()
    assert (counts["usable"], counts["workers"], counts["threads"]) == (1, 1, 1)


def test_loky_max_cpu_count_caps_the_default_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "1")
    assert ir.data_loader.available_cpus() == 1
    monkeypatch.delenv("LOKY_MAX_CPU_COUNT")
    assert 1 <= ir.data_loader.available_cpus() <= len(os.sched_getaffinity(0))


def test_a_layer_gate_stops_files_on_both_runtimes_and_needs_an_export_with_the_means(
        tiny_lite_artifacts: dict[str, Path], mixed_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = copy_artifacts(tiny_lite_artifacts, tmp_path / "own")
    paths = list(ir.scan_paths(mixed_dir))
    plain = {name: [s for s in scored(ir.ClassifierService(own["model"], own["scaler"], own["thresholds"],
                                                           backend=name), paths) if s.layer_means is not None]
             for name in ("keras", "litert")}
    assert len(plain["keras"]) == len(plain["litert"]) > 3
    means = np.stack([s.layer_means for s in plain["keras"]])
    np.testing.assert_allclose(np.stack([s.layer_means for s in plain["litert"]]), means, atol=1e-4)
    sizes = backends.feature_map_sizes(backends.load_keras_model(own["model"]))
    assert sum(sizes) == means.shape[1]
    labels = np.arange(len(means)) % 2
    gate = ir.LayerGate.fit(np.vstack([means] * 4), np.tile(labels, 4), sizes, quantile=0.99)
    before = ir.ClassifierService(own["model"], own["scaler"], own["thresholds"]).predict_paths(paths)
    assert any(r.abstain_reason != "out_of_distribution" for r in before if not r.error)
    document = json.loads(own["thresholds"].read_text())
    document["layer_gate"] = {**gate.to_json(), "max_score": -1.0}  # every file beyond the cut
    own["thresholds"].write_text(json.dumps(document))
    for name in ("keras", "litert"):
        service = ir.ClassifierService(own["model"], own["scaler"], own["thresholds"], backend=name)
        decided = [r for r in service.predict_paths(paths) if not r.error]
        assert decided and all(r.abstain_reason == "out_of_distribution" for r in decided), name
    original = backends.LiteRTBackend.__init__

    def before_the_layer_gate(self, *args, **kwargs) -> None:  # an export made before the layer gate existed
        original(self, *args, **kwargs)
        self.has_layer_means = False

    monkeypatch.setattr(backends.LiteRTBackend, "__init__", before_the_layer_gate)
    with pytest.raises(ir.ArtifactError, match=r"no feature-map means.*re-export"):
        ir.ClassifierService(own["model"], own["scaler"], own["thresholds"], backend="litert")
