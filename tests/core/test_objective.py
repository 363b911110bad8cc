import math

import pytest
import torch

from soarflow import SOARConfig, objective, sft_loss, soar_loss
from soarflow.flow import loss_weight, shift_sigma
from soarflow.objective import correction_target, layout_name, renoise, resolve_layout

from .toy_models import RecordingModel, ToyVelocity

B, D, C = 5, 6, 3


def make_batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, D, generator=g).to(dtype)
    cond = torch.randn(B, C, generator=g).to(dtype)
    null = torch.zeros(1, C, dtype=dtype)
    noise = torch.randn(B, D, generator=g).to(dtype)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    return x0, cond, null, noise, t


def aux_sigmas_for(t, cfg, seed=1):
    """Valid sigma' in [sigma1, 1] for the ODE path."""
    g = torch.Generator().manual_seed(seed)
    s1 = shift_sigma((t - 1 / cfg.rollout_steps).clamp_min(0), cfg.shift)
    return s1 + torch.rand(cfg.num_aux, t.shape[0], generator=g) * (1 - s1)


def reference_soar(model, x0, cond, null, cfg, noise, t, aux_sigmas):
    """Straight from the formulas, one sample and one point at a time."""
    main_sum, aux_sum, n_aux = 0.0, 0.0, 0
    for b in range(x0.shape[0]):
        xb, zb, cb = x0[b : b + 1], noise[b : b + 1], cond[b : b + 1]
        s0 = shift_sigma(t[b : b + 1], cfg.shift)
        s1 = shift_sigma((t[b : b + 1] - 1.0 / cfg.rollout_steps).clamp_min(0), cfg.shift)
        xs = (1 - s0) * xb + s0 * zb
        main = ((model(xs, s0, cb) - (zb - xb)) ** 2).mean()
        main_sum = main_sum + loss_weight(s0, cfg.weighting)[0] * main
        with torch.no_grad():
            vc, vu = model(xs, s0, cb), model(xs, s0, null)
            zp = xs + (s1 - s0) * (vu + cfg.guidance_scale * (vc - vu))
        for k in range(cfg.num_aux):
            sp = aux_sigmas[k, b : b + 1].clamp_min(cfg.sigma_floor)
            alpha = (sp - s1) / (1 - s1)
            za = (1 - alpha) * zp + alpha * zb
            vcorr = (za - xb) / sp
            aux = ((model(za, sp, cb) - vcorr) ** 2).mean()
            aux_sum = aux_sum + loss_weight(sp, cfg.weighting)[0] * aux
            n_aux += 1
    lam = cfg.lambda_aux
    return (main_sum + lam * aux_sum) / (x0.shape[0] + lam * n_aux)


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("weighting", ["none", "sigma_sqrt", "cosmap"])
@pytest.mark.parametrize("lam,K,w", [(1.0, 6, 4.5), (0.5, 2, 1.0), (2.0, 1, 3.0)])
def test_matches_reference_formula_loss_and_gradient(weighting, lam, K, w):
    torch.manual_seed(0)
    model = ToyVelocity(D, C)
    x0, cond, null, noise, t = make_batch()
    cfg = SOARConfig(num_aux=K, lambda_aux=lam, guidance_scale=w, rollout_steps=10, weighting=weighting)
    aux = aux_sigmas_for(t, cfg)
    out = soar_loss(model, x0, cond, null_cond=null, config=cfg, noise=noise, t=t, aux_sigmas=aux)
    ref = reference_soar(model, x0, cond, null, cfg, noise, t, aux)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    for g1, g2 in zip(grads(model, out.loss), grads(model, ref)):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    assert out.num_aux_points == K * B


@pytest.mark.parametrize("cfg", [SOARConfig(lambda_aux=0.0), SOARConfig(num_aux=0)])
def test_lambda_zero_or_no_points_is_exactly_sft(cfg):
    torch.manual_seed(0)
    model = ToyVelocity(D, C)
    x0, cond, null, _, _ = make_batch()
    a = soar_loss(model, x0, cond, null_cond=null, config=cfg, generator=torch.Generator().manual_seed(3))
    b = sft_loss(model, x0, cond, config=cfg, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.loss, b.loss)
    # and it is the plain flow-matching loss, recomputed by hand from the same draws
    g = torch.Generator().manual_seed(3)
    z1 = torch.randn(x0.shape, generator=g)
    t = torch.sigmoid(torch.randn(B, generator=g))
    s = shift_sigma(t, cfg.shift)[:, None]
    fm = ((model((1 - s) * x0 + s * z1, s[:, 0], cond) - (z1 - x0)) ** 2).mean()
    torch.testing.assert_close(a.loss, fm)


