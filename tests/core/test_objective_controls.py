"""The SOAR controls (compute- and noise-level-matched SFT, no-deviation SOAR, the sigma' density, the condition
dropout order) and the main-output reuse, each against a small independent computation, one sample at a time."""

import pytest
import torch

from soarflow import SOARConfig, sft_loss, soar_loss
from soarflow.flow import sample_t, shift_sigma
from soarflow.objective import aux_sigmas_from_uniform

from .toy_models import RecordingModel, ToyVelocity

B, D, C = 5, 6, 3


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, cond = torch.randn(B, D, generator=g), torch.randn(B, C, generator=g)
    noise = torch.randn(B, D, generator=g)
    t = torch.rand(B, generator=g) * 0.9 + 0.05
    return x0, cond, torch.zeros(1, C), noise, t


def fixed_aux(t, cfg, seed=1):
    s1 = shift_sigma((t - 1 / cfg.rollout_steps).clamp_min(0), cfg.shift)
    g = torch.Generator().manual_seed(seed)
    return s1 + torch.rand(cfg.num_aux, B, generator=g) * (1 - s1)


def reference(model, x0, cond, null, cfg, noise, t, aux, drop=None, fresh=None):
    """SOAR and its controls from the formulas in docs/objective.md, one sample and one point at a time."""
    drop = torch.zeros(B, dtype=torch.bool) if drop is None else drop
    main_sum, aux_sum, n = 0.0, 0.0, 0
    for b in range(B):
        xb, zb = x0[b : b + 1], noise[b : b + 1]
        cb = null if drop[b] else cond[b : b + 1]  # what the main and aux terms train on
        rc = cb if cfg.rollout_uses_dropped_cond else cond[b : b + 1]  # what the rollout is guided by
        s0 = shift_sigma(t[b : b + 1], cfg.shift)
        s1 = shift_sigma((t[b : b + 1] - 1.0 / cfg.rollout_steps).clamp_min(0), cfg.shift)
        xs = (1 - s0) * xb + s0 * zb
        main_sum = main_sum + ((model(xs, s0, cb) - (zb - xb)) ** 2).mean()
        with torch.no_grad():
            if cfg.rollout == "none":
                zp = (1 - s1) * xb + s1 * zb
            else:
                vc, vu = model(xs, s0, rc), model(xs, s0, null)
                zp = xs + (s1 - s0) * (vu + cfg.guidance_scale * (vc - vu))
        for k in range(cfg.num_aux):
            sp = aux[k, b : b + 1].clamp_min(cfg.sigma_floor)
            if fresh is not None:
                za = (1 - sp) * xb + sp * fresh[k, b : b + 1]
            else:
                za = (1 - (sp - s1) / (1 - s1)) * zp + (sp - s1) / (1 - s1) * zb
            aux_sum = aux_sum + ((model(za, sp, cb) - (za - xb) / sp) ** 2).mean()
            n += 1
    lam = cfg.lambda_aux
    return (main_sum + lam * aux_sum) / (B + lam * n)


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def assert_same(model, a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for g1, g2 in zip(grads(model, a), grads(model, b)):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def drop_mask(seed, p, mode):
    """The dropout draw of the objective: with noise and t given, it is the generator's first use."""
    u = torch.rand(B, generator=torch.Generator().manual_seed(seed))
    return (u[:1].expand(B) if mode == "per_batch" else u) < p


# ------------------------------------------------------------------ main-output reuse and the dropout order


@pytest.mark.parametrize("rollout_dropped", [False, True])
@pytest.mark.parametrize("mode", ["per_sample", "per_batch"])
@pytest.mark.parametrize("w", [4.5, 1.0])
def test_reuse_and_dropout_order_match_reference(rollout_dropped, mode, w):
    torch.manual_seed(0)
    model = ToyVelocity(D, C)
    x0, cond, null, noise, t = make_batch()
    cfg = SOARConfig(
        num_aux=3,
        rollout_steps=8,
        guidance_scale=w,
        cond_dropout=0.5,
        cond_dropout_mode=mode,
        rollout_uses_dropped_cond=rollout_dropped,
    )
    aux = fixed_aux(t, cfg)
    seed = 11 if mode == "per_sample" else 3  # seed 3 drops the whole batch, seed 11 some rows only
    drop = drop_mask(seed, 0.5, mode)
    assert 0 < int(drop.sum()) < B if mode == "per_sample" else bool(drop.all())
    for reuse in (True, False):
        ref = reference(model, x0, cond, null, cfg, noise, t, aux, drop=drop)
        out = soar_loss(
            model,
            x0,
            cond,
            null_cond=null,
            config=cfg.replace(reuse_main_output=reuse),
            noise=noise,
            t=t,
            aux_sigmas=aux,
            generator=torch.Generator().manual_seed(seed),
        )
        assert_same(model, out.loss, ref)


def test_default_rollout_with_undropped_caption_differs_from_the_official_order():
    torch.manual_seed(0)
    model = ToyVelocity(D, C)
    x0, cond, null, noise, t = make_batch()
    cfg = SOARConfig(num_aux=2, rollout_steps=4, cond_dropout=0.5, cond_dropout_mode="per_batch")
    a, b = (
        soar_loss(
            model,
            x0,
            cond,
            null_cond=null,
            config=cfg.replace(rollout_uses_dropped_cond=r),
            noise=noise,
            t=t,
            generator=torch.Generator().manual_seed(3),
        ).loss
        for r in (False, True)
    )
    assert abs(float((a - b).detach())) > 1e-4  # the knob changes the rollout of a dropped batch


def test_reuse_fallback_forward_only_for_dropped_rows():
    torch.manual_seed(0)
    model = RecordingModel(ToyVelocity(D, C))
    x0, cond, null, noise, t = make_batch()
    cfg = SOARConfig(num_aux=2, cond_dropout=0.5, forward_batch_size=None)
    n_drop = int(drop_mask(11, 0.5, "per_sample").sum())
    soar_loss(
        model, x0, cond, null_cond=null, config=cfg, noise=noise, t=t, generator=torch.Generator().manual_seed(11)
    )
    assert [(c["rows"], c["grad"]) for c in model.calls] == [(B, True), (B + n_drop, False), (2 * B, True)]
    model.calls.clear()
    soar_loss(
        model,
        x0,
        cond,
        null_cond=null,
        config=cfg.replace(rollout_uses_dropped_cond=True),
        noise=noise,
        t=t,
        generator=torch.Generator().manual_seed(11),
    )
    assert [(c["rows"], c["grad"]) for c in model.calls] == [(B, True), (B, False), (2 * B, True)]


def test_per_batch_dropout_in_sft_is_all_or_nothing():
    model = RecordingModel(ToyVelocity(D, C))
    x0, cond, null, noise, t = make_batch()
    cfg = SOARConfig(num_aux=0, cond_dropout=0.5, cond_dropout_mode="per_batch")
    seen = set()
    for seed in range(12):
        model.calls.clear()
        out = sft_loss(
            model, x0, cond, config=cfg, null_cond=null, noise=noise, t=t, generator=torch.Generator().manual_seed(seed)
        )
        expected = drop_mask(seed, 0.5, "per_batch")
        c = torch.where(expected[:, None], null.expand(B, C), cond)
        s = shift_sigma(t, cfg.shift)[:, None]
        ref = ((model.inner((1 - s) * x0 + s * noise, s[:, 0], c) - (noise - x0)) ** 2).mean()
        torch.testing.assert_close(out.loss, ref)
        seen.add(bool(expected[0]))
    assert seen == {True, False}


# ------------------------------------------------------------------ rollout none and noise-level-matched SFT


def test_rollout_none_is_sft_on_soar_noise_levels():
    torch.manual_seed(0)
    model = RecordingModel(ToyVelocity(D, C))
    x0, cond, null, noise, t = make_batch()
    cfg = SOARConfig(num_aux=3, rollout_steps=8, rollout="none")
    aux = fixed_aux(t, cfg)
    out = soar_loss(model, x0, cond, null_cond=None, config=cfg, noise=noise, t=t, aux_sigmas=aux)
    assert all(c["grad"] for c in model.calls)  # no rollout forward
    assert float(out.rollout_deviation) < 1e-6
    # v_corr = z1 - x0 at x_sigma': the standard flow-matching target on the same noise
    sp = aux.clamp_min(cfg.sigma_floor)
    s0 = shift_sigma(t, cfg.shift)
    terms = [((model.inner((1 - s0[:, None]) * x0 + s0[:, None] * noise, s0, cond) - (noise - x0)) ** 2).mean(1)]
    for k in range(3):
        xk = (1 - sp[k, :, None]) * x0 + sp[k, :, None] * noise
        terms.append(((model.inner(xk, sp[k], cond) - (noise - x0)) ** 2).mean(1))
    sft_at_levels = torch.cat(terms).sum() / (B + 3 * B)
    torch.testing.assert_close(out.loss, sft_at_levels, rtol=1e-5, atol=1e-6)
    assert_same(model, out.loss, reference(model.inner, x0, cond, null, cfg, noise, t, aux))


def test_fresh_noise_is_noise_level_matched_sft():
    torch.manual_seed(0)
    model = ToyVelocity(D, C)
    x0, cond, null, noise, t = make_batch()
    cfg = SOARConfig(num_aux=3, rollout_steps=8, rollout="none", aux_noise="fresh", lambda_aux=0.5)
    aux = fixed_aux(t, cfg)
    out = soar_loss(
        model,
        x0,
        cond,
        null_cond=None,
        config=cfg,
        noise=noise,
        t=t,
        aux_sigmas=aux,
        generator=torch.Generator().manual_seed(4),
    )
    g = torch.Generator().manual_seed(4)
    torch.rand((1, 3, B), generator=g)  # the sigma' uniforms (overridden by aux)
    fresh = torch.randn((1, 3, B, D), generator=g)[0]
    assert not torch.allclose(fresh[0], noise)
    assert_same(model, out.loss, reference(model, x0, cond, null, cfg, noise, t, aux, fresh=fresh))


# ------------------------------------------------------------------ compute-matched SFT


@pytest.mark.parametrize("P", [1, 3])
def test_points_per_sample_is_the_mean_over_fresh_draws(P):
    torch.manual_seed(0)
    model = ToyVelocity(D, C)
    x0, cond, *_ = make_batch()
    cfg = SOARConfig(num_aux=0, points_per_sample=P, t_density="uniform", shift=2.0)
    out = sft_loss(model, x0, cond, config=cfg, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    z, tt = torch.randn(B, D, generator=g), torch.rand(B, generator=g)
    zs, ts = [z], [tt]
    if P > 1:
        zs.append(torch.randn((P - 1) * B, D, generator=g))
        ts.append(torch.rand((P - 1) * B, generator=g))
    z, tt = torch.cat(zs), torch.cat(ts)
    total = 0.0
    for r in range(P * B):
        xb, cb, s = x0[r % B : r % B + 1], cond[r % B : r % B + 1], shift_sigma(tt[r : r + 1], 2.0)
        total = total + ((model((1 - s) * xb + s * z[r : r + 1], s, cb) - (z[r : r + 1] - xb)) ** 2).mean()
    assert_same(model, out.loss, total / (P * B))
    # soar_loss with no aux term is this SFT; with aux points it refuses P > 1
    torch.testing.assert_close(
        soar_loss(model, x0, cond, null_cond=None, config=cfg, generator=torch.Generator().manual_seed(7)).loss,
        out.loss,
    )
    if P > 1:
        with pytest.raises(ValueError, match="points_per_sample"):
            soar_loss(model, x0, cond, null_cond=None, config=cfg.replace(num_aux=2, rollout="none"))


def test_points_per_sample_with_dropout_takes_a_per_row_null_cond():
    # the shapes task passes null_cond at the batch size; P draws tile it like the caption (found by study_claim)
    model = ToyVelocity(D, C)
    x0, cond, *_ = make_batch()
    null_one = torch.zeros(1, C)
    cfg = SOARConfig(num_aux=0, points_per_sample=3, cond_dropout=0.5)
    per_row = sft_loss(
        model, x0, cond, config=cfg, null_cond=null_one.expand(B, C).clone(), generator=torch.Generator().manual_seed(3)
    )
    single = sft_loss(model, x0, cond, config=cfg, null_cond=null_one, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(per_row.loss, single.loss)


# ------------------------------------------------------------------ the sigma' density


@pytest.mark.parametrize("density", ["logit_normal", "uniform", "mode", "cosmap"])
def test_t_density_aux_sigmas_follow_the_restricted_training_density(density):
    cfg = SOARConfig(t_density=density, aux_sigma_density="t_density", rollout_steps=10, shift=3.0)
    t0 = torch.full((1,), 0.45)  # t1 = 0.35
    u = torch.rand(40000, 1, generator=torch.Generator().manual_seed(0))
    s_aux = aux_sigmas_from_uniform(t0, cfg, u)[:, 0]
    s1 = float(shift_sigma(torch.tensor(0.35), 3.0))
    assert float(s_aux.min()) >= s1 - 1e-6 and float(s_aux.max()) <= 1.0
    # rejection sampling from the training density: same quantiles
    t = sample_t(400000, density=density, generator=torch.Generator().manual_seed(1))
    kept = shift_sigma(t[t >= 0.35], 3.0)
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    torch.testing.assert_close(torch.quantile(s_aux, q), torch.quantile(kept, q), atol=0.01, rtol=0)
    # u = 0 and u = 1 are the interval's ends
    ends = aux_sigmas_from_uniform(t0, cfg, torch.tensor([[0.0], [1.0]]))[:, 0]
    torch.testing.assert_close(ends, torch.tensor([s1, 1.0]), atol=1e-5, rtol=0)


def test_logit_normal_t_density_matches_the_closed_form_and_ratio_bound():
    cfg = SOARConfig(
        aux_sigma_density="t_density",
        logit_mean=0.3,
        logit_std=0.8,
        rollout_steps=5,
        sigma_upper="ratio",
        sigma_upper_ratio=1.5,
        shift=3.0,
    )
    t0 = torch.tensor([0.3, 0.6, 0.9])
    u = torch.rand(7, 3, generator=torch.Generator().manual_seed(2))
    got = aux_sigmas_from_uniform(t0, cfg, u)
    s0 = shift_sigma(t0, 3.0)
    up = (1.5 * s0).clamp(max=1.0)
    t1, t_up = t0 - 0.2, up / (3.0 - 2.0 * up)

    def cdf(tt):
        return torch.special.ndtr((torch.logit(tt.double()) - 0.3) / 0.8)

    a, b = cdf(t1), cdf(t_up)
    expected = shift_sigma(torch.sigmoid(0.3 + 0.8 * torch.special.ndtri(a + u.double() * (b - a))), 3.0)
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)
    assert bool((got <= up + 1e-6).all())


def test_t_density_in_the_loss_and_the_trainer_draw():
    from soarflow.objective import draw_randomness

    model = RecordingModel(ToyVelocity(D, C))
    x0, cond, null, noise, t = make_batch()
    cfg = SOARConfig(
        num_aux=4, aux_sigma_density="t_density", rollout="none", reuse_main_output=False, forward_batch_size=None
    )
    soar_loss(model, x0, cond, null_cond=null, config=cfg, noise=noise, t=t, generator=torch.Generator().manual_seed(5))
    u = torch.rand((1, 4, B), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(model.calls[0]["sigma"][B:], aux_sigmas_from_uniform(t, cfg, u)[0].flatten())
    # the trainer's path: the objective's draws for the batch, passed in (the same sigma')
    model.calls.clear()
    draws = draw_randomness(cfg, x0.shape, generator=torch.Generator().manual_seed(5), noise=noise, t=t)
    soar_loss(model, x0, cond, null_cond=null, config=cfg, draws=draws)
    torch.testing.assert_close(model.calls[0]["sigma"][B:], aux_sigmas_from_uniform(t, cfg, u)[0].flatten())


# ------------------------------------------------------------------ bad combinations


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(rollout="none", num_rollout_paths=2), "rollout"),
        (dict(aux_noise="fresh"), "aux_noise"),
    ],
)
def test_bad_combinations_name_the_field(changes, field):
    with pytest.raises(ValueError, match=f"soar.{field}"):
        SOARConfig(**changes)
