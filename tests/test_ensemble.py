"""training.ensemble: members merged into one model whose logits are their mean, member 1 on the rotated view."""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from sklearn.preprocessing import StandardScaler

import calibration
import data_loader
import inference_runner as ir
from backends import (
    MEMBER_PREFIX,
    KerasBackend,
    LiteRTBackend,
    embedding_tensor,
    ensemble_head,
    export_difference,
    export_litert,
    final_layer,
    forward_model,
    load_keras_model,
    tta_view_count,
)
from training.ensemble import main, merge, remerge
from training.train import MODEL_NAME, SCALER_NAME, build_model, freeze_stems, set_batch_norm_trainable


def _member(seed: int, n_classes: int = 5):
    """An untrained member, its stem scaled up so that its outputs depend on the image's orientation (an
    untrained model's barely depend on the image at all)."""
    import keras

    keras.utils.set_random_seed(seed)
    model = build_model(n_classes, data_loader.N_FEATURES)
    stem = model.get_layer("stem")
    stem.set_weights([300 * weights for weights in stem.get_weights()])
    return model


def _inputs(n: int = 3) -> dict[str, np.ndarray]:
    """Noise on a ramp that rises to the right and down: every flip of it is a different image."""
    rng = np.random.default_rng(1)
    size = data_loader.IMAGE_SIZE
    ramp = np.linspace(0, 3, size)[None, None, :, None] * np.linspace(0, 1, size)[None, :, None, None]
    return {"image": (ramp + 0.1 * rng.normal(size=(n, size, size, 1))).astype("float32"),
            "features": rng.normal(size=(n, data_loader.N_FEATURES)).astype("float32")}


def _member_dir(directory: Path, seed: int, scaler_mean: float = 0.0) -> Path:
    directory.mkdir(parents=True)
    _member(seed).save(directory / MODEL_NAME)
    joblib.dump(StandardScaler().fit(np.random.default_rng(0).normal(scaler_mean, 1, (20, data_loader.N_FEATURES))),
                directory / SCALER_NAME)
    return directory


def _rotated(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**x, "image": x["image"][:, ::-1, ::-1]}


def _members_mean(members: list, x: dict[str, np.ndarray]) -> np.ndarray:
    """The mean of the members' logits, every other member on the 180-degree rotation of the image."""
    return np.mean([np.asarray(m.predict_on_batch(_rotated(x) if i % 2 else x)) for i, m in enumerate(members)],
                   axis=0)


def test_merged_logits_are_the_members_mean_and_the_embedding_holds_both(tmp_path: Path) -> None:
    members = [_member(0), _member(1)]
    merged = merge(members)
    x = _inputs()
    expected = _members_mean(members, x)
    unrotated = np.mean([np.asarray(m.predict_on_batch(x)) for m in members], axis=0)
    assert np.abs(unrotated - expected).max() > 1e-4  # member 1 does see another view (tolerance below: 1e-5)
    assert np.abs(np.asarray(members[0].predict_on_batch(x)) - expected).max() > 1e-3  # the members differ
    np.testing.assert_allclose(np.asarray(merged.predict_on_batch(x)), expected, atol=1e-5)
    assert embedding_tensor(merged).shape[-1] == 2 * embedding_tensor(members[0]).shape[-1]
    merged.save(tmp_path / "merged.keras")
    reloaded = load_keras_model(tmp_path / "merged.keras")
    np.testing.assert_allclose(np.asarray(reloaded.predict_on_batch(x)), expected, atol=1e-5)
    assert tta_view_count(reloaded) == 2 and tta_view_count(members[0]) == 4


