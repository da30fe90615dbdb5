"""Celery tasks: classify rows by id (idempotent), and chunk the backlog into such tasks."""

from __future__ import annotations

import logging

from celery import shared_task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import InterfaceError, OperationalError

from archive.classifier import chunks, classify_ids, current_model_sha256
from archive.models import ArchiveFile

logger = logging.getLogger(__name__)


@shared_task(
    bind=True,
    acks_late=True,  # idempotent by fingerprint: a redelivered message re-checks what is still pending
    autoretry_for=(OperationalError, InterfaceError),  # database locked / connection dropped: transient
    retry_backoff=True,
    retry_backoff_max=120,
    retry_jitter=True,
    max_retries=6,
)
def classify_files(self, file_ids: list[int]) -> dict[str, int]:
    """Classify the rows ``file_ids`` that are still pending; re-queue the rest on the soft time limit."""
    progress: list[int] = []
    try:
        written = classify_ids(file_ids, settings.CLASSIFIER["batch_size"], progress=progress)
    except SoftTimeLimitExceeded:
        # Every finished batch is already committed; hand what is left to a fresh task.
        remaining = list(ArchiveFile.objects.filter(id__in=file_ids).pending(current_model_sha256())
                         .values_list("id", flat=True))
        if remaining:
            classify_files.apply_async((remaining,))
        logger.warning("soft time limit: %d written, %d re-queued", progress[-1] if progress else 0, len(remaining))
        return {"written": progress[-1] if progress else 0, "requeued": len(remaining)}
    return {"written": written, "requeued": 0}


def enqueue_unclassified(chunk_size: int = 64, limit: int | None = None) -> int:
    """Send one ``classify_files`` task per ``chunk_size`` pending rows; returns the number of tasks."""
    ids = list(ArchiveFile.objects.pending(current_model_sha256()).order_by("id").values_list("id", flat=True)[:limit])
    tasks = 0
    for chunk in chunks(ids, chunk_size):
        classify_files.delay(chunk)
        tasks += 1
    return tasks
