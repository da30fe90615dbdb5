"""training.ensemble: members merged into one model whose logits are their mean."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

import data_loader
from backends import KerasBackend, embedding_tensor, export_difference, export_litert, load_keras_model
from training.ensemble import main, merge
from training.train import MODEL_NAME, SCALER_NAME, build_model


def _member(seed: int, n_classes: int = 5):
    import keras

    keras.utils.set_random_seed(seed)
    return build_model(n_classes, data_loader.N_FEATURES)


def _inputs(n: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"image": rng.normal(size=(n, data_loader.IMAGE_SIZE, data_loader.IMAGE_SIZE, 1)).astype("float32"),
            "features": rng.normal(size=(n, data_loader.N_FEATURES)).astype("float32")}


def _member_dir(directory: Path, seed: int, scaler_mean: float = 0.0) -> Path:
    directory.mkdir(parents=True)
    _member(seed).save(directory / MODEL_NAME)
    joblib.dump(StandardScaler().fit(np.random.default_rng(0).normal(scaler_mean, 1, (20, data_loader.N_FEATURES))),
                directory / SCALER_NAME)
    return directory


def test_merged_logits_are_the_members_mean_and_the_embedding_holds_both(tmp_path: Path) -> None:
    members = [_member(0), _member(1)]
    merged = merge(members)
    x = _inputs()
    expected = np.mean([np.asarray(m.predict_on_batch(x)) for m in members], axis=0)
    assert np.abs(np.asarray(members[0].predict_on_batch(x)) - expected).max() > 1e-3  # the members differ
    np.testing.assert_allclose(np.asarray(merged.predict_on_batch(x)), expected, atol=1e-5)
    assert embedding_tensor(merged).shape[-1] == 2 * embedding_tensor(members[0]).shape[-1]
    merged.save(tmp_path / "merged.keras")
    reloaded = load_keras_model(tmp_path / "merged.keras")
    np.testing.assert_allclose(np.asarray(reloaded.predict_on_batch(x)), expected, atol=1e-5)


def test_merged_model_exports_to_litert_with_the_same_outputs(tmp_path: Path) -> None:
    path = tmp_path / "merged.keras"
    merge([_member(0), _member(1)]).save(path)
    export = export_litert(path)
    assert export_difference(KerasBackend(path), export) <= 1e-4


def test_merge_refuses_members_with_other_classes() -> None:
    with pytest.raises(ValueError, match="numbers of classes"):
        merge([_member(0), _member(1, n_classes=3)])
    with pytest.raises(ValueError, match="at least two"):
        merge([_member(0)])


def test_command_merges_directories_and_copies_the_scaler(tmp_path: Path) -> None:
    a, b = _member_dir(tmp_path / "a", 0), _member_dir(tmp_path / "b", 1)
    assert main(["--member", str(a), "--member", str(b), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / SCALER_NAME).read_bytes() == (a / SCALER_NAME).read_bytes()
    merged = load_keras_model(tmp_path / "out" / MODEL_NAME)
    expected = np.mean([np.asarray(load_keras_model(d / MODEL_NAME).predict_on_batch(_inputs())) for d in (a, b)],
                       axis=0)
    np.testing.assert_allclose(np.asarray(merged.predict_on_batch(_inputs())), expected, atol=1e-5)


def test_command_refuses_members_with_other_scalers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _member_dir(tmp_path / "a", 0), _member_dir(tmp_path / "b", 1, scaler_mean=5.0)
    assert main(["--member", str(a), "--member", str(b), "--out", str(tmp_path / "out")]) == 2
    assert "scalers differ" in capsys.readouterr().err
    assert not (tmp_path / "out" / MODEL_NAME).exists()
