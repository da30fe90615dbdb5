"""The `filesystem` command: report content and schema, flags, exit codes, scanning rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import pytest

import cli
import inference_runner as ir
from report import load_schema, read_report
from tests.conftest import artifact_args


def run_cli(artifacts: dict[str, Path], *args: str) -> int:
    return cli.main(["filesystem", *args, *artifact_args(artifacts), "--quiet"])


def validate(report_path: Path) -> dict:
    document = json.loads(report_path.read_text())
    jsonschema.validate(document, load_schema())
    return document


def test_report_is_schema_valid_sorted_and_counts_add_up(tiny_artifacts: dict[str, Path], mixed_dir: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "out" / "report.json"
    output.parent.mkdir()
    assert run_cli(tiny_artifacts, "--input_dir", str(mixed_dir), "--output_json", str(output)) == ir.EXIT_OK
    printed = capsys.readouterr().out
    assert f"wrote {output}" in printed and "11 files" in printed
    document = validate(output)
    results, meta = document["results"], document["meta"]
    paths = [r["path"] for r in results]
    assert paths == [str(p) for p in ir.scan_paths(mixed_dir)]
    assert len(paths) == 11 and not any(p.endswith("notes.txt") for p in paths)
    relative = [os.path.relpath(p, mixed_dir).split(os.sep) for p in paths]
    assert relative == sorted(relative)
    errors = [r for r in results if r["error"]]
    assert [Path(r["path"]).name for r in errors] == ["corrupt.fits"]
    counts = meta["counts"]
    assert counts["total"] == 11 and counts["errors"] == 1
    assert counts["classified"] == sum(1 for r in results if r["error"] is None and not r["abstained"])
    assert counts["abstained"] == sum(1 for r in results if r["abstained"])
    assert meta["coverage"] == pytest.approx(counts["classified"] / 10)
    assert "probs" not in results[0]
    assert meta["operating_point"]["temperature"] == 0.7 and meta["operating_point"]["tta"] is True
    assert not ir.checkpoint_path(output).exists(), "the checkpoint is removed after the final write"


def test_include_probs_no_tta_no_abstain(tiny_artifacts: dict[str, Path], mixed_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "r.json"
    assert run_cli(tiny_artifacts, "--input_dir", str(mixed_dir), "--output_json", str(output), "--include-probs",
                   "--no-tta", "--no-abstain_unknown", "--batch_size", "4") == 0
    document = validate(output)
    good = [r for r in document["results"] if r["error"] is None]
    assert all(set(r["probs"]) == set(document["meta"]["class_names"]) for r in good)
    assert all(r["abstained"] is False for r in good)
    assert document["meta"]["coverage"] is None and document["meta"]["operating_point"]["tta"] is False


def test_jsonl_output_format(tiny_artifacts: dict[str, Path], mixed_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "r.jsonl"
    assert run_cli(tiny_artifacts, "--input_dir", str(mixed_dir), "--output_json", str(output),
                   "--output_format", "jsonl") == 0
    lines = output.read_text().splitlines()
    assert len(lines) == 12
    meta, records = read_report(output)
    schema = load_schema()
    jsonschema.validate({"meta": meta, "results": list(records)}, schema)


def test_dry_run_lists_files_and_loads_nothing(tiny_artifacts: dict[str, Path], mixed_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    output = tmp_path / "r.json"
    code = cli.main(["filesystem", "--input_dir", str(mixed_dir), "--output_json", str(output), "--dry-run",
                    "--model_path", str(tmp_path / "absent.keras")])
    assert code == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 11
    assert "11 file(s) would be classified" in captured.err
    assert not output.exists()


def test_exit_codes(tiny_artifacts: dict[str, Path], mixed_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "r.json"
    assert run_cli(tiny_artifacts, "--input_dir", str(tmp_path / "nope"), "--output_json", str(output)) == 2
    with pytest.raises(SystemExit) as usage:
        cli.main(["filesystem", "--input_dir", str(mixed_dir), "--output_json", str(output), "--batch_size", "0"])
    assert usage.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["filesystem", "--input_dir", str(mixed_dir), "--output_json", str(output), "--shard", "3/2"])
    missing = dict(tiny_artifacts, model=tmp_path / "missing.keras")
    assert run_cli(missing, "--input_dir", str(mixed_dir), "--output_json", str(output)) == ir.EXIT_ARTIFACTS
    assert run_cli(tiny_artifacts, "--input_dir", str(mixed_dir),
                   "--output_json", str(tmp_path / "no_dir" / "r.json")) == ir.EXIT_OUTPUT
    assert run_cli(tiny_artifacts, "--input_dir", str(mixed_dir), "--output_json", str(output),
                   "--fail-on-error") == ir.EXIT_FILE_ERRORS
    assert output.exists(), "the report is written even when --fail-on-error turns the exit code"


def test_unwritable_output_directory_fails_before_inference(tiny_artifacts: dict[str, Path], mixed_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded although the output cannot be written")

    monkeypatch.setattr(ir, "ClassifierService", no_model)
    # /proc refuses new files even to root, unlike a chmod-ed directory
    assert run_cli(tiny_artifacts, "--input_dir", str(mixed_dir), "--output_json", "/proc/report.json") == 4
    assert "not writable" in capsys.readouterr().err


def test_symlinks_outside_and_cycles_are_not_followed(tmp_path: Path, mixed_dir: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.fits").write_bytes((next(mixed_dir.rglob("*.fits"))).read_bytes())
    (mixed_dir / "escape").symlink_to(outside, target_is_directory=True)
    (mixed_dir / "night1" / "loop").symlink_to(mixed_dir, target_is_directory=True)
    inner = next(mixed_dir.rglob("*.tif"))
    (mixed_dir / "alias.tif").symlink_to(inner)
    found = [str(p) for p in ir.scan_paths(mixed_dir)]
    assert not any("secret" in p for p in found)
    assert str(mixed_dir / "alias.tif") in found
    assert len(found) == len(set(found)) == 12


def test_extensions_are_matched_case_insensitively(tmp_path: Path) -> None:
    for name in ("a.FITS", "b.Fit", "c.fts", "d.fits.fz", "e.FITS.GZ", "f.fits.bz2", "g.TIFF", "h.tif", "i.png",
                 "j.fits.zip"):
        (tmp_path / name).write_bytes(b"x")
    assert sorted(p.name for p in ir.scan_paths(tmp_path)) == ["a.FITS", "b.Fit", "c.fts", "d.fits.fz",
                                                                  "e.FITS.GZ", "f.fits.bz2", "g.TIFF", "h.tif"]


def test_shards_are_disjoint_stable_and_complete(mixed_dir: Path) -> None:
    everything = [str(p) for p in ir.scan_paths(mixed_dir)]
    shards = [[str(p) for p in ir.scan_paths(mixed_dir, (k, 3))] for k in (1, 2, 3)]
    assert sorted(p for shard in shards for p in shard) == sorted(everything)
    assert sum(len(s) for s in shards) == len(everything)
    assert shards[0] == [str(p) for p in ir.scan_paths(mixed_dir, (1, 3))]


def test_tensorflow_start_up_lines_only_with_verbose(tiny_artifacts: dict[str, Path], mixed_dir: Path,
                                                     tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    root = Path(ir.__file__).parent

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(root / "cli.py"), "filesystem", "--input_dir", str(mixed_dir),
                               "--output_json", str(tmp_path / f"r{len(extra)}.json"), *artifact_args(tiny_artifacts),
                               *extra], capture_output=True, text=True, env=env, timeout=300)

    quiet = run()
    assert quiet.returncode == 0, quiet.stderr
    chatter = ("oneDNN", "cuInit", "absl", "cuda", "I0000", "E0000")
    for line in chatter:
        assert line not in quiet.stderr, quiet.stderr
    assert "corrupt.fits" in quiet.stderr, "the tool's own warnings still show"
    verbose = run("--verbose")
    # TensorFlow's start-up lines depend on the CPU (oneDNN's only on some); any one shows they are let through.
    assert verbose.returncode == 0 and any(line in verbose.stderr for line in chatter), verbose.stderr

    version = subprocess.run([sys.executable, str(root / "cli.py"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"inference-runner {ir.__version__}"


def test_extensions_widen_the_walk(tiny_artifacts: dict[str, Path], mixed_dir: Path, tmp_path: Path) -> None:
    from PIL import Image

    Image.new("L", (64, 64), 30).save(mixed_dir / "press.jpg")
    Image.new("L", (64, 64), 30).save(mixed_dir / "night1" / "thumb.png")
    default = tmp_path / "default.json"
    widened = tmp_path / "widened.json"
    assert run_cli(tiny_artifacts, "--input_dir", str(mixed_dir), "--output_json", str(default)) == ir.EXIT_OK
    assert run_cli(tiny_artifacts, "--input_dir", str(mixed_dir), "--output_json", str(widened),
                   "--extensions", ".fits,.fz,.tif,.tiff,.jpg,.png") == ir.EXIT_OK
    plain, wide = validate(default), validate(widened)
    assert not any(r["path"].endswith((".jpg", ".png")) for r in plain["results"])
    added = [r for r in wide["results"] if r["path"].endswith((".jpg", ".png"))]
    assert len(added) == 2 and all(r["error"] is None for r in added)
    assert wide["meta"]["extensions"] == [".fits", ".fz", ".tif", ".tiff", ".jpg", ".png"]
    with pytest.raises(SystemExit):
        run_cli(tiny_artifacts, "--input_dir", str(mixed_dir), "--output_json", str(tmp_path / "x.json"),
                "--extensions", ".gif")


def test_a_walk_that_finds_nothing_warns_and_names_the_extensions(tiny_artifacts: dict[str, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    Image.new("L", (64, 64), 30).save(inbox / "press.jpg")
    output = tmp_path / "r.json"
    assert run_cli(tiny_artifacts, "--input_dir", str(inbox), "--output_json", str(output)) == ir.EXIT_OK
    assert validate(output)["meta"]["counts"]["total"] == 0
    warning = capsys.readouterr().err
    assert f"warning: no file under {inbox} ends in .fits" in warning and "--extensions" in warning
    assert run_cli(tiny_artifacts, "--input_dir", str(inbox), "--output_json", str(output),
                   "--extensions", ".jpg") == ir.EXIT_OK
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".ecsv", ".fits", ".vot", ".csv"])
def test_table_reports_round_trip_through_astropy(tiny_artifacts: dict[str, Path], mixed_dir: Path, tmp_path: Path,
                                                  suffix: str) -> None:
    import numpy as np
    from astropy.table import Table

    from report import TABLE_FORMATS, format_of, read_table_meta

    reference = tmp_path / "report.json"
    assert run_cli(tiny_artifacts, "--input_dir", str(mixed_dir), "--output_json", str(reference),
                   "--include-probs") == ir.EXIT_OK
    document = validate(reference)
    direct = tmp_path / f"direct{suffix}"
    assert run_cli(tiny_artifacts, "--input_dir", str(mixed_dir), "--output_json", str(direct),
                   "--include-probs") == ir.EXIT_OK, "the extension picks the table format"
    converted = tmp_path / f"converted{suffix}"
    assert cli.main(["convert", str(reference), str(converted)]) == ir.EXIT_OK
    for path in (direct, converted):
        table = Table.read(path, format=TABLE_FORMATS[format_of(path)])
        assert len(table) == len(document["results"]) == 11
        for row, record in zip(table, document["results"]):
            assert row["path"] == record["path"]
            if record["error"]:
                assert np.ma.is_masked(row["class"]) or row["class"] in ("", "--")
                assert np.ma.is_masked(row["score"]) and row["error"] == record["error"]
                continue
            assert row["class"] == record["class"] and row["top_class"] == record["top_class"]
            assert float(row["score"]) == pytest.approx(record["score"], abs=1e-9)
            assert str(row["abstained"]) == str(record["abstained"])  # CSV reads booleans back as text
            assert row["prediction_set"] == "|".join(record["prediction_set"])
            for name, value in record["probs"].items():
                assert float(row[f"prob_{name}"]) == pytest.approx(value, abs=1e-9)
        meta = read_table_meta(path)
        if suffix == ".csv":
            assert meta is None
        else:
            assert meta["class_names"] == document["meta"]["class_names"]
            assert meta["counts"] == document["meta"]["counts"]
    assert cli.main(["convert", str(reference), str(tmp_path / "bad.txt")]) == ir.EXIT_USAGE
