"""Helpers of the `soarflow study` tests on the tiny shapes base (the `tiny_base` fixture in conftest.py)."""

import yaml


def write_study(tmp_path, base, rows, **extra):
    """A study file ``tmp_path/study.yaml`` of `rows` over the shapes model at `base`: 2 SOAR steps of batch 4 a
    cell, one seed, a small evaluation; `extra` replaces top-level keys."""
    study = {
        "name": "t",
        "base": {
            "task": "shapes",
            "train_batch_size": 4,
            "learning_rate": 1e-3,
            "model.pretrained": str(base),
            "soar.num_aux": 2,
            "soar.rollout_steps": 5,
            "soar.guidance_scale": 2.0,
            "soar.shift": 1.0,
        },
        "seeds": [0],
        "budget": {"steps": 2},
        "evaluation": {
            "num_steps": [3],
            "guidance_scales": [2.0],
            "prompts_per_family": 1,
            "images_per_prompt": 2,
            "exposure_images": 4,
        },
        "rows": rows,
    }
    study.update(extra)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def quiet(msg):
    """A `log` that prints nothing."""
