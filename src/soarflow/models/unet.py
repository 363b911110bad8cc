"""A small text-conditioned U-Net: the embedded default flow model (a few million parameters, CPU-trainable).

Architecture (chosen by measurement against the MMDiT, docs/base_model.md):

* caption encoder: word embeddings + learned positions -> ``text_layers`` pre-norm transformer layers. A caption
  that is all padding (token 0) is the *null caption*: it is replaced by a learned null sequence, so
  classifier-free guidance has its own trained unconditional input;
* conditioning vector c = MLP(sinusoidal(1000 sigma)) + Linear(masked mean of the encoded caption);
* convolutional encoder/decoder over ``len(channels)`` resolutions (32 -> 16 -> 8 px for the defaults) with
  ``num_res_blocks`` residual blocks per level, each modulated by c (scale/shift after its second GroupNorm),
  skip connections between mirrored levels;
* at every level listed in ``attention_levels`` (and in the middle), a *joint attention* block: each pixel
  attends over all pixels of its level and the caption tokens in one softmax (padded caption tokens are masked
  out of the keys). This is what lets the model place and count objects globally from the first steps, where
  a patch transformer with learned positions failed (docs/base_model.md);
* zero-initialised output convolution and attention/residual outputs, so the untrained model predicts v = 0.

A velocity model in soarflow's convention: ``model(x, sigma, cond) -> v`` with x of shape (B, C, H, W),
sigma of shape (B,) in [0, 1] and cond = {"tokens": LongTensor (B, L)}.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .mmdit import caption_tokens, timestep_embedding

CHECKPOINT_FORMAT = "soarflow.unet/1"


@dataclass
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # per resolution, full size first
    num_res_blocks: int = 1
    attention_levels: list[int] = field(default_factory=lambda: [1, 2])  # indices into channels
    num_heads: int = 4
    groups: int = 8  # GroupNorm groups
    text_dim: int = 128
    text_layers: int = 1
    vocab_size: int = 64
    max_tokens: int = 16

    def __post_init__(self) -> None:
        self.channels = [int(c) for c in self.channels]
        self.attention_levels = [int(a) for a in self.attention_levels]
        levels = len(self.channels)
        checks = {
            "image_size": self.image_size > 0 and self.image_size % (2 ** max(levels - 1, 0)) == 0,
            "in_channels": self.in_channels > 0,
            "channels": levels >= 1
            and all(c > 0 and c % self.groups == 0 and c % self.num_heads == 0 for c in self.channels),
            "num_res_blocks": self.num_res_blocks >= 1,
            "attention_levels": all(0 <= a < levels for a in self.attention_levels),
            "num_heads": self.num_heads > 0,
            "groups": self.groups > 0,
            "text_dim": self.text_dim > 0 and self.text_dim % self.num_heads == 0,
            "text_layers": self.text_layers >= 0,
            "vocab_size": self.vocab_size > 1,
            "max_tokens": self.max_tokens > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"UNetConfig.{name}={getattr(self, name)!r} is invalid (image_size must be divisible by "
                    "2^(levels-1); every channel count by groups and num_heads; text_dim by num_heads; "
                    "attention_levels must index channels)"
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown UNetConfig field(s): {unknown}")
        return cls(**d)


class ResBlock(nn.Module):
    """GN -> SiLU -> conv -> GN * (1 + scale(c)) + shift(c) -> SiLU -> conv (zero-init), plus a skip."""

    def __init__(self, cin: int, cout: int, cond_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.cond = nn.Linear(cond_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.cond(F.silu(c))[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class JointAttention(nn.Module):
    """Every pixel attends over [all pixels of this level, caption tokens] in one softmax; residual, zero-init."""

    def __init__(self, channels: int, text_dim: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.text_kv = nn.Linear(text_dim, 2 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, txt: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        kt, vt = self.text_kv(txt).chunk(2, dim=-1)
        k, v = torch.cat([k, kt], dim=1), torch.cat([v, vt], dim=1)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=key_mask[:, None, None, :])
        out = self.out(out.transpose(1, 2).reshape(b, h * w, c))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    """The residual blocks (and optional joint attention after each) of one resolution on one side."""

    def __init__(self, cins: list[int], cout: int, cond_dim: int, cfg: UNetConfig, attend: bool):
        super().__init__()
        self.res = nn.ModuleList(ResBlock(cin, cout, cond_dim, cfg.groups) for cin in cins)
        self.attn = (
            nn.ModuleList(JointAttention(cout, cfg.text_dim, cfg.num_heads, cfg.groups) for _ in cins)
            if attend
            else None
        )


class UNet(nn.Module):
    """Text-conditioned flow U-Net; see the module docstring. ``forward(x, sigma, cond) -> v``."""

    def __init__(self, config: UNetConfig | None = None, **overrides: Any):
        super().__init__()
        cfg = config or UNetConfig(**overrides)
        self.config = cfg
        ch, n = cfg.channels, cfg.num_res_blocks
        cond_dim = 4 * ch[0]
        self.tok_embed = nn.Embedding(cfg.vocab_size, cfg.text_dim)
        self.txt_pos = nn.Parameter(torch.randn(1, cfg.max_tokens, cfg.text_dim) * 0.02)
        self.null_txt = nn.Parameter(torch.randn(1, cfg.max_tokens, cfg.text_dim) * 0.02)
        self.text_encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(
                cfg.text_dim,
                cfg.num_heads,
                2 * cfg.text_dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(cfg.text_layers)
        )
        self.text_norm = nn.LayerNorm(cfg.text_dim)
        self.t_mlp = nn.Sequential(nn.Linear(ch[0], cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.pool_proj = nn.Linear(cfg.text_dim, cond_dim)

        self.stem = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skip_channels = [ch[0]]
        prev = ch[0]
        for i, c in enumerate(ch):
            self.down.append(Level([prev] + [c] * (n - 1), c, cond_dim, cfg, i in cfg.attention_levels))
            skip_channels += [c] * n
            prev = c
            if i < len(ch) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skip_channels.append(c)
        self.mid1 = ResBlock(prev, prev, cond_dim, cfg.groups)
        self.mid_attn = JointAttention(prev, cfg.text_dim, cfg.num_heads, cfg.groups)
        self.mid2 = ResBlock(prev, prev, cond_dim, cfg.groups)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(ch))):
            c = ch[i]
            cins = []
            for _ in range(n + 1):
                cins.append(prev + skip_channels.pop())
                prev = c
            self.up.append(Level(cins, c, cond_dim, cfg, i in cfg.attention_levels))
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.out_norm = nn.GroupNorm(cfg.groups, ch[0])
        self.out = nn.Conv2d(ch[0], cfg.in_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.gradient_checkpointing = False

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def _run(self, fn, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def encode_text(self, tokens: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoded caption (B, L, text_dim), valid-key mask (B, L)); the null caption is the learned sequence."""
        length = tokens.shape[1]
        pad = tokens == 0
        is_null = pad.all(dim=1)
        txt = self.tok_embed(tokens) + self.txt_pos[:, :length]
        txt = torch.where(is_null[:, None, None], self.null_txt[:, :length].to(txt.dtype), txt).to(dtype)
        valid = ~pad | is_null[:, None]  # the null caption's learned tokens are all attended to
        for layer in self.text_encoder:
            txt = layer(txt, src_key_padding_mask=~valid)
        return self.text_norm(txt), valid

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"UNet expects x of shape (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}"
            )
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1).expand(b)
        txt, valid = self.encode_text(caption_tokens(cond, cfg.max_tokens, cfg.vocab_size, "UNet"), x.dtype)
        pooled = (txt * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)
        c = self.t_mlp(timestep_embedding(sigma, cfg.channels[0]).to(x.dtype)) + self.pool_proj(pooled)
        hw = (cfg.image_size // 2 ** torch.arange(len(cfg.channels))).tolist()
        masks = [torch.cat([torch.ones(b, s * s, dtype=torch.bool, device=x.device), valid], dim=1) for s in hw]

        h = self.stem(x)
        skips = [h]
        for i, level in enumerate(self.down):
            for j in range(len(level.res)):  # one skip per block, as the decoder expects
                h = self._run(self._block, level, j, h, c, txt, masks[i])
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)
        h = self.mid1(h, c)
        h = self.mid_attn(h, txt, masks[-1])
        h = self.mid2(h, c)
        for k, level in enumerate(self.up):
            i = len(self.up) - 1 - k
            for j in range(len(level.res)):
                h = torch.cat([h, skips.pop()], dim=1)
                h = self._run(self._block, level, j, h, c, txt, masks[i])
            if i > 0:
                h = self.upsample[k](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))

    @staticmethod
    def _block(level: Level, j: int, h, c, txt, key_mask):
        h = level.res[j](h, c)
        if level.attn is not None:
            h = level.attn[j](h, txt, key_mask)
        return h
