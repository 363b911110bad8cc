r"""The frozen parts of a diffusers pipeline (VAE, tokenizers, text encoders): the pipeline loaded from its folder
without the transformer, frozen, and moved to a device when used.

Latents follow the pipelines: :math:`x_0 = (z - \text{shift}) \cdot \text{scale}` for a VAE latent z, with the
VAE's ``shift_factor``/``scaling_factor``; decoding inverts it.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_pretrained(pretrained: str) -> None:
    """A path that looks local must be a diffusers pipeline folder (hub ids are left to `from_pretrained`)."""
    p = Path(pretrained)
    looks_local = p.is_absolute() or pretrained.startswith(".") or p.exists()
    if looks_local and not (p / "model_index.json").is_file():
        raise FileNotFoundError(f"model.pretrained: {p} is not a diffusers pipeline folder (no model_index.json)")


class FrozenPipeline:
    """``pipeline_class.from_pretrained(pretrained, transformer=None)``, loaded on first use and kept frozen.

    With `offload`, `on(device)` moves it back to the CPU after each use (saves ~11 GB with T5-XXL)."""

    def __init__(self, pipeline_class_name: str, pretrained: str, *, revision: str | None = None,
                 variant: str | None = None, dtype: torch.dtype = torch.float32, offload: bool = False):
        self.pipeline_class_name, self.pretrained, self.dtype, self.offload = pipeline_class_name, pretrained, dtype, offload
        self.load_kwargs = {k: v for k, v in (("revision", revision), ("variant", variant)) if v}
        self._pipe: Any = None
        self._vae_factors: tuple[float, float] | None = None

    @property
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def get(self, device: torch.device | str | None = None) -> Any:
        """The pipeline without its transformer (VAE + tokenizers + text encoders), frozen, on `device`."""
        if self._pipe is None:
            check_pretrained(self.pretrained)
            with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; keep both working
                warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
                pipe = self.pipeline_class.from_pretrained(
                    self.pretrained, transformer=None, torch_dtype=self.dtype, **self.load_kwargs
                )
            for name, component in pipe.components.items():
                if isinstance(component, nn.Module):
                    component.requires_grad_(False)
                    component.eval()
            pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe
        if device is not None and self._pipe.device != torch.device(device):
            self._pipe.to(device)
        return self._pipe

    @contextlib.contextmanager
    def on(self, device: torch.device) -> Iterator[Any]:
        """The frozen pipeline on `device`; with `offload` it goes back to the CPU afterwards."""
        pipe = self.get(device)
        try:
            yield pipe
        finally:
            if self.offload and torch.device(device).type != "cpu":
                pipe.to("cpu")

    def vae_factors(self) -> tuple[float, float]:
        """(shift_factor, scaling_factor) of the VAE, read from its config (no weights are loaded)."""
        if self._vae_factors is None:
            if self._pipe is not None:
                cfg = dict(self._pipe.vae.config)
            else:
                from diffusers import AutoencoderKL

                cfg = AutoencoderKL.load_config(self.pretrained, subfolder="vae", **self.load_kwargs)
            self._vae_factors = (float(cfg.get("shift_factor") or 0.0), float(cfg["scaling_factor"]))
        return self._vae_factors

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        pipe = self.get()
        f = pipe.vae_scale_factor
        return (pipe.vae.config.latent_channels, height // f, width // f)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from latents: the VAE decoder applied to ``latents / scale + shift``."""
        vae = self.get(latents.device).vae
        shift, scale = self.vae_factors()
        images = vae.decode((latents / scale + shift).to(vae.dtype)).sample
        return images.float().clamp(-1, 1)