def test_small_lambda_converges_to_sft():
    torch.manual_seed(0)
    model = ToyVelocity(D, C)
    x0, cond, null, noise, t = make_batch()
    sft = sft_loss(model, x0, cond, noise=noise, t=t, config=SOARConfig(num_aux=0)).loss
    near = soar_loss(model, x0, cond, null_cond=null, noise=noise, t=t, config=SOARConfig(lambda_aux=1e-7)).loss
    assert abs(float(near.detach() - sft.detach())) < 1e-5
    far = soar_loss(model, x0, cond, null_cond=null, noise=noise, t=t, config=SOARConfig(lambda_aux=1.0)).loss
    assert abs(float(far.detach() - sft.detach())) > 1e-3


@pytest.mark.parametrize("reuse", [False, True, "auto"])
@pytest.mark.parametrize("chunk,rows", [(None, None), (7, None), (None, B), (None, 3), (None, "probe"), (None, "auto")])
def test_fused_equals_per_point_loop(chunk, rows, reuse):
    torch.manual_seed(0)
    model = ToyVelocity(D, C)
    x0, cond, null, noise, t = make_batch()
    base = SOARConfig(
        num_aux=4, rollout_steps=8, aux_chunk_size=chunk, forward_batch_size=rows, reuse_main_output=reuse
    )
    aux = aux_sigmas_for(t, base)
    fused = soar_loss(model, x0, cond, null_cond=null, config=base, noise=noise, t=t, aux_sigmas=aux)
    loop_cfg = base.replace(fuse_forward=False, reuse_main_output=False)
    loop = soar_loss(model, x0, cond, null_cond=null, config=loop_cfg, noise=noise, t=t, aux_sigmas=aux)
    torch.testing.assert_close(fused.loss, loop.loss, rtol=1e-6, atol=1e-7)
    for g1, g2 in zip(grads(model, fused.loss), grads(model, loop.loss)):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_forward_structure_rollout_has_no_grad():
    torch.manual_seed(0)
    model = RecordingModel(ToyVelocity(D, C))
    x0, cond, null, *_ = make_batch()
    # the reference layout: guided rollout over 2B rows, then main + aux fused
    fused = SOARConfig(num_aux=3, reuse_main_output=False, forward_batch_size=None)
    soar_loss(model, x0, cond, null_cond=null, config=fused)
    assert [(c["rows"], c["grad"]) for c in model.calls] == [(2 * B, False), (B + 3 * B, True)]
    model.calls.clear()
    soar_loss(model, x0, cond, null_cond=None, config=fused.replace(guidance_scale=1.0))
    assert [(c["rows"], c["grad"]) for c in model.calls] == [(B, False), (B + 3 * B, True)]
    # the default: main (with grad) first, its output is the conditional half; the rollout adds B no-grad rows
    model.calls.clear()
    soar_loss(model, x0, cond, null_cond=null, config=SOARConfig(num_aux=3, forward_batch_size=None))
    assert [(c["rows"], c["grad"]) for c in model.calls] == [(B, True), (B, False), (3 * B, True)]
    model.calls.clear()
    soar_loss(model, x0, cond, null_cond=None, config=SOARConfig(num_aux=3, guidance_scale=1.0, forward_batch_size=B))
    assert [(c["rows"], c["grad"]) for c in model.calls] == [(B, True)] * 4  # no rollout forward at all