def test_two_tta_views_give_the_members_all_four_views_between_them(tmp_path: Path) -> None:
    members = [_member(0), _member(1)]
    path = tmp_path / "merged.keras"
    merge(members).save(path)
    backend = KerasBackend(path)
    x = _inputs(2)
    logits, _, means = backend.forward(x["image"][..., 0], x["features"], tta=True)
    assert logits.shape == (2, 2, 5)
    image = x["image"]
    views = {"identity": image, "lr": image[:, :, ::-1], "ud": image[:, ::-1, :], "rot": image[:, ::-1, ::-1]}
    member_logits = {(m, v): np.asarray(members[m].predict_on_batch({**x, "image": views[v]}))
                     for m, seen in ((0, ("identity", "lr")), (1, ("rot", "ud"))) for v in seen}
    np.testing.assert_allclose(logits.mean(axis=1), np.mean(list(member_logits.values()), axis=0), atol=1e-5)
    # the layer gate's feature-map means: member 0's, of each view it sees (identity first)
    np.testing.assert_allclose(means[:, 0], _feature_map_means(members[0], views["identity"]), atol=1e-5)
    np.testing.assert_allclose(means[:, 1], _feature_map_means(members[0], views["lr"]), atol=1e-5)
    one, _, one_means = backend.forward(x["image"][..., 0], x["features"], tta=False)
    assert one.shape == (2, 1, 5) and one_means.shape == (2, 1, means.shape[-1])


def _feature_map_means(member, images: np.ndarray) -> np.ndarray:
    """The channel means of the member's last three activation maps, concatenated, computed apart."""
    import keras

    maps = [layer.output for layer in member.layers
            if isinstance(layer, keras.layers.Activation) and len(layer.output.shape) == 4][-3:]
    probe = keras.Model(member.get_layer("image").output, [keras.ops.mean(m, axis=(1, 2)) for m in maps])
    return np.concatenate([np.asarray(a) for a in probe.predict_on_batch(images)], axis=-1)


def _merged_before_views_were_split(members: list):
    """An ensemble as training.ensemble merged them before: every member on the same view."""
    import keras

    inputs = {"image": keras.Input((data_loader.IMAGE_SIZE, data_loader.IMAGE_SIZE, 1), name="image"),
              "features": keras.Input((data_loader.N_FEATURES,), name="features")}
    trunks = [keras.Model(m.inputs, embedding_tensor(m), name=f"{MEMBER_PREFIX}{i}") for i, m in enumerate(members)]
    head = keras.layers.Dense(5, name="logits")
    logits = head(keras.layers.Concatenate(name="embedding")(
        [trunk([inputs[t.name.split(":")[0]] for t in trunk.inputs]) for trunk in trunks]))
    head.set_weights([np.concatenate([final_layer(m).get_weights()[0] for m in members]) / 2,
                      np.mean([final_layer(m).get_weights()[1] for m in members], axis=0)])
    return keras.Model(inputs, logits, name="multimodal_ensemble")


def test_remerge_feeds_an_older_ensembles_second_member_the_rotated_view(tmp_path: Path) -> None:
    members = [_member(0), _member(1)]
    old = tmp_path / "old.keras"
    _merged_before_views_were_split(members).save(old)
    assert tta_view_count(load_keras_model(old)) == 4
    assert main(["--remerge", str(old), "--out", str(tmp_path / "out")]) == 0
    new = load_keras_model(tmp_path / "out" / MODEL_NAME)
    np.testing.assert_allclose(np.asarray(new.predict_on_batch(_inputs())), _members_mean(members, _inputs()),
                               atol=1e-5)
    assert tta_view_count(new) == 2
    with pytest.raises(ValueError, match="before views were split"):
        remerge(new)  # already split: a second remerge would rotate member 1 twice


def test_merged_model_exports_to_litert_with_the_same_outputs(tmp_path: Path) -> None:
    path = tmp_path / "merged.keras"
    merge([_member(0), _member(1)]).save(path)
    export = export_litert(path)
    assert export_difference(KerasBackend(path), export) <= 1e-4  # logits, embedding and feature-map means
    assert LiteRTBackend(export, tta_views=2).has_layer_means


