"""Result records and the files they go to: JSON Lines checkpoint, final JSON/JSONL report.

A run appends every record to ``<output>.partial.jsonl`` (flushed and fsynced
per batch). Each start of the run (first, or ``--resume``) opens a *session*
with a header line; within a session records are in scan order. The final
report is a k-way merge of the sessions (the latest record of a path wins),
streamed into a temp file and moved into place with ``os.replace``: memory is
O(sessions), and a killed run leaves the old report or none, never a torn one.
"""

from __future__ import annotations

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

    @classmethod
    def failure(cls, path: str, error: str, fingerprint: FileFingerprint | None) -> PredictionRecord:
        return cls(path=path, label=None, score=None, top_class=None, abstained=None, probs=None,
                   timestamp=utc_now(), fingerprint=fingerprint.value if fingerprint else None,
                   size=fingerprint.size if fingerprint else None,
                   mtime=fingerprint.mtime_ns / 1e9 if fingerprint else None, error=error)

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


class AtomicWriter:
    """Write a text file via a temp file in the same directory, fsync, then ``os.replace``."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self._handle: io.TextIOWrapper | None = None
        self._temp_name = ""

    def __enter__(self) -> io.TextIOWrapper:
        fd, self._temp_name = tempfile.mkstemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; a report should get the usual permissions
        self._handle = os.fdopen(fd, "w", encoding="utf-8")
        return self._handle

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        assert self._handle is not None
        try:
            if exc_type is None:
                self._handle.flush()
                os.fsync(self._handle.fileno())
            self._handle.close()
            if exc_type is None:
                os.replace(self._temp_name, self.target)
                fsync_directory(self.target.parent)
        finally:
            if os.path.exists(self._temp_name):
                os.unlink(self._temp_name)


# --------------------------------------------------------------------------- checkpoint


def checkpoint_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial.jsonl")


def sort_key(relative: str) -> tuple[str, ...]:
    """Scan order: a directory's entries by name, depth first (path components compared in turn)."""
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


def write_report(output: Path, meta: dict[str, Any], records: Iterable[dict[str, Any]], output_format: str,
                 include_probs: bool) -> None:
    """Stream ``meta`` and ``records`` into ``output`` atomically (JSON object or JSON Lines)."""
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
