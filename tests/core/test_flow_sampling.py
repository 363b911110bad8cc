import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from soarflow.conditioning import cond_batch_size, cond_cat, cond_index, cond_repeat, cond_where
from soarflow.flow import interpolate, sample_t, shift_sigma, sigma_schedule, x0_from_velocity
from soarflow.objective import correction_target, renoise
from soarflow.sampling import guided_velocity, integrate, sample_euler, sample_sde, step

from .toy_models import RecordingModel, ToyVelocity

unit = st.floats(0.0, 1.0, allow_nan=False)


@given(t=unit, shift=st.floats(0.1, 10.0))
@example(t=1.0, shift=0.1)  # unclamped, the formula gives 1 + 1 ulp here
@example(t=0.0, shift=0.32)  # with the denominator 1 + (s-1) t, sigma(1) was 1 - 1 ulp here
def test_shift_fixes_endpoints_and_is_monotone(t, shift):
    tt = torch.tensor([0.0, t, min(t + 1e-3, 1.0), 1.0], dtype=torch.float64)
    s = shift_sigma(tt, shift)
    assert s[0] == 0 and float(s[3]) == 1.0
    assert float(s[2]) >= float(s[1]) and 0 <= float(s[1]) <= 1


def test_shift_three_matches_closed_form():
    assert math.isclose(float(shift_sigma(torch.tensor(0.5), 3.0)), 1.5 / 2.0)


def test_schedule_visits_inference_grid():
    s = sigma_schedule(4, 1.0)
    torch.testing.assert_close(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    with pytest.raises(ValueError, match="num_steps"):
        sigma_schedule(0)


@pytest.mark.parametrize("density", ["logit_normal", "uniform", "mode", "cosmap"])
def test_t_densities_in_unit_interval(density):
    t = sample_t(4000, density=density, generator=torch.Generator().manual_seed(0))
    assert t.shape == (4000,) and float(t.min()) >= 0 and float(t.max()) <= 1
    if density == "logit_normal":
        assert abs(float(t.mean()) - 0.5) < 0.02  # symmetric around 1/2 for mean 0
    with pytest.raises(ValueError, match="density"):
        sample_t(3, density="beta")


@settings(max_examples=50, deadline=None)
@given(s1=st.floats(0.0, 0.95), sp=unit, seed=st.integers(0, 2**16))
def test_renoise_correction_round_trip(s1, sp, seed):
    """For any z', z1: z_aux lies on the segment, and z_aux - sigma' v_corr = x0 exactly."""
    g = torch.Generator().manual_seed(seed)
    zp, z1, x0 = (torch.randn(1, 5, generator=g, dtype=torch.float64) for _ in range(3))
    sp = max(sp * (1 - s1) + s1, 1e-3)
    s1t, spt = torch.tensor([s1], dtype=torch.float64), torch.tensor([sp], dtype=torch.float64)
    za = renoise(zp, z1, s1t, spt)
    alpha = (sp - s1) / (1 - s1)
    torch.testing.assert_close(za, (1 - alpha) * zp + alpha * z1)
    v = correction_target(za, x0, spt).double()
    torch.testing.assert_close(za - sp * v, x0, rtol=1e-5, atol=1e-5)


def test_x0_from_velocity_inverts_interpolation():
    x0, z1, s = torch.randn(3, 4), torch.randn(3, 4), torch.rand(3)
    torch.testing.assert_close(x0_from_velocity(interpolate(x0, z1, s), s, z1 - x0), x0)


def test_guidance_one_forward_and_formula():
    m = RecordingModel(ToyVelocity(6, 3))
    x, c, null = torch.randn(4, 6), torch.randn(4, 3), torch.zeros(1, 3)
    s = torch.rand(4)
    v1 = guided_velocity(m, x, s, c, null, 1.0)
    assert [k["rows"] for k in m.calls] == [4]
    torch.testing.assert_close(v1, m.inner(x, s, c))
    m.calls.clear()
    v = guided_velocity(m, x, s, c, null, 3.0)
    assert [k["rows"] for k in m.calls] == [8]
    vc, vu = m.inner(x, s, c), m.inner(x, s, null.expand(4, 3))
    torch.testing.assert_close(v, vu + 3.0 * (vc - vu), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="null_cond"):
        guided_velocity(m, x, s, c, None, 2.0)


def test_euler_sampler_is_exact_for_straight_flows():
    """For v = z1 - x0 constant, Euler from z1 reaches x0 in any number of steps."""
    x0, z1 = torch.randn(3, 5), torch.randn(3, 5)
    model = lambda x, s, c: z1 - x0  # noqa: E731
    for n in (1, 7):
        out, traj = sample_euler(model, z1, None, num_steps=n, shift=3.0, return_trajectory=True)
        torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)
        assert len(traj) == n + 1
        s = sigma_schedule(n, 3.0)
        torch.testing.assert_close(traj[1], interpolate(x0, z1, s[1].expand(3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["euler_noise", "constant_sde", "flow_sde", "cps"])
def test_stochastic_steps_zero_noise_limits_and_finiteness(kind):
    x0, z1 = torch.randn(64, 8), torch.randn(64, 8)
    s, sn = torch.full((64,), 0.6), torch.full((64,), 0.5)
    x = interpolate(x0, z1, s)
    out = step(kind, x, s, sn, z1 - x0, noise_scale=0.0, generator=torch.Generator().manual_seed(0))
    if kind in ("euler_noise", "cps"):  # zero noise: exactly the deterministic straight path
        torch.testing.assert_close(out, interpolate(x0, z1, sn), rtol=1e-5, atol=1e-5)
    noisy = step(kind, x, s, sn, z1 - x0, noise_scale=0.7, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(noisy).all() and not torch.allclose(noisy, out)
    with pytest.raises(ValueError, match="kind"):
        step("heun", x, s, sn, z1 - x0, noise_scale=0.1)


def test_sde_sampler_runs_and_ends_deterministically():
    model = ToyVelocity(6, 3)
    c, null = torch.randn(4, 3), torch.zeros(1, 3)
    a = sample_sde(
        model,
        torch.randn(4, 6),
        c,
        null_cond=null,
        num_steps=5,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert a.shape == (4, 6) and torch.isfinite(a).all()
    with pytest.raises(ValueError, match="cond"):
        integrate(model, torch.randn(4, 6), sigma_schedule(3), c[:2])


def test_condition_tree_operations():
    c = {"a": torch.arange(6).view(3, 2), "b": (torch.arange(3.0), "static")}
    assert cond_batch_size(c) == 3
    r = cond_repeat(c, 2)
    assert r["a"].shape == (6, 2) and torch.equal(r["a"][3:], c["a"]) and r["b"][1] == "static"
    cat = cond_cat([c, c])
    assert torch.equal(cat["b"][0], r["b"][0])
    idx = cond_index(c, torch.tensor([2, 0]))
    assert torch.equal(idx["a"], c["a"][[2, 0]])
    z = {"a": torch.zeros(3, 2, dtype=torch.long), "b": (torch.zeros(3), "static")}
    w = cond_where(torch.tensor([True, False, True]), z, c)
    assert torch.equal(w["a"][1], c["a"][1]) and int(w["a"][0].abs().sum()) == 0
    with pytest.raises(ValueError, match="batch"):
        cond_batch_size({"a": torch.zeros(2, 1), "b": torch.zeros(3)})
