"""The one driver every sampler shares: options resolved against diffusers' defaults, the grid
from `start_step` on, and the whole reverse process as one `lax.scan` (`sample`); `add_noise`
gives img2img's starting state."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.samplers.steps import DDPM_VARIANCES, DEFAULTS, METHODS, STEPS, ModelFn, _check_steps
from jdiff.schedules import Schedule
from jdiff.timesteps import SPACINGS


def resolve_options(method: str, options: dict) -> dict:
    """The method's diffusers defaults updated with `options`; unknown names raise ValueError."""
    if method not in STEPS:
        raise ValueError(f"unknown sampler method {method!r}; choose one of {METHODS}")
    unknown = set(options) - set(DEFAULTS[method])
    if unknown:
        raise ValueError(
            f"sampler {method!r} takes no option(s) {sorted(unknown)}; "
            f"its options are {sorted(DEFAULTS[method])}"
        )
    opts = {**DEFAULTS[method], **options}
    diffusion.check_prediction_type(opts["prediction_type"])
    if opts["timestep_spacing"] not in SPACINGS:
        raise ValueError(
            f"unknown timestep_spacing {opts['timestep_spacing']!r}; choose one of {SPACINGS}"
        )
    if method == "ddpm" and opts["variance_type"] not in DDPM_VARIANCES:
        raise ValueError(
            f"unknown variance_type {opts['variance_type']!r} for ddpm; "
            f"choose one of {DDPM_VARIANCES}"
        )
    if method in ("pndm",) and opts["prediction_type"] == "sample":
        raise ValueError("pndm supports prediction_type 'epsilon' or 'v_prediction', not 'sample'")
    return opts


def _prepare(schedule, method, num_steps, start_step, options, end_step=None):
    opts = resolve_options(method, options)
    _check_steps(schedule.num_timesteps, num_steps)
    grid, scale = STEPS[method].grid(schedule, num_steps, opts, start_step)
    n = len(grid["t"])
    if not isinstance(start_step, int) or not 0 <= start_step < n:
        raise ValueError(f"start_step must be an integer in [0, {n - 1}], got {start_step!r}")
    end = n if end_step is None else end_step
    if not isinstance(end, int) or not start_step < end <= n:
        raise ValueError(f"end_step must be an integer in [{start_step + 1}, {n}], got {end!r}")
    grid = {k: v[start_step:end] for k, v in grid.items()}
    grid["index"] = jnp.arange(start_step, end, dtype=jnp.int32)
    return grid, jnp.asarray(scale, jnp.float32), opts


def make_grid(schedule: Schedule, *, method: str, num_steps: int, start_step: int = 0, **options):
    """The per-step arrays of a sampler's grid from `start_step` on, and its x_T scale.

    Returns:
        (grid, init_scale): grid is a dict of arrays with leading axis S (the scan length), among
        them "t" (the model's timestep per step) and "t_prev"; init_scale is diffusers'
        `init_noise_sigma` (1 for variance-preserving samplers).
    """
    grid, scale, _ = _prepare(schedule, method, num_steps, start_step, options)
    return grid, scale


def split_step(schedule: Schedule, fraction: float, *, method: str, num_steps: int,
               **options) -> int:  # fmt: skip
    """The grid index where `fraction` of the denoising is done, as diffusers splits an ensemble
    of experts (`denoising_end` of the first model, `denoising_start` of the second): the
    steps before it are those with timesteps >= round(T (1 - fraction)). Host-side: call it
    with a concrete schedule, outside `jit`."""
    if not 0.0 < fraction < 1.0:  # NaN too
        raise ValueError(f"denoising fraction {fraction}; expected 0 < fraction < 1")
    if method == "heun":
        raise ValueError("a split of the schedule needs a first-order sampler: heun "
                         "evaluates the model twice per step (euler, ddim, ...)")  # fmt: skip
    grid, _ = make_grid(schedule, method=method, num_steps=num_steps, **options)
    T = schedule.num_timesteps
    cutoff = round(T - fraction * T)
    split = int((np.asarray(grid["t"]) >= cutoff).sum())
    if not 0 < split < len(grid["t"]):
        raise ValueError(f"denoising fraction {fraction} leaves none of the {num_steps} "
                         "steps to one of the two models: move it toward 0.5 or take more "
                         "steps")  # fmt: skip
    return split


