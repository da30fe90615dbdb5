"""Example Django project of an image archive classified with inference_runner.ClassifierService."""

from .celery import app as celery_app

__all__ = ["celery_app"]
