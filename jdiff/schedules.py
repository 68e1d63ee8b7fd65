"""Noise schedules of the forward process q(x_t | x_{t-1}) = N(sqrt(1 - β_t) x_{t-1}, β_t I).

A `Schedule` is a frozen pytree of float32 arrays of shape [T], so it passes through `jit`,
`scan` and `shard_map` like any other argument. Its arrays are computed once, on the host, in
float64 and stored in float32; `num_timesteps` is static, so timestep grids can be built from it
under `jit`.

Schedules are built outside `jit` (they are constructors, not traced code).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid")

_DEFAULT_BETAS = {  # (beta_start, beta_end) as in diffusers and the papers
    "linear": (1e-4, 0.02),  # DDPM (Ho et al. 2020)
    "scaled_linear": (0.00085, 0.012),  # Stable Diffusion
    "sigmoid": (1e-4, 0.02),  # GeoDiff (Xu et al. 2022)
}


@flax.struct.dataclass
class Schedule:
    """The forward-process coefficients, every array float32 of shape [T].

    Attributes:
        betas: β_t.
        alphas: α_t = 1 - β_t.
        alphas_cumprod: ᾱ_t = ∏_{s<=t} α_s.
        alphas_cumprod_prev: ᾱ_{t-1}, with ᾱ_{-1} = 1.
        posterior_variance: β̃_t = β_t (1 - ᾱ_{t-1}) / (1 - ᾱ_t)  (DDPM eq. 7); 0 at t = 0.
        posterior_log_variance_clipped: log β̃_t with β̃_0 replaced by β̃_1 (improved-diffusion),
            so the log stays finite.
        num_timesteps: T (static).
    """

    betas: jax.Array
    alphas: jax.Array
    alphas_cumprod: jax.Array
    alphas_cumprod_prev: jax.Array
    posterior_variance: jax.Array
    posterior_log_variance_clipped: jax.Array
    num_timesteps: int = flax.struct.field(pytree_node=False)


def from_betas(betas) -> Schedule:
    """Build a `Schedule` from β_t, shape [T], each in (0, 1]; all derived arrays in float64."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2:
        raise ValueError(f"betas must be a 1-D array of at least 2 values, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas <= 1)):
        raise ValueError(
            f"betas must lie in (0, 1]; got min {betas.min():.3g}, max {betas.max():.3g}"
        )
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    log_var = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
    return Schedule(
        betas=f32(betas),
        alphas=f32(alphas),
        alphas_cumprod=f32(alphas_cumprod),
        alphas_cumprod_prev=f32(alphas_cumprod_prev),
        posterior_variance=f32(posterior_variance),
        posterior_log_variance_clipped=f32(log_var),
        num_timesteps=int(betas.size),
    )


def cosine_alpha_bar(s: np.ndarray, offset: float = 0.008) -> np.ndarray:
    """ᾱ(s) = cos²((s + offset) / (1 + offset) · π/2), s in [0, 1] (IDDPM eq. 17)."""
    return np.cos((s + offset) / (1.0 + offset) * math.pi / 2) ** 2


def get_schedule(
    name: str,
    num_timesteps: int = 1000,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    max_beta: float = 0.999,
) -> Schedule:
    """Make a named schedule.

    Args:
        name: one of `SCHEDULES`:
            "linear": β_t = linspace(beta_start, beta_end, T) (DDPM; default 1e-4 .. 0.02).
            "scaled_linear": β_t = linspace(√beta_start, √beta_end, T)² (Stable Diffusion;
                default 0.00085 .. 0.012).
            "cosine": β_t = min(1 - ᾱ(t+1/T) / ᾱ(t/T), max_beta) with ᾱ from `cosine_alpha_bar`
                (Nichol & Dhariwal 2021; diffusers' "squaredcos_cap_v2").
            "sigmoid": β_t = σ(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start (GeoDiff).
        num_timesteps: T.
        beta_start, beta_end: the end points; None takes the schedule's default. Not used by
            "cosine".
        max_beta: the clip of the cosine betas.

    Returns:
        The `Schedule`, arrays of shape [T].
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    if not isinstance(num_timesteps, int) or num_timesteps < 2:
        raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
    if name == "cosine":
        if beta_start is not None or beta_end is not None:
            raise ValueError("the cosine schedule takes no beta_start/beta_end (it uses max_beta)")
        if not 0 < max_beta <= 1:
            raise ValueError(f"max_beta must lie in (0, 1], got {max_beta}")
        s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        abar = cosine_alpha_bar(s)
        return from_betas(np.minimum(1.0 - abar[1:] / abar[:-1], max_beta))
    default_start, default_end = _DEFAULT_BETAS[name]
    start = default_start if beta_start is None else float(beta_start)
    end = default_end if beta_end is None else float(beta_end)
    if not 0 < start < 1 or not 0 < end < 1:
        raise ValueError(f"beta_start and beta_end must lie in (0, 1), got {start} and {end}")
    if name == "linear":
        betas = np.linspace(start, end, num_timesteps)
    elif name == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, num_timesteps) ** 2
    else:
        betas = 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, num_timesteps))) * (end - start) + start
    return from_betas(betas)


def rescale_zero_terminal_snr(schedule: Schedule) -> Schedule:
    """Shift and scale √ᾱ_t so that ᾱ_{T-1} = 0 while ᾱ_0 is kept (Lin et al. 2023, Algorithm 1).

    The last step then has β = 1 and zero signal-to-noise ratio; train with v-prediction and
    sample with "trailing" spacing. Sigma-space samplers clamp ᾱ_{T-1} to 2⁻²⁴ as diffusers does.
    """
    betas = np.asarray(schedule.betas, dtype=np.float64)
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.append(abar[0], abar[1:] / abar[:-1])
    return from_betas(1.0 - alphas)


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """SNR(t) = ᾱ_t / (1 - ᾱ_t) (Kingma et al. 2021). t: integer array, any shape."""
    abar = schedule.alphas_cumprod[t]
    return abar / (1.0 - abar)


def log_snr(schedule: Schedule, t: jax.Array) -> jax.Array:
    """λ(t) = log ᾱ_t - log(1 - ᾱ_t). t: integer array, any shape."""
    abar = schedule.alphas_cumprod[t]
    return jnp.log(abar) - jnp.log1p(-abar)


def sigmas(schedule: Schedule) -> jax.Array:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t), the noise level of the variance-exploding view x/√ᾱ, [T].

    A zero ᾱ (a zero-terminal-SNR schedule) is clamped to 2⁻²⁴ first, as diffusers does.
    """
    abar = schedule.alphas_cumprod
    abar = jnp.where(abar == 0, 2.0**-24, abar)
    return jnp.sqrt((1.0 - abar) / abar)


def alpha_bar_at(schedule: Schedule, t: jax.Array) -> jax.Array:
    """ᾱ at fractional timesteps t, any shape: σ interpolated linearly in t as the sigma samplers'
    grids are, ᾱ = 1/(1+σ²); 1 for t < 0 (past the clean end)."""
    sig = jnp.interp(t, jnp.arange(schedule.num_timesteps, dtype=jnp.float32), sigmas(schedule))
    return jnp.where(t < 0, 1.0, 1.0 / (1.0 + sig**2))
