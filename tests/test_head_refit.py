"""Refitting the final layer's rows of the classes learned from simulations (training/head_refit.py)."""

from __future__ import annotations

import numpy as np
import pytest

from training import head_refit


def _clusters(rng: np.random.Generator, per_class: int, n_classes: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    centres = 3.0 * rng.standard_normal((n_classes, dim))
    labels = np.repeat(np.arange(n_classes), per_class)
    return centres[labels] + rng.standard_normal((len(labels), dim)), labels


def _accuracy(embeddings: np.ndarray, labels: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> float:
    return float(((embeddings @ kernel + bias).argmax(axis=1) == labels).mean())


def test_classes_with_few_real_training_files_are_the_ones_refitted() -> None:
    names = ["galaxy", "nebula", "star_field", "artifact"]
    counts = {"galaxy": 2000, "nebula": 50, "star_field": 13}
    assert head_refit.simulation_classes(counts, names) == [2, 3]
    assert head_refit.simulation_classes(counts, names, max_real=51) == [1, 2, 3]
    assert head_refit.simulation_classes(counts, names, max_real=0) == []


def test_refit_mends_a_broken_row_and_keeps_the_others() -> None:
    rng = np.random.default_rng(0)
    embeddings, labels = _clusters(rng, 60, 4, 8)
    # a head that knows classes 0-2 (least squares on one-hot) and has lost class 3's row
    design = np.hstack([embeddings, np.ones((len(labels), 1))])
    solution = np.linalg.lstsq(design, np.eye(4)[labels], rcond=None)[0]
    kernel, bias = solution[:-1].astype(np.float32), solution[-1].astype(np.float32)
    kernel[:, 3], bias[3] = 0.0, -5.0
    assert ((embeddings @ kernel + bias).argmax(axis=1) == 3).sum() == 0

    new_kernel, new_bias = head_refit.refit_rows(embeddings, labels, kernel, bias, [3])
    np.testing.assert_array_equal(new_kernel[:, :3], kernel[:, :3])
    np.testing.assert_array_equal(new_bias[:3], bias[:3])
    assert _accuracy(embeddings, labels, new_kernel, new_bias) > _accuracy(embeddings, labels, kernel, bias) + 0.2
    # the optimum does not depend on where it starts: a second refit (as --skip-train runs it) changes nothing
    again_kernel, again_bias = head_refit.refit_rows(embeddings, labels, new_kernel, new_bias, [3])
    np.testing.assert_allclose(again_kernel, new_kernel, atol=1e-3)
    np.testing.assert_allclose(again_bias, new_bias, atol=1e-3)


def test_each_member_block_is_refitted_on_its_own_embedding() -> None:
    rng = np.random.default_rng(1)
    first, labels = _clusters(rng, 50, 3, 5)
    second = rng.standard_normal(first.shape)  # a member that has learned nothing: its block should stay near zero
    embeddings = np.hstack([first, second])
    kernel = np.zeros((10, 3), np.float32)
    bias = np.zeros(3, np.float32)
    kernel[:5, :2] = rng.standard_normal((5, 2))
    new_kernel, new_bias = head_refit.refit_member_rows(embeddings, labels, kernel, bias, [5, 5], [2])
    np.testing.assert_array_equal(new_kernel[:, :2], kernel[:, :2])
    assert new_kernel.dtype == kernel.dtype and new_bias.dtype == bias.dtype
    # member 0's block is what a refit on its own embedding gives (halved: the ensemble's logits are the mean)
    alone_kernel, alone_bias = head_refit.refit_rows(first, labels, kernel[:5] * 2, bias, [2])
    np.testing.assert_allclose(new_kernel[:5, 2], alone_kernel[:, 2] / 2, atol=1e-3)
    assert np.abs(new_kernel[5:, 2]).max() < 0.5 * np.abs(new_kernel[:5, 2]).max()
    # the refitted row's bias is the mean of the members' own
    _, second_bias = head_refit.refit_rows(second, labels, kernel[5:] * 2, bias, [2])
    assert new_bias[2] == pytest.approx((alone_bias[2] + second_bias[2]) / 2, abs=1e-3)
    np.testing.assert_array_equal(new_bias[:2], bias[:2])
