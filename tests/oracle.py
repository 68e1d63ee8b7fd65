"""Gaussian data x_0 ~ N(μ, s²) per dimension, for which the optimal denoiser is known exactly.

With x_t = √ᾱ x_0 + √(1-ᾱ) ε, x_t is Gaussian with variance v = ᾱ s² + 1 - ᾱ, and
E[ε | x_t] = √(1-ᾱ) (x_t - √ᾱ μ) / v,   Var(x_0 | x_t) = s² (1 - ᾱ) / v,
so the minimum of the ε-MSE is E Var(ε | x_t) = ᾱ s² / v per dimension.
"""

import jax.numpy as jnp

from jdiff import schedules

MU, S = 0.25, 0.4


def eps_model(schedule, mu=MU, s=S):
    """The exact E[ε | x_t] as a model function; t may be fractional (σ interpolation)."""

    def model_fn(x, t):
        abar = schedules.alpha_bar_at(schedule, t).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.sqrt(1 - abar) * (x - jnp.sqrt(abar) * mu) / (abar * s**2 + 1 - abar)

    return model_fn


def min_eps_mse(abar, s=S):
    """The minimum ε-MSE per dimension at noise level ᾱ."""
    return abar * s**2 / (abar * s**2 + 1 - abar)


def x0_posterior_var(abar, s=S):
    return s**2 * (1 - abar) / (abar * s**2 + 1 - abar)
