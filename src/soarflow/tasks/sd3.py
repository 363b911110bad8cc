r"""Stable Diffusion 3 / 3.5 adapter: `SD3Transformer2DModel` as a velocity model, and the `sd3` task.

SD3 is a rectified flow with the conventions of :mod:`soarflow.flow` (:math:`x_\sigma = (1-\sigma)x_0 + \sigma z_1`,
prediction :math:`v = z_1 - x_0`); its transformer takes the timestep :math:`1000\sigma`. The condition is
``{"encoder_hidden_states": (B, 77 + T, D), "pooled_projections": (B, P)}`` from the pipeline's three text
encoders (CLIP-L and CLIP-G hidden states concatenated and padded to T5's width, followed by the T5 tokens;
the pooled CLIP-L/CLIP-G projections concatenated), computed with ``StableDiffusion3Pipeline.encode_prompt``.

    task = SD3Task.from_config(model={"pretrained": "stabilityai/stable-diffusion-3.5-medium"},
                               data={"path": "my_images/"})
    model = task.build_model()                 # model(x, sigma, cond) -> v
"""

from __future__ import annotations

from typing import Any

import torch

from ..models.diffusers_velocity import VelocityModule
from .diffusers import DiffusersTask


class SD3Velocity(VelocityModule):
    """``v = transformer(x, timestep = 1000 sigma, cond)``; x is the latent (B, C, h, w)."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        dtype = self.compute_dtype
        out = self.transformer(
            hidden_states=x.to(dtype),
            encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
            pooled_projections=cond["pooled_projections"].to(dtype),
            timestep=(sigma.float() * 1000.0).to(dtype),
            return_dict=False,
        )[0]
        return out


class SD3Task(DiffusersTask):
    """`Task` for SD3 / SD3.5 pipelines (task name ``sd3``)."""

    family = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    transformer_class_name = "SD3Transformer2DModel"
    default_max_sequence_length = 256

    def check_config(self) -> None:
        if self.model_config.guidance != "cfg":
            raise ValueError("config key 'model.guidance': SD3 has no embedded guidance; use cfg")

    def wrap(self, transformer: torch.nn.Module) -> SD3Velocity:
        return SD3Velocity(transformer)

    @torch.no_grad()
    def encode_text(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        pipe = self.pipeline.get(device)
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=torch.device(device),
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.model_config.max_sequence_length,
        )
        return {"encoder_hidden_states": embeds.float(), "pooled_projections": pooled.float()}
