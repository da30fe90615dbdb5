"""Settings of the example archive project; everything site-specific comes from the environment.

DATABASE_URL       e.g. sqlite:////abs/path/db.sqlite3 (default: db.sqlite3 here) or postgres://user:pw@host/db
ARCHIVE_ROOTS      colon-separated directories the archive may read; paths elsewhere are refused
CLASSIFIER_MODEL, CLASSIFIER_SCALER, CLASSIFIER_THRESHOLDS   artifacts (default: the shipped ones)
CLASSIFIER_BACKEND litert (default: the pinned <model>.tflite, no TensorFlow needed), keras, or auto
CLASSIFIER_THREADS model threads per worker process (LiteRT or TensorFlow; set cores / concurrency with prefork)
CLASSIFIER_BATCH_SIZE, CLASSIFIER_TTA (1/0)
CELERY_BROKER_URL  redis://127.0.0.1:6379/0 (default), or filesystem:// with CELERY_FS_DIR for a serverless broker
CELERY_QUEUE       queue name (default: archive)
"""

import os
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-project-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
INSTALLED_APPS = ["django.contrib.contenttypes", "archive"]
ROOT_URLCONF = "archive_site.urls"
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

DATABASES = {"default": dj_database_url.parse(os.environ.get("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}"))}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # Workers and web processes share one file: wait for the writer instead of failing at once.
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 30

ARCHIVE_ROOTS = [Path(p).resolve() for p in os.environ.get("ARCHIVE_ROOTS", "").split(":") if p]

CLASSIFIER = {
    "model_path": os.environ.get("CLASSIFIER_MODEL") or None,
    "scaler_path": os.environ.get("CLASSIFIER_SCALER") or None,
    "thresholds_path": os.environ.get("CLASSIFIER_THRESHOLDS") or None,
    "backend": os.environ.get("CLASSIFIER_BACKEND", "litert"),
    "intra_op_threads": int(os.environ["CLASSIFIER_THREADS"]) if os.environ.get("CLASSIFIER_THREADS") else None,
    "batch_size": int(os.environ.get("CLASSIFIER_BATCH_SIZE", "32")),
    "tta": os.environ.get("CLASSIFIER_TTA", "1") == "1",
}

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_TASK_ACKS_LATE = True  # tasks are idempotent by fingerprint, so redelivery is safe
CELERY_TASK_REJECT_ON_WORKER_LOST = True  # a killed child's task goes back to the queue
CELERY_WORKER_PREFETCH_MULTIPLIER = 1  # long tasks: do not hoard messages in one worker
CELERY_WORKER_MAX_TASKS_PER_CHILD = int(os.environ.get("CELERY_MAX_TASKS_PER_CHILD", "500"))
CELERY_TASK_SOFT_TIME_LIMIT = int(os.environ.get("CELERY_SOFT_TIME_LIMIT", "900"))
CELERY_TASK_TIME_LIMIT = CELERY_TASK_SOFT_TIME_LIMIT + 60
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": int(os.environ.get("CELERY_VISIBILITY_TIMEOUT", "3600"))}
if CELERY_BROKER_URL.startswith("filesystem://"):
    _queue_dir = Path(os.environ.get("CELERY_FS_DIR", BASE_DIR / "broker"))
    for _sub in ("queue", "processed", "control"):
        (_queue_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS.update(data_folder_in=str(_queue_dir / "queue"),
                                           data_folder_out=str(_queue_dir / "queue"),
                                           processed_folder=str(_queue_dir / "processed"), store_processed=False,
                                           control_folder=str(_queue_dir / "control"))  # else ./control in the cwd
CELERY_TASK_IGNORE_RESULT = True  # results live in the ArchiveFile rows
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CELERY_QUEUE", "archive")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "WARNING")},
}
