"""bench/gpu_all.sh (the prepared GPU run) on the CPU: its arguments, and its tiny mode through the env, claim,
layout and fsdp sections, with stand-ins for the claim-study and FSDP scripts of other branches. The scale
section's script is tested in test_scale.py (it needs minutes here through the shell script)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_all.sh"


def run(*args, env=None, cwd_script=SCRIPT, timeout=900):
    full = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **(env or {})}
    full["PYTHONPATH"] = str(REPO / "src")
    return subprocess.run(["bash", str(cwd_script), *args], capture_output=True, text=True, env=full, timeout=timeout)


def test_arguments_are_checked_before_anything_runs(tmp_path):
    bad = run("--fast", env={"OUT": str(tmp_path / "o")})
    assert bad.returncode == 2 and "unknown argument '--fast'" in bad.stderr
    bad = run("--tiny", env={"OUT": str(tmp_path / "o"), "GPU_SECTIONS": "env,scales"})
    assert bad.returncode == 2 and "unknown section 'scales'" in bad.stderr
    assert not (tmp_path / "o").exists()
    usage = run("--help")
    assert usage.returncode == 0 and "GPU_SECTIONS" in usage.stdout and "pip download" in usage.stdout


@pytest.fixture
def repo_copy(tmp_path):
    """The bench scripts in a scratch repository, with stand-ins for bench/gpu_claim_study.sh (branch
    issue-runner) and bench/gpu_fsdp_check.sh (branch issue-fsdp) that record how they were called."""
    root = tmp_path / "repo"
    (root / "bench").mkdir(parents=True)
    for name in ("gpu_all.sh", "gpu_report.py", "scale_report.py", "step_cost.py"):
        shutil.copy(REPO / "bench" / name, root / "bench" / name)
    (root / "bench" / "gpu_claim_study.sh").write_text(
        'mkdir -p "$OUT" && echo "$STUDY_DEVICE $STUDY_MAX_SECONDS $STUDY_HARD_SECONDS $STUDY_JOBS $STUDY_ARGS '
        '$CELLS_DIR" > "$OUT/claim.txt"\n'
        'echo cells > "$OUT/cells.tar.gz"; echo "# report" > "$OUT/report.md"; echo claim study ran\n'
    )
    (root / "bench" / "gpu_fsdp_check.sh").write_text(  # outlasts its budget
        'mkdir -p "$OUT"; echo "fsdp check started smoke=$GPU_CHECK_CPU_SMOKE" > "$OUT/env.txt"; sleep 30\n'
    )
    return root


def test_tiny_mode_runs_the_sections_and_returns_few_files(tmp_path, repo_copy):
    out, work = tmp_path / "out", tmp_path / "work"
    res = run(
        env={
            "SOARFLOW_GPU_TINY": "1",
            "OUT": str(out),
            "GPU_WORK": str(work),
            "GPU_CLAIM_S": "100",
            "GPU_SECTIONS": "env,claim,layout,fsdp",
            "GPU_FSDP_S": "2",
            "GPU_LAYOUT_S": "500",
            "GPU_TOTAL_S": "900",
        },  # generous: a loaded CI core must not hit the tiny budgets
        cwd_script=repo_copy / "bench" / "gpu_all.sh",
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    # what the device tool returns: at most 8 files; here 6 (the claim study's archive and report among them)
    assert sorted(p.name for p in out.iterdir()) == [
        "claim_cells.tar.gz",
        "claim_report.md",
        "gpu_all.log",
        "gpu_all.tar.gz",
        "gpu_summary.json",
        "gpu_summary.md",
    ]
    summary = json.loads((out / "gpu_summary.json").read_text())
    status = {s["section"]: s for s in summary["sections"]}
    assert list(status) == ["env", "claim", "layout", "fsdp"]  # in this order
    assert status["env"]["rc"] == "0" and status["claim"]["rc"] == "0" and status["layout"]["rc"] == "0"
    assert status["fsdp"]["rc"] == "124" and "timeout" in status["fsdp"]["note"]  # cut at its budget, run goes on
    # the claim study gets a budget it ends within (cell starts stop at 60 %, hard stop 45 s before the end),
    # one worker, --quick and a scratch cell cache in tiny mode; the FSDP check its CPU smoke mode
    assert (work / "claim_study" / "claim.txt").read_text().split() == [
        "cpu",
        "50",
        "55",
        "1",
        "--quick",
        str(work / "claim_cells"),
    ]
    assert (work / "fsdp" / "env.txt").read_text().strip() == "fsdp check started smoke=1"
    # the layout section: the default resolves to reuse on a CPU, and every layout gives the same loss
    sc = summary["step_cost"]
    assert sc["default_layout"] == "reuse" and sc["device"] == "cpu"
    assert all(k["max_abs_loss_diff"] < 1e-5 for k in sc["ks"].values())
    assert set(sc["ks"]["1"]["median_s"]) == {"sft", "default", "reuse", "fused", "loop"}
    md = (out / "gpu_summary.md").read_text()
    assert "the default resolved to **reuse**" in md and "| claim | 0 |" in md
    with tarfile.open(out / "gpu_all.tar.gz") as tar:
        names = tar.getnames()
    assert "./step_cost.json" in names and "./claim_study/claim.txt" in names


def test_missing_scripts_of_other_branches_are_skipped_with_a_message(tmp_path, repo_copy):
    (repo_copy / "bench" / "gpu_claim_study.sh").unlink()
    (repo_copy / "bench" / "gpu_fsdp_check.sh").unlink()
    out = tmp_path / "out"
    res = run(
        env={"SOARFLOW_GPU_TINY": "1", "OUT": str(out), "GPU_WORK": str(tmp_path / "w"), "GPU_SECTIONS": "claim,fsdp"},
        cwd_script=repo_copy / "bench" / "gpu_all.sh",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    log = (out / "gpu_all.log").read_text()
    assert "bench/gpu_claim_study.sh is not in this checkout" in log
    assert "bench/gpu_fsdp_check.sh is not in this checkout" in log
