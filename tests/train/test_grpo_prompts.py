"""GRPO on a real-model task from a prompt file (no images) with a `soarflow eval` scorer as the reward, on two
processes whose per-prompt statistics are shared (Flow-GRPO's stat tracker over the gathered batch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from launching import launch_two_processes
import torch

pytest.importorskip("diffusers")

from diffusers_testing import build_tiny_clip, build_tiny_sd3_pipeline  # noqa: E402
from soarflow.data.prompts import PromptDataset, collate_prompts, read_prompt_file  # noqa: E402
from soarflow.methods.grpo import prompt_advantages  # noqa: E402
from soarflow.train import load_config  # noqa: E402
from soarflow.train.methods import resolve_reward  # noqa: E402


WORKER = Path(__file__).with_name("grpo_dist_worker.py")


def test_prompt_files_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\n\n  a dog running in the park  \n")
    assert read_prompt_file(txt) == ["a red circle", "a dog running in the park"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a red circle", "tag": "single_object"}\n\n{"prompt": "a blue square"}\n')
    assert read_prompt_file(jsonl) == ["a red circle", "a blue square"]
    ds = PromptDataset.from_file(jsonl)
    assert len(ds) == 2 and collate_prompts([ds[1], ds[0]]) == {
        "caption": ["a blue square", "a red circle"],
        "key": ["1", "0"],
        "metadata": [{"prompt": "a blue square"}, {"prompt": "a red circle", "tag": "single_object"}],
    }
    assert PromptDataset.from_file(txt, max_samples=1)[0] == {"caption": "a red circle", "key": "0", "metadata": None}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: expected an object with a non-empty 'prompt'"):
        read_prompt_file(bad)
    bad.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        read_prompt_file(bad)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompt_file(tmp_path / "empty.txt")
    (tmp_path / "p.csv").write_text("a\n")
    with pytest.raises(ValueError, match=r"expected a \.txt .* or \.jsonl"):
        read_prompt_file(tmp_path / "p.csv")


def test_prompt_data_is_refused_for_methods_that_need_images(tmp_path):
    from soarflow.tasks.registry import build_task

    (tmp_path / "p.txt").write_text("a red circle\n")
    args = [
        "--task",
        "sd3",
        f"--model.pretrained={tmp_path / 'pipe'}",
        "--data.format=prompts",
        f"--data.path={tmp_path / 'p.txt'}",
    ]
    with pytest.raises(ValueError, match="'prompts' holds no images, so only method grpo"):
        build_task(load_config(None, ["--method", "sft", *args]))
    task = build_task(load_config(None, ["--method", "grpo", "--train_batch_size", "4", *args]))
    assert task.train_dataset().prompts == ["a red circle"]
    with pytest.raises(ValueError, match="'prompts': the batch holds prompts and no images"):
        task.encode_batch(task.collate([task.train_dataset()[0]]), torch.device("cpu"))


def test_reward_by_scorer_name_uses_the_eval_registry(tmp_path):
    clip = build_tiny_clip(tmp_path / "clip")
    reward, name = resolve_reward("clip", {"path": str(clip)}, "sd3")
    scores = reward(torch.zeros(2, 3, 32, 32), ["a red circle", "a dog running in the park"])
    assert name == "clip" and scores.shape == (2,) and scores.abs().max() <= 1
    with pytest.raises(ValueError, match="config key 'grpo.reward': unknown scorer 'nope'"):
        resolve_reward("nope", {}, "sd3")
    with pytest.raises(ValueError, match="config key 'grpo.reward': .*"):
        resolve_reward("clip", {"path": str(tmp_path / "missing")}, "sd3")


def test_two_processes_share_per_prompt_statistics_on_a_prompt_file(tmp_path):
    sd3 = build_tiny_sd3_pipeline(tmp_path / "pipe")
    clip = build_tiny_clip(tmp_path / "clip")
    # two distinct prompts (both with CLIP scores above 0 on the tiny CLIP), repeated: the processes draw the same
    # prompts, whose images then share one mean
    prompts = ["a dog running in the park"] * 5 + ["a blue square and a green triangle"] * 3
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    # grpo.reward=clip: soarflow eval's CLIP score by name
    launch_two_processes(
        str(WORKER),
        str(tmp_path / "dist"),
        "--task=sd3",
        "--method=grpo",
        "--train_batch_size=4",
        "--max_train_steps=2",
        "--checkpointing_steps=0",
        "--report_to=none",
        "--show_progress=false",
        "--validation_steps=0",
        "--learning_rate=1e-2",
        "--grpo.group_size=2",
        "--grpo.num_steps=3",
        "--grpo.train_timesteps=1",
        "--grpo.guidance_scale=2.0",
        "--grpo.reward=clip",
        f"--grpo.reward_kwargs={{path: {clip}}}",
        f"--model.pretrained={sd3}",
        "--model.max_sequence_length=8",
        "--model.finetune=lora",
        "--model.lora={rank: 4, alpha: 8}",
        "--data.format=prompts",
        f"--data.path={tmp_path / 'prompts.jsonl'}",
        "--data.resolution=32",
        timeout=400,
    )
    ranks = [json.loads((tmp_path / "dist" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["num_processes"] == 2 and len(ranks[0]["calls"]) == len(ranks[1]["calls"]) == 2
    shared = differs = 0
    for c0, c1 in zip(ranks[0]["calls"], ranks[1]["calls"], strict=True):
        assert c0["global_std"] is True  # the default, as the release's configs
        prompts = c0["prompts"] + c1["prompts"]
        rewards = torch.tensor(c0["rewards"] + c1["rewards"], dtype=torch.float64)
        assert len(prompts) == 8 and rewards.std() > 0  # the CLIP scorer gave distinct rewards
        assert rewards.abs().max() <= 1 and (rewards != 0).all()  # build_scorer("clip"): the plain cosine
        # one process on the global batch gives the same advantages as the two ranks did
        one = prompt_advantages(prompts, rewards, c0["clip"], global_std=True)
        torch.testing.assert_close(torch.tensor(c0["advantages"] + c1["advantages"]), one, rtol=1e-6, atol=1e-6)
        for c in (c0, c1):
            local = prompt_advantages(c["prompts"], torch.tensor(c["rewards"]), c["clip"], global_std=True)
            differs += not torch.allclose(local, torch.tensor(c["advantages"]))
        shared += bool(set(c0["prompts"]) & set(c1["prompts"]))  # a prompt with images on both ranks: one mean
    assert differs > 0 and shared > 0  # so the statistics were gathered, not per process
    last = ranks[0]["history"][-1]
    assert all(torch.isfinite(torch.tensor(v)) for v in last.values())


def test_flux_grpo_trains_from_a_prompt_file_without_encoding_an_image(tmp_path, monkeypatch):
    import diffusers
    from diffusers_testing import build_tiny_flux_pipeline

    from soarflow.train import train

    flux = build_tiny_flux_pipeline(tmp_path / "flux", guidance_embeds=True)
    lines = [
        {"prompt": "a red circle", "tag": "single_object", "include": [{"class": "circle", "count": 1}]},
        {"prompt": "a dog running in the park", "tag": "other"},
    ]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    def no_encode(*args, **kwargs):
        raise AssertionError("GRPO encoded an image")

    monkeypatch.setattr(diffusers.AutoencoderKL, "encode", no_encode)
    seen = []

    def brightness(images, prompts, metadata=None):  # a reward that reads the .jsonl lines, as GenEval's does
        seen.append((tuple(images.shape), list(prompts), metadata))
        return images.mean(dim=(1, 2, 3))

    cfg = load_config(
        None,
        [
            "--task=flux",
            "--method=grpo",
            f"--output_dir={tmp_path / 'run'}",
            "--train_batch_size=2",
            "--max_train_steps=1",
            "--checkpointing_steps=0",
            "--report_to=none",
            "--show_progress=false",
            "--validation_steps=0",
            "--grpo.group_size=2",
            "--grpo.num_steps=3",
            "--grpo.train_timesteps=1",
            "--grpo.guidance_scale=1.0",
            f"--model.pretrained={flux}",
            "--model.max_sequence_length=8",
            "--model.guidance=embedded",
            "--data.format=prompts",
            f"--data.path={tmp_path / 'prompts.jsonl'}",
            "--data.resolution=32",
        ],
    )
    result = train(cfg, reward=brightness)
    assert len(seen) == 1 and seen[0][0][0] == 2 and seen[0][0][-2:] == (32, 32)
    assert seen[0][1][0] == seen[0][1][1]  # one prompt, G = 2 images
    line = next(m for m in lines if m["prompt"] == seen[0][1][0])
    assert seen[0][2] == [line, line]  # its whole metadata line, once per image
    assert all(torch.isfinite(torch.tensor(v)) for v in result.history[-1].values())