def test_forward_model_adds_feature_map_means_and_keeps_the_logits(tmp_path: Path) -> None:
    members = [_member(0), _member(1)]
    merged, x = merge(members), _inputs()
    logits, embedding, means = forward_model(merged).predict_on_batch(x)
    np.testing.assert_allclose(logits, np.asarray(merged.predict_on_batch(x)), atol=1e-6)
    assert embedding.shape[-1] == embedding_tensor(merged).shape[-1]
    np.testing.assert_allclose(means, _feature_map_means(members[0], x["image"]), atol=1e-5)
    # a single model: its own maps
    single_logits, _, single_means = forward_model(members[0]).predict_on_batch(x)
    np.testing.assert_allclose(single_means, _feature_map_means(members[0], x["image"]), atol=1e-5)
    np.testing.assert_allclose(single_logits, np.asarray(members[0].predict_on_batch(x)), atol=1e-6)


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
    expected = _members_mean([load_keras_model(d / MODEL_NAME) for d in (a, b)], _inputs())
    np.testing.assert_allclose(np.asarray(merged.predict_on_batch(_inputs())), expected, atol=1e-5)


def test_command_refuses_members_with_other_scalers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _member_dir(tmp_path / "a", 0), _member_dir(tmp_path / "b", 1, scaler_mean=5.0)
    assert main(["--member", str(a), "--member", str(b), "--out", str(tmp_path / "out")]) == 2
    assert "scalers differ" in capsys.readouterr().err
    assert not (tmp_path / "out" / MODEL_NAME).exists()


def _gate_head() -> tuple[np.ndarray, np.ndarray]:
    """A final layer over two 2-wide member embeddings and 3 classes (the merged head: member kernels / 2)."""
    member_kernel = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    return np.vstack([member_kernel, member_kernel]) / 2, np.array([0.1, -0.2, 0.0])


def test_member_gate_is_the_jensen_shannon_divergence_of_the_members() -> None:
    kernel, bias = _gate_head()
    gate = ir.MemberGate(kernel, bias, (2, 2), temperature=0.5, max_divergence=0.1, quantile=0.95)
    agree, disagree = [1.0, 0.5, 1.0, 0.5], [3.0, 0.0, 0.0, 3.0]
    divergence = gate.divergence(np.array([agree, disagree]))
    assert divergence[0] == pytest.approx(0.0, abs=1e-12)
    softmax = lambda z: np.exp(z) / np.exp(z).sum()  # noqa: E731
    members = [softmax((np.array(disagree[i:i + 2]) @ (2 * kernel[i:i + 2]) + bias) / 0.5) for i in (0, 2)]
    assert divergence[1] == pytest.approx(jensenshannon(*members) ** 2, rel=1e-9)  # scipy: sqrt of JSD, base e
    np.testing.assert_array_equal(gate.is_outside(np.array([agree, disagree])), [False, True])


def test_member_gate_fits_its_quantile_and_survives_the_thresholds_file(tmp_path: Path) -> None:
    kernel, bias = _gate_head()
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(400, 2))
    calibration_embeddings = np.hstack([shared, shared + rng.normal(0, 0.1, (400, 2))])  # members nearly agree
    gate = ir.MemberGate.fit(calibration_embeddings, kernel, bias, [2, 2], temperature=1.0, quantile=0.9)
    assert gate.is_outside(calibration_embeddings).mean() == pytest.approx(0.1, abs=0.01)
    unlike = np.array([[4.0, -4.0, -4.0, 4.0]])
    assert gate.is_outside(unlike)[0]
    with pytest.raises(ValueError, match="do not split"):
        ir.MemberGate.fit(calibration_embeddings, kernel, bias, [3, 2], temperature=1.0)
    document = {"class_names": ["a", "b", "c"], "temperature": 1.0, "member_gate": gate.to_json(),
                "operating_points": {key: {"thresholds": {"a": 0.0, "b": 0.0, "c": 0.0}} for key in ("tta", "no_tta")}}
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps(document))
    op = ir.OperatingPoint.load(path)
    assert (op.member_gate.sizes, op.member_gate.max_divergence) == (gate.sizes, gate.max_divergence)
    np.testing.assert_array_equal(op.inside(np.vstack([calibration_embeddings[:3], unlike]), None),
                                  ~gate.is_outside(np.vstack([calibration_embeddings[:3], unlike])))
    assert not op.inside(unlike, None)[0]


