"""Runs that survive: SIGKILL/SIGTERM then --resume, torn checkpoints, atomic reports, incremental re-runs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np
import pytest

import cli
import inference_runner as ir
from report import load_schema
from tests.conftest import ROOT, artifact_args
from training.simulator import CLASS_NAMES, render_frame, write_frame


@pytest.fixture()
def many_files(tmp_path: Path) -> Path:
    root = tmp_path / "many"
    for index in range(48):
        name = CLASS_NAMES[index % 5]
        sub = root / f"d{index % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        write_frame(render_frame(name, index, 128), sub / f"f{index:03d}", ("fits_int16", "tiff_uint16")[index % 2])
    return root


def run_args(artifacts: dict[str, Path], input_dir: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "inference_runner.py"), "filesystem", "--input_dir", str(input_dir),
            "--output_json", str(output), "--batch_size", "4", "--workers", "1", "--quiet",
            *artifact_args(artifacts), *extra]


def start_and_kill_after(command: list[str], checkpoint: Path, records: int, sig: int) -> subprocess.CompletedProcess:
    """Start the CLI and send ``sig`` once the checkpoint holds at least ``records`` records."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoint.exists() and checkpoint.read_bytes().count(b'"kind":"record"') >= records:
            process.send_signal(sig)
            break
        time.sleep(0.02)
    out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def check_complete_report(output: Path, input_dir: Path) -> dict:
    document = json.loads(output.read_text())
    jsonschema.validate(document, load_schema())
    paths = [r["path"] for r in document["results"]]
    assert paths == [str(p) for p in ir.scan_paths(input_dir)], "every file exactly once, in scan order"
    assert document["meta"]["counts"]["total"] == len(paths)
    return document