def test_no_gradient_flows_through_rollout():
    """Perturbing the weights only inside the rollout must not change the gradient's dependence: the loss
    gradient equals the gradient with z' computed by a frozen copy of the model."""
    torch.manual_seed(0)
    model = ToyVelocity(D, C)
    x0, cond, null, noise, t = make_batch()
    cfg = SOARConfig(num_aux=3, rollout_steps=5)
    aux = aux_sigmas_for(t, cfg)
    out = soar_loss(model, x0, cond, null_cond=null, config=cfg, noise=noise, t=t, aux_sigmas=aux)
    g_soar = grads(model, out.loss)
    # Gradient of the same loss built by the reference with an explicitly detached rollout.
    ref = reference_soar(model, x0, cond, null, cfg, noise, t, aux)
    g_ref = grads(model, ref)
    for a, b in zip(g_soar, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(p.grad is not None for p in model.parameters())


def test_cfg_one_is_conditional_velocity_in_rollout():
    torch.manual_seed(0)
    model = RecordingModel(ToyVelocity(D, C))
    x0, cond, null, noise, t = make_batch()
    t = t * 0.6 + 0.35  # keep sigma1 above sigma_floor, so sigma' = sigma1 exactly
    cfg = SOARConfig(num_aux=1, guidance_scale=1.0, rollout_steps=4, reuse_main_output=False, forward_batch_size=None)
    s1 = shift_sigma((t - 0.25).clamp_min(0), cfg.shift)
    soar_loss(model, x0, cond, null_cond=null, config=cfg, noise=noise, t=t, aux_sigmas=s1[None])
    s0 = shift_sigma(t, cfg.shift)
    xs = (1 - s0[:, None]) * x0 + s0[:, None] * noise
    with torch.no_grad():
        z_expected = xs + (s1 - s0)[:, None] * model.inner(xs, s0, cond)
    aux_inputs = model.calls[1]["x"][B:]
    # sigma' = sigma1 gives alpha = 0, so the aux input is z' itself
    torch.testing.assert_close(aux_inputs, z_expected, rtol=1e-6, atol=1e-6)


def test_alpha_zero_gives_z_prime_and_one_gives_z1():
    torch.manual_seed(0)
    zp, z1 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    s1 = torch.rand(4) * 0.9
    torch.testing.assert_close(renoise(zp, z1, s1, s1), zp)
    torch.testing.assert_close(renoise(zp, z1, s1, torch.ones(4)), z1)


def test_oracle_on_trajectory_has_zero_loss():
    """If the model returns the true straight-path velocity, z' lands on x_sigma1, z_aux = x_sigma' and
    v_corr = z1 - x0: every term vanishes (SFT is recovered when there is no deviation)."""
    x0, cond, null, noise, t = make_batch()
    v_true = noise - x0

    def oracle(x, sigma, c):
        reps = x.shape[0] // B
        return v_true.repeat(reps, 1)

    cfg = SOARConfig(num_aux=3, guidance_scale=1.0)
    out = soar_loss(oracle, x0, cond, null_cond=null, config=cfg, noise=noise, t=t)
    assert float(out.loss) < 1e-10 and float(out.rollout_deviation) < 1e-6


def test_t0_below_one_step_reaches_sigma_zero_and_drops_stochastic_paths():
    torch.manual_seed(0)
    model = RecordingModel(ToyVelocity(D, C))
    x0, cond, null, noise, _ = make_batch()
    t = torch.tensor([0.01, 0.02, 0.5, 0.6, 0.7])  # first two below 1/N = 0.05
    cfg = SOARConfig(
        num_aux=2,
        rollout_steps=20,
        num_rollout_paths=3,
        rollout_kind="constant_sde",
        reuse_main_output=False,
        forward_batch_size=None,
    )
    out = soar_loss(
        model, x0, cond, null_cond=null, config=cfg, noise=noise, t=t, generator=torch.Generator().manual_seed(0)
    )
    # ODE path: 2 points x 5 samples; stochastic paths: 2 paths x 2 points x 3 samples
    assert out.num_aux_points == 2 * 5 + 2 * 2 * 3
    s = model.calls[1]["sigma"][B:]
    assert torch.isfinite(s).all() and (s >= cfg.sigma_floor).all()
    assert math.isfinite(float(out.loss.detach()))


def test_x0_recovered_by_following_v_corr():
    g = torch.Generator().manual_seed(0)
    z_aux, x0 = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g)
    s = torch.rand(7, generator=g) * 0.99 + 0.01
    v = correction_target(z_aux, x0, s)
    torch.testing.assert_close(z_aux - s[:, None] * v, x0, rtol=1e-5, atol=1e-5)
    # Euler integration of dx/dsigma = v_corr (constant along the straight line to x0) lands on x0
    x = z_aux.clone()
    for _ in range(10):
        x = x - (s[:, None] / 10) * correction_target(x, x0, s * (1 - _ / 10))
    torch.testing.assert_close(x, x0, rtol=1e-4, atol=1e-4)


def test_sigma_upper_ratio_bounds_aux_sigmas():
    model = RecordingModel(ToyVelocity(D, C))
    x0, cond, null, noise, t = make_batch()
    t = torch.full((B,), 0.2)
    cfg = SOARConfig(
        num_aux=50,
        sigma_upper="ratio",
        sigma_upper_ratio=1.5,
        shift=1.0,
        rollout_steps=10,
        reuse_main_output=False,
        forward_batch_size=None,
    )
    soar_loss(model, x0, cond, null_cond=null, config=cfg, noise=noise, t=t, generator=torch.Generator().manual_seed(1))
    s = model.calls[1]["sigma"][B:]
    assert float(s.min()) >= 0.1 - 1e-6 and float(s.max()) <= 0.3 + 1e-6
    assert float(s.max()) > 0.25  # the draw actually spans the range


