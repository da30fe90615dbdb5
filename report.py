"""Result records and the files they go to: JSON Lines checkpoint, final JSON/JSONL report.

A run appends every record to ``<output>.partial.jsonl`` (flushed and fsynced
per batch). Each start of the run (first, or ``--resume``) opens a *session*
with a header line; within a session records are in scan order. The final
report is a k-way merge of the sessions (the latest record of a path wins),
streamed into a temp file and moved into place with ``os.replace``: memory is
O(sessions), and a killed run leaves the old report or none, never a torn one.
"""

from __future__ import annotations

import contextlib
import heapq
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SCHEMA_VERSION = "1.0"
UNKNOWN = "unknown"
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "report.schema.json"


class CheckpointError(Exception):
    """A checkpoint exists that cannot be used as asked (other settings, or no --resume)."""


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class FileFingerprint:
    """Identity of a file's content for re-runs: size and modification time (ns)."""

    size: int
    mtime_ns: int

    @property
    def value(self) -> str:
        return f"{self.size}-{self.mtime_ns}"

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileFingerprint | None:
        try:
            stat = os.stat(path)
        except OSError:
            return None
        return cls(stat.st_size, stat.st_mtime_ns)


@dataclass(frozen=True)
class PredictionRecord:
    """One file's result. ``label`` is the reported class (``unknown`` when abstained), ``None`` on error."""

    path: str
    label: str | None
    score: float | None
    top_class: str | None
    abstained: bool | None
    probs: dict[str, float] | None
    timestamp: str
    fingerprint: str | None
    size: int | None
    mtime: float | None
    error: str | None
    reused: bool = False
    abstain_reason: str | None = None  # "low_score" or "out_of_distribution" when abstained
    prediction_set: list[str] | None = None  # conformal set, most probable first (None: no sets calibrated)
    sky: dict[str, float] | None = None  # {"ra", "dec"}: ICRS degrees of the image centre (FITS with a WCS)
    header: dict[str, Any] | None = None  # chosen FITS header cards (None for TIFF/JPEG/PNG)
    hdu: dict[str, Any] | None = None  # {"index", "extname"} of the FITS HDU read (None for TIFF/JPEG/PNG)

    @classmethod
    def failure(cls, path: str, error: str, fingerprint: FileFingerprint | None,
                hdu: dict[str, Any] | None = None) -> PredictionRecord:
        return cls(path=path, label=None, score=None, top_class=None, abstained=None, probs=None,
                   timestamp=utc_now(), fingerprint=fingerprint.value if fingerprint else None,
                   size=fingerprint.size if fingerprint else None,
                   mtime=fingerprint.mtime_ns / 1e9 if fingerprint else None, error=error, hdu=hdu)

    def to_json(self, include_probs: bool = True) -> dict[str, Any]:
        """The record as the report schema spells it (``class`` for the label)."""
        return {
            "path": self.path,
            "class": self.label,
            "score": self.score,
            "top_class": self.top_class,
            "abstained": self.abstained,
            "abstain_reason": self.abstain_reason,
            "prediction_set": self.prediction_set,
            "sky": self.sky,
            "header": self.header,
            "hdu": self.hdu,
            **({"probs": self.probs} if include_probs else {}),
            "timestamp": self.timestamp,
            "fingerprint": self.fingerprint,
            "size": self.size,
            "mtime": self.mtime,
            "error": self.error,
            "reused": self.reused,
        }


@dataclass
class Counts:
    total: int = 0
    classified: int = 0
    abstained: int = 0
    errors: int = 0
    reused: int = 0

    def add(self, record: dict[str, Any]) -> None:
        self.total += 1
        self.reused += bool(record.get("reused"))
        if record["error"] is not None:
            self.errors += 1
        elif record["abstained"]:
            self.abstained += 1
        else:
            self.classified += 1

    def as_json(self, abstain: bool) -> dict[str, Any]:
        decided = self.classified + self.abstained
        return {
            "counts": {"total": self.total, "classified": self.classified, "abstained": self.abstained,
                       "errors": self.errors, "reused": self.reused, "new": self.total - self.reused},
            "coverage": (self.classified / decided if decided else None) if abstain else None,
        }