def test_member_gate_is_fitted_for_a_merged_model_only(tmp_path: Path) -> None:
    single, merged = tmp_path / "single.keras", tmp_path / "merged.keras"
    _member(0).save(single)
    merge([_member(0), _member(1)]).save(merged)
    kernel, bias, sizes = ensemble_head(load_keras_model(merged))
    assert sizes == [96, 96] and kernel.shape == (192, 5) and bias.shape == (5,)
    assert ensemble_head(load_keras_model(single)) is None
    embeddings = np.random.default_rng(0).normal(size=(50, 192))
    gate = calibration.fit_member_gate(load_keras_model(merged), embeddings, 0.6, 0.95)
    assert gate is not None and gate.sizes == (96, 96) and gate.temperature == 0.6
    assert calibration.fit_member_gate(load_keras_model(single), embeddings[:, :96], 0.6, 0.95) is None
    assert calibration.fit_member_gate(load_keras_model(merged), embeddings, 0.6, None) is None


def _moved_by_one_step(model):
    """Train ``model`` one SGD step on two inputs; returns whether a layer's weights (or statistics) changed."""
    import keras

    before = {id(w): w.numpy() for w in model.weights}
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    model.train_on_batch(_inputs(2), np.eye(5)[[0, 3]])
    return lambda layer: any(not np.array_equal(before[id(w)], w.numpy()) for w in layer.weights)


def _separable_convolutions(member) -> list:
    import keras

    return [layer for layer in member.layers if isinstance(layer, keras.layers.SeparableConv2D)]


def test_freeze_stems_keeps_each_members_stem_and_trains_the_rest() -> None:
    merged = merge([_member(0), _member(1)])
    assert freeze_stems(merged) == 4  # each member's stem and its batch norm
    moved = _moved_by_one_step(merged)
    for member in (merged.get_layer(f"{MEMBER_PREFIX}{i}") for i in (0, 1)):
        sepconvs = _separable_convolutions(member)
        stem_and_norm = member.layers[: member.layers.index(sepconvs[0])]
        assert next(layer.name for layer in stem_and_norm if layer.weights) == "stem"
        assert not any(moved(layer) for layer in stem_and_norm)  # kernel and batch-norm statistics alike
        assert moved(sepconvs[0]) and moved(sepconvs[-1])
    assert moved(final_layer(merged))


def test_batch_norms_of_every_member_are_frozen() -> None:
    merged = merge([_member(0), _member(1)])
    assert set_batch_norm_trainable(merged, False) == 12  # six per member
    moved = _moved_by_one_step(merged)
    assert not any(moved(layer) for layer in _batch_norms(merged)), "statistics, scale and offset alike"


def _batch_norms(model) -> list:
    import keras

    return [layer for member in model.layers if hasattr(member, "layers") for layer in member.layers
            if isinstance(layer, keras.layers.BatchNormalization)]


def test_freeze_stems_with_a_block_keeps_the_first_separable_block_too() -> None:
    merged = merge([_member(0), _member(1)])
    assert freeze_stems(merged, blocks=1) == 8  # per member: stem, batch norm, first separable convolution, batch norm
    moved = _moved_by_one_step(merged)
    for member in (merged.get_layer(f"{MEMBER_PREFIX}{i}") for i in (0, 1)):
        sepconvs = _separable_convolutions(member)
        kept = member.layers[: member.layers.index(sepconvs[1])]
        assert not any(layer.trainable for layer in kept if layer.weights)
        assert not any(moved(layer) for layer in kept)
        assert moved(sepconvs[1])
