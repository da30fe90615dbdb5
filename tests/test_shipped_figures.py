"""The shipped evaluation belongs to the shipped files, and the figures README and MODEL_CARD quote are its own.

Training is too slow for CI, so the figures are measured once (the model card's command) and written to
``evaluation/evaluation.json``; these tests catch a model, scaler or thresholds file changed without a new
evaluation, and documents left quoting an older one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from backends import sha256_of
from calibration import GATE_FIELDS

ROOT = Path(__file__).resolve().parent.parent
EVALUATION = json.loads((ROOT / "evaluation" / "evaluation.json").read_text())
SUMMARY = EVALUATION["summary"]
README = (ROOT / "README.md").read_text()
MODEL_CARD = (ROOT / "MODEL_CARD.md").read_text()


def percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


@pytest.mark.parametrize("artifact", ["model", "scaler", "thresholds", "backend"])
def test_evaluation_is_of_the_shipped_files(artifact: str) -> None:
    recorded = EVALUATION["artifacts"][artifact]
    shipped = ROOT / recorded["file"]
    assert shipped.is_file(), f"evaluation.json names {recorded['file']}, which is not shipped"
    assert sha256_of(shipped) == recorded["sha256"], f"{shipped.name} changed after the shipped evaluation"


def test_evaluation_ran_on_the_default_files() -> None:
    thresholds = json.loads((ROOT / EVALUATION["artifacts"]["thresholds"]["file"]).read_text())
    assert EVALUATION["artifacts"]["model"]["file"] == thresholds["model_file"]
    assert EVALUATION["artifacts"]["thresholds"]["file"] == "thresholds_prod_precision.json"
    assert EVALUATION["temperature"] == thresholds["temperature"]


def test_model_card_operating_point_is_the_shipped_one() -> None:
    thresholds = json.loads((ROOT / "thresholds_prod_precision.json").read_text())
    bias = " / ".join("0" if value == 0 else f"{value:+.2f}" for value in thresholds["class_bias"])
    assert (f"temperature **{thresholds['temperature']}** and a per-class bias on the\nlogits (galaxy / nebula / "
            f"star_cluster / star_field / artifact {bias})") in MODEL_CARD
    assert f"the temperature alone\nfits at {thresholds['fitted_temperature']['tta']:.3f}" in MODEL_CARD
    radii = " / ".join(f"{value:.2f}" for value in thresholds["feature_gate"]["class_max_distance"])
    assert f"artifact {radii};" in MODEL_CARD
    limits = " / ".join("0" if value == 0 else f"{value:.4f}"
                        for value in thresholds["smooth_gate"]["class_max_fraction"])
    assert f"artifact {limits}:" in re.sub(r"\s+", " ", MODEL_CARD)


def test_readme_headline_is_the_real_validation() -> None:
    real = SUMMARY["real_validation"]
    match = re.search(r"On ([\d,]+) real validation images it labels ([\d.]+%) and\s+([\d.]+%) of those labels",
                      README)
    assert match, "README's headline sentence about real validation is gone"
    assert match.groups() == (f"{real['n']:,}", percent(real["coverage"]), percent(real["selective_accuracy"]))


def test_model_card_real_validation_row() -> None:
    real = SUMMARY["real_validation"]
    row = re.search(r"\| \*\*all real validation\*\* \| ([\d,]+) \| \*\*([\d.]+)\*\* \| \*\*([\d.]+)\*\* \|",
                    MODEL_CARD)
    assert row, "MODEL_CARD's 'all real validation' row is gone"
    assert row.groups() == (f"{real['n']:,}", f"{real['coverage']:.3f}", f"{real['selective_accuracy']:.3f}")
    assert f"validation at the operating point: **{real['ece']:.3f}**" in MODEL_CARD


# the out-of-distribution table's columns after "held out", in the card's order: evaluation.json's fields
OOD_COLUMNS = {"abstained": "abstained_fraction", "without the layer gate": "abstained_fraction_without_layer_gate",
               "without the smooth-area gate": "abstained_fraction_without_smooth_gate",
               "without the member gate": "abstained_fraction_without_member_gate",
               "without the feature gate": "abstained_fraction_without_feature_gate",
               "embedding Mahalanobis gate only": "abstained_fraction_mahalanobis_only",
               "thresholds only": "abstained_fraction_thresholds_only",
               "learned gate refitted without the kind": "abstained_fraction_leave_one_kind_out"}


def test_model_card_out_of_distribution_table() -> None:
    assert f"| kind | held out | {' | '.join(OOD_COLUMNS)} |" in MODEL_CARD, "the table's columns changed"
    for kind, abstained in SUMMARY["ood_abstained_by_kind"].items():
        row = re.search(rf"^\| {kind} \| [^|]+ \| (.*) \|$", MODEL_CARD, re.MULTILINE)
        assert row, f"MODEL_CARD's out-of-distribution table has no row for {kind}"
        figures = EVALUATION["ood_by_kind"][kind]
        assert row.group(1).split(" | ") == [percent(figures[key]) for key in OOD_COLUMNS.values()], kind
        assert figures["abstained_fraction"] == abstained


def test_model_card_simulated_coverage() -> None:
    assert f"simulated coverage {SUMMARY['simulated_test']['coverage']:.3f} (target 0.85" in MODEL_CARD


def test_model_card_figures_without_tta() -> None:
    real, sim = SUMMARY["real_validation_no_tta"], EVALUATION["simulated_test"]["no_tta"]
    precision = " / ".join(f"{name} {real['precision'][name]:.3f}" for name in ("galaxy", "nebula", "star_cluster"))
    stated = re.sub(r"\s+", " ", MODEL_CARD)
    assert (f"real validation coverage {real['coverage']:.3f}" in stated and f"(accuracy "
            f"{real['selective_accuracy']:.3f}), precision {precision}, ECE {real['ece']:.3f}; simulated coverage "
            f"{sim['coverage']:.3f}" in stated), "MODEL_CARD's paragraph on figures without TTA"


def test_model_card_table_by_input_style() -> None:
    for data, key in (("simulated test", EVALUATION["simulated_test"]), ("real validation",
                                                                        EVALUATION["real_validation"])):
        for style, figures in key["per_input_style"].items():
            row = (f"| {data} | {style} | {figures['n']:,} | {figures['coverage']:.3f} | "
                   f"{figures['turned_away_by_gates']:.3f} | {figures['top1_accuracy']:.3f} |")
            assert row in MODEL_CARD, f"MODEL_CARD's table by input style: {row}"


def test_model_card_gate_costs() -> None:
    flat = " ".join(MODEL_CARD.split())
    for data in ("simulated_test", "real_validation"):
        by_gate = EVALUATION[data]["coverage_by_gate"]
        left_out = " / ".join(f"{by_gate[f'without_{gate}']:.3f}" for gate in GATE_FIELDS)  # the card's order
        quoted = f"{left_out}; thresholds alone {by_gate['thresholds_only']:.3f}"
        assert quoted in flat, f"MODEL_CARD's {data} gate costs: {quoted}"
