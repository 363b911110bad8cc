"""A small MMDiT: the embedded default text-to-image flow model (SD3-style, a few million parameters).

Architecture (after SD3's MMDiT, scaled down so it trains on a CPU at ShapesEval's 32x32):

* image stream: non-overlapping p x p patches -> linear -> + learned positions;
* text stream: word embeddings of the caption tokens + learned positions. A caption that is all padding
  (token 0) is the *null caption*: it is replaced by a learned null sequence, so classifier-free guidance
  has its own trained unconditional input rather than an empty one;
* conditioning vector c = MLP(sinusoidal(1000 * sigma)) + Linear(masked mean of the text embeddings);
* `depth` joint blocks: each stream has its own adaLN-Zero modulation from c, its own QKV/MLP weights,
  and the two streams attend jointly (one softmax over caption + image tokens; padded caption tokens are
  masked out of the keys). Q and K are RMS-normalised (as in SD3.5) for stable training;
* final adaLN + linear back to patches (zero-initialised, so the untrained model predicts v = 0).

The model is a velocity model in soarflow's convention: `model(x, sigma, cond) -> v` with x of shape
(B, C, H, W), sigma of shape (B,) in [0, 1] and cond = {"tokens": LongTensor (B, L)}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINT_FORMAT = "soarflow.mmdit/1"


@dataclass
class MMDiTConfig:
    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 4
    hidden_size: int = 96
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 3.0
    vocab_size: int = 64
    max_tokens: int = 16

    def __post_init__(self) -> None:
        checks = {
            "image_size": self.image_size > 0 and self.image_size % max(self.patch_size, 1) == 0,
            "in_channels": self.in_channels > 0,
            "patch_size": self.patch_size > 0,
            "hidden_size": self.hidden_size > 0 and self.hidden_size % max(self.num_heads, 1) == 0,
            "depth": self.depth > 0,
            "num_heads": self.num_heads > 0,
            "mlp_ratio": self.mlp_ratio > 0,
            "vocab_size": self.vocab_size > 1,
            "max_tokens": self.max_tokens > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"MMDiTConfig.{name}={getattr(self, name)!r} is invalid "
                    "(image_size must be divisible by patch_size and hidden_size by num_heads)"
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MMDiTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MMDiTConfig field(s): {unknown}")
        return cls(**d)


def timestep_embedding(sigma: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of 1000 * sigma (the DiT/SD3 timestep scale)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    args = 1000.0 * sigma.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def caption_tokens(cond: Any, max_tokens: int, vocab_size: int, model_name: str) -> torch.Tensor:
    """The caption token ids (B, L) of an embedded model's condition {"tokens": ...}, checked, as int64."""
    tokens = cond["tokens"] if isinstance(cond, Mapping) else cond
    if not torch.is_tensor(tokens) or tokens.dtype not in (torch.int64, torch.int32) or tokens.ndim != 2:
        raise ValueError(f"{model_name} expects cond={{'tokens': LongTensor (B, L)}} of caption token ids")
    if tokens.shape[1] > max_tokens:
        raise ValueError(f"caption has {tokens.shape[1]} tokens, model max_tokens={max_tokens}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got max {int(tokens.max())}")
    return tokens.long()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class StreamParams(nn.Module):
    """The per-stream weights of a joint block: adaLN-Zero modulation, QKV, output projection, MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada = nn.Linear(dim, 6 * dim)  # shift/scale/gate for attention and MLP
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def qkv_heads(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        b, n, d = x.shape
        q, k, v = self.qkv(modulate(self.norm1(x), shift, scale)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        return self.q_norm(q), self.k_norm(k), v


class JointBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.img = StreamParams(dim, heads, mlp_ratio)
        self.txt = StreamParams(dim, heads, mlp_ratio)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, c: torch.Tensor, key_mask: torch.Tensor):
        mi = self.img.ada(F.silu(c)).chunk(6, dim=-1)
        mt = self.txt.ada(F.silu(c)).chunk(6, dim=-1)
        qi, ki, vi = self.img.qkv_heads(img, mi[0], mi[1])
        qt, kt, vt = self.txt.qkv_heads(txt, mt[0], mt[1])
        # Joint attention over [caption tokens, image tokens]; (B, heads, N, head_dim) layout for SDPA.
        q, k, v = (torch.cat(p, dim=1).transpose(1, 2) for p in ((qt, qi), (kt, ki), (vt, vi)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        out = out.transpose(1, 2).flatten(2)
        n_txt = txt.shape[1]
        txt = txt + mt[2][:, None] * self.txt.proj(out[:, :n_txt])
        img = img + mi[2][:, None] * self.img.proj(out[:, n_txt:])
        txt = txt + mt[5][:, None] * self.txt.mlp(modulate(self.txt.norm2(txt), mt[3], mt[4]))
        img = img + mi[5][:, None] * self.img.mlp(modulate(self.img.norm2(img), mi[3], mi[4]))
        return img, txt


class MMDiT(nn.Module):
    """Text-conditioned flow transformer; see the module docstring. `forward(x, sigma, cond) -> v`."""

    def __init__(self, config: MMDiTConfig | None = None, **overrides: Any):
        super().__init__()
        cfg = config or MMDiTConfig(**overrides)
        self.config = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.grid = cfg.image_size // p
        self.patch_embed = nn.Linear(cfg.in_channels * p * p, d)
        self.img_pos = nn.Parameter(torch.randn(1, self.grid * self.grid, d) * 0.02)
        self.tok_embed = nn.Embedding(cfg.vocab_size, d)
        self.txt_pos = nn.Parameter(torch.randn(1, cfg.max_tokens, d) * 0.02)
        self.null_txt = nn.Parameter(torch.randn(1, cfg.max_tokens, d) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.pool_proj = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(JointBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(d, 2 * d)
        self.final = nn.Linear(d, cfg.in_channels * p * p)
        for layer in (self.final_ada, self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.gradient_checkpointing = False

    # -- helpers -------------------------------------------------------------------------------------
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.config.patch_size
        return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        p, g, c = self.config.patch_size, self.grid, self.config.in_channels
        return x.view(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, g * p, g * p)

    def _checkpointed(self, blk, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, *args, use_reentrant=False)
        return blk(*args)

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    # -- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.image_size):
            raise ValueError(
                f"MMDiT expects x of shape (B, {cfg.in_channels}, {cfg.image_size}, {cfg.image_size}), got {tuple(x.shape)}"
            )
        b, length = x.shape[0], None
        tokens = caption_tokens(cond, cfg.max_tokens, cfg.vocab_size, "MMDiT")
        length = tokens.shape[1]
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1).expand(b)

        pad = tokens == 0
        is_null = pad.all(dim=1)
        txt = self.tok_embed(tokens) + self.txt_pos[:, :length]
        txt = torch.where(is_null[:, None, None], self.null_txt[:, :length].to(txt.dtype), txt)
        valid = ~pad | is_null[:, None]  # the null caption's learned tokens are all attended to
        pooled = (txt * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp_min(1)

        c = self.t_mlp(timestep_embedding(sigma, 256).to(x.dtype)) + self.pool_proj(pooled)
        img = self.patch_embed(self.patchify(x)) + self.img_pos
        key_mask = torch.cat([valid, torch.ones(b, img.shape[1], dtype=torch.bool, device=x.device)], dim=1)
        for blk in self.blocks:
            img, txt = self._checkpointed(blk, img, txt, c, key_mask)
        shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=-1)
        return self.unpatchify(self.final(modulate(self.final_norm(img), shift, scale)))
