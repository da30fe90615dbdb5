from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from archive.classifier import inside_archive_roots, register_tree


class Command(BaseCommand):
    help = "Walk a directory under ARCHIVE_ROOTS and upsert one row per FITS/TIFF file (new or changed)."

    def add_arguments(self, parser):
        parser.add_argument("root", type=Path)

    def handle(self, *args, **options):
        root = options["root"]
        if not root.is_dir():
            raise CommandError(f"{root}: not a directory")
        if inside_archive_roots(root) is None:
            raise CommandError(f"{root}: not under ARCHIVE_ROOTS; add it to the environment variable to allow it")
        counts = register_tree(root.absolute())
        self.stdout.write(f"registered {root}: {counts['new']} new, {counts['changed']} changed, "
                          f"{counts['unchanged']} unchanged")
