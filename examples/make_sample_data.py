"""Regenerate examples/sample_data: a dozen small frames of each class in mixed formats, plus one corrupt file.

    python examples/make_sample_data.py
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.simulator import CLASS_NAMES, FILE_VARIANTS, render_frame, write_frame  # noqa: E402

SAMPLE_SEED = 4  # training uses 1, calibration 2, the held-out test set 3
PER_CLASS = 12
SIZES = (256, 320)
# Compressed variants keep the checked-in sample small.
VARIANTS = tuple(v for v in FILE_VARIANTS if v not in ("fits_float32", "tiff_float32"))


def main(target: Path = ROOT / "examples" / "sample_data") -> Path:
    if target.exists():
        shutil.rmtree(target)
    for label_index, label in enumerate(CLASS_NAMES):
        directory = target / label
        directory.mkdir(parents=True)
        for index in range(PER_CLASS):
            seed = SAMPLE_SEED * 1_000_000 + index
            variant = VARIANTS[(index + label_index) % len(VARIANTS)]
            frame = render_frame(label, seed, SIZES[index % len(SIZES)])
            write_frame(frame, directory / f"{label}_{index:02d}", variant, seed=seed)
    (target / "corrupt_download.fits").write_text("<html><body>502 Bad Gateway</body></html>\n")
    return target


if __name__ == "__main__":
    print(main())
