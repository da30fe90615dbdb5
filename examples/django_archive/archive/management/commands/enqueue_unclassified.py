from django.core.management.base import BaseCommand, CommandError

from archive.tasks import enqueue_unclassified


class Command(BaseCommand):
    help = "Queue Celery tasks (classify_files) for every pending file, --chunk-size files per task."

    def add_arguments(self, parser):
        parser.add_argument("--chunk-size", type=int, default=64)
        parser.add_argument("--limit", type=int, default=None)

    def handle(self, *args, **options):
        if options["chunk_size"] < 1:
            raise CommandError("--chunk-size must be >= 1")
        tasks = enqueue_unclassified(options["chunk_size"], options["limit"])
        self.stdout.write(f"queued {tasks} task(s)")
