r"""FLUX.1 adapter: `FluxTransformer2DModel` as a velocity model, and the `flux` task.

FLUX is a rectified flow with the conventions of :mod:`soarflow.flow`. Its transformer works on *packed*
latents: the (B, C, h, w) latent is cut into 2x2 patches, giving (B, hw/4, 4C) tokens with position ids
``(0, row, col)``; the caption tokens (T5) have ids 0 and the pooled CLIP-L embedding modulates every block.
The transformer scales its timestep (and guidance) by 1000 itself, so it receives :math:`\sigma` directly.
The wrapper packs and unpacks, so the objective sees ordinary (B, C, h, w) latents.

Guidance, chosen explicitly with ``model.guidance``:

* ``embedded`` — guidance-distilled checkpoints (FLUX.1-dev): the transformer takes a guidance scale as an
  input (``model.embedded_guidance_scale``, carried in the condition as ``cond["guidance"]``); every forward —
  training, the SOAR rollout and validation — uses it, and there is no two-pass CFG, so ``soar.guidance_scale``
  must be 1, and so is the validation guidance (``data.validation_guidance_scale`` unset or 1; both checked).
* ``cfg`` — classifier-free guidance with two passes against the empty prompt (``soar.guidance_scale``), for
  checkpoints trained with condition dropout. A checkpoint with a guidance embedding still gets
  ``embedded_guidance_scale`` as that input.
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.diffusers_velocity import VelocityModule
from .diffusers import DiffusersTask


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C): 2x2 patches, channel-major within a patch (FLUX's layout)."""
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX latents need even height and width, got {h}x{w}")
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def image_ids(h: int, w: int, device, dtype=torch.float32) -> torch.Tensor:
    """Position ids (h/2 * w/2, 3) = (0, row, col) of the packed tokens."""
    ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class FluxVelocity(VelocityModule):
    """Velocity on unpacked latents (B, C, h, w); ``cond`` = encoder_hidden_states, pooled_projections and,
    for checkpoints with a guidance embedding, ``guidance`` (B,)."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        dtype = self.compute_dtype
        b, _, h, w = x.shape
        text = cond["encoder_hidden_states"]
        guidance = None
        if self.transformer.config.guidance_embeds:
            if "guidance" not in cond:
                raise ValueError("this FLUX checkpoint has a guidance embedding: cond['guidance'] is required")
            guidance = cond["guidance"].float()
        out = self.transformer(
            hidden_states=pack_latents(x).to(dtype),
            encoder_hidden_states=text.to(dtype),
            pooled_projections=cond["pooled_projections"].to(dtype),
            timestep=sigma.float().to(dtype),
            img_ids=image_ids(h, w, x.device, dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=x.device, dtype=dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)


class FluxTask(DiffusersTask):
    """`Task` for FLUX.1 pipelines (task name ``flux``)."""

    family = "flux"
    pipeline_class_name = "FluxPipeline"
    transformer_class_name = "FluxTransformer2DModel"
    default_max_sequence_length = 512

    def check_config(self) -> None:
        value = self.data_config.validation_guidance_scale
        if self.model_config.guidance == "embedded" and value not in (None, 1.0):
            raise ValueError(
                f"config key 'data.validation_guidance_scale': model.guidance is 'embedded' (guidance-distilled FLUX), "
                f"so validation uses the embedded guidance model.embedded_guidance_scale="
                f"{self.model_config.embedded_guidance_scale} and two-pass CFG is off; leave it unset or set 1 "
                f"(got {value}), or model.guidance: cfg"
            )
        if self.train_config is None or self.train_config.method != "soar":
            return
        soar = self.train_config.soar
        if self.model_config.guidance == "embedded" and soar.guidance_scale != 1:
            raise ValueError(
                f"config key 'soar.guidance_scale': model.guidance is 'embedded' (guidance-distilled FLUX), so the "
                f"rollout uses the embedded guidance model.embedded_guidance_scale="
                f"{self.model_config.embedded_guidance_scale} and two-pass CFG is off; set soar.guidance_scale: 1 "
                f"(got {soar.guidance_scale}), or model.guidance: cfg for a checkpoint trained with condition dropout"
            )

    def _has_guidance_embeds(self) -> bool:
        transformer_config = self.transformer_class.load_config(
            self.model_config.pretrained, subfolder="transformer", **self.pipeline.load_kwargs
        )
        return bool(transformer_config.get("guidance_embeds", False))

    def wrap(self, transformer: torch.nn.Module) -> FluxVelocity:
        if self.model_config.guidance == "embedded" and not transformer.config.guidance_embeds:
            raise ValueError(
                f"config key 'model.guidance': 'embedded' needs a guidance-distilled checkpoint, but "
                f"{self.model_config.pretrained} has no guidance embedding; use cfg"
            )
        self._guidance_embeds = bool(transformer.config.guidance_embeds)
        return FluxVelocity(transformer)

    @property
    def guidance_scale(self) -> float:
        """1 with embedded guidance (the transformer's guidance input guides; there is no two-pass CFG), else the
        diffusers tasks' default."""
        return 1.0 if self.model_config.guidance == "embedded" else super().guidance_scale

    def finish_cond(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not getattr(self, "_guidance_embeds", None):
            if getattr(self, "_guidance_embeds", None) is None:
                self._guidance_embeds = self._has_guidance_embeds()
            if not self._guidance_embeds:
                return cond
        b = cond["encoder_hidden_states"].shape[0]
        device = cond["encoder_hidden_states"].device
        return {**cond, "guidance": torch.full((b,), float(self.model_config.embedded_guidance_scale), device=device)}

    @torch.no_grad()
    def encode_text(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        pipe = self.pipeline.get(device)
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=torch.device(device),
            num_images_per_prompt=1,
            max_sequence_length=self.model_config.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()}
