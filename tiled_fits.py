"""Decode tile-compressed FITS images (``.fits.fz``, ``CompImageHDU``) with the GIL released.

astropy decodes one tile per C call wrapped in ~12 us of Python. With fpack's
default one-row tiles that is 2,048 GIL hand-offs for a 2048x2048 image, and two
decode threads ran no faster than one (1.01x measured). Here the Python around a
tile is a few slices, the codecs (imagecodecs' Rice, zlib) run without the GIL,
and dequantization covers many tiles per numpy call.

Covered: 2-D images; RICE_1, GZIP_1, GZIP_2 and NOCOMPRESS tiles; integer data and
quantized floats (NO_DITHER, SUBTRACTIVE_DITHER_1/2, per-tile ZBLANK). Anything
else (HCOMPRESS, PLIO, cubes, tiles stored uncompressed as a fallback, unusual
column types) gives ``None`` and the caller decodes with astropy. The output is
identical to astropy's ``CompImageHDU.data`` read with ``do_not_scale_image_data``
(the tests compare them pixel for pixel).
"""

from __future__ import annotations

import functools
import logging
import math
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

ALGORITHMS = ("RICE_1", "RICE_ONE", "GZIP_1", "GZIP_2", "NOCOMPRESS")
DITHER_METHODS = {"NO_DITHER": -1, "SUBTRACTIVE_DITHER_1": 1, "SUBTRACTIVE_DITHER_2": 2}
N_RANDOM = 10_000  # length of the FITS standard's dither sequence
ZERO_VALUE = -2147483646  # SUBTRACTIVE_DITHER_2's code for an exact 0.0
SHORTEST_DITHER_RUN = N_RANDOM - 499  # a tile this small never wraps to the next dither seed
BAND_PIXELS = 1 << 18  # dequantize about this many pixels per numpy call: bounded temporaries
_INTEGER_DTYPES = {8: np.uint8, 16: np.int16, 32: np.int32, 64: np.int64}
_FLOAT_DTYPES = {-32: np.float32, -64: np.float64}
_RICE_DTYPES = {1: np.uint8, 2: np.int16, 4: np.int32}
_COLUMN_BYTES = {"L": 1, "B": 1, "A": 1, "I": 2, "J": 4, "K": 8, "E": 4, "D": 8, "C": 8, "M": 16, "P": 8, "Q": 16}
_TFORM = re.compile(r"^\s*(\d*)([LBAIJKEDCMPQ])(.*)$")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileLayout:
    """Where a compressed image's tile table and heap lie, and how to decode its tiles."""

    shape: tuple[int, int]  # image rows, columns
    tile: tuple[int, int]  # tile rows, columns (edge tiles are cut to the image)
    algorithm: str
    zbitpix: int
    rice: tuple[int, int]  # RICE blocksize, bytes per pixel
    table_start: int  # absolute file offset of the tile table
    row_bytes: int
    heap_start: int  # absolute file offset of the heap
    heap_size: int
    columns: dict[str, tuple[int, str]]  # name -> (byte offset in a table row, TFORM type letter)
    dither: int | None  # None: not quantized; else a DITHER_METHODS value
    dither_seed: int
    zblank: int | None  # header ZBLANK (quantized) or BLANK (integer data)

    @property
    def n_tiles(self) -> tuple[int, int]:
        return math.ceil(self.shape[0] / self.tile[0]), math.ceil(self.shape[1] / self.tile[1])

    @property
    def tile_count(self) -> int:  # = table rows
        return self.n_tiles[0] * self.n_tiles[1]

    @property
    def out_dtype(self) -> type[np.generic]:
        return _FLOAT_DTYPES[self.zbitpix] if self.zbitpix < 0 else _INTEGER_DTYPES[self.zbitpix]


class _Uncovered(Exception):
    """A layout this module leaves to astropy; the message says why (logged at DEBUG)."""


