"""data_loader: every FITS/TIFF variant archives hold, the bad inputs they also hold, preprocessing and features."""

from __future__ import annotations

import bz2
import gzip
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from astropy.io import fits

import data_loader as dl
from data_loader import ImageLoadError
from training.simulator import render_frame, write_frame

ASTROPY_DATA = Path(fits.__file__).parent / "tests" / "data"


def ramp(shape: tuple[int, ...] = (64, 80), dtype: str = "float32") -> np.ndarray:
    return (np.arange(np.prod(shape)).reshape(shape) % 251).astype(dtype)


def assert_model_ready(sample: dl.Sample) -> None:
    assert sample.image.shape == (dl.IMAGE_SIZE, dl.IMAGE_SIZE)
    assert sample.image.dtype == np.float32
    assert np.isfinite(sample.image).all()
    assert sample.image.min() >= 0.0 and sample.image.max() <= 1.0
    assert sample.features.shape == (dl.N_FEATURES,) and np.isfinite(sample.features).all()


# --------------------------------------------------------------------------- FITS variants


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "float32", "float64"])
def test_fits_bitpix_variants_read_exactly(tmp_path: Path, dtype: str) -> None:
    data = ramp(dtype=dtype)
    path = tmp_path / "a.fits"
    fits.PrimaryHDU(data).writeto(path)
    image, info = dl.read_image(path)
    assert image.dtype == np.float32 and image.shape == data.shape
    np.testing.assert_array_equal(image, data.astype(np.float32))
    assert info["format"] == "fits" and info["hdu"] == 0


@pytest.mark.parametrize("dtype,offset", [("uint16", 60000), ("uint32", 4_000_000_000)])
def test_fits_unsigned_via_bzero(tmp_path: Path, dtype: str, offset: int) -> None:
    data = (ramp(dtype="int64") + offset).astype(dtype)
    path = tmp_path / "u.fits"
    fits.PrimaryHDU(data).writeto(path)
    assert fits.getheader(path)["BZERO"] > 0
    image, _ = dl.read_image(path)
    np.testing.assert_allclose(image, data.astype(np.float64), rtol=1e-7)


def test_fits_bscale_bzero_applied(tmp_path: Path) -> None:
    hdu = fits.PrimaryHDU(ramp(dtype="int16"))
    hdu.header["BSCALE"] = 0.5
    hdu.header["BZERO"] = 100.0
    path = tmp_path / "scaled.fits"
    hdu.writeto(path, output_verify="ignore")
    with fits.open(path) as hdul:
        expected = hdul[0].data.astype(np.float32)
    np.testing.assert_allclose(dl.read_image(path)[0], expected)


def test_fits_blank_and_nonfinite_pixels_become_finite(tmp_path: Path) -> None:
    data = ramp(dtype="int16")
    data[5, 5] = -999
    hdu = fits.PrimaryHDU(data)
    hdu.header["BLANK"] = -999
    hdu.writeto(tmp_path / "blank.fits")
    image, _ = dl.read_image(tmp_path / "blank.fits")
    assert np.isnan(image[5, 5]) and np.isfinite(np.delete(image.ravel(), 5 * 80 + 5)).all()
    floats = ramp()
    floats[1, 1], floats[2, 2], floats[3, 3] = np.nan, np.inf, -np.inf
    fits.PrimaryHDU(floats).writeto(tmp_path / "nan.fits")
    for name in ("blank.fits", "nan.fits"):
        sample = dl.load_sample(tmp_path / name)
        assert_model_ready(sample)
        assert sample.info["missing_fraction"] > 0


@pytest.mark.parametrize("wrapper", ["gz", "bz2"])
def test_fits_gzip_and_bzip2_wrapped(tmp_path: Path, wrapper: str) -> None:
    plain = tmp_path / "w.fits"
    fits.PrimaryHDU(ramp()).writeto(plain)
    wrapped = tmp_path / f"w.fits.{wrapper}"
    opener = gzip.open if wrapper == "gz" else bz2.open
    with open(plain, "rb") as source, opener(wrapped, "wb") as target:
        shutil.copyfileobj(source, target)
    np.testing.assert_array_equal(dl.read_image(wrapped)[0], ramp())


@pytest.mark.parametrize("compression", ["RICE_1", "GZIP_1", "HCOMPRESS_1"])
def test_tile_compressed_fits_in_extension(tmp_path: Path, compression: str) -> None:
    data = (ramp(dtype="int32") * 3).astype(np.int16)
    path = tmp_path / "c.fits.fz"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, compression_type=compression)]).writeto(path)
    image, info = dl.read_image(path)
    np.testing.assert_array_equal(image, data.astype(np.float32))  # lossless for integers
    assert info["hdu"] == 1


