"""The shipped study files: `--quick` runs end to end on the shipped base (the CI smoke run), every file
parses with its seeds, both compute arms and contrasts between rows it runs, and every shipped report rebuilds
from its per-image data into the same text and numbers."""

import json
import shlex
from pathlib import Path

import pytest

from soarflow.study import load_study
from soarflow.commands.study import main

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
REPORTS = sorted(p.parent for p in (ROOT / "docs" / "results").glob("study_*/per_image.npz"))
STUDIES = [
    "study_claim.yaml",
    "study_knobs.yaml",
    "study_methods.yaml",
    "study_claim_focus.yaml",
    "study_claim_powered.yaml",
]
# every shipped study file; the headroom studies compare SFT with the base at equal steps only
ALL_STUDIES = STUDIES + [
    "study_headroom.yaml",
    "study_headroom_targeted.yaml",
    "study_headroom_replay.yaml",
    "study_headroom_noisy.yaml",
]


def test_claim_quick_runs_the_whole_pipeline(tmp_path):
    # Its time (< 2 minutes on a quiet 2-core CPU) is measured in docs/study.md, not asserted: machines are shared.
    out = tmp_path / "claim"
    assert main(["--config", str(CONFIGS / "study_claim.yaml"), "--quick", "--output_dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {c["row"] for c in results["cells"]} == {"base", "sft", "soar_demo"}
    assert all(c["status"] == "ok" for c in results["cells"])
    table = results["summary"]["steps"]["steps4_cfg4"]
    assert set(table["soar_demo"]["compare"]) == {"sft", "base"}
    assert 0 <= table["sft"]["overall"]["mean"] <= 1
    report = (out / "report.md").read_text()
    assert report.index("## Primary contrast") < report.index("## Secondary comparisons")
    assert "`soar_demo` minus `sft`, overall, equal optimizer steps, steps4_cfg4" in report
    assert "Minimum detectable effect at 80% power" in report and (out / "per_image.npz").is_file()
    assert results["primary"]["interval"]["se"] is not None and results["primary"]["mde_80"] > 0


@pytest.mark.parametrize("name", STUDIES)
def test_shipped_studies_parse_with_seeds_both_arms_and_their_contrasts(name):
    spec = load_study(CONFIGS / name)
    assert len(spec.seeds) >= 3 and spec.include_base and spec.reference == "sft"
    assert set(spec.budget.arms) == {"steps", "seconds"}
    rows = {r.name for r in spec.rows}
    assert spec.contrasts and all(a in rows and b in rows for a, b in spec.contrasts)
    assert spec.primary is not None and {spec.primary.row, spec.primary.against} <= rows
    assert spec.primary.setting == "steps40_cfg4" and spec.primary.arm in spec.budget.arms


@pytest.mark.parametrize("name", ALL_STUDIES)
def test_quick_sections_use_rows_that_exist_here(name):
    spec = load_study(CONFIGS / name, quick=True)
    assert spec.rows and spec.include_base
    # the quick run evaluates its primary contrast (both rows run, at a setting it evaluates)
    assert {spec.primary.row, spec.primary.against} <= set(spec.row_names())


@pytest.mark.parametrize("folder", REPORTS, ids=lambda p: p.name)
def test_shipped_reports_rebuild_from_their_per_image_data(folder, tmp_path):
    from soarflow.commands.study import build_parser
    from soarflow.commands.study_report import main as rebuild_report

    results = json.loads((folder / "results.json").read_text())
    made_with, _ = build_parser().parse_known_args(shlex.split(results["command"])[2:])  # after "soarflow study"
    args = [str(folder), "--config", str(ROOT / made_with.config), "--output_dir", str(tmp_path)]
    args += ["--quick"] if made_with.quick else []
    args += ["--only", *made_with.only] if made_with.only else []
    args += ["--seeds", *map(str, made_with.seeds)] if made_with.seeds else []
    assert rebuild_report(args) == 0
    assert (tmp_path / "report.md").read_text() == (folder / "report.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_the_shipped_reports_are_found():
    assert {p.name for p in REPORTS} >= {"study_headroom", "study_headroom_targeted", "study_headroom_replay"}
