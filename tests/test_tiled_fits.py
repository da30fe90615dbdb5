"""tiled_fits: the GIL-releasing tile decoder gives exactly what astropy gives, or steps aside."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import data_loader as dl
import tiled_fits
from data_loader import ImageLoadError

SHAPE = (200, 150)  # 150 is no multiple of the 48-pixel tiles: edge tiles are narrower and shorter


def sky(dtype: str) -> np.ndarray:
    rng = np.random.default_rng(7)
    image = rng.normal(1000, 30, SHAPE)
    image[rng.integers(0, SHAPE[0], 40), rng.integers(0, SHAPE[1], 40)] += 20000
    if dtype == "uint8":
        image = image / 100
    return np.clip(image, 0, None).astype(dtype)


def write_compressed(path: Path, data: np.ndarray, **options: object) -> Path:
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data, **options)]).writeto(path)
    return path


def astropy_and_ours(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    with fits.open(path, do_not_scale_image_data=True) as hdul:
        hdu = hdul[1]
        expected = np.array(hdu.data)
        location = hdu.fileinfo()
        blank = hdu.header.get("BLANK")
    layout = tiled_fits.read_layout(path, location["hdrLoc"], location["datLoc"], blank)
    assert layout is not None, "this layout should be decoded here, not left to astropy"
    return expected, tiled_fits.decode(path, layout)


def assert_identical(expected: np.ndarray, got: np.ndarray | None) -> None:
    assert got is not None
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)  # NaN where NaN, every other bit equal


@pytest.mark.parametrize("tile", [None, (64, 48)])
@pytest.mark.parametrize("algorithm", ["RICE_1", "GZIP_1", "GZIP_2", "NOCOMPRESS"])
@pytest.mark.parametrize("dtype", ["uint8", "int16", "uint16", "int32"])
def test_integer_images_match_astropy(tmp_path: Path, dtype: str, algorithm: str, tile: tuple | None) -> None:
    path = write_compressed(tmp_path / "i.fits.fz", sky(dtype), compression_type=algorithm, tile_shape=tile)
    assert_identical(*astropy_and_ours(path))


@pytest.mark.parametrize("tile", [None, (64, 48), (100, 100), SHAPE])  # 100x100, SHAPE: longer than a dither run
@pytest.mark.parametrize("method", [1, 2, -1])  # SUBTRACTIVE_DITHER_1, _2, NO_DITHER
@pytest.mark.parametrize("algorithm_dtype", [("RICE_1", "float32"), ("GZIP_2", "float32"), ("RICE_1", "float64")])
def test_quantized_floats_match_astropy(tmp_path: Path, algorithm_dtype: tuple[str, str], method: int,
                                        tile: tuple | None) -> None:
    algorithm, dtype = algorithm_dtype
    data = sky(dtype)
    data[5, 7] = np.nan  # becomes ZBLANK
    data[100, 3:9] = np.nan
    data[50, 50] = 0.0  # SUBTRACTIVE_DITHER_2 keeps exact zeros
    path = write_compressed(tmp_path / "q.fits.fz", data, compression_type=algorithm, quantize_method=method,
                            tile_shape=tile, dither_seed=123)
    expected, got = astropy_and_ours(path)
    assert np.isnan(expected).sum() == 7
    assert_identical(expected, got)


@pytest.mark.parametrize("name", ["comp.fits", "compressed_image.fits", "double_ext.fits"])
def test_astropy_own_compressed_files_match(name: str) -> None:
    path = Path(fits.__file__).parent / "tests" / "data" / name
    assert_identical(*astropy_and_ours(path))


def test_tiles_that_would_not_quantize_are_read_from_the_lossless_column(tmp_path: Path) -> None:
    data = sky("float32")
    data[:16, :16] = 5.0  # a constant tile: cfitsio stores it gzip-compressed, unquantized
    path = write_compressed(tmp_path / "c.fits.fz", data, compression_type="RICE_1", tile_shape=(16, 16),
                            quantize_method=1, dither_seed=9)
    expected, got = astropy_and_ours(path)
    assert_identical(expected, got)
    assert (got[:16, :16] == 5.0).all()


@pytest.mark.parametrize("algorithm", ["GZIP_1", "GZIP_2"])
def test_lossless_float_tiles_match_astropy(tmp_path: Path, algorithm: str) -> None:
    data = sky("float32")
    data[3, 3] = np.nan
    path = write_compressed(tmp_path / "l.fits.fz", data, compression_type=algorithm, quantize_level=0.0)
    expected, got = astropy_and_ours(path)
    assert_identical(expected, got)
    np.testing.assert_array_equal(got, data)


def test_blank_integer_pixels_stay_missing(tmp_path: Path) -> None:
    data = sky("int16")
    data[3, 3] = -999
    header = fits.Header([("BLANK", -999)])
    path = write_compressed(tmp_path / "b.fits.fz", data, header=header, compression_type="RICE_1")
    assert_identical(*astropy_and_ours(path))
    image, _ = dl.read_image(path)
    assert np.isnan(image[3, 3]) and np.isfinite(np.delete(image.ravel(), 3 * SHAPE[1] + 3)).all()


@pytest.mark.parametrize("options", [{"compression_type": "HCOMPRESS_1"}, {"compression_type": "PLIO_1"}])
def test_layouts_it_does_not_cover_are_left_to_astropy(tmp_path: Path, options: dict) -> None:
    path = write_compressed(tmp_path / "h.fits.fz", sky("int16"), **options)
    with fits.open(path) as hdul:
        location = hdul[1].fileinfo()
    assert tiled_fits.read_layout(path, location["hdrLoc"], location["datLoc"], None) is None
    np.testing.assert_array_equal(dl.read_image(path)[0], sky("int16").astype(np.float32))


def test_load_sample_is_the_same_with_either_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = sky("float32")
    data[10:12, 20:30] = np.nan
    path = write_compressed(tmp_path / "s.fits.fz", data, compression_type="RICE_1", quantize_method=1)
    ours = dl.load_sample(path)
    monkeypatch.setattr(tiled_fits, "read_layout", lambda *args: None)
    theirs = dl.load_sample(path)
    np.testing.assert_array_equal(ours.image, theirs.image)
    np.testing.assert_array_equal(ours.features, theirs.features)
    assert ours.info == theirs.info and ours.info["original_dtype"] == "float32"


def _heap_start(path: Path) -> tuple[int, int]:
    with fits.open(path, disable_image_compression=True) as hdul:
        table = hdul[1]
        return table.fileinfo()["datLoc"], table.header["NAXIS1"] * table.header["NAXIS2"]


def test_corrupt_tile_stream_names_the_file_and_the_tile(tmp_path: Path) -> None:
    path = write_compressed(tmp_path / "bad.fits.fz", sky("int16"), compression_type="RICE_1")
    table_start, table_bytes = _heap_start(path)
    raw = bytearray(path.read_bytes())
    heap = table_start + table_bytes
    raw[heap:heap + 200] = b"\xff" * 200  # the first tiles' streams: garbage
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageLoadError, match=r"bad\.fits\.fz.*tile 0 \(RICE_1\)"):
        dl.read_image(path)


def test_tile_descriptor_outside_the_heap_is_refused(tmp_path: Path) -> None:
    path = write_compressed(tmp_path / "far.fits.fz", sky("int16"), compression_type="RICE_1")
    table_start, _ = _heap_start(path)
    raw = bytearray(path.read_bytes())
    raw[table_start + 4:table_start + 8] = (10**8).to_bytes(4, "big")  # first tile's heap offset
    path.write_bytes(bytes(raw))
    with pytest.raises(ImageLoadError, match=r"far\.fits\.fz.*outside the heap"):
        dl.read_image(path)


def test_truncated_compressed_file_is_refused_before_any_tile_is_mapped(tmp_path: Path) -> None:
    path = write_compressed(tmp_path / "short.fits.fz", sky("int16"), compression_type="RICE_1")
    path.write_bytes(path.read_bytes()[:-3000])
    with pytest.raises(ImageLoadError, match=r"short\.fits\.fz.*truncated"):
        dl.load_sample(path)


def test_dither_sequence_is_the_fits_standard_one() -> None:
    randoms = tiled_fits.dither_randoms()
    assert randoms.dtype == np.float32 and randoms.shape == (tiled_fits.N_RANDOM,)
    assert randoms[0] == np.float32(16807 / 2147483647)  # the generator's first step, by hand
    assert randoms.min() > 0.0 and randoms.max() < 1.0


@pytest.mark.parametrize("algorithm", ["RICE_1", "HCOMPRESS_1"])  # ours, and astropy's non-reentrant one
def test_two_decode_threads_read_the_same_pixels_as_one(tmp_path: Path, algorithm: str) -> None:
    paths = [write_compressed(tmp_path / f"t{i}.fits.fz", sky("int16") + i, compression_type=algorithm,
                              tile_shape=(16, 150)) for i in range(4)]
    expected = [dl.read_image(path)[0] for path in paths]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda i: dl.read_image(paths[i % 4])[0], range(40)))
    for i, image in enumerate(results):
        np.testing.assert_array_equal(image, expected[i % 4])