def read_layout(path: Path, header_offset: int, data_offset: int, image_blank: int | None) -> TileLayout | None:
    """The layout of the compressed-image table whose header starts at ``header_offset``, or None when
    this module does not cover it. Header work only (astropy parses it); no tile is read."""
    from astropy.io import fits

    with open(path, "rb") as handle:
        handle.seek(header_offset)
        header = fits.Header.fromfile(handle)
    try:
        return _layout_from_header(header, data_offset, image_blank)
    except _Uncovered as reason:
        logger.debug("%s: tile-compressed image left to astropy: %s", path, reason)
    except (KeyError, TypeError, ValueError) as exc:  # odd keyword values: astropy's decoder judges them
        logger.debug("%s: tile-compressed image left to astropy: header: %s", path, exc)
    return None


def _layout_from_header(header: Any, data_offset: int, image_blank: int | None) -> TileLayout:
    algorithm, zbitpix, rice = _codec(header)
    shape, tile, n_rows = _grid(header)
    columns, row_bytes = _column_positions(header)
    if row_bytes != header.get("NAXIS1"):
        raise _Uncovered(f"table rows of {header.get('NAXIS1')} bytes, columns of {row_bytes}")
    dither, dither_seed, zblank = _quantization(header, columns, image_blank)
    heap_start = int(header.get("THEAP", row_bytes * n_rows))  # PCOUNT counts any gap before the heap
    heap_size = int(header.get("PCOUNT", 0)) + row_bytes * n_rows - heap_start
    if heap_size < 0:
        raise _Uncovered(f"THEAP {heap_start} lies past the heap")
    return TileLayout(
        shape=shape, tile=tile, algorithm=algorithm, zbitpix=zbitpix, rice=rice, table_start=data_offset,
        row_bytes=row_bytes, heap_start=data_offset + heap_start, heap_size=heap_size, columns=columns,
        dither=dither, dither_seed=dither_seed, zblank=zblank,
    )


def _codec(header: Any) -> tuple[str, int, tuple[int, int]]:
    """The compression algorithm, ZBITPIX and the Rice (blocksize, bytes per pixel)."""
    algorithm = str(header.get("ZCMPTYPE", "")).strip().upper()
    zbitpix = header.get("ZBITPIX")
    if header.get("ZIMAGE") is not True or algorithm not in ALGORITHMS:
        raise _Uncovered(f"compression {algorithm or 'missing'}")
    if zbitpix not in _INTEGER_DTYPES and zbitpix not in _FLOAT_DTYPES:
        raise _Uncovered(f"ZBITPIX {zbitpix}")
    rice = (_compression_setting(header, "BLOCKSIZE", 32), _compression_setting(header, "BYTEPIX", 4))
    if algorithm.startswith("RICE") and rice[1] not in _RICE_DTYPES:
        raise _Uncovered(f"Rice BYTEPIX {rice[1]}")
    return algorithm, zbitpix, rice


def _grid(header: Any) -> tuple[tuple[int, int], tuple[int, int], int]:
    """Image shape, tile shape (default: one row per tile) and the tile count, checked against the table."""
    if header.get("ZNAXIS") != 2:
        raise _Uncovered(f"ZNAXIS {header.get('ZNAXIS')} (only 2-D images)")
    shape = (int(header["ZNAXIS2"]), int(header["ZNAXIS1"]))
    tile = (int(header.get("ZTILE2", 1)), int(header.get("ZTILE1", shape[1])))
    if min(shape) < 1 or min(tile) < 1:
        raise _Uncovered(f"image {shape}, tiles {tile}")
    n_rows = math.ceil(shape[0] / tile[0]) * math.ceil(shape[1] / tile[1])
    if n_rows != header.get("NAXIS2"):
        raise _Uncovered(f"{header.get('NAXIS2')} table rows for {n_rows} tiles")
    return shape, tile, n_rows


