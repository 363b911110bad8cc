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

    def __init__(
        self,
        pipeline_class_name: str,
        pretrained: str,
        *,
        revision: str | None = None,
        variant: str | None = None,
        dtype: torch.dtype = torch.float32,
        offload: bool = False,
    ):
        self.pipeline_class_name, self.pretrained, self.dtype, self.offload = (
            pipeline_class_name,
            pretrained,
            dtype,
            offload,
        )
        self.load_kwargs = {k: v for k, v in (("revision", revision), ("variant", variant)) if v}
        self._pipe: Any = None
        self._vae_factors: tuple[float, float] | None = None
        self._vae_config: dict | None = None
        self._decoder: VAEDecoder | None = None

    @property
    def loaded(self) -> bool:
        """Whether the pipeline (text encoders, VAE encoder and decoder) has been built."""
        return self._pipe is not None

    def vae_config(self) -> dict:
        """The VAE's config.json (no weights are loaded)."""
        if self._vae_config is None:
            if self._pipe is not None:
                self._vae_config = dict(self._pipe.vae.config)
            else:
                from diffusers import AutoencoderKL

                check_pretrained(self.pretrained)
                self._vae_config = dict(AutoencoderKL.load_config(self.pretrained, subfolder="vae", **self.load_kwargs))
        return self._vae_config

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
            cfg = self.vae_config()
            self._vae_factors = (float(cfg.get("shift_factor") or 0.0), float(cfg["scaling_factor"]))
        return self._vae_factors

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(channels, height / f, width / f) with the pipelines' f = 2 ** (len(block_out_channels) - 1), from the
        VAE's config."""
        cfg = self.vae_config()
        f = 2 ** (len(cfg["block_out_channels"]) - 1)
        return (int(cfg["latent_channels"]), height // f, width // f)

    def decoder(self, device: torch.device | str) -> "VAEDecoder":
        """The VAE's decoder alone (:class:`VAEDecoder`, built from the config and the decoder's weights)."""
        if self._decoder is None:
            self._decoder = VAEDecoder.from_pretrained(self.pretrained, dtype=self.dtype, **self.load_kwargs)
        return self._decoder.to(device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from latents: the VAE decoder applied to ``latents / scale + shift``. Without the
        pipeline built (training from the encoder cache) only the decoder is loaded."""
        shift, scale = self.vae_factors()
        device = latents.device
        if self._pipe is not None:
            with self.on(device) as pipe:
                vae = pipe.vae
                images = vae.decode((latents / scale + shift).to(vae.dtype)).sample
        else:
            dec = self.decoder(device)
            try:
                images = dec((latents / scale + shift).to(self.dtype))
            finally:
                if self.offload and torch.device(device).type != "cpu":
                    dec.to("cpu")
        return images.float().clamp(-1, 1)


class VAEDecoder(nn.Module):
    """``AutoencoderKL``'s decode path alone: ``decoder(post_quant_conv(z))``, built from the VAE's config with
    diffusers' own `Decoder` block and loaded with the decoder's weights only, so a run that needs images but no
    encodings (validation from the encoder cache) never builds the VAE encoder."""

    def __init__(self, config: dict):
        super().__init__()
        import inspect

        from diffusers.models.autoencoders.vae import Decoder

        wanted = {
            "in_channels": config["latent_channels"],
            "out_channels": config.get("out_channels", 3),
            "up_block_types": tuple(config["up_block_types"]),
            "block_out_channels": tuple(config["block_out_channels"]),
            "layers_per_block": config.get("layers_per_block", 1),
            "norm_num_groups": config.get("norm_num_groups", 32),
            "act_fn": config.get("act_fn", "silu"),
            "mid_block_add_attention": config.get("mid_block_add_attention", True),
        }
        accepted = inspect.signature(Decoder.__init__).parameters
        self.decoder = Decoder(**{k: v for k, v in wanted.items() if k in accepted})
        c = config["latent_channels"]
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.get("use_post_quant_conv", True) else None

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        variant: str | None = None,
    ) -> "VAEDecoder":
        from diffusers import AutoencoderKL
        from huggingface_hub import snapshot_download
        from safetensors import safe_open

        config = dict(AutoencoderKL.load_config(pretrained, subfolder="vae", revision=revision))
        root = Path(pretrained) / "vae"
        if not root.is_dir():  # a hub id: the vae folder of the snapshot
            root = Path(snapshot_download(pretrained, revision=revision, allow_patterns=["vae/*"])) / "vae"
        name = "diffusion_pytorch_model" + (f".{variant}" if variant else "")
        files = [root / f"{name}.safetensors"]
        index = root / f"{name}.safetensors.index.json"
        if index.is_file():
            import json

            files = sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
        if not files[0].is_file():
            raise FileNotFoundError(
                f"model.pretrained: no VAE weights {files[0]} (safetensors) to load the decoder from"
            )
        state = {}
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                state.update({k: sf.get_tensor(k) for k in sf.keys() if k.startswith(("decoder.", "post_quant_conv."))})
        module = cls(config)
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"VAE decoder weights in {root} do not match its config (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]})"
            )
        module.requires_grad_(False).eval()
        return module.to(dtype)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
