"""Reverse-process samplers: one small step function each, one `lax.scan` driver.

Every sampler sees only `model_fn(x_t, t) -> prediction`, with x_t the variance-preserving input
[B, ...] and t float32 [B] on the training scale [0, T-1]. With the same settings, model function
and x_T, each deterministic sampler reproduces the trajectory of the diffusers scheduler of the
same name; option names and defaults are diffusers' (except `clip_sample=False`).

The grid of a sampler (its timesteps, noise levels and step orders) is built from static options
and the traced schedule; the whole loop is one `lax.scan`, so `jax.jit(partial(sample, model_fn,
method=..., num_steps=..., shape=...))` compiles once and a new key, x_T or parameter set does not
retrace. The state and its coefficients are float32 whatever dtype the model computes in.

The package: `steps` (each sampler's grid and update, `DEFAULTS`), `driver` (`sample`,
`make_grid`, `add_noise`), `inpaint` (RePaint's own loop). Import from `jdiff.samplers`.
"""

from jdiff.samplers.driver import (
    add_noise,
    make_grid,
    resolve_options,
    sample,
    split_step,
    step_noise,
)
from jdiff.samplers.inpaint import (
    REPAINT_DEFAULTS,
    repaint,
    repaint_timesteps,
    resolve_repaint_options,
)
from jdiff.samplers.steps import (
    DDPM_VARIANCES,
    DEFAULTS,
    FINAL_SIGMAS,
    METHODS,
    STEPS,
    Method,
    ModelFn,
)

__all__ = [
    "DDPM_VARIANCES",
    "DEFAULTS",
    "FINAL_SIGMAS",
    "METHODS",
    "REPAINT_DEFAULTS",
    "STEPS",
    "Method",
    "ModelFn",
    "add_noise",
    "make_grid",
    "repaint",
    "repaint_timesteps",
    "resolve_options",
    "resolve_repaint_options",
    "sample",
    "split_step",
    "step_noise",
]
