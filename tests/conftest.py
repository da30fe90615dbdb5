"""Shared fixtures: synthetic images and a small, quickly built model with its scaler and operating point."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from training.simulator import CLASS_NAMES, render_frame, write_frame  # noqa: E402


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An untrained model, a scaler and a hand-set operating point (see training/tiny.py)."""
    from training.tiny import make_tiny_artifacts

    return make_tiny_artifacts(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_lite_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny artifacts plus their LiteRT export (``litert``), pinned in the thresholds."""
    from training.tiny import make_tiny_artifacts

    return make_tiny_artifacts(tmp_path_factory.mktemp("tiny_lite_model"), litert=True)


@dataclass(frozen=True)
class LitePython:
    """An interpreter that has no TensorFlow or Keras, and the environment to run it with."""

    executable: str
    env: dict[str, str]

    def run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run([self.executable, *args], env={**os.environ, **self.env, **kwargs.pop("env", {})},
                              capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="session")
def lite_python(tmp_path_factory: pytest.TempPathFactory) -> LitePython:
    """CI's fresh venv of requirements-lite.txt (LITE_PYTHON, set by .ci/run); elsewhere this interpreter with
    TensorFlow, Keras and JAX made unimportable (sys.modules[name] = None, set at start-up by sitecustomize), so
    an import of either fails the test instead of passing unnoticed."""
    if os.environ.get("LITE_PYTHON"):
        return LitePython(os.environ["LITE_PYTHON"], {"PYTHONPATH": str(ROOT)})
    blocker = tmp_path_factory.mktemp("no_tensorflow")
    (blocker / "sitecustomize.py").write_text("import sys\nfor name in ('tensorflow', 'keras', 'jax'):\n"
                                              "    sys.modules[name] = None\n")
    return LitePython(sys.executable, {"PYTHONPATH": f"{blocker}{os.pathsep}{ROOT}"})


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
