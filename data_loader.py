"""One path from an image file on disk to the classifier's two inputs.

Training, calibration, the CLI, Django and Celery all call :func:`load_sample`
(or the functions it is made of), so what the model saw in training is what it
sees in production. This module never imports TensorFlow: it stays cheap to
import in worker pools.

Rules applied (documented in README "Input formats"):

* FITS: the first HDU holding image data with two or more axes is used, unless
  ``hdu`` names another. BZERO/BSCALE are applied (unsigned 16/32-bit included),
  BLANK and non-finite pixels become "missing". A cube whose first axis is 3 or
  4 is treated as colour planes (RGB[A]) and turned into luminance; any other
  cube contributes its first plane.
* TIFF: the first page with two or more image axes; RGB(A) becomes luminance
  (Rec. 709 weights, alpha dropped).
* Preprocessing: missing pixels are filled with the median of the valid ones,
  the image is resized to 448x448 with an area (box) filter, and *all*
  statistics (percentiles, features) are taken on that 448x448 image. This
  keeps the cost independent of the input size and identical in training and
  inference.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

logger = logging.getLogger(__name__)

IMAGE_SIZE = 448
DEFAULT_MAX_PIXELS = 300_000_000  # ~1.2 GB as float32: refuse anything larger before reading it
FITS_SUFFIXES = (".fits", ".fit", ".fts")
FITS_WRAPPERS = ("", ".gz", ".bz2", ".fz")
TIFF_SUFFIXES = (".tif", ".tiff")
SUPPORTED_SUFFIXES = tuple(s + w for s in FITS_SUFFIXES for w in FITS_WRAPPERS) + TIFF_SUFFIXES

# Percentiles of the 448x448 image that define the display stretch.
CLIP_LOW_PERCENTILE = 0.5
CLIP_HIGH_PERCENTILE = 99.8
ASINH_SOFTENING = 10.0
LUMINANCE_WEIGHTS = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
SOURCE_SIGMA = 5.0  # detection threshold for "sources", in robust standard deviations

FEATURE_NAMES: tuple[str, ...] = (
    "log_noise",  # log10 of the robust sigma relative to the image's range
    "dynamic_range",  # log10(1 + (p99.9 - median) / sigma)
    "upper_tail",  # log10(1 + (p99 - median) / sigma)
    "skewness",  # of the sigma-clipped standardised image
    "saturated_fraction",  # pixels at the image maximum (flat-topped, saturated regions)
    "blank_fraction",  # pixels at the image minimum (padding, dead or blank areas)
    "log_source_count",  # log1p of connected components above SOURCE_SIGMA
    "source_area_fraction",  # fraction of pixels above SOURCE_SIGMA
    "largest_source_fraction",  # largest component's share of the detected area
    "concentration",  # flux share within 0.15 N of the flux centroid
    "ellipticity",  # second-moment ellipticity of the background-subtracted flux
    "streak_score",  # longest thin component: length / N times elongation
    "psd_slope",  # log-log slope of the radial power spectrum
    "background_gradient",  # spread of 4x4 block medians, in sigma (log10)
    "pixel_noise_ratio",  # neighbour-difference sigma / sigma: ~1 for sky noise, ~0 for smooth renders
)
N_FEATURES = len(FEATURE_NAMES)


class ImageLoadError(Exception):
    """A file could not be turned into an image; the message names the file and the cause."""

    def __init__(self, path: str | os.PathLike[str], cause: str) -> None:
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class FeatureMismatchError(ValueError):
    """The scaler expects a different number of features than data_loader produces."""


@dataclass(frozen=True)
class Sample:
    """The model's inputs for one file, plus facts about where they came from."""

    image: np.ndarray  # (448, 448) float32 in [0, 1]
    features: np.ndarray  # (N_FEATURES,) float32, scaled when a scaler was given
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading


def is_supported(path: str | os.PathLike[str]) -> bool:
    """Whether the file name has an extension this module reads (case-insensitive)."""
    return str(path).lower().endswith(SUPPORTED_SUFFIXES)


