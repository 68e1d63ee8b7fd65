"""Training objectives and the variational bound (Ho et al. 2020; Nichol & Dhariwal 2021).

This module is the one home of the negative log-likelihood: evaluation code calls
`nll_bits_per_dim`. Data x_0 is in [-1, 1] with a leading batch axis [B, ...]; `model_fn(x_t, t)`
takes t as float32 [B] on the training scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr

from jdiff import diffusion
from jdiff.diffusion import expand
from jdiff.schedules import Schedule

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
_LOG2 = math.log(2.0)  # a Python float: no device array at import


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the batch axis: [B, ...] -> [B]."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def _sample_t_noise(schedule: Schedule, x0: jax.Array, key: jax.Array):
    key_t, key_noise = jax.random.split(key)
    t = jax.random.randint(key_t, (x0.shape[0],), 0, schedule.num_timesteps)
    noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
    return t, noise, diffusion.q_sample(schedule, x0, t, noise)


def snr_weight(snr: jax.Array, prediction_type: str, snr_gamma: float) -> jax.Array:
    """Min-SNR-γ weight (Hang et al. 2023) on the MSE of a prediction type, [B] -> [B].

    The x_0-MSE weight min(SNR, γ), expressed for each target:
    ε: min(SNR, γ) / SNR;  v: min(SNR, γ) / (SNR + 1);  x_0: min(SNR, γ).
    """
    diffusion.check_prediction_type(prediction_type)
    clipped = jnp.minimum(snr, snr_gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def diffusion_loss(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    prediction_type: str = "epsilon",
    snr_gamma: float | None = None,
) -> jax.Array:
    """The simple loss E_{t, ε} ‖target - model(x_t, t)‖² (DDPM eq. 14), a scalar.

    t ~ U{0, ..., T-1} per example, ε ~ N(0, I), x_t in closed form; the target is that of
    `prediction_type` ("epsilon", "v_prediction" or "sample"); the squared error is averaged over
    every dimension, then over the batch, each example weighted by min-SNR-γ when `snr_gamma`.

    Args:
        model_fn: (x_t [B, ...], t float32 [B]) -> prediction [B, ...].
        x0: clean data [B, ...]; key: PRNG key for t and ε.
    """
    diffusion.check_prediction_type(prediction_type)
    t, noise, x_t = _sample_t_noise(schedule, x0, key)
    abar = expand(schedule.alphas_cumprod[t], x0)
    target = diffusion.prediction_target(x0, noise, abar, prediction_type)
    prediction = model_fn(x_t, t.astype(jnp.float32)).astype(jnp.float32)
    mse = mean_flat((target - prediction) ** 2)
    if snr_gamma is not None:
        snr = schedule.alphas_cumprod[t] / (1.0 - schedule.alphas_cumprod[t])
        mse = mse * snr_weight(snr, prediction_type, snr_gamma)
    return jnp.mean(mse)


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats (arrays broadcast)."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x: jax.Array, *, means: jax.Array, log_scales: jax.Array
) -> jax.Array:
    """log P(x) of 8-bit data under N(means, e^{2 log_scales}) discretized to 256 bins (DDPM §3.3).

    Each x in [-1, 1] on the grid of 256 levels owns the bin [x - 1/255, x + 1/255], the end bins
    extended to ±∞. Uses the exact normal CDF in log space (improved-diffusion uses a tanh
    approximation of it), so the likelihood is a true probability. Returns log-probabilities in
    nats, elementwise.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = log_ndtr(upper)
    log_one_minus_cdf_lower = log_ndtr(-lower)
    # For the middle bins, the difference of CDFs; by symmetry the smaller tail keeps precision.
    mid = jnp.where(
        lower > 0,
        ndtr(-lower) - ndtr(-upper),
        ndtr(upper) - ndtr(lower),
    )
    log_mid = jnp.log(jnp.maximum(mid, 1e-12))
    return jnp.where(
        x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_one_minus_cdf_lower, log_mid)
    )


def prior_bpd(schedule: Schedule, x0: jax.Array) -> jax.Array:
    """KL(q(x_{T-1} | x_0) ‖ N(0, I)) in bits per dimension, [B]: the prior term L_T."""
    t = jnp.full((x0.shape[0],), schedule.num_timesteps - 1)
    abar = expand(schedule.alphas_cumprod[t], x0)
    kl = normal_kl(jnp.sqrt(abar) * x0, jnp.log1p(-abar), 0.0, 0.0)
    return mean_flat(jnp.broadcast_to(kl, x0.shape)) / _LOG2


