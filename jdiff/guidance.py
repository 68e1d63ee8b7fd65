"""Guidance as wrappers around a model function: samplers never know about it.

Each wrapper returns a new `model_fn(x_t, t)` of the same prediction type, so it composes with
every sampler and with `jax.jit`: the guidance scale and the conditioning are traced arguments
of the wrapped call, not compile-time constants, when the caller passes them through `jit`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.schedules import Schedule, alpha_bar_at


def _std(x: jax.Array) -> jax.Array:
    return jnp.std(x, axis=tuple(range(1, x.ndim)), keepdims=True)


def rescale_guidance(guided: jax.Array, cond: jax.Array, guidance_rescale) -> jax.Array:
    """Match the guided output's per-example std to the conditional one's, blended by φ
    (Lin et al. 2023, eq. 15-16): φ · guided · std(cond)/std(guided) + (1 - φ) · guided."""
    std_guided = _std(guided)
    rescaled = guided * (_std(cond) / jnp.where(std_guided > 0, std_guided, 1.0))
    return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


def batch_pair(null: Any, cond: Any) -> Any:
    """[null; cond] along the batch axis, field by field, for one network call on 2B examples:
    each leaf of `null` is broadcast to its `cond` leaf's shape ([B, ...]) first, so a null of
    one example (an empty prompt's [1, L, D]) serves the whole batch. Any pytree works."""
    return jax.tree.map(
        lambda u, c: jnp.concatenate([jnp.broadcast_to(u, jnp.shape(c)).astype(c.dtype), c]),
        null,
        cond,
    )


def _known_to_be_one(scale) -> bool:
    """True for a concrete guidance scale of exactly 1; False otherwise or when traced."""
    try:
        return bool(np.all(np.asarray(scale) == 1))
    except jax.errors.TracerArrayConversionError:  # a jit argument: decided at run time
        return False


def classifier_free(
    model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array],
    cond: Any,
    null: Any,
    guidance_scale,
    *,
    guidance_rescale=0.0,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Classifier-free guidance (Ho & Salimans 2022): ŷ = y_u + w (y_c - y_u).

    The conditional and the null conditioning go through the network as one batch of 2B,
    batched as whole pytrees (`batch_pair`: every field, however many). A
    guidance scale of exactly 1 known when the function is built (a Python or NumPy number,
    not a traced value) is the conditional model alone: one B-batch call per step, not 2B.

    Args:
        model_fn: (x [2B, ...], t [2B], c) -> prediction [2B, ...], with c a conditioning
            pytree of [2B, ...] leaves (a `conditioning.Conditioning`, an array, ...).
        cond, null: the batch's conditioning ([B, ...] leaves) and its null (each leaf
            broadcast to cond's).
        guidance_scale: w (1 = conditional model alone); a scalar or [B].
        guidance_rescale: φ of `rescale_guidance` (0 = off).

    Returns:
        model_fn(x [B, ...], t [B]) -> guided prediction [B, ...].
    """
    if _known_to_be_one(guidance_scale):  # ŷ = y_c, which rescaling leaves as it is
        return lambda x, t: model_fn(x, t, cond).astype(jnp.float32)
    both = batch_pair(null, cond)

    def guided(x, t):
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        out_u, out_c = jnp.split(out.astype(jnp.float32), 2)
        scale = diffusion.expand(jnp.asarray(guidance_scale, jnp.float32), out_c)
        result = out_u + scale * (out_c - out_u)
        return rescale_guidance(result, out_c, guidance_rescale)

    return guided


def classifier_guidance(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    log_prob_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    guidance_scale,
    *,
    prediction_type: str = "epsilon",
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Classifier guidance (Dhariwal & Nichol 2021, Alg. 2 written for ε):
    ε̂' = ε̂ - s √(1 - ᾱ_t) ∇_{x_t} log p_φ(y | x_t).

    Args:
        model_fn: (x_t [B, ...], t [B]) -> prediction of `prediction_type`.
        log_prob_fn: (x_t [B, ...], t [B]) -> log p(y | x_t) per example [B] for the target y
            (close over y); its gradient is taken with `jax.grad`.
        schedule: gives ᾱ at the (possibly fractional) t the sampler passes.
        guidance_scale: s, a scalar or [B].

    Returns:
        model_fn(x_t, t) -> the guided prediction, same type as the model's.
    """

    def guided(x, t):
        out = model_fn(x, t).astype(jnp.float32)
        grad = jax.grad(lambda x_: jnp.sum(log_prob_fn(x_, t)))(x)
        abar = diffusion.expand(alpha_bar_at(schedule, t), x)
        x0, eps = diffusion.split_prediction(out, x, abar, prediction_type)
        scale = diffusion.expand(jnp.asarray(guidance_scale, jnp.float32), x)
        eps = eps - scale * jnp.sqrt(1.0 - abar) * grad
        x0 = diffusion.eps_to_x0(x, eps, abar)
        return diffusion.prediction_target(x0, eps, abar, prediction_type)

    return guided


def check_share(share: float, name: str = "share") -> None:
    """ValueError unless `share` (of the schedule, `project_prediction`'s) lies in [0, 1]."""
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"{name}={share}; expected a share of the schedule in [0, 1]")


def project_prediction(
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    schedule: Schedule,
    project: Callable[[jax.Array], jax.Array],
    *,
    share: float = 1.0,
    prediction_type: str = "epsilon",
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Data consistency by projection (ILVR, Choi et al. 2021; DDNM, Wang et al. 2023): the
    model's x̂_0 is replaced by project(x̂_0), e.g. onto the images whose known pixels or
    low-resolution version are the given ones, and ε̂ re-derived from x_t and it, so that every
    sampler steps towards the projected prediction.

    Applied over the noisiest `share` of the schedule only (t >= (1 - share) T; 1: every step,
    0: none): the steps after it draw details from the model alone, so a result that agrees
    with the data shows that the model followed it rather than that it was pasted in.

    Args:
        model_fn: (x_t [B, ...], t [B]) -> prediction of `prediction_type`; t equal across the
            batch, as the samplers pass it.
        project: x̂_0 [B, ...] -> x̂_0' [B, ...].

    Returns:
        model_fn(x_t, t) -> prediction of the same type.
    """
    check_share(share)
    start = (1.0 - share) * schedule.num_timesteps

    def projected(x, t):
        out = model_fn(x, t).astype(jnp.float32)
        abar = diffusion.expand(alpha_bar_at(schedule, t), x)
        x0, _ = diffusion.split_prediction(out, x, abar, prediction_type)
        x0 = jax.lax.cond(t[0] >= start, project, lambda v: v, x0)
        eps = diffusion.x0_to_eps(x, x0, abar)
        return diffusion.prediction_target(x0, eps, abar, prediction_type)

    return projected