def test_empty_primary_picks_first_image_extension_and_hdu_override(tmp_path: Path) -> None:
    first, second = ramp(), ramp() * 2
    hdul = fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("a", "E", array=[1.0])]),
                         fits.ImageHDU(first, name="SCI"), fits.ImageHDU(second, name="WHT")])
    path = tmp_path / "mef.FITS"
    hdul.writeto(path)
    np.testing.assert_array_equal(dl.read_image(path)[0], first)
    np.testing.assert_array_equal(dl.read_image(path, hdu="WHT")[0], second)
    np.testing.assert_array_equal(dl.read_image(path, hdu=3)[0], second)
    with pytest.raises(ImageLoadError, match="holds no image"):
        dl.read_image(path, hdu=1)
    with pytest.raises(ImageLoadError, match="no HDU"):
        dl.read_image(path, hdu=9)


def test_cube_uses_first_plane_and_colour_planes_use_luminance(tmp_path: Path) -> None:
    cube = np.stack([ramp(), ramp() + 1000, ramp() + 2000, ramp() + 3000, ramp() + 4000])
    fits.PrimaryHDU(cube).writeto(tmp_path / "cube.fts")
    image, info = dl.read_image(tmp_path / "cube.fts")
    np.testing.assert_array_equal(image, cube[0])
    assert info["rule"] == "first plane of cube"
    rgb = np.stack([np.full((32, 32), 10.0), np.full((32, 32), 20.0), np.full((32, 32), 30.0)]).astype(np.float32)
    fits.PrimaryHDU(rgb).writeto(tmp_path / "rgb.fit")
    image, info = dl.read_image(tmp_path / "rgb.fit")
    np.testing.assert_allclose(image, 0.2126 * 10 + 0.7152 * 20 + 0.0722 * 30, rtol=1e-5)
    assert info["rule"] == "luminance of colour planes"


def test_header_without_end_card_is_opened_leniently(tmp_path: Path) -> None:
    header_only = tmp_path / "noend.fits"
    fits.PrimaryHDU().writeto(header_only)
    raw = bytearray(header_only.read_bytes())
    end = raw.index(b"END" + b" " * 77)
    raw[end:end + 3] = b"   "
    header_only.write_bytes(bytes(raw))
    with pytest.raises(OSError, match="END"):
        fits.open(header_only)  # astropy alone refuses it
    _expect_error(header_only, "no image HDU")  # opened on the lenient retry, then judged on content

    with_data = tmp_path / "noend_data.fits"
    fits.PrimaryHDU(ramp((36, 40))).writeto(with_data)
    raw = bytearray(with_data.read_bytes())
    end = raw.index(b"END" + b" " * 77)
    raw[end:end + 3] = b"   "
    with_data.write_bytes(bytes(raw))
    _expect_error(with_data, "truncated")  # binary data read as header cards: refused, not half-read


