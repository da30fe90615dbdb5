"""The example Django project's own test suite (real test database, call_command), run as its users run it."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "django_archive"


def test_django_archive_app_suite(tmp_path) -> None:
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "manage.py", "test", "archive", "-v", "2"], cwd=EXAMPLE, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "Ran 9 tests" in result.stderr and "OK" in result.stderr
