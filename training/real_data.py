"""Real labelled directories: discovery, object keys and an honest split.

A labelled directory holds one sub-folder per class (the layout ``calibrate``
takes); each directory given is one *source* (a survey, a website, a camera).
Files of one object must never sit on both sides of a split: a galaxy imaged
twice, a Messier object photographed by three sites, the g and r frames of one
SDSS field. :func:`object_key` derives that object from the file name:

* a catalogue designation (``M31``, ``NGC 6946``, ``IC0495``) -> ``M31``, ``NGC6946``, ``IC495``;
* a sky position written as ``..._<ra>_<dec>.ext`` (degrees) -> rounded to 0.001 deg (3.6");
* an SDSS run-camcol-field (``004510-4-0030``);
* otherwise the file stem without a trailing ``-<copy number>`` (``barnard_147-2`` -> ``barnard_147``;
  ``frame_0042`` stays itself).

Splits are by a seeded hash of that key, so they are stable across runs and
machines and do not depend on which other files exist.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import data_loader

logger = logging.getLogger(__name__)

SPLITS = ("train", "calibration", "validation")
_DESIGNATION = re.compile(r"(?<![a-z])(m|ngc|ic)[ _-]?0*(\d+)(?!\d)", re.IGNORECASE)
_SKY_POSITION = re.compile(r"_(\d{1,3}\.\d+)_([+-]?\d{1,2}\.\d+)$")
_SDSS_FIELD = re.compile(r"(\d{6}-\d-\d{4})")
_COPY_NUMBER = re.compile(r"-\d{1,2}$")


@dataclass(frozen=True)
class LabelledFile:
    """One real labelled file: where it is, its class, the source it came from and the object it shows."""

    path: Path
    label: str
    source: str
    object_key: str
    split: str = "train"


def object_key(path: str | Path) -> str:
    """The object a file shows, from its name (see the module docstring); files sharing it stay together."""
    stem = Path(path).name
    for suffix in data_loader.SUPPORTED_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if match := _SKY_POSITION.search(stem):
        return f"sky:{float(match.group(1)):.3f},{float(match.group(2)):+.3f}"
    if match := _SDSS_FIELD.search(stem):
        return f"sdss:{match.group(1)}"
    if match := _DESIGNATION.search(stem):
        return f"{match.group(1).upper()}{int(match.group(2))}"
    return "name:" + _COPY_NUMBER.sub("", stem.lower())


def discover(directory: Path, class_names: Sequence[str] | None = None) -> list[LabelledFile]:
    """Readable-extension files under ``directory/<class>/`` (every sub-folder is a class unless named).

    Raises
    ------
    FileNotFoundError
        When the directory is missing or holds no class folder with images.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: labelled directory not found")
    classes = sorted(p.name for p in directory.iterdir() if p.is_dir()) if class_names is None else class_names
    found = [
        LabelledFile(path, name, directory.name, object_key(path))
        for name in classes if (directory / name).is_dir()
        for path in sorted((directory / name).rglob("*"))
        if path.is_file() and data_loader.is_supported(path.name)
    ]
    if not found:
        raise FileNotFoundError(f"{directory}: no images in class sub-folders ({', '.join(classes) or 'none found'})")
    return found


def _fraction_of(key: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_splits(files: Sequence[LabelledFile], fractions: tuple[float, float] = (0.6, 0.2), seed: int = 0
                  ) -> list[LabelledFile]:
    """Each object key to train / calibration / validation with the given train and calibration shares."""
    train_share, calibration_share = fractions
    out = []
    for item in files:
        u = _fraction_of(item.object_key, seed)
        split = "train" if u < train_share else "calibration" if u < train_share + calibration_share else "validation"
        out.append(LabelledFile(item.path, item.label, item.source, item.object_key, split))
    return out


def validation_only(files: Sequence[LabelledFile]) -> list[LabelledFile]:
    """Files of a source kept out of training entirely (licence or independence)."""
    return [LabelledFile(f.path, f.label, f.source, f.object_key, "validation") for f in files]


def labelled_pairs(files: Iterable[LabelledFile], class_names: Sequence[str]) -> list[tuple[Path, int]]:
    """(path, class index) pairs, what calibration.collect_logits takes."""
    return [(f.path, list(class_names).index(f.label)) for f in files]


def summarise(files: Sequence[LabelledFile]) -> dict[str, dict[str, dict[str, int]]]:
    """Counts per split, source and class (for logs, the model card and evaluation.json)."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for (split, source, label), n in sorted(Counter((f.split, f.source, f.label) for f in files).items()):
        counts.setdefault(split, {}).setdefault(source, {})[label] = n
    return counts


def format_confounds(files: Sequence[LabelledFile], most: float = 0.8, few: float = 0.2) -> list[str]:
    """A message for each class of which at least ``most`` of the files are of one file format that at most ``few``
    of another class's files are: a model can tell those classes apart by their format, as the shipped model's
    could have learned its real galaxies by their survey-cutout style."""
    by_class: dict[str, Counter[str]] = {}
    for f in files:
        by_class.setdefault(f.label, Counter())[data_loader.file_format(f.path)] += 1
    shares = {label: {kind: n / sum(counts.values()) for kind, n in counts.items()}
              for label, counts in sorted(by_class.items())}
    messages = []
    for label, own in shares.items():
        for kind, share in own.items():
            apart = [other for other in shares if other != label and shares[other].get(kind, 0.0) <= few]
            if share >= most and apart:
                against = ", ".join(f"{shares[other].get(kind, 0.0):.0%} of the {other} files" for other in apart)
                messages.append(f"class {label}: {share:.0%} of its files are {kind.upper()} against {against}: "
                                f"the model can tell them apart by file format")
    return messages


def leaked_objects(files: Sequence[LabelledFile]) -> set[str]:
    """Object keys present both in training and outside it (must be empty for group splits)."""
    train = {f.object_key for f in files if f.split == "train"}
    return {f.object_key for f in files if f.split != "train" and f.object_key in train}


def stratified_split(files: Sequence[LabelledFile], test_fraction: float, calibration_fraction: float,
                     seed: int = 0) -> list[LabelledFile]:
    """Per class, whole objects in seeded hash order fill validation, then calibration, to their share of the
    class's files; the rest trains (always at least one object)."""
    out: list[LabelledFile] = []
    for label in sorted({f.label for f in files}):
        by_object: dict[str, list[LabelledFile]] = {}
        for item in files:
            if item.label == label:
                by_object.setdefault(item.object_key, []).append(item)
        total = sum(len(group) for group in by_object.values())
        wanted = {"validation": test_fraction * total, "calibration": calibration_fraction * total}
        taken = {"validation": 0, "calibration": 0, "train": 0}
        keys = sorted(by_object, key=lambda key: _fraction_of(key, seed))
        for index, key in enumerate(keys):
            split = next((s for s in wanted if taken[s] < wanted[s]), "train")
            if index == len(keys) - 1 and not taken["train"]:
                split = "train"
            taken[split] += len(by_object[key])
            out += [LabelledFile(f.path, f.label, f.source, f.object_key, split) for f in by_object[key]]
    return out
