import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import make_scheduler

from jdiff import diffusion, schedules

SCHED = schedules.get_schedule("cosine")
KEY = jax.random.key(0)
X0 = jax.random.uniform(KEY, (5, 4, 4, 3), minval=-1, maxval=1)
NOISE = jax.random.normal(jax.random.key(1), X0.shape)
T = jnp.array([0, 1, 250, 700, 999])


def test_q_sample_at_t0_is_nearly_x0():
    x_t = diffusion.q_sample(SCHED, X0, jnp.zeros(5, jnp.int32), NOISE)
    assert float(jnp.abs(x_t - X0).max()) < 0.03  # √(1-ᾱ_0) ≈ 6e-3 for the cosine schedule
    np.testing.assert_allclose(
        x_t,
        jnp.sqrt(SCHED.alphas_cumprod[0]) * X0 + jnp.sqrt(1 - SCHED.alphas_cumprod[0]) * NOISE,
        rtol=1e-6,
    )


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_add_noise_and_velocity_match_diffusers(name):
    sched = schedules.get_schedule(name)
    ref = make_scheduler("ddpm", name)
    x0_t, noise_t = torch.from_numpy(np.array(X0)), torch.from_numpy(np.array(NOISE))
    t_t = torch.from_numpy(np.array(T))
    for ours, theirs in (
        (diffusion.q_sample(sched, X0, T, NOISE), ref.add_noise(x0_t, noise_t, t_t)),
        (diffusion.get_velocity(sched, X0, NOISE, T), ref.get_velocity(x0_t, noise_t, t_t)),
    ):
        theirs = theirs.numpy()
        assert np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max() <= 1e-5