def _quantization(header: Any, columns: dict[str, tuple[int, str]], image_blank: int | None
                  ) -> tuple[int | None, int, int | None]:
    """(dither method or None when not quantized, ZDITHER0, the blank code)."""
    if "ZSCALE" in header or "ZZERO" in header:
        raise _Uncovered("one ZSCALE/ZZERO for every tile")
    zblank = header.get("ZBLANK", image_blank)
    zblank = None if zblank is None else int(zblank)
    if "ZSCALE" not in columns:
        if "ZBLANK" in columns or zblank != image_blank:
            raise _Uncovered("integer data with a ZBLANK of its own")
        return None, 0, zblank
    method = str(header.get("ZQUANTIZ", "NO_DITHER")).strip().upper()
    dither_seed = int(header.get("ZDITHER0", 0))
    if method not in DITHER_METHODS or (DITHER_METHODS[method] > 0 and dither_seed < 1):
        raise _Uncovered(f"ZQUANTIZ {method} with ZDITHER0 {dither_seed}")
    return DITHER_METHODS[method], dither_seed, zblank


def _compression_setting(header: Any, name: str, default: int) -> int:
    """ZNAMEn/ZVALn pairs hold the codec's parameters, in any order."""
    for i in range(1, 1000):
        if f"ZNAME{i}" not in header:
            break
        if str(header[f"ZNAME{i}"]).upper() == name:
            return int(header.get(f"ZVAL{i}", default))
    return default


def _column_positions(header: Any) -> tuple[dict[str, tuple[int, str]], int]:
    """Byte offset and type (letter, plus the array type of P/Q descriptors) of each table column, and
    the row length, from TTYPEn/TFORMn; only the column layouts cfitsio and astropy write are covered."""
    columns, offset = {}, 0
    for i in range(1, int(header.get("TFIELDS", 0)) + 1):
        match = _TFORM.match(str(header.get(f"TFORM{i}", "")))
        if match is None:
            raise _Uncovered(f"TFORM{i} {header.get(f'TFORM{i}')!r}")
        repeat, letter, rest = match.groups()
        columns[str(header.get(f"TTYPE{i}", "")).strip().upper()] = (offset, letter + rest[:1])
        offset += (int(repeat) if repeat else 1) * _COLUMN_BYTES[letter]
    if not _columns_covered(columns):
        raise _Uncovered(f"columns {columns}")
    return columns, offset


def _columns_covered(columns: dict[str, tuple[int, str]]) -> bool:
    """Tiles as byte streams with 32/64-bit descriptors; scales as doubles, ZBLANK as 32-bit ints."""
    streams = ("PB", "QB")
    expected = {"COMPRESSED_DATA": streams, "GZIP_COMPRESSED_DATA": streams, "ZSCALE": ("D",), "ZZERO": ("D",),
                "ZBLANK": ("J",)}
    if columns.get("COMPRESSED_DATA", (0, ""))[1] not in streams:
        return False
    return all(columns[name][1] in kinds for name, kinds in expected.items() if name in columns)


def decode(path: Path, layout: TileLayout) -> np.ndarray | None:
    """The image as astropy's ``CompImageHDU.data`` gives it unscaled, or None when a tile is stored in a
    way this module leaves to astropy (uncompressed, or losslessly beside integer data).

    Raises ValueError naming the tile when a tile descriptor or stream is corrupt.
    """
    n_rows = layout.tile_count
    heap_offset = layout.heap_start - layout.table_start
    region = np.memmap(path, dtype=np.uint8, mode="r", offset=layout.table_start,
                       shape=(heap_offset + layout.heap_size,))
    table = np.array(region[:n_rows * layout.row_bytes]).reshape(n_rows, layout.row_bytes)
    heap = np.asarray(region[heap_offset:])  # plain ndarray: slicing a memmap costs ~2 us per tile
    tiles = _tile_streams(table, layout, "COMPRESSED_DATA")
    # cfitsio stores a float tile that would not quantize (constant, say) losslessly, in GZIP_COMPRESSED_DATA
    lossless = [index for index, count, _ in tiles if count == 0]
    if lossless and (layout.dither is None or "GZIP_COMPRESSED_DATA" not in layout.columns):
        return None
    quantized = layout.dither is not None
    plane = np.zeros(layout.shape, dtype=np.int32 if quantized else layout.out_dtype)
    _decode_tiles(heap, [tile for tile in tiles if tile[1]], plane, layout.algorithm, layout)
    if not quantized:
        return plane
    image = _dequantize(plane, table, layout)
    if lossless:
        stored = _tile_streams(table, layout, "GZIP_COMPRESSED_DATA")
        _decode_tiles(heap, [stored[index] for index in lossless], image, "GZIP_1", layout)
    return image


