"""Out-of-distribution images the classifier must abstain on.

Real photographs bundled with scikit-image (astronomical ones excluded) in
crops, rotations and sizes, plus text pages, pure noise, gradients,
checkerboards and stripes. Written as RGB/grey TIFF and float FITS, the
formats a misfiled non-astronomical image arrives in.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from training.simulator import write_frame

ASTRONOMICAL = {"hubble_deep_field.jpg", "moon.png"}
PHOTO_SUFFIXES = (".png", ".jpg")


def photographs() -> list[np.ndarray]:
    """Greyscale float32 photographs from scikit-image's bundled data (empty if it is not installed)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        return []
    data_dir = Path(spec.origin).parent / "data"
    images = []
    for path in sorted(data_dir.iterdir()):
        if path.suffix in PHOTO_SUFFIXES and path.name not in ASTRONOMICAL:
            with Image.open(path) as image:
                grey = np.asarray(image.convert("L"), dtype=np.float32)
            if min(grey.shape) >= 64:
                images.append(grey)
    faces = data_dir / "lfw_subset.npy"
    if faces.exists():
        images += [np.asarray(face, dtype=np.float32) * 255 for face in np.load(faces)[::5]]
    return images


def _crop_variants(image: np.ndarray, rng: np.random.Generator, count: int) -> list[np.ndarray]:
    out = [image]
    h, w = image.shape
    for _ in range(count - 1):
        scale = rng.uniform(0.4, 0.9)
        ch, cw = max(int(h * scale), 16), max(int(w * scale), 16)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out.append(np.rot90(image[y:y + ch, x:x + cw], int(rng.integers(4))))
    return out


def _text_page(rng: np.random.Generator, size: int) -> np.ndarray:
    page = Image.new("L", (size, size), int(rng.integers(200, 256)))
    draw = ImageDraw.Draw(page)
    words = ["observatory", "report", "invoice", "meeting", "the", "archive", "data", "total", "page", "figure"]
    y = 8
    while y < size - 12:
        line = " ".join(rng.choice(words, int(rng.integers(3, 9))))
        draw.text((8, y), line, fill=int(rng.integers(0, 60)))
        y += int(rng.integers(11, 18))
    return np.asarray(page, dtype=np.float32)


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    kind = int(rng.integers(3))
    if kind == 0:
        return rng.uniform(0, 255, (size, size)).astype(np.float32)
    if kind == 1:
        return (rng.random((size, size)) < rng.uniform(0.05, 0.5)).astype(np.float32) * 255
    return np.abs(rng.normal(0, 1, (size, size))).astype(np.float32) ** rng.uniform(1, 4)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        return (np.cos(angle) * x + np.sin(angle) * y) * 1000
    cx, cy = rng.uniform(0, 1, 2)
    return np.hypot(x - cx, y - cy) * 1000


def _checkerboard(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    cell = int(rng.integers(4, size // 4))
    if rng.random() < 0.5:
        return (((x // cell) + (y // cell)) % 2).astype(np.float32) * 255
    return (np.sin(x / cell * np.pi * rng.uniform(0.3, 1)) > 0).astype(np.float32) * 255  # stripes


SYNTHETIC = {"text": _text_page, "noise": _noise, "gradient": _gradient, "checkerboard": _checkerboard}


def ood_images(seed: int = 7, per_photo: int = 5, per_synthetic: int = 30) -> list[tuple[str, np.ndarray]]:
    """(name, greyscale image) pairs: photo crops and synthetic non-astronomical patterns."""
    rng = np.random.default_rng(seed)
    images = []
    for index, photo in enumerate(photographs()):
        count = per_photo if photo.shape[0] >= 128 else 1
        images += [(f"photo{index:03d}_{k}", crop) for k, crop in enumerate(_crop_variants(photo, rng, count))]
    for kind, make in SYNTHETIC.items():
        images += [(f"{kind}_{k:03d}", make(rng, int(rng.choice((256, 384, 512))))) for k in range(per_synthetic)]
    return images


def write_ood_directory(directory: Path, seed: int = 7) -> Path:
    """Write the OOD set as a mix of TIFF and FITS files; returns ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    variants = ("tiff_uint16", "tiff_float32", "fits_float32", "tiff_rgb8")
    for index, (name, image) in enumerate(ood_images(seed)):
        write_frame(np.ascontiguousarray(image, dtype=np.float32), directory / name, variants[index % len(variants)],
                    seed=index)
    return directory
