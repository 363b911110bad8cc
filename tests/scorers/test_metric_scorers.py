"""The paper's metrics on tiny random-weight stand-ins (tests/scorer_testing.py): the formula each one computes,
batching, output range, determinism, and one-line errors for a missing package or missing weights. The HPSv2.1
tests need open_clip and skip where it does not import (CI: scorer_testing.open_clip_missing)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from scorer_testing import build_standins, build_tiny_image_reward, fake_detector, open_clip_missing  # noqa: E402
from soarflow.scorers import (
    AestheticScorer,
    GenEvalScorer,
    HPSv2Scorer,
    ImageRewardScorer,
    OCRScorer,  # noqa: E402
    PickScoreScorer,
    SCORER_NAMES,
    build_scorer,
)
from soarflow.scorers.geneval import judge, relations, select_objects, summarize  # noqa: E402
from soarflow.scorers.images import clip_pixels  # noqa: E402
from soarflow.scorers.ocr import easyocr_reader, ocr_score, paddleocr_reader, target_text  # noqa: E402
from soarflow.scorers.registry import check_packages  # noqa: E402

PROMPTS = [
    "a photo of a bench and a sports ball",
    'a sign that says "SOAR"',
    "a photo of a cow",
    'the word "flow" in neon',
    "a photo of a bicycle",
]
OCR_PROMPTS = ['a sign that says "soar"'] * 5
needs_open_clip = pytest.mark.skipif(open_clip_missing() is not None, reason=str(open_clip_missing()))
ALL_SCORERS = [pytest.param(n, marks=needs_open_clip) if n == "hpsv2" else n for n in SCORER_NAMES]
GENEVAL_PROMPTS = [
    "a photo of a bench",
    "a photo of a cow",
    "a photo of a bicycle",
    "a photo of three buses",
    "a photo of a bench and a sports ball",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("standins")


@pytest.fixture(scope="module")
def scorers(root):
    return build_standins(root)


def images(n=5, size=(40, 48), seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth colour fields over a range of brightness, so the fake readers and detectors see different images
    base = torch.rand(n, 3, 2, 2, generator=g) * torch.linspace(0.2, 1.0, n).view(n, 1, 1, 1)
    return F.interpolate(base, size=size, mode="bilinear", align_corners=False) * 2 - 1


def prompts_for(name):
    return {"ocr": OCR_PROMPTS, "geneval": GENEVAL_PROMPTS}.get(name, PROMPTS)


@pytest.mark.parametrize("name", ALL_SCORERS)
def test_batching_determinism_and_range(scorers, name):
    scorer, x, prompts = scorers[name], images(), prompts_for(name)
    full = scorer(x, prompts)
    assert full.shape == (5,) and full.dtype == torch.float32 and torch.isfinite(full).all()
    ones = torch.cat([scorer(x[i : i + 1], prompts[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(full, ones, atol=1e-5, rtol=1e-5)  # a batch of N = N batches of 1
    torch.testing.assert_close(scorer(x, prompts), full, atol=0, rtol=0)  # deterministic
    torch.testing.assert_close(scorer(x.flip(0), prompts[::-1]), full.flip(0), atol=1e-5, rtol=1e-5)
    bounds = {"ocr": (0, 1), "geneval": (0, 1), "clip": (-1, 1), "hpsv2": (-1, 1)}
    if name in bounds:
        lo, hi = bounds[name]
        assert ((full >= lo) & (full <= hi)).all(), full
    if name == "pickscore":
        assert (full.abs() <= scorer.scale + 1e-4).all()
    if name in ("ocr", "pickscore", "clip", "hpsv2", "aesthetic", "imagereward"):
        assert full.unique().numel() > 1, f"{name} gives one value for different images: {full}"
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        scorer(x, prompts[:4])


def test_clip_family_formulas(scorers):
    x = images()
    clip, pick = scorers["clip"], scorers["pickscore"]
    pixels = clip_pixels(x, 32)
    tokens = clip.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        t = clip.model.get_text_features(**tokens)
        i = clip.model.get_image_features(pixel_values=pixels)
    t, i = getattr(t, "pooler_output", t), getattr(i, "pooler_output", i)
    cos = F.cosine_similarity(i, t)
    torch.testing.assert_close(clip(x, PROMPTS), cos)  # the paper's ClipScore: plain cosine
    torch.testing.assert_close(pick(x, PROMPTS), pick.model.logit_scale.exp().item() * cos)
    assert abs(pick.scale - 1 / 0.07) < 1e-3  # CLIP's initial logit scale, read from the model


@needs_open_clip
def test_hps_is_the_open_clip_cosine(scorers):
    hps, x = scorers["hpsv2"], images()
    with torch.no_grad():
        i = hps.model.encode_image(clip_pixels(x, 32))
        t = hps.model.encode_text(hps.tokenizer(PROMPTS))
    torch.testing.assert_close(hps(x, PROMPTS), F.cosine_similarity(i, t))


def test_aesthetic_is_the_head_on_the_normalised_embedding(scorers):
    aes, x = scorers["aesthetic"], images()
    with torch.no_grad():
        e = aes.clip.get_image_features(pixel_values=clip_pixels(x, 32))
        e = getattr(e, "pooler_output", e)
        expected = aes.head(e / e.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(aes(x, PROMPTS), expected)
    assert [type(m).__name__ for m in aes.head.layers] == [
        "Linear",
        "Dropout",
        "Linear",
        "Dropout",
        "Linear",
        "Dropout",
        "Linear",
        "Linear",
    ]


def test_image_reward_standardises_the_head_on_the_cls_feature():
    reward, tokenizer = build_tiny_image_reward()
    scorer = ImageRewardScorer(reward, tokenizer, image_size=32)
    x = images()
    tokens = tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["input_ids"].shape == (5, 35)
    with torch.no_grad():
        img = reward.vision(pixel_values=clip_pixels(x, 32)).last_hidden_state
        h = reward.text(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], encoder_hidden_states=img
        ).last_hidden_state[:, 0]
        expected = (reward.head(h).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(scorer(x, PROMPTS), expected)
    # the prompt matters: the text encoder reads it with cross-attention to the image
    assert not torch.allclose(scorer(x, PROMPTS), scorer(x, PROMPTS[::-1]))


def test_loading_twice_gives_the_same_scores(scorers, root):
    x = images()
    again = AestheticScorer.from_pretrained(root / "clip", head=root / "aesthetic_head.pth")
    torch.testing.assert_close(again(x, PROMPTS), scorers["aesthetic"](x, PROMPTS), atol=0, rtol=0)
    again = build_scorer("pickscore", path=str(root / "clip"))
    torch.testing.assert_close(again(x, PROMPTS), scorers["pickscore"](x, PROMPTS), atol=0, rtol=0)


@needs_open_clip
def test_loading_hps_twice_gives_the_same_scores(scorers, root):
    x = images()
    again = HPSv2Scorer.from_pretrained(root / "hps_tiny.pt", arch="tiny-hps")
    torch.testing.assert_close(again(x, PROMPTS), scorers["hpsv2"](x, PROMPTS), atol=0, rtol=0)


# ---------------------------------------------------------------- OCR


def test_ocr_metric_is_one_minus_clipped_normalised_edit_distance():
    assert target_text('a sign that says "Hello World" and "x"') == "Hello World"
    assert ocr_score("hello world", "Hello World") == 1.0  # case and spaces are ignored
    assert ocr_score("xx HELLOWORLD yy", "hello world") == 1.0  # the target inside the text read: distance 0
    assert ocr_score("helo", "hello") == pytest.approx(1 - 1 / 5)  # one deletion
    assert ocr_score("hxllo", "hello") == pytest.approx(0.8)  # one substitution
    assert ocr_score("", "hello") == 0.0
    assert ocr_score("a completely different and long text", "hello") == 0.0  # clipped at |target|
    with pytest.raises(ValueError, match="without a quoted target"):
        target_text("no quotes here")


def test_ocr_scorer_reads_each_image_and_adapts_easyocr_and_paddleocr():
    seen = []

    def reader(image):
        seen.append(image.shape)
        return "SO AR" if image.mean() > 127 else "sar"

    x = torch.stack([torch.ones(3, 8, 8), -torch.ones(3, 8, 8)])
    scores = OCRScorer(reader)(x, ['"soar"', 'write "soar"'])
    assert scores.tolist() == [1.0, 0.75] and seen == [(8, 8, 3), (8, 8, 3)]

    class EasyReader:
        def readtext(self, image):
            return [([0, 0], "so", 0.9), ([0, 0], "junk", 0.0), ([0, 0], "ar", 0.5)]

    class Paddle:
        def ocr(self, image, cls=False):
            return [[([0], ("so", 0.9)), ([0], ("ar", 0.8))]]

    class PaddleNothing:
        def ocr(self, image, cls=False):
            return [None]

    img = np.zeros((8, 8, 3), np.uint8)
    assert easyocr_reader(EasyReader())(img) == "soar"
    assert paddleocr_reader(Paddle())(img) == "soar" and paddleocr_reader(PaddleNothing())(img) == ""


# ---------------------------------------------------------------- GenEval


def det(box, score=0.95, mask=None):
    return (np.array(box, dtype=float), score, mask)


def test_geneval_counting_uses_its_own_threshold_and_the_exclude_clause():
    meta = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]}
    two = {"clock": [det([0, 0, 10, 10]), det([20, 0, 30, 10])]}
    three = {"clock": two["clock"] + [det([40, 0, 50, 10], 0.92)]}
    two_and_weak = {"clock": two["clock"] + [det([40, 0, 50, 10], 0.5)]}  # 0.5 < 0.9: not counted
    img = np.zeros((64, 64, 3), np.uint8)
    assert judge(img, select_objects(two, "counting"), meta, None)[0]
    assert not judge(img, select_objects(three, "counting"), meta, None)[0]
    assert judge(img, select_objects(two_and_weak, "counting"), meta, None)[0]
    ok, why = judge(img, select_objects({"clock": [det([0, 0, 9, 9], 0.5)]}, "counting"), meta, None)
    assert not ok and why == ["expected clock>=2, found 0"]
    # outside counting the threshold is 0.3, most confident first, at most 16 per class
    kept = select_objects({"cup": [det([0, 0, 1, 1], s) for s in [0.2, 0.5, 0.9] + [0.4] * 20]}, "single_object")
    assert len(kept["cup"]) == 16 and kept["cup"][0][1] == 0.9 and min(d[1] for d in kept["cup"]) > 0.3


def test_geneval_position_and_colour():
    img = np.zeros((100, 100, 3), np.uint8)
    bear, dog_right, dog_left = det([0, 40, 20, 60]), det([60, 40, 80, 60]), det([-60, 40, -40, 60])
    assert relations(dog_right, bear) == {"right of"} and relations(dog_left, bear) == {"left of"}
    assert relations(det([0, 0, 20, 20]), det([0, 50, 20, 70])) == {"above"}
    assert relations(det([0, 0, 20, 20]), det([2, 2, 22, 22])) == set()  # overlapping: too close to tell
    meta = {
        "tag": "position",
        "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    }
    assert judge(img, {"teddy bear": [bear], "dog": [dog_right]}, meta, None)[0]
    ok, why = judge(img, {"teddy bear": [bear], "dog": [dog_left]}, meta, None)
    assert not ok and why == ["expected dog right of target"]
    assert judge(img, {"dog": [dog_right]}, meta, None)[1] == [
        "expected teddy bear>=1, found 0",
        "no target for dog to be right of",
    ]
    meta = {
        "tag": "color_attr",
        "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "vase", "count": 1, "color": "blue"}],
    }
    objects = {"car": [det([0, 0, 5, 5])], "vase": [det([10, 10, 20, 20])]}
    assert judge(img, objects, meta, lambda im, objs, name: {"car": ["red"], "vase": ["blue"]}[name])[0]
    assert not judge(img, objects, meta, lambda im, objs, name: ["red"])[0]


def test_geneval_summary_is_the_mean_over_tags():
    s = summarize(["counting", "counting", "colors", "single_object"], [1, 0, 1, 1])
    assert s == {"single_object": 1.0, "counting": 0.5, "colors": 1.0, "overall": pytest.approx(2.5 / 3)}


def test_geneval_scorer_looks_up_its_metadata():
    scorer = GenEvalScorer(fake_detector, None)
    # an image whose four quadrants have mean 13 (class 13 = bench) with confidence > 0.3
    x = torch.full((1, 3, 16, 16), 13 / 127.5 - 1)
    assert scorer(x, ["a photo of a bench"]).tolist() == [1.0]
    assert scorer(x, ["a photo of a cow"]).tolist() == [0.0]
    assert scorer(x, ["anything"], metadata=[{"include": [{"class": "bench", "count": 4}]}]).tolist() == [1.0]
    with pytest.raises(ValueError, match="no metadata for prompt 'a cat'"):
        scorer(x, ["a cat"])
    with pytest.raises(ValueError, match="prompt 'a cat' has no 'include' clause"):
        scorer(x, ["a cat"], metadata=[{"prompt": "a cat"}])  # a line of another suite would score 1


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "name, module",
    [
        ("hpsv2", "open_clip"),
        ("imagereward", "ImageReward"),
        ("geneval", "mmdet"),
        ("ocr", "easyocr"),
        ("clip", "transformers"),
    ],
)
def test_a_missing_package_is_named_in_one_line(monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    with pytest.raises(ImportError) as err:
        build_scorer(name, **({} if name == "ocr" else {"path": "/nonexistent/weights"}))
    msg = str(err.value)
    assert "\n" not in msg and f"scorer {name!r} needs the package {module!r}" in msg and "pip install" in msg
    with pytest.raises(ImportError) as err2:
        check_packages(name)
    assert str(err2.value) == msg


def test_missing_weights_are_named_in_one_line(tmp_path, root, scorers):
    cases = [
        (
            lambda: AestheticScorer.from_pretrained(root / "clip", head=tmp_path / "head.pth"),
            "scorer 'aesthetic': head weights",
        ),
        (lambda: build_scorer("clip", path=str(tmp_path / "clip")), "CLIP model folder (config.json)"),
        (lambda: PickScoreScorer.from_pretrained(tmp_path / "pick"), "scorer 'pickscore'"),
    ]
    for build, text in cases:
        with pytest.raises(FileNotFoundError) as err:
            build()
        assert text in str(err.value) and str(tmp_path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="unknown scorer 'fid'"):
        build_scorer("fid")


@needs_open_clip
def test_a_missing_hps_checkpoint_is_named_in_one_line(tmp_path, scorers):
    with pytest.raises(FileNotFoundError) as err:
        HPSv2Scorer.from_pretrained(tmp_path / "nope.pt", arch="tiny-hps")
    msg = str(err.value)
    assert "scorer 'hpsv2': checkpoint" in msg and str(tmp_path) in msg and "\n" not in msg
