"""The embedded models (U-Net, MMDiT): interface, conditioning, null caption, checkpoint round trip and errors."""

import pytest
import torch

from soarflow import SOARConfig, soar_loss
from soarflow.models.embedded import load_checkpoint, save_checkpoint
from soarflow.models.mmdit import MMDiT, MMDiTConfig
from soarflow.models.unet import UNet, UNetConfig

TINY = {
    "mmdit": (
        MMDiT,
        MMDiTConfig(image_size=8, patch_size=4, hidden_size=32, depth=2, num_heads=2, vocab_size=10, max_tokens=5),
    ),
    "unet": (
        UNet,
        UNetConfig(
            image_size=8,
            channels=[8, 16],
            attention_levels=[1],
            num_heads=2,
            groups=4,
            text_dim=16,
            vocab_size=10,
            max_tokens=5,
        ),
    ),
}


@pytest.fixture(params=sorted(TINY))
def arch(request):
    return request.param


def tiny(arch, seed=0, perturb=True):
    torch.manual_seed(seed)
    cls, config = TINY[arch]
    m = cls(config)
    if perturb:  # zero-initialised outputs make a fresh model output 0; perturb so the tests see real dependence
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return m


def some_weight(m):
    """A weight deep inside the network (before the output layers), to check gradients reach it."""
    return m.blocks[0].txt.qkv.weight if isinstance(m, MMDiT) else m.down[0].res[0].conv1.weight


def batch(b=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 3, 8, 8, generator=g)
    sigma = torch.rand(b, generator=g)
    tokens = torch.randint(1, 10, (b, 5), generator=g)
    tokens[:, 3:] = 0
    return x, sigma, {"tokens": tokens}


def test_fresh_model_predicts_zero_velocity(arch):
    x, s, c = batch()
    assert torch.equal(tiny(arch, perturb=False)(x, s, c), torch.zeros_like(x))


def test_output_shape_and_dependence_on_inputs(arch):
    m = tiny(arch)
    x, s, c = batch()
    v = m(x, s, c)
    assert v.shape == x.shape
    assert not torch.allclose(v, m(x, s.flip(0) * 0.5, c))
    c2 = {"tokens": c["tokens"].clone()}
    c2["tokens"][:, 0] = (c2["tokens"][:, 0] % 9) + 1
    assert not torch.allclose(v, m(x, s, c2))


def test_padding_tokens_are_ignored_and_samples_are_independent(arch):
    m = tiny(arch)
    x, s, c = batch()
    v = m(x, s, c)
    # Per-sample independence: running one sample alone gives the same output.
    assert torch.allclose(m(x[:1], s[:1], {"tokens": c["tokens"][:1]}), v[:1], atol=1e-5)
    # Shorter padded sequence with the same words -> same output (pads are masked out of attention/pooling).
    short = {"tokens": c["tokens"][:, :3]}
    assert torch.allclose(m(x, s, short), v, atol=1e-5)


def test_null_caption_uses_learned_embedding(arch):
    m = tiny(arch)
    x, s, _ = batch()
    null = {"tokens": torch.zeros(3, 5, dtype=torch.long)}
    v0 = m(x, s, null)
    with torch.no_grad():
        m.null_txt.add_(1.0)
    assert not torch.allclose(v0, m(x, s, null))


def test_trains_with_soar_objective(arch):
    m = tiny(arch)
    x, s, c = batch(4)
    null = {"tokens": torch.zeros(4, 5, dtype=torch.long)}
    cfg = SOARConfig(num_aux=2, rollout_steps=10, guidance_scale=2.0, shift=1.0)
    out = soar_loss(m, x.clamp(-1, 1), c, null_cond=null, config=cfg, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert m.null_txt.grad is not None and some_weight(m).grad.abs().sum() > 0


def test_gradient_checkpointing_matches(arch):
    m = tiny(arch)
    x, s, c = batch()
    m(x, s, c).square().sum().backward()
    g_ref = some_weight(m).grad.clone()
    m.zero_grad()
    m.enable_gradient_checkpointing()
    m(x, s, c).square().sum().backward()
    assert torch.allclose(some_weight(m).grad, g_ref, atol=1e-6)


def test_checkpoint_round_trip(arch, tmp_path):
    m = tiny(arch)
    path = save_checkpoint(m, tmp_path / "m.safetensors")
    m2 = load_checkpoint(path)
    assert type(m2) is type(m) and m2.config == TINY[arch][1]
    x, s, c = batch()
    assert torch.equal(m(x, s, c), m2(x, s, c))


def test_checkpoint_errors_name_the_file(arch, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_checkpoint(tmp_path / "missing.safetensors")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_checkpoint(bad)
    good = save_checkpoint(tiny(arch), tmp_path / "trunc.safetensors")
    good.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        load_checkpoint(good)


def test_bad_inputs_raise(arch):
    m = tiny(arch)
    x, s, c = batch()
    with pytest.raises(ValueError, match="shape"):
        m(x[:, :, :4], s, c)
    with pytest.raises(ValueError, match="token ids"):
        m(x, s, {"tokens": torch.full((3, 5), 99)})
    with pytest.raises(ValueError, match="MMDiTConfig.hidden_size"):
        MMDiTConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="UNetConfig.channels"):
        UNetConfig(channels=[30, 64], groups=8)
    with pytest.raises(ValueError, match="UNetConfig.attention_levels"):
        UNetConfig(channels=[32, 64], attention_levels=[2])
