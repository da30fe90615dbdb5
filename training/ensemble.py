"""Merge models trained apart into one Keras model whose logits are the mean of theirs (a deep ensemble).

    python -m training.ensemble --member DIR_A --member DIR_B --out OUT

Each ``DIR`` holds a model and scaler as ``python -m training.train --out DIR`` writes them (members differ in
``--model-seed`` and share the split and training data, so their scalers are the same; a different one is
refused). The merged model is one file with the usual two inputs: every member's embedding, concatenated, feeds
one final Dense layer whose weights are the members' stacked and divided by their number, so its logits equal
the mean of the members' logits and its embedding (what the out-of-distribution gates measure) holds all of
theirs. Everything downstream (LiteRT export, calibration, ``inference-runner train --from default``) sees an
ordinary model. Recalibrate OUT afterwards (``python -m training.train --skip-train --out OUT ...``).

Why: one run of the recipe is a lottery (over three model seeds, real nebula precision 0.881-0.959 and Moon
photographs turned away 83-97%); the mean of two narrows it (figures in MODEL_CARD.md).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from backends import (
    MEMBER_PREFIX,
    ArtifactError,
    describe_inputs,
    embedding_tensor,
    final_layer,
    import_keras,
    load_keras_model,
)

logger = logging.getLogger(__name__)


def merge(members: Sequence, name: str = "multimodal_ensemble"):
    """One model whose logits are the mean of ``members``' logits (same inputs and classes) on their
    concatenated embeddings."""
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two members")
    keras = import_keras()
    first = members[0]
    image_name, feature_name, _ = describe_inputs(first, Path(first.name))
    by_name = {tensor.name.split(":")[0]: tensor for tensor in first.inputs}
    inputs = {key: keras.Input(tuple(by_name[key].shape[1:]), name=key) for key in (image_name, feature_name)}
    heads = [final_layer(member).get_weights() for member in members]
    if len({kernel.shape[1] for kernel, _ in heads}) > 1:
        raise ValueError("members have different numbers of classes")
    embeddings = []
    for index, member in enumerate(members):
        if describe_inputs(member, Path(member.name))[:2] != (image_name, feature_name):
            raise ValueError(f"member {index} has other input names than member 0")
        trunk = keras.Model(member.inputs, embedding_tensor(member), name=f"{MEMBER_PREFIX}{index}")
        embeddings.append(trunk([inputs[tensor.name.split(":")[0]] for tensor in member.inputs]))
    head = keras.layers.Dense(heads[0][0].shape[1], name="logits")
    logits = head(keras.layers.Concatenate(name="embedding")(embeddings))
    head.set_weights([np.concatenate([kernel for kernel, _ in heads]) / len(members),
                      np.mean([bias for _, bias in heads], axis=0)])
    return keras.Model(inputs, logits, name=name)


def same_scaler(scalers: Sequence) -> bool:
    """Whether every scaler standardises as the first does."""
    first = scalers[0]
    return all(np.allclose(s.mean_, first.mean_) and np.allclose(s.scale_, first.scale_) for s in scalers[1:])


def merge_directories(member_dirs: Sequence[Path], out: Path, model_name: str, scaler_name: str) -> Path:
    """Merge the models in ``member_dirs`` into ``out/model_name`` and copy their common scaler; returns the
    model path."""
    import joblib

    scalers = [joblib.load(directory / scaler_name) for directory in member_dirs]
    if not same_scaler(scalers):
        raise ArtifactError(f"{', '.join(str(d / scaler_name) for d in member_dirs)}: the members' scalers differ; "
                            "members must be trained on the same data (vary --model-seed only)")
    members = [load_keras_model(directory / model_name) for directory in member_dirs]
    merged = merge(members)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / model_name
    merged.save(model_path)
    if (out / scaler_name).resolve() != (member_dirs[0] / scaler_name).resolve():
        shutil.copyfile(member_dirs[0] / scaler_name, out / scaler_name)
    logger.info("merged %d members into %s (%d parameters)", len(members), model_path, merged.count_params())
    return model_path


def main(argv: list[str] | None = None) -> int:
    from training.train import MODEL_NAME, SCALER_NAME

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--member", type=Path, action="append", required=True,
                        help=f"a directory holding {MODEL_NAME} and {SCALER_NAME}; repeat for each member")
    parser.add_argument("--out", type=Path, required=True, help="where the merged model and the scaler go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        path = merge_directories(args.member, args.out, MODEL_NAME, SCALER_NAME)
    except (ArtifactError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
