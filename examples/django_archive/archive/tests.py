"""Django tests of the archive app on a real test database, through call_command.

Run with ``python manage.py test archive`` (the repository's pytest suite does).
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path
from unittest import mock

from celery.exceptions import SoftTimeLimitExceeded
from django.core.management import CommandError, call_command
from django.test import TestCase, override_settings

from archive import classifier
from archive.models import ArchiveFile
from archive.tasks import classify_files
from training.simulator import CLASS_NAMES, render_frame, write_frame
from training.tiny import make_tiny_artifacts

ARTIFACTS: dict[str, Path] = {}


def setUpModule() -> None:
    # with its LiteRT export: the example's default backend
    ARTIFACTS.update(make_tiny_artifacts(Path(tempfile.mkdtemp(prefix="tiny-model-")), litert=True))


def tearDownModule() -> None:
    shutil.rmtree(ARTIFACTS["model"].parent, ignore_errors=True)


class ArchiveCommandsTest(TestCase):
    def setUp(self) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="archive-"))
        self.root = self.scratch / "archive"
        for index, name in enumerate(CLASS_NAMES):
            directory = self.root / f"night{index % 2}"
            directory.mkdir(parents=True, exist_ok=True)
            write_frame(render_frame(name, index, 128), directory / name, ("fits_int16", "tiff_uint16")[index % 2])
        (self.root / "night0" / "broken.fits").write_text("<html>gateway timeout</html>")
        self.settings_override = override_settings(ARCHIVE_ROOTS=[self.root.resolve()],
                                                   CLASSIFIER=self.classifier_settings())
        self.settings_override.enable()

    @staticmethod
    def classifier_settings() -> dict:
        return {"model_path": str(ARTIFACTS["model"]), "scaler_path": str(ARTIFACTS["scaler"]),
                "thresholds_path": str(ARTIFACTS["thresholds"]), "intra_op_threads": None, "batch_size": 4,
                "tta": True}

    def tearDown(self) -> None:
        self.settings_override.disable()
        shutil.rmtree(self.scratch, ignore_errors=True)

    def command(self, *args: str) -> str:
        out = io.StringIO()
        call_command(*args, stdout=out)
        return out.getvalue()

    def test_register_is_an_idempotent_upsert(self) -> None:
        self.assertIn("6 new, 0 changed, 0 unchanged", self.command("register_files", str(self.root)))
        self.assertEqual(ArchiveFile.objects.count(), 6)
        self.assertIn("0 new, 0 changed, 6 unchanged", self.command("register_files", str(self.root)))
        galaxy = self.root / "night0" / "galaxy.fit"
        write_frame(render_frame("galaxy", 99, 160), galaxy.with_suffix(""), "fits_int16")
        self.assertIn("0 new, 1 changed, 5 unchanged", self.command("register_files", str(self.root)))
        row = ArchiveFile.objects.get(path=str(galaxy))
        self.assertEqual(row.size, galaxy.stat().st_size)

    def test_register_refuses_roots_outside_the_archive(self) -> None:
        with self.assertRaisesMessage(CommandError, "not under ARCHIVE_ROOTS"):
            call_command("register_files", str(self.scratch))
        with self.assertRaisesMessage(CommandError, "not a directory"):
            call_command("register_files", str(self.scratch / "nope"))

    def test_classify_writes_every_row_once_and_second_run_does_nothing(self) -> None:
        self.command("register_files", str(self.root))
        self.assertIn("dry run: 6 file(s)", self.command("classify_new_files", "--dry-run"))
        self.assertFalse(ArchiveFile.objects.exclude(classified_at=None).exists())
        output = self.command("classify_new_files", "--batch-size", "2")
        self.assertIn("classified 6 file(s)", output)
        self.assertIn("1 errors", output)
        rows = ArchiveFile.objects.all()
        self.assertTrue(all(row.classification_count == 1 for row in rows))
        broken = rows.get(path__endswith="broken.fits")
        self.assertIn("not a FITS file", broken.error)
        self.assertIsNone(broken.prediction_set)
        for row in rows.exclude(pk=broken.pk):
            self.assertEqual(row.error, "")
            self.assertEqual(set(row.probs), set(CLASS_NAMES))
            self.assertTrue(row.prediction_set and set(row.prediction_set) <= set(CLASS_NAMES))
            self.assertEqual(row.label == "unknown", row.abstained)
            self.assertEqual(len(row.model_sha256), 64)
        self.assertEqual(classifier.get_service().backend.name, "litert")  # the example's default
        self.assertIn("nothing to classify", self.command("classify_new_files"))
        self.assertIn("classified 6", self.command("classify_new_files", "--reclassify-all"))
        self.assertTrue(all(row.classification_count == 2 for row in ArchiveFile.objects.all()))

    def test_limit_and_changed_files(self) -> None:
        self.command("register_files", str(self.root))
        self.assertIn("classified 2 file(s)", self.command("classify_new_files", "--limit", "2"))
        self.assertIn("dry run: 4 file(s)", self.command("classify_new_files", "--dry-run"))
        self.command("classify_new_files")
        nebula = self.root / "night1" / "nebula.tif"
        write_frame(render_frame("nebula", 7, 140), nebula.with_suffix(""), "tiff_uint16")
        self.command("register_files", str(self.root))
        self.assertIn("dry run: 1 file(s)", self.command("classify_new_files", "--dry-run"))

    def test_sky_position_and_header_cards_are_stored(self) -> None:
        from astropy.io import fits
        from astropy.wcs import WCS

        wcs = WCS(naxis=2)
        wcs.wcs.ctype, wcs.wcs.crval, wcs.wcs.crpix = ["RA---TAN", "DEC--TAN"], [150.1, 2.2], [64.5, 64.5]
        wcs.wcs.cdelt = [-0.0003, 0.0003]
        header = wcs.to_header()
        header["OBJECT"], header["EXPTIME"] = "COSMOS", 120.0
        fits.PrimaryHDU(render_frame("galaxy", 5, 128), header=header).writeto(self.root / "night0" / "cosmos.fits")
        self.command("register_files", str(self.root))
        self.command("classify_new_files")
        row = ArchiveFile.objects.get(path__endswith="cosmos.fits")
        self.assertAlmostEqual(row.ra, 150.1, places=4)
        self.assertAlmostEqual(row.dec, 2.2, places=4)
        self.assertEqual(row.header, {"OBJECT": "COSMOS", "EXPTIME": 120.0})
        self.assertTrue(ArchiveFile.objects.filter(ra__range=(150.0, 150.2), dec__range=(2.1, 2.3)).exists())
        tiff = ArchiveFile.objects.filter(path__endswith=".tif").first()
        self.assertIsNone(tiff.ra)
        self.assertIsNone(tiff.header)

    def test_misuse_raises_command_error(self) -> None:
        with self.assertRaisesMessage(CommandError, "--batch-size"):
            call_command("classify_new_files", "--batch-size", "0")
        with self.assertRaisesMessage(CommandError, "--limit"):
            call_command("classify_new_files", "--limit", "0")
        with override_settings(CLASSIFIER={"model_path": str(self.scratch / "missing.keras"), "scaler_path": None,
                                           "thresholds_path": None, "intra_op_threads": None, "batch_size": 4,
                                           "tta": True}), self.assertRaisesMessage(CommandError, "not readable"):
            call_command("classify_new_files")

    def test_paths_outside_archive_roots_are_refused_and_recorded(self) -> None:
        outside = self.scratch / "outside.fits"
        shutil.copy(next(self.root.rglob("*.fit")), outside)
        (self.root / "night0" / "link.fits").symlink_to(outside)
        stat = outside.stat()
        ArchiveFile.objects.create(path=str(outside), size=stat.st_size, mtime=stat.st_mtime,
                                   fingerprint=f"{stat.st_size}-{stat.st_mtime_ns}")
        ArchiveFile.objects.create(path=str(self.root / "night0" / "link.fits"), size=stat.st_size,
                                   mtime=stat.st_mtime, fingerprint=f"{stat.st_size}-{stat.st_mtime_ns}")
        self.command("classify_new_files")
        for row in ArchiveFile.objects.all():
            self.assertIn("outside ARCHIVE_ROOTS", row.error)
            self.assertEqual(row.label, "")

    def test_task_is_idempotent_under_redelivery(self) -> None:
        self.command("register_files", str(self.root))
        ids = list(ArchiveFile.objects.values_list("id", flat=True))
        first = classify_files.run(ids)  # the task body, as a worker runs it
        again = classify_files.run(ids)  # the same message delivered a second time
        self.assertEqual(first, {"written": 6, "requeued": 0})
        self.assertEqual(again, {"written": 0, "requeued": 0})
        self.assertTrue(all(row.classification_count == 1 for row in ArchiveFile.objects.all()))

    def test_soft_time_limit_keeps_finished_batches_and_requeues_the_rest(self) -> None:
        self.command("register_files", str(self.root))
        ids = sorted(ArchiveFile.objects.values_list("id", flat=True))
        real_classify_rows = classifier.classify_rows
        calls = []

        def stop_on_second_batch(rows, service, force=False):
            calls.append(len(rows))
            if len(calls) == 2:
                raise SoftTimeLimitExceeded()
            return real_classify_rows(rows, service, force)

        with override_settings(CLASSIFIER={**self.classifier_settings(), "batch_size": 2}), \
                mock.patch.object(classifier, "classify_rows", stop_on_second_batch), \
                mock.patch.object(classify_files, "apply_async") as requeue:
            result = classify_files.run(ids)
        self.assertEqual(result, {"written": 2, "requeued": 4})
        requeued_ids = requeue.call_args.args[0][0]
        self.assertEqual(sorted(requeued_ids), ids[2:])
        done = ArchiveFile.objects.filter(classification_count=1)
        self.assertEqual(sorted(done.values_list("id", flat=True)), ids[:2])
