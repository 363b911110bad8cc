"""CLIPScore example scorer (tiny random CLIP loaded from a folder) and the evaluation hook."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from diffusers_testing import build_tiny_clip  # noqa: E402
from soarflow.scorers import CLIPScorer, evaluate  # noqa: E402


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def test_clip_score_is_100_times_clamped_cosine(clip_path):
    scorer = CLIPScorer.from_pretrained(clip_path)
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a red circle", "a dog running in the park", "a cat"]
    scores = scorer(images, prompts)
    assert scores.shape == (3,) and (scores >= 0).all() and (scores <= 100).all()
    pixels = scorer.preprocess(images)
    assert pixels.shape == (3, 3, 32, 32)
    tokens = scorer.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        t = scorer.model.get_text_features(**tokens)
        i = scorer.model.get_image_features(pixel_values=pixels)
    t, i = getattr(t, "pooler_output", t), getattr(i, "pooler_output", i)
    torch.testing.assert_close(scores, 100 * F.cosine_similarity(i, t).clamp_min(0))
    torch.testing.assert_close(scorer(images, prompts), scores)  # deterministic
    with pytest.raises(ValueError, match="prompts"):
        scorer(images, prompts[:2])


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        CLIPScorer.from_pretrained(tmp_path / "nope")


def test_evaluate_generates_in_batches_and_summarises(clip_path):
    calls = []

    def generate(prompts):
        calls.append(list(prompts))
        return torch.stack([torch.full((3, 32, 32), float(len(p)) / 30 - 1) for p in prompts])

    def length_scorer(images, prompts):
        return torch.tensor([float(len(p)) for p in prompts])

    prompts = ["a", "bb", "ccc"]
    out = evaluate(
        generate,
        prompts,
        {"len": length_scorer, "clip": CLIPScorer.from_pretrained(clip_path)},
        batch_size=4,
        images_per_prompt=2,
    )
    assert [len(c) for c in calls] == [4, 2]
    assert out["len"]["per_prompt"] == [1.0, 2.0, 3.0] and out["len"]["mean"] == 2.0
    assert len(out["clip"]["per_prompt"]) == 3
    with pytest.raises(ValueError, match="scorer 'bad'"):
        evaluate(generate, prompts, {"bad": lambda im, p: torch.zeros(1)})
    with pytest.raises(ValueError, match="empty"):
        evaluate(generate, [], {"len": length_scorer})