def _tile_streams(table: np.ndarray, layout: TileLayout, column: str) -> list[tuple[int, int, int]]:
    """(tile index, byte count, heap offset) of each tile's stream in ``column``, checked against the heap."""
    pairs = _column_values(table, layout, column, ">i4" if layout.columns[column][1].startswith("P") else ">i8", 2)
    counts, offsets = pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)
    if (counts < 0).any() or (offsets < 0).any() or (offsets + counts > layout.heap_size).any():
        raise ValueError(f"a {column} tile descriptor points outside the heap")
    return list(zip(range(len(counts)), counts.tolist(), offsets.tolist()))


def _column_values(table: np.ndarray, layout: TileLayout, name: str, dtype: str, repeat: int = 1
                   ) -> np.ndarray | None:
    """Column ``name`` of every table row as native ``dtype`` (``repeat`` values per row: 2-D), or None."""
    if name not in layout.columns:
        return None
    offset = layout.columns[name][0]
    values = table[:, offset:offset + repeat * np.dtype(dtype).itemsize].copy().view(dtype).astype(dtype[1:])
    return values.ravel() if repeat == 1 else values


def _decode_tiles(heap: np.ndarray, tiles: list[tuple[int, int, int]], plane: np.ndarray, algorithm: str,
                  layout: TileLayout) -> None:
    """Each tile straight into its place in ``plane``; the codec calls release the GIL.

    This loop runs once per tile (2,048 times for fpack's row tiles of a 2048^2 image): what the GIL
    holds here is what two decode threads wait on, so it is kept to slicing and one codec call.
    """
    tile_rows, tile_cols = layout.tile
    tiles_across = layout.n_tiles[1]
    decode_tile = _tile_decoder(algorithm, layout, lossless=layout.dither is None or plane.dtype.kind == "f")
    for index, count, offset in tiles:
        row, column = divmod(index, tiles_across)
        target = plane[row * tile_rows:(row + 1) * tile_rows, column * tile_cols:(column + 1) * tile_cols]
        try:
            decode_tile(heap[offset:offset + count], target)
        except (RuntimeError, ValueError, zlib.error) as exc:
            raise ValueError(f"tile {index} ({algorithm}): {exc}") from exc


def _tile_decoder(algorithm: str, layout: TileLayout, lossless: bool) -> Callable[[np.ndarray, np.ndarray], None]:
    """A function decoding one tile's stream into its target view of the plane."""
    if not algorithm.startswith("RICE"):
        return lambda stream, target: _store_bytes(_inflate(stream, algorithm, target.size), target,
                                                   layout.zbitpix, lossless)
    import imagecodecs  # ~60 ms to import: only when a Rice-compressed file comes

    blocksize, bytepix = layout.rice
    rice_dtype = _RICE_DTYPES[bytepix]

    def decode_rice(stream: np.ndarray, target: np.ndarray) -> None:
        if target.flags.c_contiguous and target.dtype == rice_dtype:
            imagecodecs.rcomp_decode(stream, nblock=blocksize, out=target)  # full-width tiles: no copy
            return
        decoded = np.empty(target.shape, dtype=rice_dtype)
        imagecodecs.rcomp_decode(stream, nblock=blocksize, out=decoded)
        target[...] = decoded

    return decode_rice


def _inflate(stream: np.ndarray, algorithm: str, n_pixels: int) -> bytes | np.ndarray:
    """A GZIP/NOCOMPRESS tile's big-endian pixel bytes (GZIP_2 stores them byte-plane by byte-plane)."""
    if algorithm == "NOCOMPRESS":
        return stream
    data = zlib.decompress(stream, wbits=zlib.MAX_WBITS | 32)  # gzip or zlib header
    if algorithm == "GZIP_2":
        itemsize = len(data) // n_pixels
        return np.frombuffer(data, dtype=np.uint8).reshape(itemsize, -1).T.ravel()
    return data