def _file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if name.endswith(SUPPORTED_SUFFIXES):
        return "fits"
    raise ImageLoadError(path, f"unsupported extension (expected one of {', '.join(SUPPORTED_SUFFIXES)})")


def _check_magic(path: Path, kind: str) -> None:
    """Refuse files whose first bytes contradict their extension (an HTML page named .fits)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise ImageLoadError(path, f"cannot open: {exc.strerror or exc}") from exc
    if size == 0:
        raise ImageLoadError(path, "file is empty (0 bytes)")
    if kind == "tiff":
        if head[:4] not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            raise ImageLoadError(path, f"not a TIFF file (starts with {head[:8]!r})")
        return
    name = path.name.lower()
    if name.endswith(".gz"):
        ok = head[:2] == b"\x1f\x8b"
    elif name.endswith(".bz2"):
        ok = head[:3] == b"BZh"
    else:
        ok = head[:9] == b"SIMPLE  ="
    if not ok:
        raise ImageLoadError(path, f"not a FITS file (starts with {head[:12]!r})")


def _check_pixel_limit(path: Path, shape: tuple[int, ...], max_pixels: int) -> None:
    plane = int(shape[-1]) * int(shape[-2])
    if plane > max_pixels:
        raise ImageLoadError(
            path, f"image plane of {shape[-2]}x{shape[-1]} = {plane} pixels exceeds the limit of {max_pixels}"
        )


def _to_luminance(planes: np.ndarray, channel_axis: int) -> np.ndarray:
    """RGB or RGBA planes to one float32 plane (alpha dropped), 256 rows at a time to bound temporaries."""
    rgb = np.moveaxis(planes, channel_axis, 0)[:3]
    luminance = np.empty(rgb.shape[1:], dtype=np.float32)
    for start in range(0, rgb.shape[1], 256):
        chunk = rgb[:, start:start + 256].astype(np.float32)
        luminance[start:start + 256] = np.tensordot(LUMINANCE_WEIGHTS, chunk, axes=1)
    return luminance


def _reduce_fits_cube(data: np.ndarray) -> tuple[np.ndarray, str]:
    """Apply the documented cube rule: colour planes -> luminance, other cubes -> first plane."""
    while data.ndim > 3:
        data = data[0]
    if data.ndim == 3:
        if data.shape[0] in (3, 4):
            return _to_luminance(data, 0), "luminance of colour planes"
        return data[0], "first plane of cube"
    return data, "2-D image"


def _open_fits(path: Path) -> tuple[Any, str | None]:
    """Open leniently in steps (strict, then ignoring a missing END card); also say if it looks truncated."""
    from astropy.io import fits
    from astropy.utils.exceptions import AstropyUserWarning

    attempts = ({}, {"ignore_missing_end": True})
    last_error: Exception | None = None
    for options in attempts:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AstropyUserWarning)
            try:
                hdul = fits.open(path, memmap=True, do_not_scale_image_data=True, **options)
            except OSError as exc:
                last_error = exc
                continue
            except Exception as exc:  # astropy raises ValueError/TypeError/KeyError on garbage
                raise ImageLoadError(path, f"unreadable FITS: {exc}") from exc
        truncation = next((str(w.message) for w in caught if "truncated" in str(w.message)), None)
        if options:
            logger.warning("%s: opened leniently (%s) after: %s", path, options, last_error)
        return hdul, truncation
    raise ImageLoadError(path, f"unreadable FITS: {last_error}")


def _pick_fits_hdu(path: Path, hdul: Any, hdu: int | str | None) -> Any:
    from astropy.io import fits

    image_types = (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)
    if hdu is not None:
        try:
            chosen = hdul[hdu]
        except (KeyError, IndexError) as exc:
            raise ImageLoadError(path, f"no HDU {hdu!r} (file has {len(hdul)})") from exc
        if not isinstance(chosen, image_types) or chosen.header.get("NAXIS", 0) < 2:
            raise ImageLoadError(path, f"HDU {hdu!r} holds no image with 2 or more axes")
        return chosen
    naxis_seen = []
    for candidate in hdul:
        if not isinstance(candidate, image_types) or isinstance(candidate, fits.GroupsHDU):
            continue
        naxis = candidate.header.get("NAXIS", 0)
        naxis_seen.append(naxis)
        if naxis >= 2:
            return candidate
    if naxis_seen and max(naxis_seen) == 1:
        raise ImageLoadError(path, "image data is 1-D; a 2-D image is required")
    raise ImageLoadError(path, "no image HDU with 2 or more axes (tables, header-only or random groups)")


def _read_fits(path: Path, hdu: int | str | None, max_pixels: int) -> tuple[np.ndarray, dict[str, Any]]:
    hdul, truncation = _open_fits(path)
    try:
        chosen = _pick_fits_hdu(path, hdul, hdu)
        header = chosen.header
        naxis = header.get("NAXIS", 0)
        shape = tuple(int(header.get(f"NAXIS{i}", 0)) for i in range(naxis, 0, -1))
        _check_pixel_limit(path, shape, max_pixels)  # before the truncation verdict: a bomb is named as such
        if truncation:
            raise ImageLoadError(path, f"truncated FITS: {truncation}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # astropy warns about odd cards; the data is what matters
            data = chosen.data
        if data is None or data.ndim < 2:
            raise ImageLoadError(path, "HDU has no 2-D image data")
        original_dtype = str(data.dtype)
        plane, rule = _reduce_fits_cube(data)
        image = _fits_plane_to_float32(plane, header)
        info = {
            "format": "fits",
            "hdu": hdul.index_of(chosen),
            "original_shape": list(shape),
            "original_dtype": original_dtype,
            "rule": rule,
            "header": {k: _plain(header[k]) for k in ("OBJECT", "TELESCOP", "INSTRUME", "FILTER", "EXPTIME")
                       if k in header},
        }
        return image, info
    except ImageLoadError:
        raise
    except (OSError, ValueError, TypeError, IndexError, KeyError, MemoryError) as exc:
        raise ImageLoadError(path, f"cannot decode FITS data: {exc}") from exc
    finally:
        hdul.close()


def _fits_plane_to_float32(plane: np.ndarray, header: Any) -> np.ndarray:
    """Native-endian float32 copy with BSCALE/BZERO applied in float32 and BLANK -> NaN.

    The file is opened unscaled so memory-mapping works for integer data and
    the scaling costs one in-place float32 pass instead of a float64 copy.
    """
    image = np.array(plane, dtype=np.float32, copy=True)
    bscale = float(header.get("BSCALE", 1.0))
    bzero = float(header.get("BZERO", 0.0))
    if bscale != 1.0:
        image *= np.float32(bscale)
    if bzero != 0.0:
        image += np.float32(bzero)
    blank = header.get("BLANK")
    if blank is not None and plane.dtype.kind in "iu":
        image[np.asarray(plane) == blank] = np.nan
    return image


def _plain(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) else str(value)


def _read_tiff(path: Path, max_pixels: int) -> tuple[np.ndarray, dict[str, Any]]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            found = next(((i, p) for i, p in enumerate(tif.pages) if "Y" in p.axes and "X" in p.axes), None)
            if found is None:
                raise ImageLoadError(path, "no TIFF page with 2-D image data")
            index, page = found
            axes = page.axes
            _check_pixel_limit(path, (page.shape[axes.index("Y")], page.shape[axes.index("X")]), max_pixels)
            data = page.asarray()
            info = {
                "format": "tiff",
                "page": index,
                "original_shape": list(page.shape),
                "original_dtype": str(page.dtype),
                "bigtiff": bool(tif.is_bigtiff),
                "compression": str(page.compression.name if hasattr(page.compression, "name") else page.compression),
            }
    except ImageLoadError:
        raise
    except Exception as exc:  # tifffile raises many types (TiffFileError, ValueError, struct.error, ...)
        raise ImageLoadError(path, f"cannot decode TIFF: {type(exc).__name__}: {exc}") from exc
    axes = axes.replace("Q", "")
    if "S" in axes and data.ndim == len(axes):
        image = _to_luminance(data, axes.index("S")) if data.shape[axes.index("S")] >= 3 else np.take(
            data, 0, axis=axes.index("S"))
    else:
        image = data
    while image.ndim > 2:
        image = image[0]
    info["rule"] = "luminance" if "S" in axes else "grayscale"
    return np.asarray(image, dtype=np.float32), info


def read_image(
    path: str | os.PathLike[str], hdu: int | str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a FITS or TIFF file into one 2-D float32 plane.

    Parameters
    ----------
    path : path-like
        A ``.fits/.fit/.fts`` file (optionally ``.gz``, ``.bz2`` or ``.fz``) or ``.tif/.tiff``.
    hdu : int or str, optional
        FITS only: the HDU index or EXTNAME to read instead of the first image HDU.
    max_pixels : int
        Refuse images whose plane has more pixels than this, before allocating them.

    Returns
    -------
    image : ndarray, float32, 2-D
        May contain NaN for missing (BLANK/NaN/Inf) pixels.
    info : dict
        Facts: format, HDU or page, original shape and dtype, the plane rule, some header values.

    Raises
    ------
    ImageLoadError
        For every reason the file cannot be read; the message names the file and the cause.
    """
    path = Path(path)
    kind = _file_kind(path)
    _check_magic(path, kind)
    image, info = _read_fits(path, hdu, max_pixels) if kind == "fits" else _read_tiff(path, max_pixels)
    if image.ndim != 2 or min(image.shape) < 2:
        raise ImageLoadError(path, f"image shape {image.shape} is not a 2-D image")
    return image, info


