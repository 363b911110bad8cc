"""Every method through the trainer: same metrics, config errors before any work, init_from, rewards, DDP."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from launching import launch_two_processes
import torch

from soarflow.train import load_config, train
from soarflow.train.config import TrainConfig
from soarflow.train.methods import METHODS, build_method, load_init_weights, method_config

from .test_distributed import WORKER
from .toy_task import ToyTask, toy_reward

COMMON = ["--report_to", "none", "--show_progress", "false", "--checkpointing_steps", "0", "--learning_rate", "1e-2"]
METHOD_ARGS = {
    "sft": [],
    "soar": ["--soar.num_aux", "2", "--soar.rollout_steps", "4"],
    "grpo": [
        "--grpo.group_size",
        "2",
        "--grpo.num_steps",
        "4",
        "--grpo.train_timesteps",
        "2",
        "--grpo.guidance_scale",
        "1",
        "--grpo.reward",
        "train.toy_task:toy_reward",
    ],
    "scheduled_sampling": ["--scheduled_sampling.max_step_offset", "2", "--scheduled_sampling.num_steps", "4"],
    "input_perturbation": ["--input_perturbation.gamma", "0.2"],
}


def run(tmp_path, method, *extra, task=None, **kw):
    cfg = load_config(
        None,
        [
            "--method",
            method,
            "--output_dir",
            str(tmp_path / method),
            "--train_batch_size",
            "4",
            "--max_train_steps",
            "2",
            *COMMON,
            *METHOD_ARGS[method],
            *extra,
        ],
    )
    return train(cfg, task=task or ToyTask(), **kw)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_and_logs_the_same_metrics(tmp_path, method):
    torch.manual_seed(0)
    before = ToyTask().build_model().state_dict()
    result = run(tmp_path, method)
    assert result.global_step == 2 and len(result.history) == 2
    for entry in result.history:
        for key in ("loss", "forwards_per_sample", "grad_forwards_per_sample", "step_time_s", "lr"):
            assert key in entry and math.isfinite(entry[key]), (method, key, entry)
        assert entry["step_time_s"] > 0
    last = result.history[-1]
    # soar: main + K aux with grad, and the rollout's unconditional half (its conditional half is the main output)
    expected = {
        "sft": (1, 1),
        "soar": (1 + 1 + 2, 1 + 2),
        "input_perturbation": (1, 1),
        "grpo": (4 + 2 + 2, 2),
    }  # grpo: 4 rollout steps, 2 trained steps, 2 reference forwards
    if method in expected:
        assert (last["forwards_per_sample"], last["grad_forwards_per_sample"]) == expected[method], last
    else:  # scheduled_sampling: 1 training forward plus at most max_step_offset rollout forwards
        assert last["grad_forwards_per_sample"] == 1 and 1 <= last["forwards_per_sample"] <= 3
    if method == "grpo":
        assert {"reward_mean", "reward_std", "kl", "clip_frac", "entropy", "policy_loss"} <= set(last)
        assert result.history[0]["kl"] == 0  # the reference is the start model
    after = result.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), f"{method} did not move the weights"


def test_unknown_method_and_foreign_section_keys_fail_before_anything_runs(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="config key 'method'"):
        load_config(None, ["--method", "dpo", "--output_dir", str(out)])
    with pytest.raises(ValueError, match="config key 'grpo.beta' applies only to method 'grpo'"):
        load_config(None, ["--method", "sft", "--grpo.beta", "0.04"])  # even at its default value
    with pytest.raises(ValueError, match="'scheduled_sampling.probability' applies only"):
        TrainConfig(method="grpo", scheduled_sampling=type(TrainConfig().scheduled_sampling)(probability=0.5))
    with pytest.raises(ValueError, match="unknown config key 'grpo.group'"):
        load_config(None, ["--method", "grpo", "--grpo.group", "4"])
    with pytest.raises(ValueError, match="'train_batch_size': must be a multiple of grpo.group_size 4"):
        load_config(None, ["--method", "grpo", "--train_batch_size", "6"])
    with pytest.raises(ValueError, match="config key 'grpo.reward'.*no attribute 'nope'"):
        train(
            load_config(
                None, ["--method", "grpo", "--grpo.reward", "soarflow.shapes:nope", "--output_dir", str(out), *COMMON]
            ),
            task=ToyTask(),
        )
    with pytest.raises(FileNotFoundError, match="config key 'init_from'"):
        train(
            load_config(None, ["--init_from", str(tmp_path / "missing"), "--output_dir", str(out), *COMMON]),
            task=ToyTask(),
        )
    assert not out.exists()
    # the written config holds only the active method's section, and reloads
    cfg = load_config(None, ["--method", "input_perturbation", "--input_perturbation.gamma", "0.3"])
    assert "grpo" not in cfg.to_dict() and cfg.to_dict()["input_perturbation"] == {"gamma": 0.3}
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda im, p: torch.ones(len(p) + 1), r"returned shape \(5,\)"),
        (lambda im, p: torch.full((len(p),), float("nan")), "returned 4 non-finite"),
    ],
)
def test_a_bad_reward_stops_the_run_naming_the_reward_and_step(tmp_path, bad, match):
    def my_reward(images, prompts):
        return bad(images, prompts)

    with pytest.raises(ValueError, match=rf"reward 'my_reward' at step 0: {match}"):
        run(tmp_path, "grpo", reward=my_reward)


def test_grpo_reward_from_the_python_api_is_called_with_group_prompts(tmp_path):
    seen = []

    def reward(images, prompts):
        seen.append(list(prompts))
        return toy_reward(images, prompts)

    run(tmp_path, "grpo", reward=reward)
    assert len(seen) == 2 and all(len(p) == 4 and p[0] == p[1] and p[2] == p[3] for p in seen)
    with pytest.raises(ValueError, match="uses no reward"):
        build_method(load_config(None, ["--method", "sft"]), reward=reward)


def test_init_from_a_finished_run_loads_its_weights_and_is_the_kl_reference(tmp_path):
    first = run(tmp_path, "sft")
    task = ToyTask()
    model = task.build_model()
    load_init_weights(task, model, first.output_dir)
    for k, v in first.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
    rl = run(tmp_path, "grpo", "--init_from", str(first.output_dir))
    assert rl.history[0]["kl"] == 0 and rl.history[1]["kl"] > 0  # the reference is the SFT model, not the init


def test_sample_reuse_makes_the_ratio_clip_active(tmp_path):
    result = run(tmp_path, "grpo", "--grpo.sample_reuse", "2", "--grpo.clip_range", "1e-4")
    assert result.history[0]["approx_kl_old"] < 1e-12  # fresh rollouts: on-policy
    assert result.history[1]["approx_kl_old"] > 0 and result.history[1]["clip_frac"] > 0  # reused after an update


def test_method_config_builds_each_shapes_recipe():
    for method in METHODS:
        cfg = method_config(method, {"output_dir": "/tmp/x", "train_batch_size": 8, "max_train_steps": 5})
        assert cfg.method == method and cfg.task == "shapes" and cfg.train_batch_size == 8
        assert cfg.soar.shift == 1.0


@pytest.mark.parametrize("method", ["scheduled_sampling", "grpo"])
def test_two_processes(tmp_path, method):
    """scheduled_sampling (like input_perturbation) draws every random number for the global batch, so two processes
    match one; grpo's rollouts are per process, so there it runs under DDP and gives finite metrics."""
    args = ["--method", method, "--max_train_steps", "2", *COMMON, *METHOD_ARGS[method]]
    launch_two_processes(WORKER, tmp_path / "dist", "--train_batch_size", "2", *args, timeout=240)
    dist = json.loads((tmp_path / "dist" / "history.json").read_text())
    assert dist["num_processes"] == 2
    if method == "grpo":
        assert all(math.isfinite(h["loss"]) and math.isfinite(h["reward_mean"]) for h in dist["history"])
        return
    single = train(
        load_config(None, ["--output_dir", str(tmp_path / "single"), "--train_batch_size", "4", *args]), task=ToyTask()
    )
    for d, s in zip(dist["history"], single.history, strict=True):
        for key in ("loss", "flow_loss", "grad_norm"):
            assert abs(d[key] - s[key]) <= 1e-5 * max(1.0, abs(s[key])), (key, d[key], s[key])


def test_shipped_shapes_recipes_load():
    root = Path(__file__).resolve().parents[2]
    for method in METHODS:
        cfg = load_config(root / "configs" / f"shapes_{method}.yaml")
        assert cfg.method == method and cfg.model["pretrained"] == "base"