def _store_bytes(data: bytes | np.ndarray, target: np.ndarray, zbitpix: int, lossless: bool) -> None:
    """Interpret a tile's bytes by their count per pixel, as cfitsio and astropy do, into ``target``."""
    per_pixel = len(data) // target.size if target.size else 0
    if per_pixel * target.size != len(data) or per_pixel not in (1, 2, 4, 8):
        raise ValueError(f"{len(data)} bytes for a tile of {target.size} pixels")
    float_data = zbitpix < 0 and lossless and per_pixel in (4, 8)
    dtype = {1: "u1", 2: ">i2", 4: ">f4" if float_data else ">i4", 8: ">f8" if float_data else ">i8"}[per_pixel]
    target[...] = np.frombuffer(data, dtype=dtype).reshape(target.shape)


@functools.cache
def dither_randoms() -> np.ndarray:
    """The FITS standard's 10,000 dither values (Park-Miller generator, as cfitsio computes them)."""
    multiplier, modulus, seed = 16807.0, 2147483647.0, 1.0
    values = np.empty(N_RANDOM, dtype=np.float32)
    for i in range(N_RANDOM):
        product = multiplier * seed
        seed = product - modulus * int(product / modulus)
        values[i] = seed / modulus
    if int(seed) != 1043618065:  # the standard's check value
        raise RuntimeError("dither sequence does not match the FITS standard")
    return values


def _dither_run(first_seed: int, start: int, stop: int) -> np.ndarray:
    """Dither values for pixels ``start:stop`` (row-major) of a tile whose sequence starts at ``first_seed``:
    the sequence runs from index int(r[seed] * 500) to the end, then continues from the next seed."""
    randoms = dither_randoms()
    parts, seed, position = [], first_seed, 0
    while position < stop:
        run = randoms[int(randoms[seed] * 500):]
        low, high = max(start - position, 0), min(stop - position, run.size)
        if low < high:
            parts.append(run[low:high])
        position += run.size
        seed = (seed + 1) % N_RANDOM
    return np.concatenate(parts)


