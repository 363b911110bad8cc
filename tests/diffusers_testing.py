"""Tiny random-weight SD3 / SD3.5 / FLUX pipelines and CLIP models, built offline (no hub access).

Tests and smoke runs use them exactly as a user uses a real checkpoint: the pipeline is written with
`save_pretrained` into a folder and loaded back through the adapters' `from_pretrained` path, including the
real tokenizers and text encoders. The tokenizers are trained with the `tokenizers` library on a few captions
and wrapped in the transformers classes the pipelines load (CLIP BPE with ``</w>`` word ends; T5 Unigram).

Sizes follow diffusers' own tests: SD3 transformer with sample size 32, patch 1, 4 latent channels, head dim 8,
4 heads, joint/caption dims 32, pooled dim 64 (two 32-dim CLIP projections); SD3.5 adds a dual-attention layer
and RMS qk-norm; a one-block `AutoencoderKL` (no downsampling, so latents have the image's size).

    path = build_tiny_sd3_pipeline(tmp / "sd3")          # then SD3Task(model={"pretrained": str(path)}, ...)

A run or a sampling command on them takes the tiny sizes too: `tiny_train_args` (`soarflow train`),
`TINY_GENERATION_ARGS` (`soarflow sample` / `soarflow eval`), `generate_tiny` (a diffusers pipeline call). The
`sd3_path` and `images` fixtures (tests/conftest.py) build one pipeline and one imagefolder per test module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import torch

CAPTIONS = (
    "a red circle",
    "a blue square and a green triangle",
    "three yellow circles on a white background",
    "a photo of a cat sitting on a wooden table",
    "a dog running in the park",
    "the word soar written in large letters",
    "two magenta triangles above a cyan square",
    "an astronaut riding a horse on the moon",
)

CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def build_clip_tokenizer(captions: Sequence[str] = CAPTIONS, vocab_size: int = 300, max_length: int = 77):
    """A CLIP-style BPE tokenizer (lower-cased words, ``</w>`` word ends) trained on `captions`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bpe = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Lowercase()
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(CLIP_SPECIAL),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(list(captions), trainer=trainer)
    return CLIPTokenizer(vocab=bpe.get_vocab(), merges=_bpe_merges(bpe), model_max_length=max_length)


def _bpe_merges(tok) -> list[tuple[str, str]]:
    import json

    data = json.loads(tok.to_str())
    merges = data["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def build_t5_tokenizer(captions: Sequence[str] = CAPTIONS, vocab_size: int = 200):
    """A T5-style Unigram tokenizer trained on `captions` (pad=0, eos=1, unk=2 as in T5)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    uni = Tokenizer(models.Unigram())
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    uni.train_from_iterator(list(captions), trainer=trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(uni.to_str())["model"]["vocab"]]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _clip_text_config(vocab_size: int, hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-5,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        hidden_act="gelu",
        projection_dim=projection,
        max_position_embeddings=77,
    )


def _t5_encoder(vocab_size: int, d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


def _tiny_vae(latent_channels: int = 4, shift: float = 0.0609, scale: float = 1.5035):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift,
        scaling_factor=scale,
    )


def build_tiny_sd3_pipeline(path: str | Path, variant: Literal["sd3", "sd35"] = "sd3", seed: int = 0) -> Path:
    """Write a tiny random SD3 (or SD3.5: dual attention + RMS qk-norm) pipeline folder and return its path."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    extra = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if variant == "sd35" else {}
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=4,
        num_layers=2 if variant == "sd35" else 1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        **extra,
    )
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer()
    tokenizer_3 = build_t5_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_clip_text_config(len(tokenizer)))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(len(tokenizer_2)))
    text_encoder_3 = _t5_encoder(len(tokenizer_3))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    path = Path(path)
    pipe.save_pretrained(path)
    return path


def build_tiny_flux_pipeline(path: str | Path, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """Write a tiny random FLUX.1 pipeline folder (guidance-distilled like FLUX.1-dev when `guidance_embeds`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    )
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        vae=_tiny_vae(shift=0.1159, scale=0.3611),
        text_encoder=CLIPTextModel(_clip_text_config(len(tokenizer))),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    path = Path(path)
    pipe.save_pretrained(path)
    return path


def build_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random `CLIPModel` with its tokenizer and image processor (for the CLIPScore scorer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    text = _clip_text_config(len(tokenizer)).to_dict()
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    ).to_dict()
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def make_imagefolder(
    root: str | Path,
    captions: Sequence[str] = CAPTIONS[:4],
    sizes: Sequence[tuple[int, int]] = ((40, 48),),
    seed: int = 0,
) -> Path:
    """An imagefolder dataset (``metadata.jsonl`` + PNGs of smooth random colour fields) of `captions`;
    image i has size ``sizes[i % len(sizes)]`` as (height, width)."""
    import json

    import numpy as np
    from PIL import Image

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, caption in enumerate(captions):
        h, w = sizes[i % len(sizes)]
        base = rng.uniform(0, 255, size=(2, 2, 3)).astype(np.uint8)
        image = Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR)
        image.save(root / f"img_{i:03d}.png")
        rows.append(json.dumps({"file_name": f"img_{i:03d}.png", "text": caption}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


# `soarflow sample` / `soarflow eval` options for images of the tiny pipelines: 2 steps, 32x32 pixels, 8-token prompts
TINY_GENERATION_ARGS = ["--num_inference_steps", "2", "--height", "32", "--width", "32", "--max_sequence_length", "8"]


def generate_tiny(pipe, prompt: str, **kwargs) -> torch.Tensor:
    """`pipe(prompt, **kwargs).images` for a tiny pipeline: 2 steps, 32x32 pixels, 8-token prompts."""
    return pipe(prompt, num_inference_steps=2, height=32, width=32, max_sequence_length=8, **kwargs).images


def tiny_train_args(
    task: str,
    output_dir: str | Path,
    pipeline: str | Path,
    images: str | Path,
    *,
    method: str | None = None,
    batch_size: int = 2,
    checkpointing_steps: int = 1,
    learning_rate: str | None = None,
    validation_prompts: Sequence[str] = (),
) -> list[str]:
    """`soarflow train` overrides for a 2-step run of `task` on the tiny pipeline folder `pipeline` (8-token prompts)
    and the imagefolder `images` at 32 pixels, without trackers or progress bar; with `validation_prompts`, the
    validation images of those prompts take 2 sampling steps. The method's own overrides go after these."""
    args = [
        "--task",
        task,
        "--output_dir",
        str(output_dir),
        "--train_batch_size",
        str(batch_size),
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        str(checkpointing_steps),
        "--report_to",
        "none",
        "--show_progress",
        "false",
        f"--model.pretrained={pipeline}",
        "--model.max_sequence_length=8",
        f"--data.path={images}",
        "--data.resolution=32",
    ]
    if method is not None:
        args += ["--method", method]
    if learning_rate is not None:
        args += ["--learning_rate", learning_rate]
    if validation_prompts:
        args += ["--data.validation_num_steps=2", f"--data.validation_prompts={list(validation_prompts)}"]
    return args
