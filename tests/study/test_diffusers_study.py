"""A study on a diffusers task (tiny random SD3 pipeline) runs through the same code path, with the
task-agnostic `loss` evaluation."""

import json

import pytest
import yaml

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers_testing import build_tiny_sd3_pipeline, make_imagefolder  # noqa: E402
from soarflow.commands.study import main  # noqa: E402


def test_sd3_study_with_loss_evaluation(tmp_path):
    pipe = build_tiny_sd3_pipeline(tmp_path / "pipe", variant="sd3")
    images = make_imagefolder(tmp_path / "imgs", sizes=((32, 32),))
    study = {
        "name": "sd3",
        "base": {
            "task": "sd3",
            "train_batch_size": 2,
            "learning_rate": 1e-3,
            "soar.num_aux": 1,
            "soar.rollout_steps": 4,
            "soar.guidance_scale": 2.0,
            "model": {"pretrained": str(pipe), "max_sequence_length": 8},
            "data": {"path": str(images), "resolution": 32, "validation_prompts": ["a red circle"]},
        },
        "seeds": [0],
        "budget": {"steps": 1},
        "evaluation": {"kind": "loss", "num_steps": [8], "guidance_scales": [2.0], "num_samples": 3, "shift": 3.0},
        "rows": [{"name": "sft", "set": {"method": "sft"}}, {"name": "soar", "set": {"method": "soar"}}],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    out = tmp_path / "out"
    assert main(["--config", str(path), "--output_dir", str(out), "--no_estimate", "--num_resamples", "200"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [c["status"] for c in results["cells"]] == ["ok"] * 3
    table = results["summary"]["steps"]["steps8_cfg2"]
    assert table["soar"]["fm_loss"]["mean"] > 0 and "sft" in table["soar"]["compare"]
    assert "Δ fm_loss vs sft" in (out / "report.md").read_text()
