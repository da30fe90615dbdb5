"""Deterministic synthetic telescope frames for the five default classes.

``render_frame(label, seed, size)`` gives a float32 frame in detector units
(electrons: sky, sources, Poisson and read noise, saturation); ``write_frame``
stores it in one of the file variants real archives hold. Tests, examples and
training all make their data here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import fftconvolve

CLASS_NAMES: tuple[str, ...] = ("galaxy", "nebula", "star_cluster", "star_field", "artifact")
FILE_VARIANTS: tuple[str, ...] = (
    "fits_float32",
    "fits_int16",
    "fits_uint16",
    "fits_rice",
    "fits_gz",
    "tiff_uint16",
    "tiff_float32",
    "tiff_rgb8",
)
FULL_WELL = 60000.0


@dataclass(frozen=True)
class Sky:
    """Per-frame observing conditions shared by every class."""

    background: float
    read_noise: float
    fwhm: float
    moffat_beta: float
    gradient: tuple[float, float]


def _sky(rng: np.random.Generator, size: int) -> Sky:
    scale = size / 512.0
    return Sky(
        background=float(rng.uniform(50, 1500)),
        read_noise=float(rng.uniform(3, 15)),
        fwhm=float(rng.uniform(1.6, 4.5) * max(scale, 0.5)),
        moffat_beta=float(rng.uniform(2.5, 4.5)) if rng.random() < 0.7 else 0.0,  # 0 = Gaussian
        gradient=(float(rng.normal(0, 0.15)), float(rng.normal(0, 0.15))),
    )


def _psf(sky: Sky) -> np.ndarray:
    half = int(np.ceil(sky.fwhm * 4)) + 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float32)
    r2 = x * x + y * y
    if sky.moffat_beta > 0:
        alpha = sky.fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / sky.moffat_beta) - 1.0))
        kernel = (1.0 + r2 / alpha**2) ** (-sky.moffat_beta)
    else:
        sigma = sky.fwhm / 2.3548
        kernel = np.exp(-r2 / (2 * sigma**2))
    return (kernel / kernel.sum()).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def _point_sources(size: int, xs: np.ndarray, ys: np.ndarray, fluxes: np.ndarray) -> np.ndarray:
    image = np.zeros((size, size), dtype=np.float32)
    inside = (xs >= 0) & (xs < size) & (ys >= 0) & (ys < size)
    np.add.at(image, (ys[inside].astype(int), xs[inside].astype(int)), fluxes[inside].astype(np.float32))
    return image


def _star_fluxes(rng: np.random.Generator, count: int, bright: float = 2e5) -> np.ndarray:
    # Power-law luminosity function: many faint stars, few bright ones.
    return (bright * rng.pareto(1.3, count) / 30.0 + rng.uniform(200, 2000, count)).astype(np.float32)


def _field_stars(rng: np.random.Generator, size: int, density: float) -> np.ndarray:
    count = int(density * (size / 512.0) ** 2)
    return _point_sources(size, rng.uniform(0, size, count), rng.uniform(0, size, count),
                          _star_fluxes(rng, count))


def _sersic(size: int, cx: float, cy: float, r_eff: float, n: float, q: float, pa: float) -> np.ndarray:
    y, x = _grid(size)
    dx, dy = x - cx, y - cy
    cos, sin = np.cos(pa), np.sin(pa)
    xr = dx * cos + dy * sin
    yr = (-dx * sin + dy * cos) / max(q, 0.05)
    r = np.sqrt(xr * xr + yr * yr) + 0.5
    b_n = 2.0 * n - 1.0 / 3.0
    return np.exp(-b_n * ((r / r_eff) ** (1.0 / n) - 1.0)).astype(np.float32)


def _galaxy(rng: np.random.Generator, size: int) -> np.ndarray:
    image = np.zeros((size, size), dtype=np.float32)
    y, x = _grid(size)
    n_gal = 2 if rng.random() < 0.2 else 1  # mergers / pairs
    for index in range(n_gal):
        cx = size * rng.uniform(0.35, 0.65) + (index * rng.uniform(-0.2, 0.2) * size)
        cy = size * rng.uniform(0.35, 0.65) + (index * rng.uniform(-0.2, 0.2) * size)
        r_eff = size * rng.uniform(0.04, 0.14)
        pa = rng.uniform(0, np.pi)
        edge_on = rng.random() < 0.2
        q = rng.uniform(0.08, 0.2) if edge_on else rng.uniform(0.35, 1.0)
        peak = rng.uniform(300, 8000)
        disc = _sersic(size, cx, cy, r_eff * 1.3, rng.uniform(0.7, 1.3), q, pa)
        bulge = _sersic(size, cx, cy, r_eff * rng.uniform(0.15, 0.4), rng.uniform(2.5, 4.5), min(1.0, q + 0.3), pa)
        if not edge_on and rng.random() < 0.6:
            arms = int(rng.integers(2, 4))
            pitch = rng.uniform(0.2, 0.5)
            theta = np.arctan2(y - cy, x - cx)
            radius = np.hypot(x - cx, y - cy) + 1.0
            spiral = 1.0 + rng.uniform(0.5, 0.9) * np.cos(arms * (theta - np.log(radius) / np.tan(pitch)))
            disc = disc * spiral.astype(np.float32)
        if edge_on and rng.random() < 0.7:  # dust lane along the major axis
            dist = np.abs(-(x - cx) * np.sin(pa) + (y - cy) * np.cos(pa))
            disc = disc * (1.0 - 0.8 * np.exp(-(dist / (r_eff * q * 0.3)) ** 2)).astype(np.float32)
        image += peak * (disc + rng.uniform(0.5, 3.0) * bulge)
        if n_gal == 2 and index == 1:  # tidal tail between the pair
            image += peak * 0.05 * _sersic(size, cx, cy, r_eff * 3, 0.5, 0.15, pa + 0.4)
    return image + _field_stars(rng, size, rng.uniform(5, 40))


def _gaussian_random_field(rng: np.random.Generator, size: int, slope: float) -> np.ndarray:
    ky = np.fft.fftfreq(size)[:, None]
    kx = np.fft.rfftfreq(size)[None, :]
    k = np.hypot(kx, ky)
    k[0, 0] = 1.0
    amplitude = k ** (-slope / 2.0)
    amplitude[0, 0] = 0.0
    phases = rng.normal(size=amplitude.shape) + 1j * rng.normal(size=amplitude.shape)
    field = np.fft.irfft2(amplitude * phases, s=(size, size))
    return ((field - field.mean()) / (field.std() + 1e-12)).astype(np.float32)


def _nebula(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _grid(size)
    field = _gaussian_random_field(rng, size, rng.uniform(2.8, 4.0))
    if rng.random() < 0.5:  # filamentary: ridges of the random field
        emission = np.exp(-(field / rng.uniform(0.15, 0.4)) ** 2)
    else:  # diffuse: log-normal clouds
        emission = np.exp(rng.uniform(0.8, 1.6) * field)
    cx, cy = size * rng.uniform(0.2, 0.8), size * rng.uniform(0.2, 0.8)
    extent = size * rng.uniform(0.35, 0.9)
    envelope = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * extent**2))
    if rng.random() < 0.3:  # shell / planetary-like ring
        radius = np.hypot(x - cx, y - cy)
        envelope = envelope * (0.3 + np.exp(-((radius - extent * 0.4) / (extent * 0.08)) ** 2))
    if rng.random() < 0.4:  # dark dust lanes
        emission = emission * (1.0 - 0.9 * np.clip(_gaussian_random_field(rng, size, 3.5), 0, None) / 3.0)
    image = rng.uniform(200, 5000) * emission * envelope
    return image.astype(np.float32) + _field_stars(rng, size, rng.uniform(30, 250))


def _king_radii(rng: np.random.Generator, count: int, core: float, tidal: float) -> np.ndarray:
    # Plummer-like core with a tidal cut (a King-profile stand-in that is cheap to sample).
    u = rng.uniform(0, 1, count * 2)
    radii = core / np.sqrt(u ** (-2.0 / 3.0) - 1.0 + 1e-9)
    return radii[radii < tidal][:count]


def _star_cluster(rng: np.random.Generator, size: int) -> np.ndarray:
    globular = rng.random() < 0.5
    count = int((rng.uniform(800, 3000) if globular else rng.uniform(80, 300)) * max(size / 512.0, 0.6))
    core = size * (rng.uniform(0.015, 0.05) if globular else rng.uniform(0.05, 0.12))
    radii = _king_radii(rng, count, core, size * 0.45)
    angles = rng.uniform(0, 2 * np.pi, len(radii))
    cx, cy = size * rng.uniform(0.35, 0.65), size * rng.uniform(0.35, 0.65)
    fluxes = _star_fluxes(rng, len(radii), bright=rng.uniform(5e4, 4e5))
    cluster = _point_sources(size, cx + radii * np.cos(angles), cy + radii * np.sin(angles), fluxes)
    if globular:  # unresolved core light
        cluster += rng.uniform(10, 100) * _sersic(size, cx, cy, core * 1.5, 2.0, 1.0, 0.0)
    return cluster + _field_stars(rng, size, rng.uniform(20, 120))


def _star_field(rng: np.random.Generator, size: int) -> np.ndarray:
    density = rng.uniform(60, 400) if rng.random() < 0.6 else rng.uniform(600, 3000)  # sparse vs crowded
    return _field_stars(rng, size, density)


def _trail(rng: np.random.Generator, size: int, width: float) -> np.ndarray:
    y, x = _grid(size)
    angle = rng.uniform(0, np.pi)
    offset = rng.uniform(-0.3, 0.3) * size
    dist = (x - size / 2) * np.sin(angle) - (y - size / 2) * np.cos(angle) - offset
    line = np.exp(-(dist / width) ** 2 / 2)
    if rng.random() < 0.35:  # aircraft: dashed, with parallel navigation lights
        along = (x - size / 2) * np.cos(angle) + (y - size / 2) * np.sin(angle)
        line = line * (np.sin(along / rng.uniform(6, 20)) > 0)
        line = line + np.exp(-((dist - rng.uniform(4, 10) * width) / width) ** 2 / 2)
    return (rng.uniform(300, 6000) * line).astype(np.float32)


def _artifact_signal(rng: np.random.Generator, size: int, sky: Sky) -> tuple[np.ndarray, str]:
    """Signal before the PSF, and which artifact it is."""
    kind = str(rng.choice(["trail", "cosmic_rays", "bleed", "blank", "calibration"], p=[0.35, 0.2, 0.15, 0.15, 0.15]))
    if kind == "trail":
        signal = _field_stars(rng, size, rng.uniform(20, 300))
        for _ in range(int(rng.integers(1, 3))):
            signal += _trail(rng, size, max(sky.fwhm / 2.3548, 0.7))
        return signal, kind
    if kind == "cosmic_rays":
        return np.zeros((size, size), np.float32), kind
    if kind == "bleed":
        signal = _field_stars(rng, size, rng.uniform(10, 80))
        for _ in range(int(rng.integers(1, 4))):
            xs, ys = rng.uniform(0.1, 0.9, 1) * size, rng.uniform(0.1, 0.9, 1) * size
            signal += _point_sources(size, xs, ys, np.array([rng.uniform(5e7, 5e8)], np.float32))
        return signal, kind
    return np.zeros((size, size), np.float32), kind


def _cosmic_rays(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    hits = np.zeros((size, size), dtype=np.float32)
    for _ in range(count):
        length = int(rng.integers(1, 12))
        angle = rng.uniform(0, np.pi)
        x0, y0 = rng.uniform(0, size, 2)
        steps = np.arange(length)
        xs = np.clip((x0 + steps * np.cos(angle)).astype(int), 0, size - 1)
        ys = np.clip((y0 + steps * np.sin(angle)).astype(int), 0, size - 1)
        hits[ys, xs] += rng.uniform(2000, 40000)
    return hits


def _bleed_columns(image: np.ndarray) -> np.ndarray:
    """Charge above full well spills along columns, as on a CCD."""
    excess = np.clip(image - FULL_WELL, 0, None)
    if not excess.any():
        return image
    cols = np.nonzero(excess.sum(axis=0) > 0)[0]
    for col in cols:
        rows = np.nonzero(excess[:, col])[0]
        spill = int(min(excess[:, col].sum() / FULL_WELL, image.shape[0] // 2))
        centre = int(rows.mean())
        image[max(0, centre - spill) : centre + spill + 1, col] = FULL_WELL
    return image


def render_frame(label: str, seed: int, size: int = 512) -> np.ndarray:
    """One noisy detector frame of class ``label``; the same (label, seed, size) gives the same pixels."""
    if label not in CLASS_NAMES:
        raise ValueError(f"unknown class {label!r}; expected one of {CLASS_NAMES}")
    rng = np.random.default_rng([CLASS_NAMES.index(label), seed, size])
    sky = _sky(rng, size)
    kind = label
    if label == "artifact":
        signal, kind = _artifact_signal(rng, size, sky)
    else:
        signal = {"galaxy": _galaxy, "nebula": _nebula, "star_cluster": _star_cluster, "star_field": _star_field}[
            label](rng, size)
    image = fftconvolve(signal, _psf(sky), mode="same").astype(np.float32) if signal.any() else signal
    y, x = _grid(size)
    background = sky.background * (1.0 + sky.gradient[0] * (x / size - 0.5) + sky.gradient[1] * (y / size - 0.5))
    if kind == "calibration":  # flat/dark-like: vignetting and column structure, no sky sources
        radius2 = ((x - size / 2) ** 2 + (y - size / 2) ** 2) / (size / 2) ** 2
        background = background * (1.0 - rng.uniform(0.1, 0.4) * radius2)
        background = background + rng.normal(0, sky.read_noise, size)[None, :]
    image = np.clip(image, 0, None) + np.clip(background, 1.0, None).astype(np.float32)
    image = rng.poisson(image).astype(np.float32) + rng.normal(0, sky.read_noise, image.shape).astype(np.float32)
    if kind == "cosmic_rays":
        image += _cosmic_rays(rng, size, int(rng.uniform(0.002, 0.01) * size * size))
    if kind == "calibration" and rng.random() < 0.5:  # dark: hot pixels
        image += (rng.random((size, size)) < 0.0005) * np.float32(rng.uniform(5000, 30000))
    image = _bleed_columns(image)
    return np.clip(image, -100.0, FULL_WELL).astype(np.float32)


def colour_render(frame: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A processed, colour-stretched 8-bit RGB rendering, as in press releases and amateur archives."""
    low, high = np.percentile(frame, (rng.uniform(0.5, 20), rng.uniform(99.0, 99.95)))
    norm = np.clip((frame - low) / max(high - low, 1e-6), 0, 1)
    stretched = np.arcsinh(norm * rng.uniform(3, 30)) / np.arcsinh(rng.uniform(3, 30))
    tint = rng.uniform(0.6, 1.0, 3)
    rgb = np.clip(stretched[..., None] * tint[None, None, :], 0, 1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def write_frame(frame: np.ndarray, path: str | os.PathLike[str], variant: str, seed: int = 0) -> Path:
    """Write ``frame`` as one archive variant; the extension is added from the variant."""
    import tifffile
    from astropy.io import fits

    path = Path(path)
    rng = np.random.default_rng(seed)
    if variant == "fits_float32":
        target = path.with_suffix(".fits")
        fits.PrimaryHDU(frame.astype(np.float32)).writeto(target, overwrite=True)
    elif variant == "fits_int16":
        target = path.with_suffix(".fit")
        fits.PrimaryHDU(np.clip(frame, -32768, 32767).astype(np.int16)).writeto(target, overwrite=True)
    elif variant == "fits_uint16":  # BZERO=32768 on disk
        target = path.with_suffix(".fits")
        fits.PrimaryHDU(np.clip(frame, 0, 65535).astype(np.uint16)).writeto(target, overwrite=True)
    elif variant == "fits_rice":  # DECam-style: empty primary, compressed image extension
        target = path.with_suffix(".fits.fz")
        data = np.clip(frame, 0, 65535).astype(np.uint16)
        hdus = [fits.PrimaryHDU(), fits.CompImageHDU(data, compression_type="RICE_1")]
        fits.HDUList(hdus).writeto(target, overwrite=True)
    elif variant == "fits_gz":
        target = path.with_suffix(".fits.gz")
        fits.PrimaryHDU(frame.astype(np.float32)).writeto(target, overwrite=True)
    elif variant == "tiff_uint16":
        target = path.with_suffix(".tif")
        tifffile.imwrite(target, np.clip(frame, 0, 65535).astype(np.uint16), compression="zlib")
    elif variant == "tiff_float32":
        target = path.with_suffix(".tiff")
        tifffile.imwrite(target, frame.astype(np.float32))
    elif variant == "tiff_rgb8":
        target = path.with_suffix(".tif")
        tifffile.imwrite(target, colour_render(frame, rng), photometric="rgb", compression="lzw")
    else:
        raise ValueError(f"unknown variant {variant!r}; expected one of {FILE_VARIANTS}")
    return target
