"""The lite install (requirements-lite.txt: LiteRT, no TensorFlow, no Keras) runs the CLI and the Python API on the
shipped model, and refuses training, calibration and export with the install to use.

In CI the interpreter is a fresh venv of requirements-lite.txt alone (LITE_PYTHON, made by .ci/run); elsewhere
it is this interpreter with TensorFlow, Keras and JAX made unimportable (see conftest.lite_python).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import inference_runner as ir
from tests.conftest import ROOT, LitePython

SAMPLE_DATA = ROOT / "examples" / "sample_data"
HEAVY = ("tensorflow", "keras", "jax")

API_SCRIPT = """
import json, sys
import inference_runner as ir
service = ir.ClassifierService(workers=2)
records = service.predict_paths(sorted(ir.scan_paths(sys.argv[1])), batch_size=8)
print(json.dumps({"backend": service.backend.name, "records": [r.to_json() for r in records],
                  "loaded": sorted(m for m, mod in sys.modules.items() if m.split(".")[0] in HEAVY and mod)}))
""".replace("HEAVY", repr(HEAVY))


def test_cli_on_the_lite_install_matches_the_full_install(lite_python: LitePython, tmp_path: Path) -> None:
    output = tmp_path / "lite.json"
    done = lite_python.run([str(ROOT / "cli.py"), "filesystem", "--input_dir", str(SAMPLE_DATA), "--output_json",
                            str(output), "--include-probs", "--quiet"], cwd=tmp_path, timeout=300)
    assert done.returncode == ir.EXIT_OK, done.stderr[-3000:]
    assert "tensorflow" not in done.stderr.lower()
    lite = json.loads(output.read_text())
    assert lite["meta"]["backend"]["name"] == "litert"
    full_output = tmp_path / "full.json"
    assert ir.main(["filesystem", "--input_dir", str(SAMPLE_DATA), "--output_json", str(full_output),
                    "--include-probs", "--quiet", "--backend", "keras"]) == ir.EXIT_OK
    full = json.loads(full_output.read_text())
    assert [r["path"] for r in lite["results"]] == [r["path"] for r in full["results"]]
    for a, b in zip(lite["results"], full["results"]):
        assert (a["class"], a["abstain_reason"], a["prediction_set"], a["error"]) == \
            (b["class"], b["abstain_reason"], b["prediction_set"], b["error"])
        if a["probs"]:
            assert max(abs(a["probs"][c] - b["probs"][c]) for c in a["probs"]) <= 1e-4


def test_python_api_on_the_lite_install_never_imports_tensorflow(lite_python: LitePython, tmp_path: Path) -> None:
    done = lite_python.run(["-c", API_SCRIPT, str(SAMPLE_DATA)], cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backend"] == "litert"
    assert result["loaded"] == []
    classified = [r for r in result["records"] if r["error"] is None]
    assert len(classified) == 60 and any(not r["abstained"] for r in classified)


@pytest.mark.parametrize("command", [
    ["calibrate", "--labelled_dir", str(SAMPLE_DATA)],
    ["export"],
    ["train", "--labelled_dir", str(SAMPLE_DATA), "--output_dir", "unused"],
    ["filesystem", "--input_dir", str(SAMPLE_DATA), "--output_json", "unused.json", "--backend", "keras"],
    ["-m", "training.train", "--out", "unused"],
])
def test_the_lite_install_names_the_full_install_for_what_needs_tensorflow(lite_python: LitePython, tmp_path: Path,
                                                                          command: list[str]) -> None:
    program = command if command[0] == "-m" else [str(ROOT / "cli.py"), *command]
    done = lite_python.run(program, cwd=tmp_path, timeout=120)
    assert done.returncode == ir.EXIT_ARTIFACTS, done.stdout + done.stderr[-3000:]
    assert "full install" in done.stderr and "requirements.txt" in done.stderr
    assert "Traceback" not in done.stderr