def _dequantize(quantized: np.ndarray, table: np.ndarray, layout: TileLayout) -> np.ndarray:
    """Integers back to floats with each tile's ZSCALE/ZZERO and dither, as cfitsio's unquantize does.

    float32 results overwrite the int32 codes band by band (same item size): no second full plane.
    """
    scales = _column_values(table, layout, "ZSCALE", ">f8")
    zeros = _column_values(table, layout, "ZZERO", ">f8")
    if zeros is None:
        zeros = np.zeros_like(scales)
    zblanks = _column_values(table, layout, "ZBLANK", ">i4")
    tile_ids = _tile_ids(layout)
    out = quantized.view(np.float32) if layout.zbitpix == -32 else np.empty(layout.shape, dtype=np.float64)
    band_rows = max(1, BAND_PIXELS // layout.shape[1])
    run_starts = _dither_run_starts(layout)
    for start in range(0, layout.shape[0], band_rows):
        rows = slice(start, start + band_rows)
        ids = tile_ids(rows)
        codes = quantized[rows]
        if layout.dither == DITHER_METHODS["NO_DITHER"]:
            values = codes.astype(np.float64)
        else:  # ((q - dither) + 0.5) in float64, cfitsio's order of operations, so results match bit for bit
            values = np.subtract(codes, _band_dither(layout, rows, ids, run_starts), dtype=np.float64)
            values += 0.5
        values *= scales[ids]
        values += zeros[ids]
        blank = zblanks[ids] if zblanks is not None else layout.zblank
        missing = None if blank is None else codes == blank  # read the codes before the band is overwritten
        exact_zeros = codes == ZERO_VALUE if layout.dither == DITHER_METHODS["SUBTRACTIVE_DITHER_2"] else None
        band = out[rows]
        band[...] = values
        if exact_zeros is not None:
            band[exact_zeros] = 0.0
        if missing is not None:
            band[missing] = np.nan
    return out


def _tile_ids(layout: TileLayout) -> Callable[[slice], np.ndarray]:
    """A function giving, for a band of rows, each pixel's tile index (row-major over the tile grid);
    (rows, 1) when tiles span the full width, so per-tile values broadcast instead of being gathered."""
    tiles_across = layout.n_tiles[1]
    tile_columns = np.arange(layout.shape[1]) // layout.tile[1] if tiles_across > 1 else np.zeros(1, np.int64)

    def ids(rows: slice) -> np.ndarray:
        tile_rows = np.arange(layout.shape[0])[rows] // layout.tile[0]
        return tile_rows[:, None] * tiles_across + tile_columns[None, :]

    return ids


def _dither_run_starts(layout: TileLayout) -> np.ndarray | None:
    """Where each tile's dither values start: seed (tile + ZDITHER0 - 1) mod 10,000 picks index
    int(r[seed] * 500). None when a tile can outlast that run and continue from the next seed."""
    if layout.tile[0] * layout.tile[1] > SHORTEST_DITHER_RUN:
        return None
    randoms = dither_randoms()
    seeds = (np.arange(layout.tile_count) + layout.dither_seed - 1) % N_RANDOM
    return (randoms[seeds] * 500).astype(np.int64)


def _band_dither(layout: TileLayout, rows: slice, ids: np.ndarray, run_starts: np.ndarray | None) -> np.ndarray:
    """Each pixel's dither value. A tile's values run through it in row-major order, so each image row
    of a tile is one contiguous run of the sequence."""
    (tile_rows, tile_cols), (height, width) = layout.tile, layout.shape
    y = np.arange(height)[rows]
    if run_starts is None:
        return _long_tile_dither(layout, y[0], y[-1] + 1)
    randoms = dither_randoms()
    full_tiles = width // tile_cols  # tile columns of full width; a narrower one may follow
    edge = width - full_tiles * tile_cols
    widths = np.array([tile_cols] * full_tiles + ([edge] if edge else []))
    runs = run_starts[ids[:, ::tile_cols]] + (y % tile_rows)[:, None] * widths[None, :]  # (rows, tile columns)
    noise = np.empty((y.size, width), dtype=np.float32)
    if full_tiles:  # copy whole runs: no per-pixel index arrays
        noise[:, :full_tiles * tile_cols] = sliding_window_view(randoms, tile_cols)[runs[:, :full_tiles]].reshape(
            y.size, -1)
    if edge:
        noise[:, full_tiles * tile_cols:] = sliding_window_view(randoms, edge)[runs[:, full_tiles]]
    return noise


def _long_tile_dither(layout: TileLayout, first_row: int, stop_row: int) -> np.ndarray:
    """Dither values for image rows ``first_row:stop_row`` when a tile's sequence may pass through several
    seeds: filled tile by tile, each tile's rows in the band being one contiguous stretch of its sequence."""
    (tile_rows, tile_cols), width = layout.tile, layout.shape[1]
    noise = np.empty((stop_row - first_row, width), dtype=np.float32)
    for tile_row in range(first_row // tile_rows, (stop_row - 1) // tile_rows + 1):
        top, bottom = max(tile_row * tile_rows, first_row), min((tile_row + 1) * tile_rows, stop_row)
        for tile_col in range(layout.n_tiles[1]):
            left, right = tile_col * tile_cols, min((tile_col + 1) * tile_cols, width)
            tile = tile_row * layout.n_tiles[1] + tile_col
            start = (top - tile_row * tile_rows) * (right - left)
            run = _dither_run((tile + layout.dither_seed - 1) % N_RANDOM, start,
                              start + (bottom - top) * (right - left))
            noise[top - first_row:bottom - first_row, left:right] = run.reshape(bottom - top, right - left)
    return noise