# --------------------------------------------------------------------------- atomic files


def fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(output: Path) -> None:
    """Fail before any inference is spent when the output's directory cannot take a file."""
    directory = output.parent
    if not directory.is_dir():
        raise OSError(f"{directory}: output directory does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=f".{output.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise OSError(f"{directory}: output directory is not writable ({exc.strerror or exc})") from exc


def _process_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before worker threads exist
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temp path in ``target``'s directory to write; on success it is fsynced and moved onto ``target``
    with ``os.replace``, on failure removed. A reader sees the old file or the new one, never a torn one."""
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a report should get the usual permissions
    os.close(fd)
    try:
        yield Path(temp_name)
        with open(temp_name, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp_name, target)
        fsync_directory(target.parent)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)


@contextlib.contextmanager
def AtomicWriter(target: Path) -> Iterator[io.TextIOWrapper]:
    """A text handle on :func:`atomic_path`."""
    with atomic_path(target) as temp, open(temp, "w", encoding="utf-8") as handle:
        yield handle


def write_json_atomic(path: Path, document: Any) -> None:
    """``document`` as indented JSON at ``path``, through :func:`AtomicWriter` (thresholds, evaluations)."""
    with AtomicWriter(path.absolute()) as handle:
        json.dump(document, handle, indent=2)


# --------------------------------------------------------------------------- checkpoint


def checkpoint_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial.jsonl")


HDU_KEY = "/#{:05d}"  # appended to a file's key for one of its HDUs: "/" cannot occur in a file name


def sort_key(relative: str) -> tuple[str, ...]:
    """Scan order: a directory's entries by name, depth first (path components compared in turn); a file's HDUs
    (``HDU_KEY``) follow the file in index order."""
    return tuple(relative.split("/"))


class Checkpoint:
    """Append-only JSON Lines journal of one run, possibly spanning several sessions."""

    def __init__(self, path: Path, run_key: dict[str, Any]) -> None:
        self.path = path
        self.run_key = run_key
        self._handle: io.BufferedWriter | None = None

    def done_fingerprints(self) -> dict[str, str | None]:
        """Relative path -> fingerprint of what the checkpoint holds; checks settings, repairs a torn tail."""
        done: dict[str, str | None] = {}
        for kind, data in self._read_lines(repair=True):
            if kind == "header" and data["run_key"] != self.run_key:
                raise CheckpointError(
                    f"{self.path}: checkpoint was written with other settings "
                    f"({_diff_keys(data['run_key'], self.run_key)}); delete it or rerun with the same arguments"
                )
            if kind == "record":
                done[data["relative_path"]] = data["fingerprint"]
        return done

    def open_session(self, started_at: str) -> None:
        self._handle = open(self.path, "ab")  # noqa: SIM115 - held open across batches, closed in close()
        self._write_lines([{"kind": "header", "run_key": self.run_key, "started_at": started_at}])

    def append(self, records: Iterable[tuple[str, dict[str, Any]]]) -> None:
        """Append (relative path, record json) pairs and make them durable."""
        self._write_lines({"kind": "record", "relative_path": rel, **rec} for rel, rec in records)

    def _write_lines(self, lines: Iterable[dict[str, Any]]) -> None:
        assert self._handle is not None, "open_session first"
        payload = b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines)
        if payload:
            self._handle.write(payload)
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def first_started_at(self) -> str | None:
        for kind, data in self._read_lines(repair=False):
            if kind == "header":
                return data.get("started_at")
        return None

    def _read_lines(self, repair: bool) -> Iterator[tuple[str, dict[str, Any]]]:
        if not self.path.exists():
            return
        good_end = 0
        with open(self.path, "rb") as handle:
            for raw in handle:
                try:
                    data = json.loads(raw)
                    if not raw.endswith(b"\n"):
                        raise ValueError("no newline")
                except ValueError:
                    logger.warning("%s: dropping a torn line at byte %d", self.path, good_end)
                    break
                good_end += len(raw)
                yield data.pop("kind"), data
        if repair and good_end < self.path.stat().st_size:
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)

    def _sessions(self) -> list[tuple[int, int]]:
        """Byte ranges (start, end) of each session's records: from after its header to the next header."""
        headers: list[tuple[int, int]] = []  # (where the header line begins, where it ends)
        offset = 0
        with open(self.path, "rb") as handle:
            for raw in handle:
                if b'"header"' in raw and json.loads(raw).get("kind") == "header":
                    headers.append((offset, offset + len(raw)))
                offset += len(raw)
        ends = [begin for begin, _ in headers[1:]] + [offset]
        return [(after, end) for (_, after), end in zip(headers, ends)]

    def merged_records(self) -> Iterator[dict[str, Any]]:
        """Every path once, in scan order; a later session's record replaces an earlier one."""
        streams = [self._session_records(index, start, end) for index, (start, end) in enumerate(self._sessions())]
        pending: tuple[tuple[str, ...], int, dict[str, Any]] | None = None
        for key, session, record in heapq.merge(*streams, key=lambda item: (item[0], item[1])):
            if pending is not None and pending[0] != key:
                yield pending[2]
            pending = (key, session, record)
        if pending is not None:
            yield pending[2]

    def _session_records(self, session: int, start: int, end: int) -> Iterator[tuple[tuple[str, ...], int, dict]]:
        with open(self.path, "rb") as handle:
            handle.seek(start)
            while handle.tell() < end:
                raw = handle.readline()
                if not raw:
                    break
                data = json.loads(raw)
                data.pop("kind")
                relative = data.pop("relative_path")
                yield sort_key(relative), session, data


def _diff_keys(old: dict[str, Any], new: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                     if old.get(k) != new.get(k))


# --------------------------------------------------------------------------- final report


JSON_FORMATS = ("json", "jsonl")
TABLE_FORMATS = {"ecsv": "ascii.ecsv", "fits": "fits", "votable": "votable", "csv": "ascii.csv"}  # astropy names
OUTPUT_FORMATS = (*JSON_FORMATS, *TABLE_FORMATS)
_FORMAT_OF_SUFFIX = {".json": "json", ".jsonl": "jsonl", ".ecsv": "ecsv", ".fits": "fits", ".fit": "fits",
                     ".vot": "votable", ".votable": "votable", ".xml": "votable", ".csv": "csv"}


def format_of(path: Path) -> str:
    """The report format a file name asks for (``.ecsv``, ``.fits``, ``.vot``/``.xml``, ``.csv``, ``.json[l]``)."""
    try:
        return _FORMAT_OF_SUFFIX[path.suffix.lower()]
    except KeyError:
        raise ValueError(f"{path}: unknown report extension; use one of {', '.join(_FORMAT_OF_SUFFIX)}") from None


def write_report(output: Path, meta: dict[str, Any], records: Iterable[dict[str, Any]], output_format: str,
                 include_probs: bool) -> None:
    """Stream ``meta`` and ``records`` into ``output`` atomically: a JSON object, JSON Lines, or a table
    (ECSV, FITS binary table, VOTable, CSV) that TOPCAT and astropy open as it is."""
    if output_format in TABLE_FORMATS:
        table = results_table(meta, records, include_probs)
        with atomic_path(output) as temp:
            _write_table(table, meta, temp, output_format)
        return
    with AtomicWriter(output) as handle:
        if output_format == "jsonl":
            handle.write(json.dumps({"meta": meta}) + "\n")
            for record in records:
                handle.write(json.dumps(_shape(record, include_probs)) + "\n")
            return
        handle.write('{"meta": ' + json.dumps(meta, indent=1) + ',\n"results": [')
        for index, record in enumerate(records):
            handle.write(("\n" if index == 0 else ",\n") + json.dumps(_shape(record, include_probs)))
        handle.write("\n]}\n")


def results_table(meta: dict[str, Any], records: Iterable[dict[str, Any]], include_probs: bool) -> Any:
    """The records as an astropy Table: one row per file, nulls masked, ``prediction_set`` as ``a|b``, ``header``
    as JSON text, one ``prob_<class>`` column per class (``meta`` gives the class names)."""
    from astropy.table import Table

    names = list(meta["class_names"])
    columns: dict[str, list[Any]] = {key: [] for key in _TABLE_COLUMNS}
    columns.update({f"prob_{name}": [] for name in names} if include_probs else {})
    for row in records:
        flat = {**row, "ra": (row.get("sky") or {}).get("ra"), "dec": (row.get("sky") or {}).get("dec"),
                "hdu": (row.get("hdu") or {}).get("index"), "extname": (row.get("hdu") or {}).get("extname"),
                "prediction_set": (None if row.get("prediction_set") is None  # no sets; "" is an empty set
                                   else "|".join(row["prediction_set"])),
                "header": json.dumps(row["header"]) if row.get("header") is not None else None}
        for name in names if include_probs else ():
            flat[f"prob_{name}"] = (row.get("probs") or {}).get(name)
        for key, values in columns.items():
            values.append(flat.get(key))
    table = Table()
    for key, values in columns.items():
        table[key] = _masked_column(key, values)
    return table


def _write_table(table: Any, meta: dict[str, Any], path: Path, output_format: str) -> None:
    """Write with the report meta where each format keeps it: ECSV as it is (YAML), a FITS header card as JSON
    text, a VOTable INFO as JSON text (an attribute: nothing re-wraps it); CSV has no place for it."""
    text = json.dumps(meta)
    if output_format == "votable":
        from astropy.io.votable import from_table
        from astropy.io.votable.tree import Info

        votable = from_table(table)
        votable.get_first_table().infos.append(Info(name=REPORT_META_KEY, value=text))
        votable.to_xml(str(path))
        return
    table.meta = {"ecsv": {REPORT_META_KEY: meta}, "fits": {"RPTMETA": text}}.get(output_format, {})
    table.write(path, format=TABLE_FORMATS[output_format], overwrite=True)


def read_table_meta(path: Path) -> dict[str, Any] | None:
    """The report meta a table written by :func:`write_report` carries (None for CSV)."""
    output_format = format_of(path)
    if output_format == "votable":
        from astropy.io.votable import parse

        infos = [info for info in parse(str(path)).get_first_table().infos if info.name == REPORT_META_KEY]
        return json.loads(infos[0].value) if infos else None
    if output_format == "fits":
        from astropy.io import fits

        text = fits.getheader(path, 1).get("RPTMETA")
        return json.loads(text) if text else None
    if output_format == "ecsv":
        from astropy.table import Table

        return Table.read(path, format=TABLE_FORMATS["ecsv"]).meta.get(REPORT_META_KEY)
    return None


REPORT_META_KEY = "report_meta"
_TABLE_COLUMNS = ("path", "hdu", "extname", "class", "score", "top_class", "abstained", "abstain_reason",
                  "prediction_set", "ra", "dec",
                  "header", "timestamp", "fingerprint", "size", "mtime", "error", "reused")
_FILL = {float: np.nan, int: -1, bool: False, str: ""}


def _masked_column(name: str, values: list[Any]) -> Any:
    """One table column with None masked (and filled with a value of the column's type)."""
    from astropy.table import MaskedColumn

    present = [v for v in values if v is not None]
    kind = float if name in ("score", "ra", "dec", "mtime") or name.startswith("prob_") else \
        type(present[0]) if present else str
    fill = _FILL.get(kind, "")
    data = [fill if v is None else v for v in values]
    return MaskedColumn(data, name=name, mask=[v is None for v in values], dtype=kind if kind is not str else str)


def _shape(record: dict[str, Any], include_probs: bool) -> dict[str, Any]:
    if not include_probs:
        record = {k: v for k, v in record.items() if k != "probs"}
    return record


def read_report(path: Path) -> tuple[dict[str, Any], Iterator[dict[str, Any]]]:
    """Meta and records of a JSON or JSON Lines report (used for incremental runs and tests)."""
    with open(path, encoding="utf-8") as handle:
        first = handle.readline()
        try:
            head = json.loads(first)
        except ValueError:
            head = None
    if isinstance(head, dict) and set(head) == {"meta"}:
        def lines() -> Iterator[dict[str, Any]]:
            with open(path, encoding="utf-8") as stream:
                stream.readline()
                for line in stream:
                    if line.strip():
                        yield json.loads(line)
        return head["meta"], lines()
    with open(path, encoding="utf-8") as handle:
        document = json.load(handle)
    return document["meta"], iter(document["results"])


def load_schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as handle:
        return json.load(handle)