@pytest.mark.parametrize("shape", [(B, 4, 8, 8), (B, 10, 16)])
def test_image_latents_and_token_sequences_with_dict_cond(shape):
    class DictModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(shape[1]) * 0.1)

        def forward(self, x, sigma, cond):
            scale = cond["emb"].mean(dim=(1, 2)) + cond["pooled"].mean(1)
            view = (-1, shape[1]) + (1,) * (x.ndim - 2)
            return x * self.w.view(view) + (sigma + scale).view(-1, *([1] * (x.ndim - 1)))

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g)
    cond = {"emb": torch.randn(B, 7, 5, generator=g), "pooled": torch.randn(B, 9, generator=g)}
    null = {"emb": torch.zeros(1, 7, 5), "pooled": torch.zeros(1, 9)}
    model = DictModel()
    out = soar_loss(
        model,
        x0,
        cond,
        null_cond=null,
        config=SOARConfig(num_aux=2, cond_dropout=0.3),
        generator=torch.Generator().manual_seed(0),
    )
    out.loss.backward()
    assert model.w.grad is not None and torch.isfinite(model.w.grad).all()
    assert out.num_aux_points == 2 * B


def test_bf16_inputs():
    torch.manual_seed(0)
    model = ToyVelocity(D, C).to(torch.bfloat16)
    x0, cond, null, *_ = make_batch(dtype=torch.bfloat16)
    out = soar_loss(
        model, x0, cond, null_cond=null, config=SOARConfig(num_aux=2), generator=torch.Generator().manual_seed(0)
    )
    assert out.loss.dtype == torch.float32 and math.isfinite(float(out.loss.detach()))
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_seeded_calls_are_reproducible_and_diagnostics_sane():
    torch.manual_seed(0)
    model = ToyVelocity(D, C)
    x0, cond, null, *_ = make_batch()
    cfg = SOARConfig(num_aux=3, num_rollout_paths=2, rollout_kind="cps")
    a = soar_loss(model, x0, cond, null_cond=null, config=cfg, generator=torch.Generator().manual_seed(5))
    b = soar_loss(model, x0, cond, null_cond=null, config=cfg, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.loss, b.loss)
    m = a.metrics()
    assert set(m) >= {"loss", "main_loss", "aux_loss", "num_aux_points", "mean_aux_sigma", "rollout_deviation"}
    assert 0 < m["mean_aux_sigma"] <= 1 and m["rollout_deviation"] > 0


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "field,value",
    [
        ("num_aux", -1),
        ("lambda_aux", -0.1),
        ("rollout_steps", 0),
        ("num_rollout_paths", 0),
        ("rollout_kind", "ode"),
        ("sigma_upper", "two"),
        ("sigma_upper_ratio", 0.5),
        ("sigma_floor", 0.0),
        ("t_density", "normal"),
        ("weighting", "snr"),
        ("cond_dropout", 1.0),
        ("aux_chunk_size", 0),
        ("shift", 0.0),
        ("forward_batch_size", 0),
        ("forward_batch_size", "fast"),
        ("points_per_sample", 0),
        ("rollout", "exact"),
        ("aux_noise", "new"),
        ("aux_sigma_density", "beta"),
        ("cond_dropout_mode", "per_token"),
    ],
)
def test_config_validation_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        SOARConfig(**{field: value})


def test_bad_inputs_name_the_argument():
    model = ToyVelocity(D, C)
    x0, cond, null, noise, t = make_batch()
    cfg = SOARConfig(num_aux=2)
    with pytest.raises(ValueError, match="noise"):
        soar_loss(model, x0, cond, null_cond=null, config=cfg, noise=noise[:, :3])
    with pytest.raises(ValueError, match="cond"):
        soar_loss(model, x0, cond[:3], null_cond=null, config=cfg)
    with pytest.raises(ValueError, match="t"):
        soar_loss(model, x0, cond, null_cond=null, config=cfg, t=t[:2])
    with pytest.raises(ValueError, match="aux_sigmas"):
        soar_loss(model, x0, cond, null_cond=null, config=cfg, t=t, aux_sigmas=torch.full((2, B), 0.001))
    with pytest.raises(ValueError, match="aux_sigmas"):
        soar_loss(model, x0, cond, null_cond=null, config=cfg, t=t, aux_sigmas=torch.full((3, B), 0.99))
    with pytest.raises(ValueError, match="null_cond"):
        soar_loss(model, x0, cond, null_cond=None, config=cfg)
    with pytest.raises(ValueError, match="x0"):
        soar_loss(model, torch.randn(5), cond, null_cond=null, config=cfg)