def test_nonstandard_header_cards_do_not_stop_reading(tmp_path: Path) -> None:
    path = tmp_path / "cards.fits"
    fits.PrimaryHDU(ramp()).writeto(path)
    raw = bytearray(path.read_bytes())
    bad = b"BAD CARD= 'lower-case and space in keyword'".ljust(80)
    slot = raw.index(b"END" + b" " * 77)
    raw[slot:slot + 160] = bad + b"END".ljust(80)
    path.write_bytes(bytes(raw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning may escape to the caller either
        image, _ = dl.read_image(path)
    np.testing.assert_array_equal(image, ramp())


def test_astropy_real_edge_case_files() -> None:
    image, info = dl.read_image(ASTROPY_DATA / "comp.fits")
    assert image.ndim == 2 and np.isfinite(image).all() and info["hdu"] == 1
    with pytest.raises(ImageLoadError, match="1-D"):
        dl.read_image(ASTROPY_DATA / "compressed_float_bzero.fits")  # a 3-pixel 1-D compressed HDU
    scaled, _ = dl.read_image(ASTROPY_DATA / "scale.fits")
    with fits.open(ASTROPY_DATA / "scale.fits") as hdul:
        np.testing.assert_allclose(scaled, hdul[0].data, rtol=1e-6)
    with pytest.raises(ImageLoadError, match="no image HDU"):
        dl.read_image(ASTROPY_DATA / "random_groups.fits")
    with pytest.raises(ImageLoadError, match="no image HDU"):
        dl.read_image(ASTROPY_DATA / "tb.fits")


# --------------------------------------------------------------------------- TIFF variants


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32", "float64"])
@pytest.mark.parametrize("compression", [None, "lzw", "zlib", "packbits"])
def test_tiff_dtypes_and_compressions(tmp_path: Path, dtype: str, compression: str | None) -> None:
    data = ramp(dtype=dtype)
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, data, compression=compression)
    image, info = dl.read_image(path)
    np.testing.assert_array_equal(image, data.astype(np.float32))
    assert info["format"] == "tiff"


@pytest.mark.parametrize("channels,planar", [(3, "contig"), (4, "contig"), (3, "separate")])
def test_tiff_colour_to_luminance(tmp_path: Path, channels: int, planar: str) -> None:
    pixel = np.array([10, 20, 30, 255][:channels], dtype=np.uint8)
    data = np.broadcast_to(pixel, (40, 48, channels)).copy()
    if planar == "separate":
        data = np.moveaxis(data, -1, 0).copy()
    extras = ["unassalpha"] if channels == 4 else None
    tifffile.imwrite(tmp_path / "c.tiff", data, photometric="rgb", planarconfig=planar, extrasamples=extras)
    image, _ = dl.read_image(tmp_path / "c.tiff")
    assert image.shape == (40, 48)
    np.testing.assert_allclose(image, 0.2126 * 10 + 0.7152 * 20 + 0.0722 * 30, rtol=1e-5)


def test_tiff_multipage_and_bigtiff(tmp_path: Path) -> None:
    path = tmp_path / "pages.TIF"
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        writer.write(ramp())
        writer.write(ramp() * 3)
    image, info = dl.read_image(path)
    np.testing.assert_array_equal(image, ramp())
    assert info["bigtiff"] is True and info["page"] == 0


# --------------------------------------------------------------------------- bad input


def _expect_error(path: Path, cause: str, **kwargs: object) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as caught:
        dl.load_sample(path, **kwargs)
    assert str(path) in str(caught.value), "the error names the file"
    assert cause in caught.value.cause
    return caught.value


def test_bad_inputs_give_one_clear_error_type(tmp_path: Path) -> None:
    (tmp_path / "empty.fits").write_bytes(b"")
    _expect_error(tmp_path / "empty.fits", "empty")
    (tmp_path / "page.fits").write_text("<!DOCTYPE html><html><body>404</body></html>")
    _expect_error(tmp_path / "page.fits", "not a FITS file")
    (tmp_path / "page.tif").write_text("<!DOCTYPE html><html></html>")
    _expect_error(tmp_path / "page.tif", "not a TIFF file")
    (tmp_path / "fake.fits.gz").write_bytes(b"plain text, not gzip")
    _expect_error(tmp_path / "fake.fits.gz", "not a FITS file")

    full = tmp_path / "full.fits"
    fits.PrimaryHDU(ramp((256, 256))).writeto(full)
    (tmp_path / "truncated.fits").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _expect_error(tmp_path / "truncated.fits", "truncated")

    tifffile.imwrite(tmp_path / "full.tif", ramp((256, 256)))
    (tmp_path / "truncated.tif").write_bytes((tmp_path / "full.tif").read_bytes()[:3000])
    _expect_error(tmp_path / "truncated.tif", "cannot decode TIFF")

    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns([fits.Column("x", "J", array=[1, 2])])]
                 ).writeto(tmp_path / "table.fits")
    _expect_error(tmp_path / "table.fits", "no image HDU")
    fits.PrimaryHDU().writeto(tmp_path / "header_only.fits")
    _expect_error(tmp_path / "header_only.fits", "no image HDU")
    fits.PrimaryHDU(np.arange(100, dtype=np.float32)).writeto(tmp_path / "spectrum.fits")
    _expect_error(tmp_path / "spectrum.fits", "1-D")
    _expect_error(tmp_path / "missing.fits", "cannot open")


def test_pixel_limit_refuses_before_reading(tmp_path: Path) -> None:
    # A header that promises 100k x 100k pixels over a tiny file: refused from the header alone.
    header = fits.Header({"SIMPLE": True, "BITPIX": -32, "NAXIS": 2, "NAXIS1": 100_000, "NAXIS2": 100_000})
    path = tmp_path / "bomb.fits"
    path.write_bytes(header.tostring().encode() + b"\0" * 2880)
    error = _expect_error(path, "exceeds the limit", max_pixels=50_000_000)
    assert "100000x100000" in error.cause
    tifffile.imwrite(tmp_path / "big.tif", np.zeros((300, 300), np.uint8))
    _expect_error(tmp_path / "big.tif", "exceeds the limit", max_pixels=10_000)


def test_unsupported_extension_is_refused(tmp_path: Path) -> None:
    (tmp_path / "image.gif").write_bytes(b"GIF89a")
    _expect_error(tmp_path / "image.gif", "unsupported extension")


# --------------------------------------------------------------------------- JPEG and PNG (labelled data, press images)


def _galaxy_rgb(shape: tuple[int, int] = (120, 160)) -> np.ndarray:
    frame = render_frame("galaxy", 4, max(shape))[: shape[0], : shape[1]]
    scaled = dl.stretch(frame, None) if frame.shape == (448, 448) else frame
    grey = np.clip((scaled - scaled.min()) / (np.ptp(scaled) or 1) * 255, 0, 255).astype(np.uint8)
    return np.stack([grey, (grey * 0.8).astype(np.uint8), (grey * 0.5).astype(np.uint8)], axis=-1)


PNG_MODE_STYLES = {"L": "png uint8", "RGB": "png uint8 colour", "RGBA": "png uint8 colour", "P": "png uint8 colour",
                   "LA": "png uint8", "I;16": "png uint16", "1": "png bilevel"}


