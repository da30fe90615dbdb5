from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count, Q

from archive.classifier import classify_ids, current_model_sha256
from archive.models import ArchiveFile
from inference_runner import ArtifactError


class Command(BaseCommand):
    help = "Classify files never classified, changed since (fingerprint), or classified by another model."

    def add_arguments(self, parser):
        parser.add_argument("--batch-size", type=int, default=64, help="rows per saved batch")
        parser.add_argument("--limit", type=int, default=None, help="at most this many files")
        parser.add_argument("--dry-run", action="store_true", help="count what would be classified; load nothing")
        parser.add_argument("--reclassify-all", action="store_true", help="classify every row again")

    def handle(self, *args, **options):
        if options["batch_size"] < 1:
            raise CommandError("--batch-size must be >= 1")
        if options["limit"] is not None and options["limit"] < 1:
            raise CommandError("--limit must be >= 1")
        try:
            model_sha = current_model_sha256()
        except OSError as exc:
            raise CommandError(f"classifier model not readable: {exc}") from exc
        rows = ArchiveFile.objects.all() if options["reclassify_all"] else ArchiveFile.objects.pending(model_sha)
        ids = list(rows.order_by("id").values_list("id", flat=True)[: options["limit"]])
        if options["dry_run"]:
            self.stdout.write(f"dry run: {len(ids)} file(s) would be classified")
            return
        if not ids:
            self.stdout.write("nothing to classify")
            return
        try:
            written = classify_ids(ids, options["batch_size"], force=options["reclassify_all"])
        except ArtifactError as exc:
            raise CommandError(str(exc)) from exc
        summary = ArchiveFile.objects.filter(id__in=ids).aggregate(
            labelled=Count("id", filter=Q(error="", abstained=False)),
            unknown=Count("id", filter=Q(error="", abstained=True)),
            errors=Count("id", filter=~Q(error="")))
        self.stdout.write(f"classified {written} file(s): {summary['labelled']} labelled, {summary['unknown']} "
                          f"unknown, {summary['errors']} errors")
