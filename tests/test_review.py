"""The HTML review page: content per class and state, the gallery cap, and filters working in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import cli
import review
from report import read_report
from tests.conftest import artifact_args

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def reviewed(tiny_artifacts: dict[str, Path], mixed_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    report, page = tmp_path / "report.json", tmp_path / "review.html"
    assert cli.main(["filesystem", "--input_dir", str(mixed_dir), "--output_json", str(report), "--html", str(page),
                     "--quiet", *artifact_args(tiny_artifacts)]) == 0
    return report, page


def _expected(report: Path) -> tuple[dict[str, int], dict[str, int], int]:
    """Classified cards per class, abstained cards per top class, failed rows."""
    classified: dict[str, int] = {}
    abstained: dict[str, int] = {}
    failed = 0
    for record in read_report(report)[1]:
        if record["error"]:
            failed += 1
        elif record["abstained"]:
            abstained[record["top_class"]] = abstained.get(record["top_class"], 0) + 1
        else:
            classified[record["class"]] = classified.get(record["class"], 0) + 1
    return classified, abstained, failed


def test_page_holds_every_file_once_with_embedded_thumbnails(reviewed: tuple[Path, Path]) -> None:
    report, page = reviewed
    text = page.read_text()
    classified, abstained, failed = _expected(report)
    for name, count in classified.items():
        section = re.search(rf'<section class="gallery" data-class="{name}">(.*?)</section>', text, re.S).group(1)
        assert section.count('data-state="classified"') == count
    assert text.count('data-state="abstained" title=') == sum(abstained.values())
    assert text.count('<tr data-state="failed">') == failed == 1 and "corrupt.fits" in text
    assert text.count("data:image/jpeg;base64,") == sum(classified.values()) + sum(abstained.values())
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text, "self-contained"


def test_galleries_are_capped_and_the_rest_counted(reviewed: tuple[Path, Path], tmp_path: Path) -> None:
    report, _ = reviewed
    meta, records = read_report(report)
    records = list(records)
    many = [dict(records[0], path=f"{records[0]['path']}", score=index / 500) for index in range(500)]
    for record in many:
        record.update({"error": None, "abstained": False, "class": "galaxy", "top_class": "galaxy"})
    page = review.render_page(meta, many, report, per_gallery=20, workers=1)
    assert page.count('data-state="classified"') == 20
    assert "480 more not shown" in page
    scores = [float(s) for s in re.findall(r"<figcaption><b>([0-9.]+)</b>", page)]
    assert scores[:10] == sorted(scores[:10], reverse=True) and max(scores) == pytest.approx(0.998)
    assert min(scores) == 0.0, "the lowest scores are shown too"


def _dom(page: Path, fragment: str, tmp_path: Path) -> str:
    result = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                             "--virtual-time-budget=3000", "--dump-dom", f"{page.as_uri()}#{fragment}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian package chromium; .ci/run installs it)")
def test_filters_work_in_a_real_browser_and_a_screenshot_is_made(reviewed: tuple[Path, Path], tmp_path: Path) -> None:
    report, page = reviewed
    classified, abstained, failed = _expected(report)
    total = sum(classified.values()) + sum(abstained.values())
    visible = re.compile(r'<body[^>]*data-visible-cards="(\d+)"')
    assert int(visible.search(_dom(page, "", tmp_path)).group(1)) == total
    for name in set(classified) | set(abstained):
        dom = _dom(page, f"class={name}", tmp_path)
        assert int(visible.search(dom).group(1)) == classified.get(name, 0) + abstained.get(name, 0), name
    assert int(visible.search(_dom(page, "state=abstained", tmp_path)).group(1)) == sum(abstained.values())
    failed_view = _dom(page, "state=failed", tmp_path)
    assert int(visible.search(failed_view).group(1)) == 0
    assert re.search(r'<section id="failed" data-state="failed"( class="")?>', failed_view), "failed table shown"
    assert failed_view.count('<tr data-state="failed">') == failed
    assert re.search(r'<section id="failed" data-state="failed" class="hidden">', dom), "hidden under a class filter"
    assert "<svg" in _dom(page, "", tmp_path), "score histograms drawn by the page's script"
    screenshot = tmp_path / "review.png"
    subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1400",
                    f"--screenshot={screenshot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    assert screenshot.read_bytes()[:4] == b"\x89PNG"


def test_cards_tell_an_empty_set_from_no_sets() -> None:
    record = {"path": "/a/b.fits", "class": "galaxy", "top_class": "galaxy", "score": 0.99, "abstain_reason": None,
              "sky": None}
    assert "set: (empty)" in review._card({**record, "prediction_set": []}, None, "classified")
    assert "set: galaxy, nebula" in review._card({**record, "prediction_set": ["galaxy", "nebula"]}, None,
                                                 "classified")
    assert "set:" not in review._card({**record, "prediction_set": None}, None, "classified")