@pytest.mark.parametrize("mode", list(PNG_MODE_STYLES))
def test_png_modes_read_as_one_plane(tmp_path: Path, mode: str) -> None:
    from PIL import Image

    rgb = _galaxy_rgb()
    if mode == "I;16":
        image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    else:
        image = Image.fromarray(rgb).convert(mode)
    path = tmp_path / f"image_{mode.replace(';', '')}.png"
    image.save(path)
    pixels, info = dl.read_image(path)
    assert pixels.shape == (120, 160) and pixels.dtype == np.float32
    assert info["format"] == "png" and info["original_mode"] == mode
    if mode == "I;16":
        assert pixels.max() == int(rgb[..., 0].max()) * 257, "16-bit values kept, not cut to 8 bits"
    elif mode == "1":
        assert set(np.unique(pixels)) <= {0.0, 1.0} and pixels.max() == 1.0
    elif mode in ("L", "LA"):
        np.testing.assert_array_equal(pixels, np.asarray(image.convert("L"), dtype=np.float32))
    else:
        expected = np.asarray(image.convert("RGB"), dtype=np.float32) @ dl.LUMINANCE_WEIGHTS
        np.testing.assert_allclose(pixels, expected, atol=1e-3)
    assert dl.input_style(info) == PNG_MODE_STYLES[mode]
    assert_model_ready(dl.load_sample(path))


# the stored type: uint16 data go into FITS as int16 with BZERO 32768
@pytest.mark.parametrize(("variant", "style"), [
    ("fits_float32", "fits float32"), ("fits_int16", "fits int16"), ("fits_uint16", "fits int16"),
    ("fits_rice", "fits int16"), ("fits_gz", "fits float32"), ("tiff_uint16", "tiff uint16"),
    ("tiff_float32", "tiff float32"), ("tiff_rgb8", "tiff uint8 colour")])
def test_input_style_names_format_pixel_type_and_colour(tmp_path: Path, variant: str, style: str) -> None:
    path = write_frame(render_frame("galaxy", 1, 128), tmp_path / "frame", variant)
    assert dl.input_style(dl.load_sample(path).info) == style
    assert dl.input_style({}) == "unknown"


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".JPG"])
def test_jpeg_colour_and_grey(tmp_path: Path, suffix: str) -> None:
    from PIL import Image

    rgb = _galaxy_rgb()
    Image.fromarray(rgb).save(tmp_path / f"colour{suffix}", quality=90)
    Image.fromarray(rgb[..., 0]).save(tmp_path / f"grey{suffix}", quality=90)
    colour, info = dl.read_image(tmp_path / f"colour{suffix}")
    grey, _ = dl.read_image(tmp_path / f"grey{suffix}")
    assert info["format"] == "jpeg" and info["rule"] == "luminance"
    assert dl.input_style(info) == "jpeg uint8 colour"
    assert dl.input_style(dl.read_image(tmp_path / f"grey{suffix}")[1]) == "jpeg uint8"
    assert colour.shape == grey.shape == (120, 160)
    assert np.abs(colour - rgb.astype(np.float32) @ dl.LUMINANCE_WEIGHTS).mean() < 3, "JPEG loss only"
    assert np.corrcoef(colour.ravel(), grey.ravel())[0, 1] > 0.98
    sample = dl.load_sample(tmp_path / f"colour{suffix}")
    np.testing.assert_allclose(sample.image, dl.sample_from_array(colour).image, atol=1e-6)


