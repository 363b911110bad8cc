r"""GenEval (Ghosh et al. 2023): an object detector decides whether an image shows what its metadata line asks
(``include`` clauses all hold, no ``exclude`` clause holds); the score of an image is 1 or 0, a tag's score the
mean over its images, and GenEval overall the mean over the six tags.

The decision follows GenEval's ``evaluate_images.py`` (read, not copied):

* detections per class, most confident first, kept when their confidence is > 0.3 (> 0.9 for ``counting``
  prompts), at most 16 per class (no NMS at its default overlap 1.0);
* ``include {class, count}``: at least `count` kept; with ``color``, CLIP ViT-L/14 (zero-shot over GenEval's 10
  colours, templates "a photo of a {c} {class}", "a photo of a {c}-colored {class}", "a photo of a {c} object",
  on the object cut out of a grey #999 background by its mask, then cropped to its box) must name that colour for
  the first `count` of them; with ``position [relation, i]``, every such object must stand in `relation` to every
  object matched by include clause i, where A is "left of" B when the direction of their centre offset, each
  axis shrunk by 0.1 x (width_A + width_B) (heights for y), has x component < -0.5 (right of: > 0.5; above: y <
  -0.5; below: y > 0.5);
* ``exclude {class, count}``: fails when `count` or more are kept.

The official detector is mmdetection's Mask2Former (Swin-S, COCO); it needs ``mmdet`` (GenEval pins mmdet 2.x
with mmcv-full), which soarflow does not install. Any ``detector(uint8 HxWx3) -> {class: [(box xyxy, score,
mask or None), ...]}`` and ``colors(image, objects, class) -> [colour, ...]`` can be passed instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .images import check_batch, missing_package, to_uint8
from .suites import COCO_CLASSES, GENEVAL_COLORS, GENEVAL_TAGS, generate_geneval

Detection = tuple[np.ndarray, float, "np.ndarray | None"]
Detector = Callable[[np.ndarray], Mapping[str, Sequence[Detection]]]
ColorClassifier = Callable[[np.ndarray, Sequence[Detection], str], list[str]]


@dataclass(frozen=True)
class GenEvalThresholds:
    confidence: float = 0.3
    counting_confidence: float = 0.9
    max_objects: int = 16
    position: float = 0.1


def select_objects(
    detections: Mapping[str, Sequence[Detection]], tag: str | None, th: GenEvalThresholds = GenEvalThresholds()
) -> dict[str, list[Detection]]:
    """Per class: most confident first, above the tag's confidence threshold, at most `max_objects`."""
    cut = th.counting_confidence if tag == "counting" else th.confidence
    out = {}
    for name, dets in detections.items():
        kept = sorted((d for d in dets if float(d[1]) > cut), key=lambda d: -float(d[1]))[: th.max_objects]
        if kept:
            out[name] = kept
    return out