def vlb_term_bpd(
    schedule: Schedule,
    model_output: jax.Array,
    x0: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_denoised: bool = False,
) -> jax.Array:
    """One term of the bound in bits per dimension, [B] (DDPM eq. 5, IDDPM eqs. 4-6).

    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) ‖ p(x_{t-1} | x_t)) for t > 0, and the discretized decoder
    L_0 = -log p(x_0 | x_1) at t = 0.

    Args:
        model_output: the network's output at (x_t, t) ([B, ..., 2C] for learned variances).
        x0, x_t: [B, ...]; t: integer timesteps [B].
    """
    true_mean, _, true_log_var = diffusion.q_posterior(schedule, x0, x_t, t)
    mean, _, log_var, _ = diffusion.p_mean_variance(
        schedule,
        model_output,
        x_t,
        t,
        prediction_type=prediction_type,
        variance_type=variance_type,
        clip_denoised=clip_denoised,
    )
    kl = mean_flat(jnp.broadcast_to(normal_kl(true_mean, true_log_var, mean, log_var), x0.shape))
    decoder_nll = -mean_flat(
        discretized_gaussian_log_likelihood(x0, means=mean, log_scales=0.5 * log_var)
    )
    return jnp.where(t == 0, decoder_nll, kl) / _LOG2


def vlb_terms_bpd(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_denoised: bool = False,
) -> jax.Array:
    """Every term L_0 ... L_{T-2} of the bound at once, bits/dim, [B, T]; column t is term t.

    Each t draws its own ε (folded from `key`); the loop over t is a `lax.map`, one model call each.
    """

    def term(t_scalar):
        noise = jax.random.normal(jax.random.fold_in(key, t_scalar), x0.shape, jnp.float32)
        t = jnp.full((x0.shape[0],), t_scalar)
        x_t = diffusion.q_sample(schedule, x0, t, noise)
        out = model_fn(x_t, t.astype(jnp.float32)).astype(jnp.float32)
        return vlb_term_bpd(
            schedule,
            out,
            x0,
            x_t,
            t,
            prediction_type=prediction_type,
            variance_type=variance_type,
            clip_denoised=clip_denoised,
        )

    return jax.lax.map(term, jnp.arange(schedule.num_timesteps)).T


def nll_bits_per_dim(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    variance_type: str = "fixed_small",
    clip_denoised: bool = False,
    prediction_type: str = "epsilon",
) -> jax.Array:
    """The variational bound on -log p(x_0) in bits per dimension, [B], over all T steps.

    L = L_T + Σ_{t>0} L_{t-1} + L_0 (DDPM eq. 5) with improved-diffusion's conventions: clipped
    posterior log-variance, the 8-bit discretized decoder at t = 0, the prior term
    KL(q(x_T | x_0) ‖ N(0, I)). x0 must be 8-bit data scaled to [-1, 1].
    """
    terms = vlb_terms_bpd(
        model_fn,
        schedule,
        x0,
        key,
        prediction_type=prediction_type,
        variance_type=variance_type,
        clip_denoised=clip_denoised,
    )
    return jnp.sum(terms, axis=1) + prior_bpd(schedule, x0)


def hybrid_loss(
    model_fn: ModelFn,
    schedule: Schedule,
    x0: jax.Array,
    key: jax.Array,
    *,
    lambda_vlb: float = 0.001,
    variance_type: str = "learned_range",
) -> jax.Array:
    """L_hybrid = L_simple + λ L_vlb for a learned-variance ε-model (IDDPM §3.1), a scalar.

    The model outputs [B, ..., 2C]: ε and the variance parameter. L_vlb's one-sample estimate at
    uniform t is T · L_t; its mean is held fixed (stop-gradient on ε), so L_vlb trains only Σ, and
    L_simple only ε (IDDPM: "we apply a stop-gradient to the μ output for the L_vlb term").
    """
    t, noise, x_t = _sample_t_noise(schedule, x0, key)
    out = model_fn(x_t, t.astype(jnp.float32)).astype(jnp.float32)
    eps, var = jnp.split(out, 2, axis=-1)
    mse = mean_flat((noise - eps) ** 2)
    frozen = jnp.concatenate([jax.lax.stop_gradient(eps), var], axis=-1)
    vlb = vlb_term_bpd(schedule, frozen, x0, x_t, t, variance_type=variance_type)
    return jnp.mean(mse + lambda_vlb * schedule.num_timesteps * vlb)
