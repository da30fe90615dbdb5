"""A small, quickly built model with its scaler and operating point, for tests and examples.

The weights are untrained (seeded); the scaler is fitted on a few simulated
frames; thresholds (and the prediction sets' quantile) are set by hand so that, with
any weights, some files are classified and some abstained on. Not for real use.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import data_loader
from training.simulator import CLASS_NAMES, render_frame


def make_tiny_artifacts(directory: Path, threshold: float = 0.3, litert: bool = False) -> dict[str, Path]:
    """Write ``tiny.keras``, ``scaler.joblib`` and ``thresholds.json`` into ``directory``; with ``litert``, also
    ``tiny.tflite``, pinned in the thresholds."""
    import joblib
    import keras
    from sklearn.preprocessing import StandardScaler

    from backends import export_litert, litert_pin, sha256_of
    from training.train import build_model

    directory.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    model_path = directory / "tiny.keras"
    build_model(len(CLASS_NAMES), data_loader.N_FEATURES).save(model_path)
    features = [data_loader.sample_from_array(render_frame(name, seed, 128)).features
                for name in CLASS_NAMES for seed in range(2)]
    scaler_path = directory / "scaler.joblib"
    joblib.dump(StandardScaler().fit(np.stack(features)), scaler_path)
    thresholds = dict.fromkeys(CLASS_NAMES, threshold)
    document = {
        "format_version": 1,
        "class_names": list(CLASS_NAMES),
        "temperature": 0.7,
        "target_precision": 0.95,
        "operating_points": {"tta": {"thresholds": thresholds}, "no_tta": {"thresholds": thresholds}},
        "prediction_sets": {"method": "aps-randomised", "coverage": 0.9, "class_conditional": False, "n_calibration": 0,
                            "tta": {"quantile": 0.9, "scores": []}, "no_tta": {"quantile": 0.9, "scores": []}},
        "model_sha256": sha256_of(model_path),
        "scaler_sha256": sha256_of(scaler_path),
    }
    if litert:
        export_litert(model_path)
        document.update(litert_pin(model_path))
    thresholds_path = directory / "thresholds.json"
    thresholds_path.write_text(json.dumps(document, indent=2))
    artifacts = {"model": model_path, "scaler": scaler_path, "thresholds": thresholds_path}
    return {**artifacts, "litert": model_path.with_suffix(".tflite")} if litert else artifacts