@pytest.mark.parametrize(
    "cfg",
    [
        SOARConfig(num_aux=2, num_rollout_paths=3, rollout_kind="cps", cond_dropout=0.4, rollout_steps=4),
        SOARConfig(num_aux=0, points_per_sample=3, cond_dropout=0.4),
        SOARConfig(num_aux=2, rollout="none", aux_noise="fresh", cond_dropout=0.4, cond_dropout_mode="per_batch"),
    ],
)
def test_global_draws_sliced_per_process_give_the_global_loss(cfg):
    """The trainer's scheme: one draw for the global batch, each process takes its rows. Every random number
    (noise, t, dropout, stochastic paths, sigma', fresh aux noise) is then the same as on one process, so the
    summed per-process terms equal the global ones."""
    from soarflow.objective import draw_randomness

    model = ToyVelocity(D, C)
    x0, cond, null, _, _ = make_batch()
    draws = draw_randomness(cfg, x0.shape, generator=torch.Generator().manual_seed(3))
    whole = soar_loss(model, x0, cond, null_cond=null, config=cfg, draws=draws)
    total, terms = 0.0, 0.0
    for rows in (slice(0, 2), slice(2, B)):
        part = soar_loss(model, x0[rows], cond[rows], null_cond=null, config=cfg, draws=draws.rows(rows))
        n = (rows.stop - rows.start) * cfg.points_per_sample + cfg.lambda_aux * part.num_aux_points * (not cfg.is_sft)
        total, terms = total + part.loss * n, terms + n
    torch.testing.assert_close(total / terms, whole.loss)


@pytest.mark.parametrize(
    "device,expected", [("cpu", "reuse"), ("cuda", "fused"), ("cuda:1", "fused"), ("mps", "reuse"), ("meta", "reuse")]
)
def test_auto_layout_resolves_by_device_type(device, expected):
    auto = SOARConfig(num_aux=2)
    assert auto.reuse_main_output == "auto" and layout_name(auto) == "auto"
    resolved = resolve_layout(auto, device)
    assert layout_name(resolved) == expected
    assert resolve_layout(resolved, "cuda" if expected == "reuse" else "cpu") == resolved  # resolved stays put
    # the per-term loop, when asked for, on every device; explicit values are never changed
    assert layout_name(resolve_layout(auto.replace(fuse_forward=False), device)) == "loop"
    for explicit, name in ((True, "reuse"), (False, "fused")):
        assert layout_name(resolve_layout(auto.replace(reuse_main_output=explicit), device)) == name


def test_reuse_main_output_values_are_checked():
    with pytest.raises(ValueError, match="soar.reuse_main_output.*true, false or 'auto'"):
        SOARConfig(reuse_main_output="fast")
    from soarflow.train import load_config

    assert load_config(None, ["--soar.reuse_main_output", "auto"]).soar.reuse_main_output == "auto"
    assert load_config(None, ["--soar.reuse_main_output", "false"]).soar.reuse_main_output is False


def test_soar_loss_runs_the_layout_of_its_device_type(monkeypatch):
    """soar_loss resolves ``auto`` from the input's device: the reuse structure on a CPU, the fused structure
    when the CPU is listed as a fused device type (as CUDA is), with the same loss and gradients."""
    torch.manual_seed(0)
    model = RecordingModel(ToyVelocity(D, C))
    x0, cond, null, noise, t = make_batch()
    cfg = SOARConfig(num_aux=3, rollout_steps=8, forward_batch_size=None)
    aux = aux_sigmas_for(t, cfg)
    reuse = soar_loss(model, x0, cond, null_cond=null, config=cfg, noise=noise, t=t, aux_sigmas=aux)
    assert [(c["rows"], c["grad"]) for c in model.calls] == [(B, True), (B, False), (3 * B, True)]
    g_reuse = grads(model, reuse.loss)
    model.calls.clear()
    monkeypatch.setattr(objective, "FUSED_DEVICE_TYPES", ("cpu",))
    fused = soar_loss(model, x0, cond, null_cond=null, config=cfg, noise=noise, t=t, aux_sigmas=aux)
    assert [(c["rows"], c["grad"]) for c in model.calls] == [(2 * B, False), (B + 3 * B, True)]
    torch.testing.assert_close(fused.loss, reuse.loss, rtol=1e-6, atol=1e-7)
    for g1, g2 in zip(grads(model, fused.loss), g_reuse):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)