def step_noise(key: jax.Array, index: jax.Array, shape) -> jax.Array:
    """The standard-normal noise a stochastic sampler draws at grid step `index`."""
    return jax.random.normal(jax.random.fold_in(key, index), shape, jnp.float32)


def add_noise(
    schedule: Schedule,
    x0: jax.Array,
    noise: jax.Array,
    *,
    method: str,
    num_steps: int,
    start_step: int,
    **options,
) -> jax.Array:
    """Noise clean x0 [B, ...] to the state a sampler has at grid step `start_step` (img2img).

    Variance-preserving samplers return √ᾱ x0 + √(1-ᾱ) ε; the Euler family's state is
    x0 + σ ε (diffusers' `add_noise` of the same scheduler). Pass the result as `x_T` to
    `sample(..., start_step=start_step)` with the same options.
    """
    grid, _ = make_grid(
        schedule, method=method, num_steps=num_steps, start_step=start_step, **options
    )
    return grid["c_x0"][0] * x0.astype(jnp.float32) + grid["c_noise"][0] * noise


def sample(
    model_fn: ModelFn,
    schedule: Schedule,
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    method: str,
    num_steps: int,
    x_T: jax.Array | None = None,
    start_step: int = 0,
    end_step: int | None = None,
    after_step: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    return_trajectory: bool = False,
    **options,
):
    """Run the reverse process from noise to data with one `lax.scan`.

    Args:
        model_fn: (x_t [B, ...] variance-preserving, t float32 [B]) -> prediction [B, ...] of
            `prediction_type` (for ddpm's "learned_range", 2x the channels, last axis).
        schedule: the training schedule.
        key: PRNG key; x_T (when not given) and per-step noise derive from it.
        shape: [B, ...], the shape of a sample.
        method: one of `METHODS`.
        num_steps: N, the number of grid steps (static).
        x_T: standard-normal initial noise [B, ...]; sigma-space samplers scale it by diffusers'
            `init_noise_sigma`. With start_step > 0, x_T is instead the state at that step, as
            `add_noise` returns it, and is used as is.
        start_step: begin at this index of the grid (img2img); static.
        end_step: stop before this index (None: run to the end) and return the state there,
            which `sample(..., x_T=it, start_step=end_step)` continues, with another model too
            (SDXL's ensemble of experts; `split_step` finds it); static.
        after_step: optional hook (x [B, ...], t_prev float32 [B]) -> x applied after every step
            to the variance-preserving state at timestep t_prev (-1 past the clean end; fractional
            on sigma grids). Inpainting replaces the known region this way.
        return_trajectory: also return the state after every step.
        **options: the method's options (see `DEFAULTS`), named as in diffusers.

    Returns:
        x_0 [B, ...] float32, or (x_0, trajectory [S, B, ...]) with return_trajectory.
    """
    grid, scale, opts = _prepare(schedule, method, num_steps, start_step, options, end_step)
    method_def = STEPS[method]
    init_key, step_key = jax.random.split(key)
    if x_T is None:
        x = jax.random.normal(init_key, shape, jnp.float32) * scale
    else:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {x_T.shape}, expected {tuple(shape)}")
        x = x_T.astype(jnp.float32) * (scale if start_step == 0 else 1.0)

    def body(carry, g):
        x, state = carry
        noise = step_noise(step_key, g["index"], x.shape)
        x, state = method_def.step(model_fn, schedule, x, state, g, noise, opts)
        if after_step is not None:
            c = jnp.sqrt(g["sigma_prev"] ** 2 + 1.0)
            x = after_step(x / c, jnp.full((x.shape[0],), g["t_prev"], jnp.float32)) * c
        return (x, state), (x if return_trajectory else None)

    (x, _), traj = jax.lax.scan(body, (x, method_def.init(x)), grid)
    return (x, traj) if return_trajectory else x
