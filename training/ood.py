"""Out-of-distribution images the classifier must abstain on, one folder per kind.

Kinds: photographs bundled with scikit-image (astronomical ones excluded),
photographs from another source (scikit-learn's and matplotlib's sample
images), desktop wallpapers (Debian packages, when installed), the Moon, text
pages, noise, gradients, checkerboards and stripes, planet-like discs,
spectrum-like stripes and radio-map-like blobs; each in
crops, rotations and sizes. Written as RGB/grey TIFF and float FITS, the
formats a misfiled non-astronomical image arrives in. Training shows the kinds
``training.train.OUTLIER_KINDS`` names (outlier exposure, learned gate); the
others are held out for evaluation.
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


def other_photographs() -> list[np.ndarray]:
    """Greyscale photographs that are not scikit-image's: scikit-learn's and matplotlib's sample images."""
    found = []
    for package, folder, names in (("sklearn.datasets", "images", ("china.jpg", "flower.jpg")),
                                   ("matplotlib", "mpl-data/sample_data",
                                    ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png"))):
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            continue
        for name in names:
            path = Path(spec.origin).parent / folder / name
            if path.exists():
                with Image.open(path) as image:
                    found.append(np.asarray(image.convert("L"), dtype=np.float32))
    return found


WALLPAPERS = (Path("/usr/share/backgrounds/mate/nature"), Path("/usr/share/wallpapers"))
NOT_OUT_OF_DISTRIBUTION = {"MilkyWay"}  # a star-dotted wallpaper: too close to the taxonomy's sky
WALLPAPER_WIDTH = 1600  # the largest wallpapers are 5120 px wide; crops of 1600 px are plenty


def wallpapers(folders: tuple[Path, ...] = WALLPAPERS) -> list[np.ndarray]:
    """Greyscale desktop wallpapers, photographs and illustrations, from Debian's ``mate-backgrounds`` (nature
    photographs) and ``plasma-workspace-wallpapers`` (the largest image of each); empty when not installed."""
    files = []
    for folder in folders:
        files += sorted(folder.glob("*.jpg"))
        for theme in sorted(folder.glob("*/contents/images")):
            if theme.parts[-3] not in NOT_OUT_OF_DISTRIBUTION:
                files.append(max(theme.iterdir(), key=lambda path: path.stat().st_size))
    images = []
    for path in files:
        with Image.open(path) as image:
            image.draft("L", (WALLPAPER_WIDTH, WALLPAPER_WIDTH))
            grey = image.convert("L")
            if grey.width > WALLPAPER_WIDTH:
                grey = grey.resize((WALLPAPER_WIDTH, round(grey.height * WALLPAPER_WIDTH / grey.width)))
            images.append(np.asarray(grey, dtype=np.float32))
    return images


def moon() -> list[np.ndarray]:
    """scikit-image's Moon photograph (the taxonomy has no Moon class)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        return []
    with Image.open(Path(spec.origin).parent / "data" / "moon.png") as image:
        return [np.asarray(image.convert("L"), dtype=np.float32)]


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


def _planet(rng: np.random.Generator, size: int) -> np.ndarray:
    """A limb-darkened disc with latitude bands (or a ring) on black sky."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    radius = size * rng.uniform(0.15, 0.45)
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1, 2) * size
    r = np.hypot(x - cx, y - cy) / radius
    disc = np.sqrt(np.clip(1 - r**2, 0, 1)) ** rng.uniform(0.3, 1.0)
    bands = 1 + 0.3 * np.sin((y - cy) / radius * rng.uniform(4, 14) + rng.uniform(0, 6))
    image = disc * bands * 1000
    if rng.random() < 0.3:
        ring = np.abs(np.hypot((x - cx), (y - cy) * rng.uniform(2, 4)) / radius - 1.8) < 0.15
        image += ring * 400
    return image + rng.normal(0, 2, (size, size))


def _spectrum(rng: np.random.Generator, size: int) -> np.ndarray:
    """A long-slit spectrum: a horizontal continuum trace with absorption lines and vertical sky lines."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    trace = np.exp(-0.5 * ((y - size / 2 - rng.uniform(-20, 20)) / rng.uniform(2, 10)) ** 2)
    continuum = 1 + 0.5 * np.sin(x / size * rng.uniform(1, 4))
    for centre in rng.uniform(0, size, int(rng.integers(5, 30))):
        continuum *= 1 - rng.uniform(0.2, 0.9) * np.exp(-0.5 * ((x - centre) / rng.uniform(1, 3)) ** 2)
    sky = sum(rng.uniform(0.2, 2) * np.exp(-0.5 * ((x - c) / 1.5) ** 2) for c in rng.uniform(0, size, 12))
    return (trace * continuum * 1000 + sky * 200 + rng.normal(0, 5, (size, size))).astype(np.float32)


def _radio_map(rng: np.random.Generator, size: int) -> np.ndarray:
    """A radio-map look: a few smooth elliptical lobes with correlated (beam-smoothed) noise and sidelobes."""
    from scipy import ndimage

    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    image = ndimage.gaussian_filter(rng.normal(0, 1, (size, size)), rng.uniform(3, 8)) * 20
    for _ in range(int(rng.integers(1, 5))):
        cx, cy = rng.uniform(0.2, 0.8, 2) * size
        sx, sy = rng.uniform(0.03, 0.15, 2) * size
        image += rng.uniform(50, 500) * np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))
    return image.astype(np.float32)


SYNTHETIC = {"text": _text_page, "noise": _noise, "gradient": _gradient, "checkerboard": _checkerboard,
             "planet": _planet, "spectrum": _spectrum, "radio_map": _radio_map}


def _photo_crops(kind: str, photos: list[np.ndarray], count: int, rng: np.random.Generator
                 ) -> list[tuple[str, str, np.ndarray]]:
    """``count`` crops of each photograph (one, the whole, of a photograph under 128 rows)."""
    images = []
    for index, photo in enumerate(photos):
        variants = _crop_variants(photo, rng, count if photo.shape[0] >= 128 else 1)
        images += [(kind, f"{kind}{index:03d}_{k}", crop) for k, crop in enumerate(variants)]
    return images


def ood_images(seed: int = 7, per_photo: int = 5, per_synthetic: int = 30) -> list[tuple[str, str, np.ndarray]]:
    """(kind, name, greyscale image) triples: photo crops per source, the Moon and synthetic patterns."""
    rng = np.random.default_rng(seed)
    images = []
    for kind, photos, count in (("photo_skimage", photographs(), per_photo),
                                ("photo_other", other_photographs(), 4 * per_photo),
                                ("moon", moon(), per_synthetic)):
        images += _photo_crops(kind, photos, count, rng)
    for kind, make in SYNTHETIC.items():
        images += [(kind, f"{kind}_{k:03d}", make(rng, int(rng.choice((256, 384, 512))))) for k in range(per_synthetic)]
    # last, so the kinds above draw the same images as before
    images += _photo_crops("photo_wallpaper", wallpapers(), per_photo, rng)
    return images


def write_ood_directory(directory: Path, seed: int = 7, per_photo: int = 5, per_synthetic: int = 30) -> Path:
    """Write the OOD set under ``directory/<kind>/`` as a mix of TIFF and FITS files; returns ``directory``."""
    variants = ("tiff_uint16", "tiff_float32", "fits_float32", "tiff_rgb8")
    for index, (kind, name, image) in enumerate(ood_images(seed, per_photo, per_synthetic)):
        (directory / kind).mkdir(parents=True, exist_ok=True)
        write_frame(np.ascontiguousarray(image, dtype=np.float32), directory / kind / name,
                    variants[index % len(variants)], seed=index)
    return directory
