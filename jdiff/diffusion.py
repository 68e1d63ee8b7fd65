"""The Gaussian diffusion process in closed form (Ho et al. 2020; Nichol & Dhariwal 2021).

Notation: x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε, ε ~ N(0, I). Arrays have a leading batch axis [B, ...];
timesteps `t` are integer arrays of shape [B] unless said otherwise. The prediction types are
those of diffusers: "epsilon" (ε), "sample" (x_0) and "v_prediction" (v = √ᾱ ε - √(1-ᾱ) x_0,
Salimans & Ho 2022).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff.schedules import Schedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")


def expand(a: jax.Array, x: jax.Array) -> jax.Array:
    """Reshape per-example values a [B] (or a scalar) to broadcast against x [B, ...]."""
    a = jnp.asarray(a)
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def check_prediction_type(prediction_type: str) -> None:
    """Raise a ValueError naming the allowed prediction types if `prediction_type` is not one."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; choose one of {PREDICTION_TYPES}"
        )


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """Draw x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I) (DDPM eq. 4).

    x0, noise: [B, ...]; t: integer timesteps [B].
    """
    abar = expand(schedule.alphas_cumprod[t], x0)
    return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise


def posterior_coefficients(abar_t: jax.Array, abar_s: jax.Array):
    """q(x_s | x_t, x_0) = N(c_0 x_0 + c_t x_t, β̃ I) for any s < t, from ᾱ_t and ᾱ_s.

    With α_{t|s} = ᾱ_t / ᾱ_s and β_{t|s} = 1 - α_{t|s} (DDPM eq. 7 for s = t - 1):
    c_0 = √ᾱ_s β_{t|s} / (1 - ᾱ_t), c_t = √α_{t|s} (1 - ᾱ_s) / (1 - ᾱ_t),
    β̃ = (1 - ᾱ_s) / (1 - ᾱ_t) β_{t|s}.

    Returns:
        (c_0, c_t, β̃, β_{t|s}), each shaped like the inputs.
    """
    alpha_ts = abar_t / abar_s
    beta_ts = 1.0 - alpha_ts
    c0 = jnp.sqrt(abar_s) * beta_ts / (1.0 - abar_t)
    ct = jnp.sqrt(alpha_ts) * (1.0 - abar_s) / (1.0 - abar_t)
    variance = (1.0 - abar_s) / (1.0 - abar_t) * beta_ts
    return c0, ct, variance, beta_ts


def q_posterior(schedule: Schedule, x0: jax.Array, x_t: jax.Array, t: jax.Array):
    """The forward posterior q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7). x0, x_t: [B, ...]; t: [B].

    Returns:
        (mean [B, ...], variance [B, 1...], log_variance_clipped [B, 1...]); the log-variance at
        t = 0 is that of t = 1, as in improved-diffusion.
    """
    c0, ct, _, _ = posterior_coefficients(
        schedule.alphas_cumprod[t], schedule.alphas_cumprod_prev[t]
    )
    mean = expand(c0, x0) * x0 + expand(ct, x_t) * x_t
    variance = expand(schedule.posterior_variance[t], x_t)
    log_variance = expand(schedule.posterior_log_variance_clipped[t], x_t)
    return mean, variance, log_variance


