"""Out-of-distribution image kinds (training/ood.py): the wallpaper source and the stability of the other kinds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import ood


def _write(path: Path, width: int, height: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_wallpapers_reads_photos_and_each_themes_largest_image(tmp_path: Path) -> None:
    photos, themes = tmp_path / "nature", tmp_path / "wallpapers"
    _write(photos / "Dune.jpg", 300, 200, 0)
    _write(themes / "Path" / "contents" / "images" / "640x400.png", 640, 400, 1)
    _write(themes / "Path" / "contents" / "images" / "1920x1080.png", 1920, 1080, 2)  # the largest file
    _write(themes / "MilkyWay" / "contents" / "images" / "800x600.png", 800, 600, 3)  # a sky: left out
    images = ood.wallpapers((photos, themes))
    assert [image.shape for image in images] == [(200, 300), (900, ood.WALLPAPER_WIDTH)]
    assert all(image.dtype == np.float32 for image in images)
    assert ood.wallpapers((tmp_path / "not_installed",)) == []


def test_wallpapers_come_last_so_the_other_kinds_do_not_change(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ood, "wallpapers", lambda: [])
    without = ood.ood_images(seed=3, per_photo=1, per_synthetic=1)
    monkeypatch.setattr(ood, "wallpapers", lambda: [np.full((256, 256), 100, np.float32)])
    with_one = ood.ood_images(seed=3, per_photo=1, per_synthetic=1)
    assert [kind for kind, _, _ in with_one[len(without):]] == ["photo_wallpaper"]
    for (kind_a, name_a, image_a), (kind_b, name_b, image_b) in zip(without, with_one):
        assert (kind_a, name_a) == (kind_b, name_b)
        np.testing.assert_array_equal(image_a, image_b)
