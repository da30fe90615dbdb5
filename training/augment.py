"""Style augmentation on the 448x448 plane *before* stretch, so the model learns the class, not the source.

Real labelled data confounds class and style: most galaxies are survey cutouts,
most nebulae processed colour photographs, and archives hold raw linear FITS.
These operations move any frame between those looks: an 8-bit display stretch
with JPEG artefacts (a press or amateur image), an undone display gamma (closer
to linear data), a crop that makes the object fill the frame, a shrink that
leaves it small in a field. They act on the plane that ``data_loader.load_small``
returns; the caller then runs ``data_loader.sample_from_small``, so the
augmented image *and its features* come from the production arithmetic.
:func:`single_band` adds colour-to-grey variety: a colour photograph seen
through one filter, as archives hold it, instead of its luminance.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

import data_loader

SIZE = data_loader.IMAGE_SIZE


def _robust_level_and_sigma(small: np.ndarray) -> tuple[float, float]:
    q16, q50 = np.percentile(small[::4, ::4], (15.87, 50.0))
    return float(q50), max(float(q50 - q16), 1e-6 * (float(np.ptp(small)) or 1.0))


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Box resize down, bilinear up (what a user's own crop or thumbnail would do)."""
    shrinking = size[0] <= image.shape[1] and size[1] <= image.shape[0]
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(size, method),
                      dtype=np.float32)


def crop_in(small: np.ndarray, rng: np.random.Generator, smallest: float = 0.5) -> np.ndarray:
    """A random sub-window (``smallest`` to 1 of the side) blown up to the full plane: objects fill the frame."""
    side = int(SIZE * rng.uniform(smallest, 1.0))
    y, x = (int(v) for v in rng.integers(0, SIZE - side + 1, 2))
    return _resize(small[y:y + side, x:x + side], (SIZE, SIZE))


def shrink_out(small: np.ndarray, rng: np.random.Generator, smallest: float = 0.45) -> np.ndarray:
    """The frame shrunk and set into a noisy background of its own level: a small object in a wider field."""
    side = int(SIZE * rng.uniform(smallest, 0.85))
    level, sigma = _robust_level_and_sigma(small)
    canvas = rng.normal(level, sigma, (SIZE, SIZE)).astype(np.float32)
    y, x = (int(v) for v in rng.integers(0, SIZE - side + 1, 2))
    canvas[y:y + side, x:x + side] = _resize(small, (side, side))
    return canvas


def display_stretch(small: np.ndarray, rng: np.random.Generator, jpeg_probability: float = 0.6) -> np.ndarray:
    """Render like a press or amateur image: black/white points, a display curve, 8 bits, maybe JPEG."""
    low, high = np.percentile(small[::2, ::2], (rng.uniform(0.0, 20.0), rng.uniform(99.0, 100.0)))
    scaled = np.clip((small - low) / max(float(high - low), 1e-12), 0.0, 1.0)
    curve = int(rng.integers(3))
    if curve == 0:
        softening = rng.uniform(2.0, 40.0)
        scaled = np.arcsinh(softening * scaled) / np.arcsinh(softening)
    elif curve == 1:
        scaled = scaled ** rng.uniform(0.25, 0.8)
    else:
        scaled = np.log1p(rng.uniform(10, 1000) * scaled) / np.log1p(1000)
        scaled /= max(float(scaled.max()), 1e-12)
    pixels = np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)
    if rng.random() < jpeg_probability:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(rng.integers(35, 96)))
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            pixels = np.asarray(decoded.convert("L"))
    return pixels.astype(np.float32)


def linearise(small: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Undo a display gamma: processed 8-bit images move towards the look of linear data."""
    low, high = float(small.min()), float(small.max())
    return (((small - low) / max(high - low, 1e-12)) ** rng.uniform(1.6, 2.8)).astype(np.float32)


def add_noise(small: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """More sky noise: a shallower exposure of the same scene."""
    _, sigma = _robust_level_and_sigma(small)
    return small + rng.normal(0.0, sigma * rng.uniform(0.5, 3.0), small.shape).astype(np.float32)


def single_band(path: Path, rng: np.random.Generator) -> np.ndarray | None:
    """A colour JPEG/PNG as one random band or channel mix (a mono-filter exposure of the same scene), resized
    by the production resize; None for files that are not colour photographs."""
    if not path.name.lower().endswith(data_loader.PHOTO_SUFFIXES):
        return None
    with Image.open(path) as image:
        if image.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
            return None
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    weights = np.eye(3)[rng.integers(3)] if rng.random() < 0.5 else rng.dirichlet(np.ones(3))
    return data_loader.resize_finite(rgb @ weights.astype(np.float32))[0]


def style_augment(small: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
    """One random framing and one random look for a 448x448 plane (``strength`` scales every probability)."""
    out = np.asarray(small, dtype=np.float32)
    framing = rng.random()
    if framing < 0.35 * strength:
        out = crop_in(out, rng)
    elif framing < 0.5 * strength:
        out = shrink_out(out, rng)
    look = rng.random()
    if look < 0.35 * strength:
        out = display_stretch(out, rng)
    elif look < 0.5 * strength:
        out = linearise(out, rng)
    if rng.random() < 0.2 * strength:
        out = add_noise(out, rng)
    return np.ascontiguousarray(out, dtype=np.float32)