# --------------------------------------------------------------------------- preprocessing


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor x factor`` blocks with strided adds: no full-size temporary, about 2 ms at 2048^2."""
    height, width = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    rows = image[0:height:factor, :width].astype(np.float32)
    for k in range(1, factor):
        rows += image[k:height:factor, :width]
    reduced = np.ascontiguousarray(rows[:, 0::factor])
    for k in range(1, factor):
        reduced += rows[:, k::factor]
    reduced *= np.float32(1.0 / (factor * factor))
    return reduced


def resize_area(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased area (box) resize of a finite float32 plane to ``size x size``.

    Every input pixel contributes to the output, so a single hot pixel or a
    faint star survives downsampling (plain bilinear would skip it). Large
    planes are first block-averaged by the largest integer factor that keeps
    them at least ``size`` (cheap, and no full-size copy), then box-resized.
    """
    factor = min(image.shape[0] // size, image.shape[1] // size)
    if factor >= 2:
        image = _block_mean(image, factor)
    image = np.ascontiguousarray(image, dtype=np.float32)
    if image.shape == (size, size):
        return image.copy()
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BOX), dtype=np.float32)


def _fill_missing(image: np.ndarray) -> np.ndarray:
    """Replace NaN/Inf with the median of the finite pixels (0 when none is finite)."""
    finite = np.isfinite(image)
    filled = np.array(image, dtype=np.float32, copy=True)
    fill_value = np.float32(np.median(image[finite])) if finite.any() else np.float32(0.0)
    filled[~finite] = fill_value
    return filled