def relations(a: Detection, b: Detection, threshold: float = 0.1) -> set[str]:
    """Where A is relative to B (module docstring); empty when their centres are too close to tell."""
    box_a, box_b = np.asarray(a[0], dtype=float)[:4], np.asarray(b[0], dtype=float)[:4]
    offset = (box_a[:2] + box_a[2:]) / 2 - (box_b[:2] + box_b[2:]) / 2
    size = (box_a[2:] - box_a[:2]) + (box_b[2:] - box_b[:2])
    shrunk = np.maximum(np.abs(offset) - threshold * np.abs(size), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


def judge(
    image: np.ndarray,
    objects: Mapping[str, Sequence[Detection]],
    metadata: Mapping[str, Any],
    colors: ColorClassifier | None,
    th: GenEvalThresholds = GenEvalThresholds(),
) -> tuple[bool, list[str]]:
    """(correct, reasons) for one image's selected objects against its metadata line."""
    correct, reasons = True, []
    matched: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        name, count = req["class"], int(req["count"])
        found = list(objects.get(name, []))[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and "color" in req:
            if colors is None:
                raise ValueError("GenEval: a colour clause needs a colour classifier")
            named = colors(image, found, name)
            if named.count(req["color"]) < count:
                ok = False
                reasons.append(f"expected {req['color']} {name}>={count}, found {named}")
        if ok and "position" in req:
            relation, target = req["position"]
            targets = matched[int(target)] if int(target) < len(matched) else None
            if targets is None:
                ok = False
                reasons.append(f"no target for {name} to be {relation}")
            elif not all(relation in relations(o, t, th.position) for o in found for t in targets):
                ok = False
                reasons.append(f"expected {name} {relation} target")
        matched.append(found if ok else None)
        correct = correct and ok
    for req in metadata.get("exclude", []):
        if len(objects.get(req["class"], [])) >= int(req["count"]):
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {len(objects[req['class']])}")
    return correct, reasons


def summarize(tags: Sequence[str], correct: Sequence[float]) -> dict[str, float]:
    """Per-tag accuracy and ``overall`` = the mean over the tags present (GenEval's summary)."""
    out: dict[str, float] = {}
    for tag in [t for t in GENEVAL_TAGS if t in tags] + sorted(set(tags) - set(GENEVAL_TAGS)):
        vals = [c for t, c in zip(tags, correct) if t == tag]
        out[tag] = float(np.mean(vals))
    out["overall"] = float(np.mean(list(out.values()))) if out else float("nan")
    return out


class CLIPColorClassifier:
    """GenEval's colour check with an open_clip model (``encode_image``/``encode_text``), its tokenizer and its
    image transform (PIL -> tensor)."""

    def __init__(self, model, tokenizer, transform, device: torch.device | str = "cpu", background: str = "#999"):
        self.model, self.tokenizer, self.transform = model.eval(), tokenizer, transform
        self.device, self.background = torch.device(device), background
        self._weights: dict[str, torch.Tensor] = {}

    def _classifier(self, name: str) -> torch.Tensor:
        if name not in self._weights:
            templates = (f"a photo of a {{c}} {name}", f"a photo of a {{c}}-colored {name}", "a photo of a {c} object")
            rows = []
            for c in GENEVAL_COLORS:
                e = self.model.encode_text(self.tokenizer([t.format(c=c) for t in templates]).to(self.device)).float()
                e = (e / e.norm(dim=-1, keepdim=True)).mean(0)
                rows.append(e / e.norm())
            self._weights[name] = torch.stack(rows, 1)
        return self._weights[name]

    @torch.no_grad()
    def __call__(self, image: np.ndarray, objects: Sequence[Detection], name: str) -> list[str]:
        from PIL import Image

        pil = Image.fromarray(image).convert("RGB")
        blank = Image.new("RGB", pil.size, color=self.background)
        crops = []
        for box, _, mask in objects:
            im = (
                pil
                if mask is None
                else Image.composite(pil, blank, Image.fromarray(np.asarray(mask).astype(np.uint8) * 255))
            )
            crops.append(self.transform(im.crop(tuple(float(v) for v in np.asarray(box)[:4]))))
        feats = self.model.encode_image(torch.stack(crops).to(self.device)).float()
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return [GENEVAL_COLORS[i] for i in (feats @ self._classifier(name)).argmax(1).tolist()]


def mmdet_detector(model, classes: Sequence[str] = COCO_CLASSES) -> Detector:
    """An mmdetection model (``init_detector``) as a Detector: mmdet 2.x results (per-class (n, 5) box arrays and
    mask lists) or mmdet 3.x ``DetDataSample``s."""
    from mmdet.apis import inference_detector

    def detect(image: np.ndarray) -> dict[str, list[Detection]]:
        result = inference_detector(model, image[..., ::-1].copy())  # mmdet reads BGR arrays
        out: dict[str, list[Detection]] = {}
        if hasattr(result, "pred_instances"):
            inst = result.pred_instances
            masks = inst.masks.cpu().numpy() if "masks" in inst else None
            for j, (box, score, label) in enumerate(
                zip(inst.bboxes.cpu().numpy(), inst.scores.cpu().numpy(), inst.labels.cpu().numpy())
            ):
                out.setdefault(classes[int(label)], []).append((box, float(score), None if masks is None else masks[j]))
            return out
        boxes, segms = (result[0], result[1]) if isinstance(result, tuple) else (result, None)
        for c, name in enumerate(classes):
            for j, row in enumerate(boxes[c]):
                out.setdefault(name, []).append((row[:4], float(row[4]), None if segms is None else segms[c][j]))
        return out

    return detect


class GenEvalScorer:
    name = "geneval"

    def __init__(
        self,
        detector: Detector,
        colors: ColorClassifier | None,
        thresholds: GenEvalThresholds = GenEvalThresholds(),
        metadata: Mapping[str, Mapping[str, Any]] | None = None,
    ):
        self.detector, self.colors, self.thresholds = detector, colors, thresholds
        self.metadata = dict(metadata) if metadata is not None else {r.prompt: r.metadata for r in generate_geneval()}

    @classmethod
    def from_pretrained(
        cls,
        path: str | None = None,
        config: str | None = None,
        clip_arch: str = "ViT-L-14",
        device: torch.device | str = "cpu",
    ) -> "GenEvalScorer":
        """`path`: the Mask2Former checkpoint (GenEval's download_models.sh); `config`: its mmdet config (default
        mmdet's mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py)."""
        try:
            import mmdet
            from mmdet.apis import init_detector
        except ImportError:
            raise missing_package(cls.name, "mmdet") from None
        try:
            import open_clip
        except ImportError:
            raise missing_package(cls.name, "open_clip") from None
        import os

        if path is None or not os.path.isfile(path):
            raise FileNotFoundError(
                f"scorer 'geneval': detector checkpoint not found: {path} (GenEval's "
                f"evaluation/download_models.sh fetches mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth)"
            )
        config = config or os.path.join(
            os.path.dirname(mmdet.__file__), "../configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py"
        )
        detector = mmdet_detector(init_detector(config, path, device=str(device)))
        model, _, transform = open_clip.create_model_and_transforms(clip_arch, pretrained="openai", device=str(device))
        return cls(detector, CLIPColorClassifier(model, open_clip.get_tokenizer(clip_arch), transform, device))

    def judge(self, images: torch.Tensor, metadata: Sequence[Mapping[str, Any]]) -> list[tuple[bool, list[str]]]:
        out = []
        for image, meta in zip(to_uint8(images), metadata):
            objects = select_objects(self.detector(image), meta.get("tag"), self.thresholds)
            out.append(judge(image, objects, meta, self.colors, self.thresholds))
        return out

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None
    ) -> torch.Tensor:
        """1.0 where the image is correct, else 0.0; without `metadata` each prompt's line is looked up in the
        built-in GenEval suite (or the `metadata` mapping given at construction)."""
        check_batch("GenEvalScorer", images, prompts)
        if metadata is None:
            unknown = [p for p in prompts if p not in self.metadata]
            if unknown:
                raise ValueError(f"GenEval scorer: no metadata for prompt {unknown[0]!r} (not a GenEval prompt)")
            metadata = [self.metadata[p] for p in prompts]
        bad = [p for p, m in zip(prompts, metadata) if not m.get("include")]
        if bad:
            raise ValueError(
                f"GenEval scorer: the metadata of prompt {bad[0]!r} has no 'include' clause (not a GenEval line)"
            )
        return torch.tensor([float(ok) for ok, _ in self.judge(images, metadata)])