def test_q_posterior_matches_closed_form():
    x_t = diffusion.q_sample(SCHED, X0, T, NOISE)
    mean, var, log_var = diffusion.q_posterior(SCHED, X0, x_t, T)
    b = np.asarray(SCHED.betas, np.float64)
    abar = np.cumprod(1 - b)
    for i, t in enumerate(np.asarray(T)):
        ap = abar[t - 1] if t > 0 else 1.0
        c0 = np.sqrt(ap) * b[t] / (1 - abar[t])
        ct = np.sqrt(1 - b[t]) * (1 - ap) / (1 - abar[t])
        want_var = b[t] * (1 - ap) / (1 - abar[t])
        np.testing.assert_allclose(mean[i], c0 * X0[i] + ct * x_t[i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(var[i].squeeze(), want_var, rtol=1e-4, atol=1e-12)
        if t > 0:
            np.testing.assert_allclose(log_var[i].squeeze(), np.log(want_var), rtol=1e-4)
    # the clipped log-variance at t = 0 is that of t = 1
    assert log_var[0].squeeze() == SCHED.posterior_log_variance_clipped[1]


def test_posterior_is_the_gaussian_conditional():
    """Sampling x_{t-1} | x_t, x0 by the posterior reproduces q(x_{t-1} | x0)'s moments."""
    t = jnp.full((20000,), 300)
    x0 = jnp.full((20000, 1), 0.5)
    noise = jax.random.normal(jax.random.key(2), x0.shape)
    x_t = diffusion.q_sample(SCHED, x0, t, noise)
    mean, var, _ = diffusion.q_posterior(SCHED, x0, x_t, t)
    x_prev = mean + jnp.sqrt(var) * jax.random.normal(jax.random.key(3), x0.shape)
    abar_prev = SCHED.alphas_cumprod[299]
    assert abs(float(x_prev.mean()) - float(jnp.sqrt(abar_prev) * 0.5)) < 0.02
    assert abs(float(x_prev.var()) - float(1 - abar_prev)) < 0.03


@pytest.mark.parametrize("prediction_type", diffusion.PREDICTION_TYPES)
def test_conversions_invert_each_other(prediction_type):
    abar = diffusion.expand(SCHED.alphas_cumprod[T], X0)
    x_t = diffusion.q_sample(SCHED, X0, T, NOISE)
    target = diffusion.prediction_target(X0, NOISE, abar, prediction_type)
    x0, eps = diffusion.split_prediction(target, x_t, abar, prediction_type)
    # skip t = 999 for x0 from ε (√ᾱ = 5e-5 amplifies rounding) and t = 0 for ε from x0
    np.testing.assert_allclose(x0[:4], X0[:4], atol=2e-3)
    np.testing.assert_allclose(eps[1:], NOISE[1:], atol=2e-3)
    np.testing.assert_allclose(diffusion.eps_to_x0(x_t, NOISE, abar)[:4], X0[:4], atol=2e-3)
    np.testing.assert_allclose(diffusion.x0_to_eps(x_t, X0, abar)[1:], NOISE[1:], atol=2e-3)
    v = diffusion.velocity(X0, NOISE, abar)
    np.testing.assert_allclose(diffusion.v_to_x0(x_t, v, abar), X0, atol=1e-5)
    np.testing.assert_allclose(diffusion.v_to_eps(x_t, v, abar), NOISE, atol=1e-5)


def test_sigma_view_conversion_agrees_with_vp():
    sigma = jnp.array([0.03, 1.0, 14.6])[:, None]
    x0 = jnp.array([[0.2], [-0.7], [0.9]])
    eps = jnp.array([[1.1], [0.3], [-0.5]])
    x = x0 + sigma * eps  # the variance-exploding state
    abar = 1 / (1 + sigma**2)
    for ptype in diffusion.PREDICTION_TYPES:
        out = diffusion.prediction_target(x0, eps, abar, ptype)
        np.testing.assert_allclose(
            diffusion.split_prediction_sigma(out, x, sigma, ptype), x0, atol=1e-5
        )


def test_p_mean_variance_variance_types():
    x_t = diffusion.q_sample(SCHED, X0, T, NOISE)
    v = jnp.full(X0.shape, 0.3)
    out2 = jnp.concatenate([NOISE, v], axis=-1)
    small = diffusion.p_mean_variance(SCHED, NOISE, x_t, T, variance_type="fixed_small")
    large = diffusion.p_mean_variance(SCHED, NOISE, x_t, T, variance_type="fixed_large")
    rng = diffusion.p_mean_variance(SCHED, out2, x_t, T, variance_type="learned_range")
    learned = diffusion.p_mean_variance(SCHED, out2, x_t, T, variance_type="learned")
    # the mean is the posterior mean at x̂0 = x0 (the true noise was given)
    mean, _, _ = diffusion.q_posterior(SCHED, X0, x_t, T)
    np.testing.assert_allclose(small[0][:4], mean[:4], atol=1e-3)
    np.testing.assert_allclose(
        small[2][1:].squeeze(), np.log(SCHED.posterior_variance[T[1:]]), rtol=1e-5
    )
    np.testing.assert_allclose(large[1][1:].squeeze(), SCHED.betas[T[1:]], rtol=1e-5)
    assert large[1][0].squeeze() == pytest.approx(float(SCHED.posterior_variance[1]))
    u = (0.3 + 1) / 2
    want = u * np.log(SCHED.betas[T]) + (1 - u) * SCHED.posterior_log_variance_clipped[T]
    np.testing.assert_allclose(rng[2][:, 0, 0, 0], want, rtol=1e-5)
    np.testing.assert_allclose(learned[2], v)
    with pytest.raises(ValueError, match="2 x 3 channels"):
        diffusion.p_mean_variance(SCHED, NOISE, x_t, T, variance_type="learned_range")
    with pytest.raises(ValueError, match="choose one of"):
        diffusion.p_mean_variance(SCHED, NOISE, x_t, T, variance_type="small")
    clipped = diffusion.p_mean_variance(SCHED, NOISE * 50, x_t, T, clip_denoised=True)
    assert float(jnp.abs(clipped[3]).max()) <= 1.0