def resize_finite(image: np.ndarray, size: int = IMAGE_SIZE) -> tuple[np.ndarray, float]:
    """Resize to ``size x size`` with missing pixels filled; also return the missing fraction.

    The box filter propagates NaN/Inf, so the full-resolution finiteness scan
    only runs when the small image shows that something was missing.
    """
    small = resize_area(image, size)
    if np.isfinite(small).all():
        return small, 0.0
    missing_fraction = float(1.0 - np.count_nonzero(np.isfinite(image)) / image.size)
    return resize_area(_fill_missing(image), size), missing_fraction


def stretch(small: np.ndarray, percentiles: dict[float, float] | None = None) -> np.ndarray:
    """Percentile clip and asinh stretch of a finite 448x448 plane to float32 [0, 1].

    Statistics are taken on this small image (see module docstring). Constant
    images map to zeros without a division warning.
    """
    q = percentiles or _percentiles(small)
    low, high = q[CLIP_LOW_PERCENTILE], q[CLIP_HIGH_PERCENTILE]
    span = np.float32(high - low)
    if not span > 0:
        return np.zeros_like(small, dtype=np.float32)
    scaled = (small - np.float32(low)) * (np.float32(ASINH_SOFTENING) / span)  # stays float32
    np.clip(scaled, 0.0, np.float32(ASINH_SOFTENING), out=scaled)
    np.arcsinh(scaled, out=scaled)
    scaled *= np.float32(1.0 / np.arcsinh(ASINH_SOFTENING))
    return scaled


