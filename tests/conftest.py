"""Shared fixtures: synthetic images and a small, quickly built model with its scaler and operating point."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import data_loader  # noqa: E402
from training.simulator import CLASS_NAMES, render_frame, write_frame  # noqa: E402


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained two-input model, a scaler fitted on simulated frames, and a hand-set operating point.

    Thresholds of 0.3 give a mix of classified and abstained files even with
    random weights; tests assert the rule, not the labels.
    """
    import joblib
    import keras
    from sklearn.preprocessing import StandardScaler

    from inference_runner import sha256_of
    from training.train import build_model

    directory = tmp_path_factory.mktemp("tiny_model")
    keras.utils.set_random_seed(0)
    model = build_model(len(CLASS_NAMES), data_loader.N_FEATURES)
    model_path = directory / "tiny.keras"
    model.save(model_path)
    features = [data_loader.sample_from_array(render_frame(name, seed, 128)).features
                for name in CLASS_NAMES for seed in range(2)]
    scaler_path = directory / "scaler.joblib"
    joblib.dump(StandardScaler().fit(np.stack(features)), scaler_path)
    thresholds = {name: 0.3 for name in CLASS_NAMES}
    document = {
        "format_version": 1,
        "class_names": list(CLASS_NAMES),
        "temperature": 0.7,
        "target_precision": 0.95,
        "operating_points": {"tta": {"thresholds": thresholds}, "no_tta": {"thresholds": thresholds}},
        "model_sha256": sha256_of(model_path),
        "scaler_sha256": sha256_of(scaler_path),
    }
    thresholds_path = directory / "thresholds.json"
    thresholds_path.write_text(json.dumps(document))
    return {"model": model_path, "scaler": scaler_path, "thresholds": thresholds_path}


@pytest.fixture(scope="session")
def tiny_service(tiny_artifacts: dict[str, Path]):
    from inference_runner import ClassifierService

    return ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tiny_artifacts["thresholds"],
                             workers=2)


def artifact_args(artifacts: dict[str, Path]) -> list[str]:
    return ["--model_path", str(artifacts["model"]), "--scaler_path", str(artifacts["scaler"]),
            "--thresholds", str(artifacts["thresholds"])]


@pytest.fixture()
def mixed_dir(tmp_path: Path) -> Path:
    """A small tree of FITS and TIFF files of every class, nested, plus a corrupt file."""
    root = tmp_path / "archive"
    variants = ("fits_float32", "tiff_uint16", "fits_rice", "tiff_rgb8", "fits_int16")
    for index, name in enumerate(CLASS_NAMES):
        sub = root / ("night1" if index % 2 else "night2") / name
        sub.mkdir(parents=True)
        for seed in range(2):
            write_frame(render_frame(name, seed, 160), sub / f"{name}_{seed}", variants[(index + seed) % 5], seed)
    (root / "night1" / "corrupt.fits").write_bytes(b"<html><body>Not Found</body></html>")
    (root / "notes.txt").write_text("not an image")
    return root