def test_bad_jpeg_and_png_are_refused_by_name(tmp_path: Path) -> None:
    from PIL import Image

    Image.fromarray(_galaxy_rgb()).save(tmp_path / "full.jpg")
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:400])
    _expect_error(tmp_path / "truncated.jpg", "cannot decode JPEG")
    (tmp_path / "page.png").write_text("<html>404</html>")
    _expect_error(tmp_path / "page.png", "not a PNG file")
    (tmp_path / "png_named.jpg").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    _expect_error(tmp_path / "png_named.jpg", "not a JPEG file")
    (tmp_path / "stub.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    _expect_error(tmp_path / "stub.png", "cannot decode PNG")
    Image.new("L", (400, 300)).save(tmp_path / "big.png")
    _expect_error(tmp_path / "big.png", "exceeds the limit", max_pixels=10_000)


def test_extension_lists_parse_and_refuse_unreadable() -> None:
    assert dl.parse_suffixes(".fits, FZ,jpg,.png") == (".fits", ".fz", ".jpg", ".png")
    with pytest.raises(ValueError, match=r"\.gif"):
        dl.parse_suffixes(".fits,.gif")
    assert dl.is_supported("a.JPG") and not dl.is_supported("a.jpg", dl.ARCHIVE_SUFFIXES)


# --------------------------------------------------------------------------- edge inputs (bilevel, tiny, no pixels)


def test_bilevel_tiff_reads_as_zero_one(tmp_path: Path) -> None:
    mask = np.zeros((64, 72), dtype=bool)
    mask[10:30, 20:50] = True
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    pixels, _ = dl.read_image(tmp_path / "mask.tif")
    np.testing.assert_array_equal(pixels, mask.astype(np.float32))
    assert_model_ready(dl.load_sample(tmp_path / "mask.tif"))


def test_tiny_fits_is_refused_with_the_minimum_size(tmp_path: Path) -> None:
    fits.PrimaryHDU(np.ones((1, 1), np.float32)).writeto(tmp_path / "one.fits")
    error = _expect_error(tmp_path / "one.fits", "too small")
    assert "1x1" in error.cause and f"at least {dl.MIN_IMAGE_SIDE} pixels" in error.cause
    fits.PrimaryHDU(np.ones((dl.MIN_IMAGE_SIDE, 40), np.float32)).writeto(tmp_path / "narrow_ok.fits")
    assert_model_ready(dl.load_sample(tmp_path / "narrow_ok.fits"))


def test_image_without_valid_pixels_is_an_error(tmp_path: Path) -> None:
    fits.PrimaryHDU(np.full((64, 64), np.nan, np.float32)).writeto(tmp_path / "nan.fits")
    _expect_error(tmp_path / "nan.fits", "no valid pixels")
    blank = fits.PrimaryHDU(np.full((64, 64), -32768, np.int16))
    blank.header["BLANK"] = -32768
    blank.writeto(tmp_path / "blank.fits")
    _expect_error(tmp_path / "blank.fits", "no valid pixels")
    with pytest.raises(ValueError, match="no valid pixels"):
        dl.sample_from_array(np.full((64, 64), np.inf, np.float32))


def _fits_variants(directory: Path) -> list[Path]:
    """Primary-image FITS files that take the direct memory-mapped path, each with something to get right."""
    rng = np.random.default_rng(5)
    frame = rng.normal(1000, 30, (1000, 1100)).astype(np.float32)
    frame[rng.integers(0, 1000, 300), rng.integers(0, 1100, 300)] += 20000
    unsigned = frame.astype(np.uint16)
    blank = frame.astype(np.int16)
    blank[10:20, 10:20] = -32768
    nan = frame.copy()
    nan[100:140, 200:260] = np.nan
    long_header = fits.Header([(f"HIST{i:04d}", i) for i in range(400)])  # 5 blocks: longer than the probe
    hdus = {"f32": fits.PrimaryHDU(frame), "u16": fits.PrimaryHDU(unsigned), "f64": fits.PrimaryHDU(
        frame.astype(np.float64)), "nan": fits.PrimaryHDU(nan), "long": fits.PrimaryHDU(frame, header=long_header),
        "blank": fits.PrimaryHDU(blank), "cube": fits.PrimaryHDU(np.stack([frame, frame * 2]))}
    hdus["blank"].header["BLANK"] = -32768
    paths = []
    for name, hdu in hdus.items():
        hdu.writeto(directory / f"{name}.fits")
        paths.append(directory / f"{name}.fits")
    return paths


def test_load_sample_equals_preprocessing_the_read_image(tmp_path: Path) -> None:
    # load_sample resizes the stored values straight from the file; read_image makes the float32 copy first.
    for path in _fits_variants(tmp_path):
        image, info = dl.read_image(path)
        expected, sample = dl.sample_from_array(image, info=info), dl.load_sample(path)
        np.testing.assert_allclose(sample.image, expected.image, atol=1e-6, err_msg=path.name)
        np.testing.assert_allclose(sample.features, expected.features, rtol=1e-5, atol=1e-6, err_msg=path.name)
        assert sample.info == expected.info
        assert (sample.info["missing_fraction"] > 0) == (path.stem in ("nan", "blank"))


def test_direct_primary_path_matches_astropy_hdulist_path(tmp_path: Path) -> None:
    # hdu=0 forces fits.open; the default maps the primary array directly. Same pixels, same facts.
    for path in _fits_variants(tmp_path):
        direct, direct_info = dl.read_image(path)
        via_astropy, astropy_info = dl.read_image(path, hdu=0)
        np.testing.assert_array_equal(direct, via_astropy, err_msg=path.name)
        assert direct_info == astropy_info


def test_concurrent_reads_leave_warning_filters_alone(tmp_path: Path) -> None:
    path = tmp_path / "cards.fits"
    fits.PrimaryHDU(ramp((300, 300))).writeto(path)
    raw = bytearray(path.read_bytes())
    slot = raw.index(b"END" + b" " * 77)
    raw[slot:slot + 160] = b"BAD CARD= 'not a standard keyword'".ljust(80) + b"END".ljust(80)
    path.write_bytes(bytes(raw))
    filters_before, show_before = list(warnings.filters), warnings.showwarning
    with ThreadPoolExecutor(4) as pool:
        samples = list(pool.map(lambda _: dl.load_sample(path), range(40)))
    assert warnings.filters == filters_before and warnings.showwarning is show_before
    assert all(np.array_equal(s.image, samples[0].image) for s in samples)


# --------------------------------------------------------------------------- preprocessing


def test_preprocess_shape_range_dtype_and_no_float64(tmp_path: Path) -> None:
    image = np.random.default_rng(0).normal(100, 5, (1000, 1300)).astype(np.float32)
    out = dl.preprocess(image)
    assert out.shape == (448, 448) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 1 and np.isfinite(out).all()
    small = dl.resize_area(image)
    assert dl.stretch(small).dtype == np.float32


def test_constant_images_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample = dl.sample_from_array(np.full((300, 300), 7.0, np.float32))
        assert_model_ready(sample)
        assert sample.image.max() == 0.0


def test_bright_point_source_survives_area_resize() -> None:
    noise = np.random.default_rng(1).normal(100, 3, (2048, 2048)).astype(np.float32)
    image = noise.copy()
    image[1003, 517] = 5000.0  # one hot pixel: a resize that samples every 4th pixel never sees it
    assert image[::4, ::4].max() < 200
    base, out = dl.preprocess(noise), dl.preprocess(image)
    y, x = int(1003 * 448 / 2048), int(517 * 448 / 2048)
    window = (slice(y - 1, y + 2), slice(x - 1, x + 2))
    assert out[window].max() == pytest.approx(1.0)
    assert out[window].max() - base[window].max() > 0.05


def test_missing_pixels_are_filled_not_propagated() -> None:
    image = np.random.default_rng(2).normal(100, 3, (900, 900)).astype(np.float32)
    image[:, :300] = np.nan
    small, missing = dl.resize_finite(image)
    assert np.isfinite(small).all() and missing == pytest.approx(1 / 3, abs=1e-3)


def test_small_images_are_upsampled() -> None:
    assert dl.preprocess(np.random.default_rng(3).random((50, 70), dtype=np.float32)).shape == (448, 448)


# --------------------------------------------------------------------------- features and scaler


def test_features_have_signal_for_the_classes() -> None:
    def features(name: str, seed: int) -> dict[str, float]:
        return dict(zip(dl.FEATURE_NAMES, dl.sample_from_array(render_frame(name, seed, 512)).features))

    fields = [features("star_field", seed) for seed in range(3)]
    galaxies = [features("galaxy", seed) for seed in range(3)]
    assert min(f["log_source_count"] for f in fields) > max(f["log_source_count"] for f in galaxies) - 1
    assert np.mean([g["concentration"] for g in galaxies]) > np.mean([f["concentration"] for f in fields])
    line = np.random.default_rng(4).normal(100, 3, (512, 512)).astype(np.float32)
    np.fill_diagonal(line, 3000.0)
    streak = dict(zip(dl.FEATURE_NAMES, dl.sample_from_array(line).features))["streak_score"]
    assert streak > 0.5 > max(f["streak_score"] for f in fields)


def test_features_are_invariant_to_flips() -> None:
    frame = render_frame("galaxy", 11, 448)
    base = dl.extract_features(frame)
    for view in (frame[::-1], frame[:, ::-1], np.rot90(frame)):
        np.testing.assert_allclose(dl.extract_features(np.ascontiguousarray(view)), base, rtol=1e-3, atol=1e-3)


def _photograph_like(size: int = 512) -> np.ndarray:
    """An 8-bit grey 'photograph': a sharp textured disc (a flower) on a smooth, out-of-focus mid-grey ramp."""
    y, x = np.mgrid[:size, :size].astype(np.float32) / size
    background = 80.0 + 20.0 * x + 10.0 * np.sin(2.0 * y)  # smooth: no noise, as a blurred background is
    disc = (x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.08
    texture = 200.0 + 40.0 * np.sin(90.0 * x) * np.sin(90.0 * y)
    return np.round(np.where(disc, texture, background)).astype(np.float32)


def _smooth_fraction(image: np.ndarray) -> float:
    return dl.sample_from_array(image).smooth_fraction


def test_smooth_fraction_sees_a_photograph_not_a_sky_image() -> None:
    photograph = _photograph_like()
    assert _smooth_fraction(photograph) > 0.05
    for name in ("galaxy", "nebula", "star_cluster", "star_field"):
        for seed in range(2):
            assert _smooth_fraction(render_frame(name, seed, 512)) == 0.0, (name, seed)
    # the same object on a flat black sky (a processed nebula photograph's clipped background): nothing smooth
    # lies above the sky
    assert _smooth_fraction(np.where(photograph > 150.0, photograph, 0.0)) == 0.0


def test_noise_whiteness_tells_beam_correlated_noise_from_white_noise_on_linear_pixels() -> None:
    from scipy import ndimage

    noise = np.random.default_rng(9).normal(1000.0, 10.0, (512, 512)).astype(np.float32)
    beam = ndimage.gaussian_filter(noise, 4.0)  # a radio map's noise: correlated over its beam
    assert dl.sample_from_array(noise).noise_whiteness > 0.9
    assert dl.sample_from_array(beam).noise_whiteness < 0.5
    for view in (beam[::-1], np.rot90(beam), np.rot90(beam, 2)):  # sampled rows differ, the statistic does not
        assert dl.sample_from_array(np.ascontiguousarray(view)).noise_whiteness == pytest.approx(
            dl.sample_from_array(beam).noise_whiteness, rel=0.05)
    half_missing = noise.copy()  # a mosaic's blank half, filled with one value: its zero differences hold no noise
    half_missing[:, :256] = np.nan
    assert dl.sample_from_array(half_missing).noise_whiteness > 0.9
    half_missing[:, :500] = np.nan  # too little left to measure: not judged
    assert dl.sample_from_array(half_missing).noise_whiteness == 1.0
    # not judged (1.0, white): 8-bit pixels, and a plane smaller than the one it is measured on (enlarged)
    assert dl.sample_from_array(np.clip(beam - 900.0, 0, 255).astype(np.uint8)).noise_whiteness == 1.0
    assert dl.sample_from_array(beam[:200, :200]).noise_whiteness == 1.0


def test_noise_whiteness_is_judged_on_linear_files_only(tmp_path: Path) -> None:
    from PIL import Image
    from scipy import ndimage

    beam = ndimage.gaussian_filter(np.random.default_rng(10).normal(0.0, 1.0, (300, 300)), 4.0) * 1000.0 + 5000.0
    fits.PrimaryHDU(beam.astype(np.float32)).writeto(tmp_path / "radio.fits")
    tifffile.imwrite(tmp_path / "radio.tif", beam.astype(np.uint16))
    Image.fromarray(np.clip(beam - 4900.0, 0, 255).astype(np.uint8)).save(tmp_path / "radio.png")
    assert dl.load_sample(tmp_path / "radio.fits").noise_whiteness < 0.5
    assert dl.load_sample(tmp_path / "radio.tif").noise_whiteness < 0.5
    assert dl.load_sample(tmp_path / "radio.png").noise_whiteness == 1.0  # a display image: not judged


def test_smooth_fraction_leaves_out_saturated_plateaus_and_is_invariant_to_views() -> None:
    sky = np.random.default_rng(8).normal(1000.0, 10.0, (512, 512)).astype(np.float32)
    sky[100:220, 300:420] = 65535.0  # a saturated star's flat top: no smooth area of a photograph
    assert _smooth_fraction(sky) == 0.0
    photograph = _photograph_like()
    base = _smooth_fraction(photograph)
    for view in (photograph[::-1], photograph[:, ::-1], np.rot90(photograph), np.rot90(photograph, 2)):
        assert _smooth_fraction(np.ascontiguousarray(view)) == base
    assert _smooth_fraction(np.full((512, 512), 7.0, dtype=np.float32)) == 0.0  # constant: no range, no areas


def test_zoom_is_stored_pixels_per_small_pixel_along_a_side() -> None:
    assert dl._zoom([2048, 2048], (448, 448)) == pytest.approx(2048 / 448)
    assert dl._zoom([1792, 448], (448, 448)) == pytest.approx(2.0)  # geometric mean of 4 and 1
    for colour_or_cube in ([896, 896, 3], [3, 896, 896]):  # the plane's sides are the two largest axes
        assert dl._zoom(colour_or_cube, (448, 448)) == pytest.approx(2.0)
    assert dl._zoom([128, 128], (448, 448)) == 1.0  # upsampled: no averaging
    assert dl._zoom(None, (448, 448)) == 1.0


@pytest.mark.parametrize(("name", "seed"), [("star_field", 1), ("star_field", 3), ("star_cluster", 0)])
def test_smooth_fraction_of_a_large_frame_is_measured_at_its_own_pixel_scale(name: str, seed: int) -> None:
    """A 2048^2 frame averaged down to 448 has a quarter of its sky noise: its sky (here with a gradient) would pass
    for smooth at the small image's scale; at the stored pixels' scale it is not."""
    frame = render_frame(name, seed, 2048)
    sample = dl.sample_from_array(frame)
    assert sample.info["original_shape"] == [2048, 2048]
    assert sample.smooth_fraction == 0.0
    small = dl.resize_area(frame)
    half = dl._half(small)
    assert dl.smooth_fraction(half, dl._percentiles(half), zoom=1.0) > 0.0  # what the small image alone shows


@pytest.mark.parametrize("name", ["nebula", "star_field"])
def test_smooth_fraction_ignores_filled_and_padded_areas(name: str) -> None:
    """A reprojected frame's empty border, as NaN (filled with the median) or as zeros below a sky at 12,000, is
    constant: not a smooth area, and a zero border must not become the dark end the sky is measured from."""
    frame = render_frame(name, 3, 1024).astype(np.float32) + np.float32(12000.0)
    assert _smooth_fraction(frame) == 0.0
    for fill in (np.nan, 0.0):
        padded = frame.copy()
        padded[:, :300] = fill
        assert _smooth_fraction(padded) == 0.0, fill
    letterboxed = _photograph_like(512)  # a photograph keeps its smooth areas inside a black border
    letterboxed[:64] = 0.0
    assert _smooth_fraction(letterboxed) > 0.05


def test_scaler_feature_count_mismatch_is_clear(tmp_path: Path) -> None:
    import joblib
    from sklearn.preprocessing import StandardScaler

    wrong = StandardScaler().fit(np.zeros((4, dl.N_FEATURES + 2)))
    joblib.dump(wrong, tmp_path / "wrong.joblib")
    with pytest.raises(dl.FeatureMismatchError, match=f"fitted on {dl.N_FEATURES + 2} features"):
        dl.load_scaler(tmp_path / "wrong.joblib")
    with pytest.raises(dl.FeatureMismatchError):
        dl.apply_scaler(np.zeros(dl.N_FEATURES), wrong)
    with pytest.raises(dl.FeatureMismatchError):
        dl.apply_scaler(np.zeros(3), None)


def test_import_does_not_load_tensorflow() -> None:
    code = "import sys, data_loader; bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]; " \
           "print(bad); sys.exit(1 if bad else 0)"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(dl.__file__).parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------- sky position and header facts


def _wcs_header(ctype: tuple[str, str] = ("RA---TAN", "DEC--TAN"), crval: tuple[float, float] = (150.1, 2.2)):
    from astropy.wcs import WCS

    wcs = WCS(naxis=2)
    wcs.wcs.ctype, wcs.wcs.crval, wcs.wcs.crpix = list(ctype), list(crval), [100.0, 80.0]
    wcs.wcs.cdelt = [-0.0003, 0.0003]
    return wcs, wcs.to_header()


@pytest.mark.parametrize("layout", ["primary", "extension", "rice"])
def test_sky_centre_matches_astropy_within_an_arcsecond(tmp_path: Path, layout: str) -> None:
    from astropy.coordinates import SkyCoord

    wcs, header = _wcs_header()
    header["OBJECT"] = "COSMOS"
    pixels = ramp((300, 400))
    path = tmp_path / f"{layout}.fits"
    if layout == "primary":
        fits.PrimaryHDU(pixels, header=header).writeto(path)
    elif layout == "extension":
        fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(pixels, header=header)]).writeto(path)
    else:
        fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(pixels.astype(np.int16), header=header)]).writeto(path)
    info = dl.load_sample(path).info
    expected = wcs.pixel_to_world((400 - 1) / 2, (300 - 1) / 2)
    found = SkyCoord(info["sky"]["ra"], info["sky"]["dec"], unit="deg")
    assert found.separation(expected).arcsec < 1.0
    assert info["header"]["OBJECT"] == "COSMOS"


