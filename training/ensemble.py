"""Merge models trained apart into one Keras model whose logits are the mean of theirs (a deep ensemble).

    python -m training.ensemble --member DIR_A --member DIR_B --out OUT
    python -m training.ensemble --remerge MODEL --out OUT    # an ensemble merged before, merged as now

Each ``DIR`` holds a model and scaler as ``python -m training.train --out DIR`` writes them (members differ in
``--model-seed`` and share the split and training data, so their scalers are the same; a different one is
refused). The merged model is one file with the usual two inputs: every member's embedding, concatenated, feeds
one final Dense layer whose weights are the members' stacked and divided by their number, so its logits equal
the mean of the members' logits and its embedding (what the out-of-distribution gates measure) holds all of
theirs. Everything downstream (LiteRT export, calibration, ``inference-runner train --from default``) sees an
ordinary model. Recalibrate OUT afterwards (``python -m training.train --skip-train --out OUT ...``).

Every other member (the second, the fourth...) sees each view rotated by 180 degrees (a ``view_rotated_180``
sub-model before it), so that two TTA views (identity and left-right flip) give the members the four views
between them: member 0 the identity and the left-right flip, member 1 the 180-degree rotation and the up-down
flip. That is half the model work of every member seeing all four views (measured on the shipped pair: LiteRT
model-only with TTA 157 files/s against 82, the same calibration data; MODEL_CARD.md).

Why: one run of the recipe is a lottery (over three model seeds, real nebula precision 0.881-0.959 and Moon
photographs turned away 83-97%); the mean of two narrows it (figures in MODEL_CARD.md).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from backends import (
    MEMBER_PREFIX,
    ROTATED_VIEW,
    ArtifactError,
    describe_inputs,
    embedding_tensor,
    final_layer,
    has_rotated_view,
    import_keras,
    load_keras_model,
)
from data_loader import load_scaler

logger = logging.getLogger(__name__)


def merge(members: Sequence, name: str = "multimodal_ensemble"):
    """One model whose logits are the mean of ``members``' logits (same inputs and classes) on their
    concatenated embeddings, every other member fed each view rotated by 180 degrees."""
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two members")
    keras = import_keras()
    names = describe_inputs(members[0], Path(members[0].name))[:2]
    heads = [final_layer(member).get_weights() for member in members]
    if len({kernel.shape[1] for kernel, _ in heads}) > 1:
        raise ValueError("members have different numbers of classes")
    trunks = []
    for index, member in enumerate(members):
        if describe_inputs(member, Path(member.name))[:2] != names:
            raise ValueError(f"member {index} has other input names than member 0")
        trunks.append(keras.Model(member.inputs, embedding_tensor(member), name=f"{MEMBER_PREFIX}{index}"))
    head = [np.concatenate([kernel for kernel, _ in heads]) / len(members), np.mean([b for _, b in heads], axis=0)]
    return assemble(trunks, head, name)


def assemble(trunks: Sequence, head_weights: Sequence[np.ndarray], name: str):
    """The ensemble graph: each trunk (a member's inputs -> its embedding, named ``member_<i>``) on the shared
    inputs, every other one on the 180-degree rotation of the image; their embeddings concatenated into one final
    layer holding ``head_weights``."""
    keras = import_keras()
    image_name, feature_name, _ = describe_inputs(trunks[0], Path(trunks[0].name))
    by_name = {tensor.name.split(":")[0]: tensor for tensor in trunks[0].inputs}
    inputs = {key: keras.Input(tuple(by_name[key].shape[1:]), name=key) for key in (image_name, feature_name)}
    plane = keras.Input(tuple(by_name[image_name].shape[1:]))
    rotate = keras.Model(plane, keras.ops.flip(plane, axis=(1, 2)), name=ROTATED_VIEW)
    views = (inputs[image_name], rotate(inputs[image_name]))
    embeddings = []
    for index, trunk in enumerate(trunks):
        fed = {image_name: views[index % 2], feature_name: inputs[feature_name]}
        embeddings.append(trunk([fed[tensor.name.split(":")[0]] for tensor in trunk.inputs]))
    head = keras.layers.Dense(head_weights[0].shape[1], name="logits")
    logits = head(keras.layers.Concatenate(name="embedding")(embeddings))
    head.set_weights(list(head_weights))
    return keras.Model(inputs, logits, name=name)


def remerge(ensemble):
    """An ensemble merged before its members' views were split, assembled as :func:`merge` assembles now: the
    same member sub-models and final layer, every other member fed the rotated view."""
    trunks = sorted((layer for layer in ensemble.layers if layer.name.startswith(MEMBER_PREFIX)),
                    key=lambda layer: int(layer.name[len(MEMBER_PREFIX):]))
    if len(trunks) < 2 or has_rotated_view(ensemble):
        raise ValueError(f"{ensemble.name}: not an ensemble merged by training.ensemble before views were split")
    return assemble(trunks, final_layer(ensemble).get_weights(), ensemble.name)


def same_scaler(scalers: Sequence) -> bool:
    """Whether every scaler standardises as the first does."""
    first = scalers[0]
    return all(np.allclose(s.mean_, first.mean_) and np.allclose(s.scale_, first.scale_) for s in scalers[1:])


def check_common_scaler(model_dirs: Sequence[Path], scaler_name: str, advice: str) -> None:
    """Refuse models whose scalers (``scaler_name`` in each of ``model_dirs``) standardise differently."""
    if not same_scaler([load_scaler(directory / scaler_name) for directory in model_dirs]):
        raise ArtifactError(f"{', '.join(str(d / scaler_name) for d in model_dirs)}: the scalers differ; {advice}")


def merge_directories(member_dirs: Sequence[Path], out: Path, model_name: str, scaler_name: str) -> Path:
    """Merge the models in ``member_dirs`` into ``out/model_name`` and copy their common scaler; returns the
    model path."""
    check_common_scaler(member_dirs, scaler_name, "members must be trained on the same data (vary --model-seed only)")
    members = [load_keras_model(directory / model_name) for directory in member_dirs]
    model_path = save_merged(merge(members), out / model_name)
    copy_scaler(member_dirs[0] / scaler_name, out / scaler_name)
    return model_path


def copy_scaler(source: Path, target: Path) -> None:
    """Copy the models' common scaler next to the new model (nothing to do when OUT is the source's folder)."""
    if target.resolve() != source.resolve():
        shutil.copyfile(source, target)


def run_command(write_model: Callable[[], Path]) -> int:
    """A command's exit code: 0 and the model's path printed, or 2 and the cause on stderr."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        path = write_model()
    except (ArtifactError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def save_merged(merged, model_path: Path) -> Path:
    model_path.parent.mkdir(parents=True, exist_ok=True)
    merged.save(model_path)
    logger.info("merged into %s (%d parameters)", model_path, merged.count_params())
    return model_path


def main(argv: list[str] | None = None) -> int:
    from training.train import MODEL_NAME, SCALER_NAME

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument("--member", type=Path, action="append",
                         help=f"a directory holding {MODEL_NAME} and {SCALER_NAME}; repeat for each member")
    sources.add_argument("--remerge", type=Path,
                         help="an ensemble model merged before members' views were split: assemble it as now "
                              f"(the scaler next to it stays as it is); OUT gets {MODEL_NAME}")
    parser.add_argument("--out", type=Path, required=True, help="where the merged model and the scaler go")
    args = parser.parse_args(argv)
    if args.remerge:
        return run_command(lambda: save_merged(remerge(load_keras_model(args.remerge)), args.out / MODEL_NAME))
    return run_command(lambda: merge_directories(args.member, args.out, MODEL_NAME, SCALER_NAME))


if __name__ == "__main__":
    raise SystemExit(main())
