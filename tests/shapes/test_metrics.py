import pytest
import torch

from soarflow.shapes import ShapesEval, diversity, exposure_bias, features, frechet_distance, render


@pytest.fixture(scope="module")
def real():
    ev = ShapesEval(prompts_per_family=10, images_per_prompt=2, seed=0)
    return ev, ev.render_real()


def test_features_deterministic(real):
    _, x = real
    f = features(x[:10])
    assert f.shape == (10, 210) and torch.equal(f, features(x[:10]))


def test_frechet_distance_sanity(real):
    ev, x = real
    other = render(ev.image_prompts(), seed=5)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    fd_real = frechet_distance(x, other)
    fd_noise = frechet_distance(x, noise)
    assert fd_noise > 10 * fd_real and fd_noise > 20
    with pytest.raises(ValueError, match="differ in shape"):
        frechet_distance(x, render(["a circle"] * 4, size=48))


def test_diversity(real):
    _, x = real
    groups = [i // 2 for i in range(len(x))]
    assert diversity(x[::2].repeat_interleave(2, 0), groups) == pytest.approx(0.0, abs=1e-9)
    assert diversity(x, groups) > 0.5
    assert diversity(x, groups, space="pixels") > 0.1
    with pytest.raises(ValueError, match="group ids"):
        diversity(x, groups[:-1])
    with pytest.raises(ValueError, match="two or more"):
        diversity(x[:3], [0, 1, 2])


def _line_model(x0, scale=1.0):
    """Velocity of the straight line through the current state and x0: exact (scale=1) on every coupled path."""
    return lambda x, sigma, cond: scale * (x - x0) / sigma.view(-1, 1, 1, 1)


def test_exposure_bias_oracle_and_biased_model(real):
    _, x = real
    x0 = x[:8]
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    exact = exposure_bias(_line_model(x0), x0, None, num_steps=10, generator=g())
    assert abs(exact.mean_gap) < 1e-6 and all(abs(b.gap) < 1e-6 for b in exact.bins)
    assert sum(b.num_points for b in exact.bins) == len(exact.sigmas) == 6
    assert all(0 < s < 0.75 + 1e-6 for s in exact.sigmas)
    # undershooting velocity: its own states drift from the ideal path, so the x0 error grows there
    biased = exposure_bias(_line_model(x0, 0.8), x0, None, num_steps=10, generator=g())
    assert biased.mean_gap > 1e-3 and all(b.gap > 0 for b in biased.bins)
    assert all(b.ideal_error > 0 for b in biased.bins)
    d = biased.to_dict()
    assert d["mean_gap"] == biased.mean_gap and len(d["bins"]) == len(biased.bins)
    assert "mean gap" in biased.table()


def test_exposure_bias_with_guidance(real):
    _, x = real
    x0 = x[:4]
    cond, null = torch.ones(4, 2), torch.zeros(1, 2)

    def model(xx, sigma, c):  # the conditional branch is exact, the unconditional one predicts x0 = 0
        exact = (xx - x0.repeat(xx.shape[0] // 4, 1, 1, 1)) / sigma.view(-1, 1, 1, 1)
        uncond = xx / sigma.view(-1, 1, 1, 1)
        return torch.where(c[:, :1, None, None] > 0, exact, uncond)

    rep = exposure_bias(
        model, x0, cond, null_cond=null, guidance_scale=1.0, num_steps=8, generator=torch.Generator().manual_seed(1)
    )
    assert abs(rep.mean_gap) < 1e-6
    rep = exposure_bias(
        model, x0, cond, null_cond=null, guidance_scale=2.0, num_steps=8, generator=torch.Generator().manual_seed(1)
    )
    assert rep.guidance_scale == 2.0 and rep.mean_gap != 0
    with pytest.raises(ValueError, match="null_cond"):
        exposure_bias(model, x0, cond, guidance_scale=2.0)


def test_exposure_bias_errors(real):
    _, x = real
    with pytest.raises(ValueError, match="start_sigma"):
        exposure_bias(_line_model(x[:2]), x[:2], None, start_sigma=0)
    with pytest.raises(ValueError, match="fewer than 2 steps"):
        exposure_bias(_line_model(x[:2]), x[:2], None, num_steps=2, start_sigma=0.4)
