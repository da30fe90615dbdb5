"""ClassifierService: records, order, scores, abstention, pins and the arrays entry point."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

import inference_runner as ir
from inference_runner import ArtifactError, ClassifierService, calibrated_probs
from training.simulator import CLASS_NAMES, render_frame, write_frame


def test_one_record_per_path_in_input_order_with_errors(tiny_service: ClassifierService, mixed_dir: Path) -> None:
    paths = sorted(ir.scan_paths(mixed_dir), reverse=True)  # an order the scan would not give
    paths.insert(3, mixed_dir / "does_not_exist.fits")
    records = tiny_service.predict_paths(paths, batch_size=3)
    assert [r.path for r in records] == [str(p) for p in paths]
    failed = {Path(r.path).name: r for r in records if r.error}
    assert set(failed) == {"corrupt.fits", "does_not_exist.fits"}
    assert "not a FITS file" in failed["corrupt.fits"].error
    for record in records:
        if record.error:
            assert record.label is None and record.score is None and record.probs is None
            continue
        assert set(record.probs) == set(CLASS_NAMES)
        assert sum(record.probs.values()) == pytest.approx(1.0, abs=1e-4)
        assert record.score == pytest.approx(max(record.probs.values()), abs=1e-6)
        assert record.top_class == max(record.probs, key=record.probs.get)
        size, _mtime_ns = (int(v) for v in record.fingerprint.split("-"))
        assert size == Path(record.path).stat().st_size == record.size
        assert record.timestamp.endswith("Z")


def test_abstention_follows_the_class_thresholds(tiny_service: ClassifierService, mixed_dir: Path) -> None:
    records = [r for r in tiny_service.predict_paths(ir.scan_paths(mixed_dir)) if not r.error]
    thresholds = tiny_service.operating_point.thresholds[True]
    for record in records:
        assert record.abstained == (record.score < thresholds[record.top_class])
        assert record.label == ("unknown" if record.abstained else record.top_class)
    no_abstain = tiny_service.predict_paths([r.path for r in records], abstain=False)
    assert all(not r.abstained and r.label == r.top_class for r in no_abstain)
    assert [r.score for r in no_abstain] == [r.score for r in records]


def test_generator_streams_and_batch_size_does_not_change_results(tiny_service: ClassifierService,
                                                                   mixed_dir: Path) -> None:
    paths = list(ir.scan_paths(mixed_dir))
    stream = tiny_service.iter_predict_paths(iter(paths), batch_size=2)
    first = next(stream)
    assert first.path == str(paths[0])
    rest = list(stream)
    by_one = tiny_service.predict_paths(paths, batch_size=1, tta=False)
    by_seven = tiny_service.predict_paths(paths, batch_size=7, tta=False)
    for a, b in zip(by_one, by_seven):
        assert a.error == b.error
        if a.probs:
            for name in CLASS_NAMES:
                assert a.probs[name] == pytest.approx(b.probs[name], abs=1e-4)
    assert len(rest) + 1 == len(paths)


def test_arrays_entry_point_matches_files(tiny_service: ClassifierService, tmp_path: Path) -> None:
    frame = render_frame("nebula", 3, 200)
    path = write_frame(frame, tmp_path / "neb", "fits_float32")
    from_file = tiny_service.predict_paths([path])[0]
    from_array = tiny_service.predict_arrays([frame], names=["neb"])[0]
    assert from_array.path == "neb" and from_array.fingerprint is None
    for name in CLASS_NAMES:
        assert from_array.probs[name] == pytest.approx(from_file.probs[name], abs=1e-5)
    bad = tiny_service.predict_arrays([np.zeros(10)])[0]
    assert bad.error and "2-D" in bad.error


def test_temperature_and_tta_averaging() -> None:
    logits = np.array([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]])  # one file, two views
    probs = calibrated_probs(logits, 0.5)
    sharp = np.exp(logits / 0.5) / np.exp(logits / 0.5).sum(axis=-1, keepdims=True)
    np.testing.assert_allclose(probs, sharp.mean(axis=1))
    # softmax is shift-invariant: log-probabilities at temperature T equal logits at T
    log_probs = np.log(np.exp(logits) / np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(calibrated_probs(log_probs, 0.7), calibrated_probs(logits, 0.7))


def test_softmax_model_gives_the_same_scores_as_its_logit_twin(tiny_artifacts: dict[str, Path], tmp_path: Path,
                                                               mixed_dir: Path) -> None:
    import keras

    logit_model = keras.saving.load_model(tiny_artifacts["model"], compile=False)
    probs_out = keras.layers.Softmax(name="probs")(logit_model.outputs[0])
    softmax_model = keras.Model(logit_model.inputs, probs_out)
    path = tmp_path / "softmax.keras"
    softmax_model.save(path)
    twin = ClassifierService(path, tiny_artifacts["scaler"], tiny_artifacts["thresholds"], allow_mismatch=True)
    assert twin.backend.outputs_probabilities
    reference = ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tiny_artifacts["thresholds"])
    assert not reference.backend.outputs_probabilities
    paths = [p for p in ir.scan_paths(mixed_dir) if p.name != "corrupt.fits"][:4]
    for a, b in zip(twin.predict_paths(paths), reference.predict_paths(paths)):
        for name in CLASS_NAMES:
            assert a.probs[name] == pytest.approx(b.probs[name], abs=1e-4)


def test_pinned_sha256_mismatch_is_refused_unless_allowed(tiny_artifacts: dict[str, Path], tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    document = json.loads(tiny_artifacts["thresholds"].read_text())
    document["model_sha256"] = "0" * 64
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps(document))
    with pytest.raises(ArtifactError, match="model SHA-256"):
        ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], pinned)
    with caplog.at_level(logging.WARNING):
        ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], pinned, allow_mismatch=True)
    assert "mismatch allowed" in caplog.text


def test_missing_or_broken_artifacts_are_clear(tiny_artifacts: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="model file not found"):
        ClassifierService(tmp_path / "nope.keras", tiny_artifacts["scaler"], tiny_artifacts["thresholds"])
    (tmp_path / "t.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tmp_path / "t.json")
    (tmp_path / "t2.json").write_text(json.dumps({"class_names": ["a"]}))
    with pytest.raises(ArtifactError, match="lacks"):
        ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tmp_path / "t2.json")
    (tmp_path / "bad.keras").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="cannot load Keras model"):
        ClassifierService(tmp_path / "bad.keras", tiny_artifacts["scaler"], tiny_artifacts["thresholds"],
                          allow_mismatch=True)


def test_off_calibration_temperature_is_warned(tiny_service: ClassifierService, mixed_dir: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    path = next(ir.scan_paths(mixed_dir))
    with caplog.at_level(logging.WARNING):
        tiny_service.predict_paths([path], temperature=1.3)
    assert "differs from the calibrated" in caplog.text
    with pytest.raises(ValueError, match="temperature"):
        tiny_service.predict_paths([path], temperature=0)


def test_reuse_keeps_memory_flat(tiny_service: ClassifierService, tmp_path: Path) -> None:
    import resource

    path = write_frame(render_frame("star_field", 1, 128), tmp_path / "s", "fits_int16")
    tiny_service.predict_paths([path] * 64, batch_size=16)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(5):
        tiny_service.predict_paths([path] * 64, batch_size=16)
    growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert growth_mb < 100, f"peak RSS grew {growth_mb:.0f} MB over 320 repeated predictions"


def test_import_loads_no_tensorflow_so_forking_parents_stay_safe() -> None:
    import subprocess
    import sys

    code = ("import sys, inference_runner; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(ir.__file__).parent, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_records_carry_sky_and_chosen_header_cards(tiny_service, tmp_path: Path) -> None:
    from astropy.io import fits
    from astropy.wcs import WCS

    wcs = WCS(naxis=2)
    wcs.wcs.ctype, wcs.wcs.crval, wcs.wcs.crpix, wcs.wcs.cdelt = ["RA---TAN", "DEC--TAN"], [10.0, -5.0], \
        [32.5, 32.5], [-0.001, 0.001]
    header = wcs.to_header()
    header["OBJECT"], header["FILTER"], header["GAIN"] = "NGC 253", "r", 1.5
    fits.PrimaryHDU(render_frame("galaxy", 1, 64), header=header).writeto(tmp_path / "a.fits")
    write_frame(render_frame("galaxy", 2, 64), tmp_path / "b", "tiff_uint16")
    fits_record, tiff_record = tiny_service.predict_paths([tmp_path / "a.fits", tmp_path / "b.tif"])
    assert fits_record.sky == pytest.approx({"ra": 10.0, "dec": -5.0}, abs=1e-6)
    assert fits_record.header == {"OBJECT": "NGC 253", "FILTER": "r"}, "only the chosen cards, missing ones left out"
    assert tiff_record.sky is None and tiff_record.header is None
    custom = ir.ClassifierService(tiny_service.model_path, tiny_service.scaler_path, tiny_service.thresholds_path,
                                  header_keys=("gain", "object"))
    assert custom.predict_paths([tmp_path / "a.fits"])[0].header == {"GAIN": 1.5, "OBJECT": "NGC 253"}
