"""The one place the archive app talks to the classifier: per-process service, path confinement, saving results.

Both the ``classify_new_files`` command and the Celery task call :func:`classify_ids`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from archive.models import ArchiveFile
from inference_runner import (
    DEFAULT_MODEL_PATH,
    ClassifierService,
    FileFingerprint,
    PredictionRecord,
    scan_paths,
    sha256_of,
)

logger = logging.getLogger(__name__)

RESULT_FIELDS = ["size", "mtime", "fingerprint", "label", "score", "abstained", "probs", "prediction_set", "ra",
                 "dec", "header", "model_sha256", "classified_fingerprint", "classified_at", "error",
                 "classification_count"]
OUTSIDE_ROOTS = "path is outside ARCHIVE_ROOTS; refused"

_service: ClassifierService | None = None
_service_pid: int | None = None
_service_lock = threading.Lock()


def get_service() -> ClassifierService:
    """The process's ClassifierService, created on first use *in this process*.

    A Celery prefork parent never calls this, so the model runtime (LiteRT, or TensorFlow) is first loaded in
    each child after the fork; the pid check guards against reuse across forks.
    """
    global _service, _service_pid
    with _service_lock:
        if _service is None or _service_pid != os.getpid():
            config = settings.CLASSIFIER
            _service = ClassifierService(config["model_path"], config["scaler_path"], config["thresholds_path"],
                                         intra_op_threads=config["intra_op_threads"],
                                         backend=config.get("backend", "litert"))
            _service_pid = os.getpid()
            logger.info("classifier loaded in process %d (model %s, %s backend)", _service_pid,
                        _service.model_sha256[:12], _service.backend.name)
        return _service


def current_model_sha256() -> str:
    """SHA-256 of the configured model file, without loading TensorFlow."""
    return sha256_of(settings.CLASSIFIER["model_path"] or DEFAULT_MODEL_PATH)


def inside_archive_roots(path: str | os.PathLike[str]) -> Path | None:
    """The resolved path (symlinks followed) if it lies under a configured archive root, else None."""
    real = Path(os.path.realpath(path))
    for root in settings.ARCHIVE_ROOTS:
        if real == root or root in real.parents:
            return real
    return None


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --------------------------------------------------------------------------- registering


def register_tree(root: Path, batch_size: int = 1000) -> dict[str, int]:
    """Upsert one row per image under ``root``: new files created, changed files (fingerprint) updated."""
    counts = {"new": 0, "changed": 0, "unchanged": 0}
    paths = scan_paths(root)
    while batch := [str(p) for _, p in zip(range(batch_size), paths)]:
        existing = {row.path: row for row in ArchiveFile.objects.filter(path__in=batch)}
        new, changed = [], []
        for path in batch:
            fingerprint = FileFingerprint.of(path)
            if fingerprint is None:
                continue  # vanished between the scan and now
            row = existing.get(path)
            if row is None:
                new.append(ArchiveFile(path=path, size=fingerprint.size, mtime=fingerprint.mtime_ns / 1e9,
                                       fingerprint=fingerprint.value))
            elif row.fingerprint != fingerprint.value:
                row.size, row.mtime, row.fingerprint = fingerprint.size, fingerprint.mtime_ns / 1e9, fingerprint.value
                changed.append(row)
            else:
                counts["unchanged"] += 1
        with transaction.atomic():
            ArchiveFile.objects.bulk_create(new, batch_size=500)
            ArchiveFile.objects.bulk_update(changed, ["size", "mtime", "fingerprint"], batch_size=500)
        counts["new"] += len(new)
        counts["changed"] += len(changed)
    return counts


# --------------------------------------------------------------------------- classifying


def _apply(row: ArchiveFile, record: PredictionRecord | None, model_sha256: str) -> None:
    row.model_sha256 = model_sha256
    row.classified_at = timezone.now()
    row.classification_count = F("classification_count") + 1
    if record is None or record.error:
        row.label, row.score, row.abstained, row.probs, row.prediction_set = "", None, None, None, None
        row.ra, row.dec, row.header = None, None, None
        row.error = OUTSIDE_ROOTS if record is None else record.error
        row.classified_fingerprint = record.fingerprint if record and record.fingerprint else row.fingerprint
        if record and record.fingerprint:
            row.fingerprint = record.fingerprint
        return
    row.size, row.mtime, row.fingerprint = record.size, record.mtime, record.fingerprint  # as read, not as registered
    row.classified_fingerprint = record.fingerprint
    row.label, row.score, row.abstained, row.probs = record.label, record.score, record.abstained, record.probs
    row.prediction_set, row.header = record.prediction_set, record.header
    row.ra, row.dec = (record.sky["ra"], record.sky["dec"]) if record.sky else (None, None)
    row.error = ""


def classify_rows(rows: list[ArchiveFile], service: ClassifierService, force: bool = False) -> int:
    """Classify one batch and save it in one transaction; returns how many rows were written.

    Rows that another worker finished meanwhile (a redelivered task) are not
    written again unless ``force``.
    """
    allowed = [row for row in rows if inside_archive_roots(row.path)]
    for row in rows:
        if row not in allowed:
            logger.warning("%s: %s", row.path, OUTSIDE_ROOTS)
    config = settings.CLASSIFIER
    records = service.predict_paths([row.path for row in allowed], batch_size=config["batch_size"],
                                    tta=config["tta"])
    by_id = {row.id: record for row, record in zip(allowed, records)}
    with transaction.atomic():
        ids = [row.id for row in rows]
        candidates = ArchiveFile.objects.select_for_update().filter(id__in=ids)
        if not force:
            candidates = candidates.pending(service.model_sha256)
        writable = set(candidates.values_list("id", flat=True))
        fresh = [row for row in rows if row.id in writable]
        for row in fresh:
            _apply(row, by_id.get(row.id), service.model_sha256)
        ArchiveFile.objects.bulk_update(fresh, RESULT_FIELDS)
    return len(fresh)


def classify_ids(file_ids: Iterable[int], batch_size: int, force: bool = False,
                 progress: list[int] | None = None) -> int:
    """Classify the given rows batch by batch (each batch saved before the next starts)."""
    service = get_service()
    written = 0
    for chunk in chunks(sorted(file_ids), batch_size):
        rows = ArchiveFile.objects.filter(id__in=chunk)
        if not force:
            rows = rows.pending(service.model_sha256)
        written += classify_rows(list(rows.order_by("id")), service, force)
        if progress is not None:
            progress.append(written)
    return written