def eps_to_x0(x_t: jax.Array, eps: jax.Array, abar: jax.Array) -> jax.Array:
    """x̂_0 = (x_t - √(1-ᾱ) ε̂) / √ᾱ. abar broadcasts against x_t."""
    return (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def x0_to_eps(x_t: jax.Array, x0: jax.Array, abar: jax.Array) -> jax.Array:
    """ε̂ = (x_t - √ᾱ x̂_0) / √(1-ᾱ). abar broadcasts against x_t."""
    return (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)


def v_to_x0(x_t: jax.Array, v: jax.Array, abar: jax.Array) -> jax.Array:
    """x̂_0 = √ᾱ x_t - √(1-ᾱ) v̂."""
    return jnp.sqrt(abar) * x_t - jnp.sqrt(1.0 - abar) * v


def v_to_eps(x_t: jax.Array, v: jax.Array, abar: jax.Array) -> jax.Array:
    """ε̂ = √ᾱ v̂ + √(1-ᾱ) x_t."""
    return jnp.sqrt(abar) * v + jnp.sqrt(1.0 - abar) * x_t


def velocity(x0: jax.Array, eps: jax.Array, abar: jax.Array) -> jax.Array:
    """v = √ᾱ ε - √(1-ᾱ) x_0, the v-prediction target (Salimans & Ho 2022)."""
    return jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0


def get_velocity(schedule: Schedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v target at integer timesteps t [B] (diffusers' `get_velocity`). x0, noise: [B, ...]."""
    return velocity(x0, noise, expand(schedule.alphas_cumprod[t], x0))


def split_prediction(
    model_output: jax.Array, x_t: jax.Array, abar: jax.Array, prediction_type: str
) -> tuple[jax.Array, jax.Array]:
    """Turn a model output of any prediction type into (x̂_0, ε̂) at noise level ᾱ.

    Args:
        model_output: [B, ...], the same shape as x_t.
        x_t: the variance-preserving noisy input, [B, ...].
        abar: ᾱ at the input's noise level, broadcastable against x_t.
        prediction_type: one of `PREDICTION_TYPES`.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps_to_x0(x_t, model_output, abar), model_output
    if prediction_type == "sample":
        return model_output, x0_to_eps(x_t, model_output, abar)
    return v_to_x0(x_t, model_output, abar), v_to_eps(x_t, model_output, abar)


def prediction_target(x0: jax.Array, eps: jax.Array, abar: jax.Array, prediction_type: str):
    """What a network of this prediction type should output for x_t built from (x0, eps)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return velocity(x0, eps, abar)


def p_mean_variance(
    schedule: Schedule,
    model_output: jax.Array,
    x_t: jax.Array,
    t: jax.Array,
    *,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_denoised: bool = False,
):
    """The reverse step p(x_{t-1} | x_t) = N(μ_θ, Σ_θ) of the full T-step chain.

    Conventions of improved-diffusion (Nichol & Dhariwal 2021): the mean is the posterior mean
    with x_0 replaced by x̂_0; the variance is
      fixed_small: β̃_t (log-variance clipped at t = 0),
      fixed_large: β_t, with β̃_1 in place of β_0,
      learned: Σ = exp(v), the network's second half of channels is the log-variance,
      learned_range: Σ = exp(u log β_t + (1-u) log β̃_t), u = (v + 1) / 2 for the network's
        v in [-1, 1] (IDDPM eq. 15).

    Args:
        model_output: [B, ..., C], or [B, ..., 2C] for the learned variance types (channels last).
        x_t: [B, ..., C]; t: integer timesteps [B].
        clip_denoised: clip x̂_0 to [-1, 1] before forming the mean.

    Returns:
        (mean, variance, log_variance, x0_pred), each [B, ..., C] (variance broadcastable).
    """
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance_type {variance_type!r}; choose one of {VARIANCE_TYPES}")
    learned = variance_type in ("learned", "learned_range")
    if learned:
        if model_output.shape[-1] != 2 * x_t.shape[-1]:
            raise ValueError(
                f"variance_type {variance_type!r} needs a model output of 2 x {x_t.shape[-1]} "
                f"channels (prediction, variance), got {model_output.shape[-1]}"
            )
        model_output, var_output = jnp.split(model_output, 2, axis=-1)
    if variance_type == "fixed_small":
        log_variance = expand(schedule.posterior_log_variance_clipped[t], x_t)
    elif variance_type == "fixed_large":
        large = jnp.append(schedule.posterior_variance[1], schedule.betas[1:])
        log_variance = expand(jnp.log(large)[t], x_t)
    elif variance_type == "learned":
        log_variance = var_output
    else:
        min_log = expand(schedule.posterior_log_variance_clipped[t], x_t)
        max_log = expand(jnp.log(schedule.betas)[t], x_t)
        frac = (var_output + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
    abar = expand(schedule.alphas_cumprod[t], x_t)
    x0_pred, _ = split_prediction(model_output, x_t, abar, prediction_type)
    if clip_denoised:
        x0_pred = jnp.clip(x0_pred, -1.0, 1.0)
    mean, _, _ = q_posterior(schedule, x0_pred, x_t, t)
    return mean, jnp.exp(log_variance), log_variance, x0_pred


def split_prediction_sigma(
    model_output: jax.Array, x: jax.Array, sigma: jax.Array, prediction_type: str
) -> jax.Array:
    """x̂_0 from a model output in the variance-exploding view x = x_0 + σ ε (Karras et al. 2022).

    The model saw x / √(σ²+1), the variance-preserving input at ᾱ = 1/(σ²+1); written in σ this
    avoids forming 1 - ᾱ, which loses precision at small σ.
      epsilon: x̂_0 = x - σ ε̂;  v_prediction: x̂_0 = x / (σ²+1) - σ v̂ / √(σ²+1);  sample: x̂_0.
    sigma broadcasts against x.
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "sample":
        return model_output
    return model_output * (-sigma / jnp.sqrt(sigma**2 + 1)) + x / (sigma**2 + 1)