def test_galactic_wcs_is_converted_to_icrs_and_bad_wcs_is_no_error(tmp_path: Path) -> None:
    from astropy.coordinates import SkyCoord

    wcs, header = _wcs_header(("GLON-CAR", "GLAT-CAR"), (30.0, 5.0))
    fits.PrimaryHDU(ramp((300, 400)), header=header).writeto(tmp_path / "galactic.fits")
    sky = dl.load_sample(tmp_path / "galactic.fits").info["sky"]
    expected = wcs.pixel_to_world((400 - 1) / 2, (300 - 1) / 2).icrs
    assert SkyCoord(sky["ra"], sky["dec"], unit="deg").separation(expected).arcsec < 1.0

    broken = fits.Header({"CTYPE1": "RA---XYZ", "CTYPE2": "DEC--XYZ", "CRVAL1": 1.0, "CRVAL2": 2.0,
                          "CDELT1": 0.001, "CDELT2": 0.001})  # an unknown projection: wcslib refuses it
    fits.PrimaryHDU(ramp((64, 64)), header=broken).writeto(tmp_path / "broken.fits")
    assert dl.load_sample(tmp_path / "broken.fits").info["sky"] is None
    fits.PrimaryHDU(ramp((64, 64))).writeto(tmp_path / "plain.fits")
    assert dl.load_sample(tmp_path / "plain.fits").info["sky"] is None
    tifffile.imwrite(tmp_path / "plain.tif", ramp((64, 64)))
    assert "sky" not in dl.load_sample(tmp_path / "plain.tif").info


def test_fk5_at_another_equinox_is_precessed_to_icrs(tmp_path: Path) -> None:
    from astropy.coordinates import SkyCoord

    wcs, header = _wcs_header(crval=(150.1, 2.2))
    header["RADESYS"], header["EQUINOX"] = "FK5", 1975.0
    wcs.wcs.radesys, wcs.wcs.equinox = "FK5", 1975.0
    fits.PrimaryHDU(ramp((300, 400)), header=header).writeto(tmp_path / "fk5_1975.fits")
    sky = dl.load_sample(tmp_path / "fk5_1975.fits").info["sky"]
    expected = wcs.pixel_to_world((400 - 1) / 2, (300 - 1) / 2).icrs
    assert SkyCoord(sky["ra"], sky["dec"], unit="deg").separation(expected).arcsec < 1.0
    assert abs(sky["ra"] - 150.1) > 0.1, "25 years of precession moved it: the raw CRVAL is not the answer"