def preprocess(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """The model's image input: fill missing, area-resize to ``size``, clip and stretch to [0, 1].

    Returns a ``(size, size)`` float32 array; the service adds the channel axis
    its model asks for (1 or 3).
    """
    small, _ = resize_finite(image, size)
    return stretch(small)


# --------------------------------------------------------------------------- features


def _percentiles(small: np.ndarray) -> dict[float, float]:
    """All percentiles the stretch and the features use, from one partition.

    Taken on the 2x2 block means of the 448x448 image (224x224): 4x cheaper
    than the small image itself, and a flipped or rotated image has the same
    blocks, so every statistic is exactly invariant under the TTA views.
    """
    qs = (CLIP_LOW_PERCENTILE, 15.87, 50.0, 99.0, CLIP_HIGH_PERCENTILE, 99.9)
    return dict(zip(qs, (float(v) for v in np.percentile(_block_mean(small, 2), qs))))


def _component_shapes(labels: np.ndarray, n_labels: int, size: int) -> tuple[float, float]:
    """Largest component's share of the mask and the best linear-streak score."""
    if n_labels == 0:
        return 0.0, 0.0
    areas = np.bincount(labels.ravel())[1:]
    largest_share = float(areas.max() / areas.sum())
    best_streak = 0.0
    for label in np.argsort(areas)[::-1][:5] + 1:
        if areas[label - 1] < 8:
            break
        ys, xs = np.nonzero(labels == label)
        cov = np.cov(np.vstack((xs, ys)).astype(np.float64))
        minor, major = np.linalg.eigvalsh(cov)
        if major <= 0:
            continue
        length = 4.0 * np.sqrt(major)
        elongation = 1.0 - np.sqrt(max(minor, 0.0) / major)
        best_streak = max(best_streak, min(length / size, 1.5) * elongation)
    return largest_share, best_streak


def _flux_shape(flux: np.ndarray) -> tuple[float, float]:
    """Concentration around the flux centroid and second-moment ellipticity."""
    total = float(flux.sum())
    if total <= 0:
        return 0.0, 0.0
    size = flux.shape[0]
    coords = np.arange(size, dtype=np.float32)
    col = flux.sum(axis=0)
    row = flux.sum(axis=1)
    cx = float(col @ coords) / total
    cy = float(row @ coords) / total
    dx2 = (coords - cx) ** 2
    dy2 = (coords - cy) ** 2
    ixx = float(col @ dx2) / total
    iyy = float(row @ dy2) / total
    ixy = float((coords - cy) @ flux @ (coords - cx)) / total
    root = np.sqrt((ixx - iyy) ** 2 + 4 * ixy**2)
    ellipticity = float(root / (ixx + iyy)) if ixx + iyy > 0 else 0.0
    inside = (dy2[:, None] + dx2[None, :]) <= (0.15 * size) ** 2
    concentration = float(flux[inside].sum()) / total
    return concentration, ellipticity


def _difference_sigma(image: np.ndarray) -> float:
    """Robust sigma of one pixel from |horizontal| and |vertical| neighbour differences.

    Absolute values make it exactly invariant under flips and rotations. ``image``
    holds 2x2 means of the plane sigma is measured on, so white noise there has
    sigma / 2, and a difference of two such pixels sqrt(2) times that.
    """
    differences = np.concatenate((np.abs(image[:, 1:] - image[:, :-1]).ravel(),
                                  np.abs(image[1:] - image[:-1]).ravel()))
    return float(np.median(differences)) / 0.6745 * 2.0 / np.sqrt(2.0)


@functools.lru_cache(maxsize=4)
def _radial_bins(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For an n x n FFT: each frequency's ring index (-1 = unused), log10 ring radius, and ring sizes."""
    radius = np.hypot(np.fft.fftfreq(n)[None, :], np.fft.fftfreq(n)[:, None]) * n
    edges = np.arange(2, n // 2 - 4)
    ring = np.digitize(radius.ravel(), edges) - 1  # ring k spans [edges[k], edges[k+1])
    ring[(ring < 0) | (ring >= len(edges) - 1)] = -1
    counts = np.bincount(ring[ring >= 0], minlength=len(edges) - 1).astype(np.float64)
    return ring, np.log10(edges[:-1] + 0.5), counts


def _psd_slope(image: np.ndarray) -> float:
    """Slope of log radial power vs log frequency (textures: noise ~0, diffuse nebulae steep).

    Uses the full (not real-half) plane: every ring is symmetric, so flips and
    rotations give the same slope. Ring geometry is cached per size.
    """
    ring, log_k, counts = _radial_bins(image.shape[0])
    power = np.abs(np.fft.fft2(image - image.mean())).ravel() ** 2
    used = ring >= 0
    sums = np.bincount(ring[used], weights=power[used], minlength=len(counts))
    valid = (counts > 0) & (sums > 0)
    if valid.sum() < 3:
        return 0.0
    x, y = log_k[valid], np.log10(sums[valid] / counts[valid])
    x_centred = x - x.mean()
    return float(x_centred @ (y - y.mean()) / (x_centred @ x_centred))


def extract_features(small: np.ndarray, percentiles: dict[float, float] | None = None) -> np.ndarray:
    """Hand-crafted features of a finite 448x448 plane (before stretch), in FEATURE_NAMES order.

    Computed on the 224x224 block means (the same view as the percentiles), so
    all are invariant to flips and 90-degree rotations: one vector serves all
    TTA views.
    """
    small = np.asarray(small, dtype=np.float32)
    half = _block_mean(small, 2)
    size = half.shape[0]
    q = percentiles or _percentiles(small)
    median = q[50.0]
    lo, hi = float(half.min()), float(half.max())
    span = hi - lo
    sigma = max(median - q[15.87], 1e-6 * span, 1e-12)  # lower half: sources do not inflate it
    standardised = np.clip((half - np.float32(median)) * np.float32(1.0 / sigma), -10.0, 50.0)
    centred = standardised - standardised.mean()
    squared = centred * centred
    skewness = float((squared * centred).mean() / max(float(squared.mean()) ** 1.5, 1e-12))
    if span > 0:
        saturated_fraction = np.count_nonzero(half >= hi - 1e-3 * span) / half.size
        blank_fraction = np.count_nonzero(half <= lo + 1e-4 * span) / half.size
    else:
        saturated_fraction, blank_fraction = 0.0, 1.0
    mask = standardised > SOURCE_SIGMA
    labels, n_labels = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    largest_share, streak = _component_shapes(labels, n_labels, size)
    concentration, ellipticity = _flux_shape(np.where(mask, standardised, np.float32(0.0)))
    quarter = _block_mean(half, 2)
    tile = quarter.shape[0] // 4
    tiles = quarter[: 4 * tile, : 4 * tile].reshape(4, tile, 4, tile).transpose(0, 2, 1, 3).reshape(16, -1)
    block_medians = np.median(tiles, axis=1)
    gradient = float(block_medians.max() - block_medians.min()) / sigma
    features = np.array(
        [
            np.log10(sigma / span) if span > 0 else -12.0,
            np.log10(1.0 + max(q[99.9] - median, 0.0) / sigma),
            np.log10(1.0 + max(q[99.0] - median, 0.0) / sigma),
            np.clip(skewness, -50.0, 50.0),
            saturated_fraction,
            blank_fraction,
            np.log1p(n_labels),
            np.count_nonzero(mask) / mask.size,
            largest_share,
            concentration,
            ellipticity,
            streak,
            _psd_slope(np.clip(quarter, None, np.float32(q[99.0]))),
            np.log10(1.0 + gradient),
            _difference_sigma(quarter) / sigma,
        ],
        dtype=np.float32,
    )
    return np.nan_to_num(features, nan=0.0, posinf=0.0, neginf=0.0)


# --------------------------------------------------------------------------- scaler


def load_scaler(path: str | os.PathLike[str]) -> Any:
    """Load a fitted scikit-learn transformer saved with joblib and check its feature count."""
    import joblib

    try:
        scaler = joblib.load(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: scaler file not found") from exc
    except Exception as exc:
        raise ValueError(f"{path}: not a joblib-saved scaler: {exc}") from exc
    expected = getattr(scaler, "n_features_in_", None)
    if expected is not None and expected != N_FEATURES:
        raise FeatureMismatchError(
            f"{path}: scaler was fitted on {expected} features, data_loader produces {N_FEATURES} "
            f"({', '.join(FEATURE_NAMES)})"
        )
    return scaler


def apply_scaler(features: np.ndarray, scaler: Any | None) -> np.ndarray:
    """Scale one vector ``(N,)`` or a matrix ``(B, N)``; a feature-count mismatch is a clear error."""
    features = np.asarray(features, dtype=np.float32)
    if features.shape[-1] != N_FEATURES:
        raise FeatureMismatchError(f"got {features.shape[-1]} features, expected {N_FEATURES}")
    if scaler is None:
        return features
    expected = getattr(scaler, "n_features_in_", N_FEATURES)
    if expected != N_FEATURES:
        raise FeatureMismatchError(f"scaler expects {expected} features, data_loader produces {N_FEATURES}")
    matrix = features.reshape(-1, N_FEATURES)
    scaled = np.asarray(scaler.transform(matrix), dtype=np.float32)
    return scaled.reshape(features.shape)


# --------------------------------------------------------------------------- one call


def sample_from_array(image: np.ndarray, scaler: Any | None = None, info: dict[str, Any] | None = None) -> Sample:
    """Preprocess pixels already in memory exactly as :func:`load_sample` does for a file."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2 or min(image.shape) < 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    small, missing_fraction = resize_finite(image)
    percentiles = _percentiles(small)
    features = apply_scaler(extract_features(small, percentiles), scaler)
    facts = dict(info or {})
    facts["missing_fraction"] = missing_fraction
    return Sample(image=stretch(small, percentiles), features=features, info=facts)


def load_sample(
    path: str | os.PathLike[str],
    scaler: Any | None = None,
    hdu: int | str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Sample:
    """Read one file and produce the model's inputs: the shared path for every caller.

    Raises
    ------
    ImageLoadError
        When the file cannot be read (names the file and the cause).
    FeatureMismatchError
        When the scaler does not fit the feature vector.
    """
    image, info = read_image(path, hdu=hdu, max_pixels=max_pixels)
    return sample_from_array(image, scaler, info)


# --------------------------------------------------------------------------- process tuning


def tune_malloc(mmap_threshold: int = 256 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Keep large freed arrays in the glibc heap so the next decode does not page-fault anew.

    glibc serves allocations above M_MMAP_THRESHOLD (at most 32 MiB dynamically)
    with fresh mmap pages and returns them on free, so every 16-64 MiB decode
    buffer costs page faults. Raising both thresholds lets them be reused.
    Returns False where glibc is not present (no-op).
    """
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, int(mmap_threshold)) and libc.mallopt(m_trim_threshold, int(trim_threshold))
    except (OSError, AttributeError):
        return False
    return bool(ok)