def test_sigkill_at_random_points_then_resume(tiny_artifacts: dict[str, Path], many_files: Path,
                                              tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    checkpoint = ir.checkpoint_path(output)
    rng = random.Random(1234)
    kills = 0
    for trial in range(3):
        extra = ["--resume"] if checkpoint.exists() else []
        result = start_and_kill_after(run_args(tiny_artifacts, many_files, output, *extra), checkpoint,
                                      records=rng.randint(4, 40) if trial < 2 else 10**9, sig=signal.SIGKILL)
        if result.returncode == -signal.SIGKILL:
            kills += 1
            assert not output.exists(), "a killed run leaves no report (and never a torn one)"
    assert kills >= 1
    if not output.exists():
        final = subprocess.run(run_args(tiny_artifacts, many_files, output, "--resume"), capture_output=True, text=True)
        assert final.returncode == 0, final.stderr
    check_complete_report(output, many_files)
    assert not checkpoint.exists()


def test_sigterm_stops_cleanly_and_says_how_to_resume(tiny_artifacts: dict[str, Path], many_files: Path,
                                                       tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    checkpoint = ir.checkpoint_path(output)
    stopped = start_and_kill_after(run_args(tiny_artifacts, many_files, output), checkpoint, 8, signal.SIGTERM)
    assert stopped.returncode == ir.EXIT_INTERRUPTED, stopped.stderr
    assert "--resume" in stopped.stderr
    lines = checkpoint.read_text().splitlines()
    assert all(json.loads(line) for line in lines), "the checkpoint holds whole lines only"
    refused = subprocess.run(run_args(tiny_artifacts, many_files, output), capture_output=True, text=True)
    assert refused.returncode == ir.EXIT_USAGE and "--resume" in refused.stderr
    resumed = subprocess.run(run_args(tiny_artifacts, many_files, output, "--resume"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    check_complete_report(output, many_files)


def test_resume_tolerates_a_torn_line_and_redoes_changed_files(tiny_artifacts: dict[str, Path], many_files: Path,
                                                               tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    checkpoint = ir.checkpoint_path(output)
    base = ["filesystem", "--input_dir", str(many_files), "--output_json", str(output), "--batch_size", "4",
            "--quiet", *artifact_args(tiny_artifacts)]
    assert cli.main(base) == 0
    first = json.loads(output.read_text())
    # Rebuild an interrupted state: the first 20 records, then half a line.
    service = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tiny_artifacts["thresholds"])
    key = ir._run_key(service, ir.RunOptions(input_dir=many_files, output=output))
    header = {"kind": "header", "run_key": key, "started_at": "2026-01-01T00:00:00.000Z"}
    lines = [json.dumps(header)] + [
        json.dumps({"kind": "record", "relative_path": os.path.relpath(r["path"], many_files), **r})
        for r in first["results"][:20]]
    checkpoint.write_text("\n".join(lines) + "\n" + lines[-1][: len(lines[-1]) // 2])
    changed = Path(first["results"][5]["path"])
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    assert cli.main([*base, "--resume"]) == 0
    second = check_complete_report(output, many_files)
    by_path = {r["path"]: r for r in second["results"]}
    assert by_path[str(changed)]["fingerprint"] != first["results"][5]["fingerprint"]
    assert by_path[first["results"][3]["path"]]["timestamp"] == first["results"][3]["timestamp"], "kept, not redone"
    assert second["meta"]["started_at"] == "2026-01-01T00:00:00.000Z"


def test_resume_with_other_settings_is_refused(tiny_artifacts: dict[str, Path], many_files: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "report.json"
    service = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tiny_artifacts["thresholds"])
    key = ir._run_key(service, ir.RunOptions(input_dir=many_files, output=output, tta=False))
    ir.checkpoint_path(output).write_text(json.dumps({"kind": "header", "run_key": key, "started_at": "x"}) + "\n")
    code = cli.main(["filesystem", "--input_dir", str(many_files), "--output_json", str(output), "--resume",
                    "--quiet", *artifact_args(tiny_artifacts)])
    assert code == ir.EXIT_USAGE
    assert "other settings" in capsys.readouterr().err


def test_killed_rerun_keeps_the_previous_report_intact(tiny_artifacts: dict[str, Path], many_files: Path,
                                                       tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    done = subprocess.run(run_args(tiny_artifacts, many_files, output), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    before = output.read_bytes()
    killed = start_and_kill_after(run_args(tiny_artifacts, many_files, output), ir.checkpoint_path(output), 12,
                                  signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert output.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no temp file left beside the report"


def test_file_deleted_mid_run_becomes_an_error_record(tiny_artifacts: dict[str, Path], many_files: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    victim = sorted((many_files / "d0").glob("*.tif"))[-1]  # listed with the first file, read later
    real_scan = ir.scan_paths

    def scan_then_delete(root: Path, shard: object = None, suffixes: tuple[str, ...] = ir.data_loader.ARCHIVE_SUFFIXES):
        for index, path in enumerate(real_scan(root, shard, suffixes)):
            yield path
            if index == 0 and victim.exists():
                victim.unlink()  # listed by the scan, gone before it is read

    monkeypatch.setattr(ir, "scan_paths", scan_then_delete)
    output = tmp_path / "report.json"
    assert cli.main(["filesystem", "--input_dir", str(many_files), "--output_json", str(output), "--quiet",
                    *artifact_args(tiny_artifacts)]) == 0
    document = json.loads(output.read_text())
    record = next(r for r in document["results"] if r["path"] == str(victim))
    assert record["error"] and "cannot open" in record["error"]
    assert document["meta"]["counts"]["total"] == 48


def test_previous_report_reuses_unchanged_files(tiny_artifacts: dict[str, Path], many_files: Path,
                                                tmp_path: Path) -> None:
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    base = ["filesystem", "--input_dir", str(many_files), "--quiet", *artifact_args(tiny_artifacts)]
    assert cli.main([*base, "--output_json", str(first)]) == 0
    changed = sorted(many_files.rglob("*.fit"))[0]
    write_frame(render_frame("galaxy", 999, 128), changed.with_suffix(""), "fits_int16")
    (many_files / "d0" / "new.fits").write_bytes(changed.read_bytes())
    assert cli.main([*base, "--output_json", str(second), "--previous_report", str(first)]) == 0
    document = json.loads(second.read_text())
    jsonschema.validate(document, load_schema())
    counts = document["meta"]["counts"]
    assert counts == {**counts, "total": 49, "reused": 47, "new": 2}
    fresh = {Path(r["path"]).name for r in document["results"] if not r["reused"]}
    assert fresh == {changed.name, "new.fits"}
    old = {r["path"]: r for r in json.loads(first.read_text())["results"]}
    for record in document["results"]:
        if record["reused"]:
            assert record["class"] == old[record["path"]]["class"]
    with_probs = tmp_path / "with_probs.json"
    assert cli.main([*base, "--output_json", str(with_probs), "--previous_report", str(first), "--include-probs"]) == 0
    assert json.loads(with_probs.read_text())["meta"]["counts"]["reused"] == 0, "old records lack probabilities"
    other_temperature = tmp_path / "third.json"
    assert cli.main([*base, "--output_json", str(other_temperature), "--previous_report", str(first),
                    "--temperature", "1.0"]) == 0
    assert json.loads(other_temperature.read_text())["meta"]["counts"]["reused"] == 0


@pytest.fixture()
def mosaic_dir(tmp_path: Path) -> Path:
    """A 4-CCD tile-compressed mosaic, a plain FITS file and a TIFF."""
    from astropy.io import fits

    root = tmp_path / "mosaics"
    root.mkdir()
    ccds = [fits.CompImageHDU(render_frame(name, index, 96).astype(np.float32), name=f"CCD{index + 1}")
            for index, name in enumerate(("star_field", "galaxy", "artifact", "nebula"))]
    fits.HDUList([fits.PrimaryHDU(), *ccds]).writeto(root / "decam.fits.fz")
    write_frame(render_frame("galaxy", 9, 96), root / "single", "fits_float32")
    write_frame(render_frame("nebula", 9, 96), root / "single_tiff", "tiff_uint16")
    return root


def test_hdu_all_gives_one_record_per_ccd_and_resumes_per_ccd(tiny_artifacts: dict[str, Path], mosaic_dir: Path,
                                                              tmp_path: Path) -> None:
    output = tmp_path / "report.json"
    base = ["filesystem", "--input_dir", str(mosaic_dir), "--hdu", "all", "--batch_size", "2", "--quiet",
            *artifact_args(tiny_artifacts)]
    assert cli.main([*base, "--output_json", str(output)]) == 0
    document = json.loads(output.read_text())
    jsonschema.validate(document, load_schema())
    keys = [(Path(r["path"]).name, (r["hdu"] or {}).get("index"), (r["hdu"] or {}).get("extname"))
            for r in document["results"]]
    assert keys == [("decam.fits.fz", 1, "CCD1"), ("decam.fits.fz", 2, "CCD2"), ("decam.fits.fz", 3, "CCD3"),
                    ("decam.fits.fz", 4, "CCD4"), ("single.fits", 0, None), ("single_tiff.tif", None, None)]
    assert all(r["error"] is None for r in document["results"])

    # an interrupted run that finished two CCDs: resume redoes exactly the rest
    service = ir.ClassifierService(tiny_artifacts["model"], tiny_artifacts["scaler"], tiny_artifacts["thresholds"])
    options = ir.RunOptions(input_dir=mosaic_dir, output=tmp_path / "resumed.json", hdu_all=True)
    header = {"kind": "header", "run_key": ir._run_key(service, options), "started_at": "2026-01-01T00:00:00.000Z"}
    done = [{"kind": "record", "relative_path": f"decam.fits.fz/#{index:05d}", **document["results"][index - 1]}
            for index in (1, 2)]
    ir.checkpoint_path(options.output).write_text("\n".join(json.dumps(line) for line in [header, *done]) + "\n")
    assert cli.main([*base, "--output_json", str(options.output), "--resume"]) == 0
    resumed = json.loads(options.output.read_text())
    assert [(Path(r["path"]).name, (r["hdu"] or {}).get("index")) for r in resumed["results"]] == \
        [(name, index) for name, index, _ in keys]
    assert resumed["meta"]["counts"]["total"] == 6

    again = tmp_path / "again.json"
    assert cli.main([*base, "--output_json", str(again), "--previous_report", str(output)]) == 0
    assert json.loads(again.read_text())["meta"]["counts"]["reused"] == 6, "reuse keys on (file, HDU)"
