"""Average the weights of copies of one model fine-tuned apart (a "model soup"; WiSE-FT when the model they started
from is one of them).

    python -m training.average --model DIR --model DIR_A --model DIR_B --weights 0.5,0.25,0.25 --out OUT

Each ``DIR`` holds a model and scaler as ``python -m training.train --out DIR`` writes them. The models must have
the same architecture and scaler, and should share a starting point: two fine-tunings of the shipped ensemble
(``training.train --init-model``) stay close enough in weight space that their mean is a model too, which two
models trained from scratch are not. The mean costs nothing at inference (one model of the same size), unlike an
ensemble of the copies. ``--weights`` (default: equal) must be positive and sum to 1. Recalibrate OUT afterwards
(``python -m training.train --skip-train --out OUT ...``).

Why: a fine-tuning's gains depend on its seed (MODEL_CARD.md, "Tried and not shipped"); interpolating between the
starting weights and the mean of the fine-tuned ones (Wortsman et al. 2022, "Robust fine-tuning of zero-shot
models") keeps what they share and damps what one seed drew. The shipped model is 0.5 of the ensemble it was
fine-tuned from and 0.25 of each of two fine-tunings (MODEL_CARD.md, "How it was made").
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from backends import ArtifactError, load_keras_model
from training.ensemble import check_common_scaler, copy_scaler, run_command

logger = logging.getLogger(__name__)


def check_mixing_weights(weights: Sequence[float], n_models: int) -> np.ndarray:
    """The mixing weights as an array; refuses a count other than ``n_models``, a weight <= 0 or a sum other than 1."""
    mixing = np.asarray(weights, dtype=np.float64)
    if len(mixing) != n_models:
        raise ValueError(f"{len(mixing)} weights for {n_models} models")
    if (mixing <= 0).any() or not np.isclose(mixing.sum(), 1.0):
        raise ValueError(f"weights {mixing.tolist()} must be positive and sum to 1")
    return mixing


def average_models(models: Sequence, weights: Sequence[float], names: Sequence[str] | None = None):
    """The first of ``models`` with every floating-point variable replaced by the ``weights``-weighted mean of the
    models' (other variables, such as seed states, stay the first model's). ``names`` label the models in errors."""
    mixing = check_mixing_weights(weights, len(models))
    names = names or [f"model {index + 1}" for index in range(len(models))]
    # layers left unnamed get a counter in their path, so a model loaded twice differs there: compare in order
    layouts = [[(v.name, tuple(v.shape)) for v in model.weights] for model in models]
    for index, layout in enumerate(layouts[1:], start=1):
        if layout != layouts[0]:
            raise ArtifactError(f"{names[index]} has other variables than {names[0]}: the models must share an "
                                "architecture (fine-tunings of one model)")
    for variables in zip(*(model.weights for model in models)):
        values = [np.asarray(v.numpy()) for v in variables]
        if np.issubdtype(values[0].dtype, np.floating):
            mean = np.tensordot(mixing, np.stack(values).astype(np.float64), axes=1)
            variables[0].assign(mean.astype(values[0].dtype))
    return models[0]


def average_directories(model_dirs: Sequence[Path], weights: Sequence[float] | None, out: Path, model_name: str,
                        scaler_name: str) -> Path:
    """Average the models in ``model_dirs`` (equal weights when None) into ``out/model_name`` and copy their
    common scaler; returns the model path."""
    if len(model_dirs) < 2:
        raise ValueError("averaging needs at least two models")
    check_common_scaler(model_dirs, scaler_name,
                        "the models must be fine-tunings of one model (training.train --init-model keeps its scaler)")
    mixing = [1.0 / len(model_dirs)] * len(model_dirs) if weights is None else weights
    averaged = average_models([load_keras_model(directory / model_name) for directory in model_dirs], mixing,
                              [str(directory / model_name) for directory in model_dirs])
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / model_name
    averaged.save(model_path)  # every model was loaded first, so OUT may be one of the inputs
    copy_scaler(model_dirs[0] / scaler_name, out / scaler_name)
    logger.info("averaged %d models (weights %s) into %s", len(model_dirs), [round(w, 4) for w in mixing],
                model_path)
    return model_path


def _weights(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--weights {text!r}: give numbers separated by commas") from exc


def main(argv: list[str] | None = None) -> int:
    from training.train import MODEL_NAME, SCALER_NAME

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, action="append", required=True,
                        help=f"a directory holding {MODEL_NAME} and {SCALER_NAME}; repeat for each model")
    parser.add_argument("--weights", type=_weights, default=None,
                        help="one weight per --model, in order, separated by commas (default: equal)")
    parser.add_argument("--out", type=Path, required=True, help="where the averaged model and the scaler go")
    args = parser.parse_args(argv)
    return run_command(lambda: average_directories(args.model, args.weights, args.out, MODEL_NAME, SCALER_NAME))


if __name__ == "__main__":
    raise SystemExit(main())
