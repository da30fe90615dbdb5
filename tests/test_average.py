"""training.average: the weighted mean of fine-tuned copies of one model, saved with their common scaler."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

import data_loader
from backends import load_keras_model
from training.average import average_models, check_mixing_weights, main
from training.train import MODEL_NAME, SCALER_NAME, build_model


def _model(seed: int, n_classes: int = 3):
    import keras

    keras.utils.set_random_seed(seed)
    return build_model(n_classes, data_loader.N_FEATURES)


def _model_dir(directory: Path, seed: int, n_classes: int = 3, scaler_mean: float = 0.0) -> Path:
    directory.mkdir(parents=True)
    _model(seed, n_classes).save(directory / MODEL_NAME)
    joblib.dump(StandardScaler().fit(np.random.default_rng(0).normal(scaler_mean, 1, (20, data_loader.N_FEATURES))),
                directory / SCALER_NAME)
    return directory


def _float_weights(model) -> list[np.ndarray]:
    return [np.asarray(v.numpy()) for v in model.weights if np.issubdtype(np.asarray(v.numpy()).dtype, np.floating)]


def test_every_weight_is_the_weighted_mean_of_the_models() -> None:
    a, b = _model(0), _model(1)
    expected = [0.25 * x + 0.75 * y for x, y in zip(_float_weights(a), _float_weights(b))]
    assert any(not np.allclose(x, y) for x, y in zip(_float_weights(a), _float_weights(b)))  # the seeds differ
    averaged = average_models([a, b], [0.25, 0.75])
    for got, want in zip(_float_weights(averaged), expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("weights", "message"), [([1.0], "1 weights for 2 models"),
                                                  ([0.7, 0.7], "sum to 1"), ([1.2, -0.2], "positive")])
def test_mixing_weights_must_match_the_models_and_sum_to_one(weights: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_mixing_weights(weights, 2)


def test_command_averages_directories_into_out_and_copies_the_scaler(tmp_path: Path) -> None:
    a, b = _model_dir(tmp_path / "a", 0), _model_dir(tmp_path / "b", 1)
    assert main(["--model", str(a), "--model", str(b), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / SCALER_NAME).read_bytes() == (a / SCALER_NAME).read_bytes()
    averaged = load_keras_model(tmp_path / "out" / MODEL_NAME)
    inputs = [_float_weights(load_keras_model(d / MODEL_NAME)) for d in (a, b)]
    for got, x, y in zip(_float_weights(averaged), *inputs, strict=True):
        np.testing.assert_allclose(got, (x + y) / 2, rtol=1e-6, atol=1e-7)


def test_command_refuses_other_architectures_and_scalers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _model_dir(tmp_path / "a", 0)
    wider = _model_dir(tmp_path / "wider", 1, n_classes=4)
    assert main(["--model", str(a), "--model", str(wider), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(wider / MODEL_NAME) in err and "architecture" in err
    other_scaler = _model_dir(tmp_path / "other_scaler", 1, scaler_mean=5.0)
    assert main(["--model", str(a), "--model", str(other_scaler), "--out", str(tmp_path / "out")]) == 2
    assert "scalers differ" in capsys.readouterr().err
    assert main(["--model", str(a), "--model", str(a), "--weights", "0.5", "--out", str(tmp_path / "out")]) == 2
    assert "1 weights for 2 models" in capsys.readouterr().err
    assert not (tmp_path / "out" / MODEL_NAME).exists()


def test_command_writes_over_the_first_model_as_the_model_card_does(tmp_path: Path) -> None:
    """``--model . ... --out .``: every model is read before the average replaces the first one."""
    a, b = _model_dir(tmp_path / "a", 0), _model_dir(tmp_path / "b", 1)
    before = [_float_weights(load_keras_model(d / MODEL_NAME)) for d in (a, b)]
    scaler = (a / SCALER_NAME).read_bytes()
    assert main(["--model", str(a), "--model", str(b), "--weights", "0.5,0.5", "--out", str(a)]) == 0
    assert (a / SCALER_NAME).read_bytes() == scaler
    for got, x, y in zip(_float_weights(load_keras_model(a / MODEL_NAME)), *before, strict=True):
        np.testing.assert_allclose(got, (x + y) / 2, rtol=1e-6, atol=1e-7)
