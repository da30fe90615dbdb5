from django.db import models
from django.db.models import F, Q


class ArchiveFileQuerySet(models.QuerySet):
    def pending(self, model_sha256: str) -> "ArchiveFileQuerySet":
        """Never classified, changed since (fingerprint differs), or classified by another model."""
        return self.filter(~Q(classified_fingerprint=F("fingerprint")) | ~Q(model_sha256=model_sha256))


class ArchiveFile(models.Model):
    path = models.CharField(max_length=4096, unique=True)
    size = models.BigIntegerField()
    mtime = models.FloatField()
    fingerprint = models.CharField(max_length=64)
    label = models.CharField(max_length=64, blank=True, default="")
    score = models.FloatField(null=True, blank=True)
    abstained = models.BooleanField(null=True, blank=True)
    probs = models.JSONField(null=True, blank=True)
    prediction_set = models.JSONField(null=True, blank=True)  # conformal set of class names, most probable first
    ra = models.FloatField(null=True, blank=True)  # ICRS degrees of the image centre (FITS with a celestial WCS)
    dec = models.FloatField(null=True, blank=True)
    header = models.JSONField(null=True, blank=True)  # the FITS cards the service reports (OBJECT, DATE-OBS, ...)
    model_sha256 = models.CharField(max_length=64, blank=True, default="")
    classified_fingerprint = models.CharField(max_length=64, blank=True, default="")
    classified_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    classification_count = models.PositiveIntegerField(default=0)  # how many results were written: proves idempotency

    objects = ArchiveFileQuerySet.as_manager()

    class Meta:
        indexes = (models.Index(fields=["classified_fingerprint"]), models.Index(fields=["label"]),
                   models.Index(fields=["ra", "dec"]))

    def __str__(self) -> str:
        return f"{self.path} [{self.label or 'unclassified'}]"
