"""Generation pipelines: a network, a schedule and a sampler composed into one function to jit.

`make_generate(...)` returns `generate(params, key, labels=None) -> images`; under `jax.jit` the
U-Net and the whole sampling loop compile together once, and new parameters, keys, labels or
guidance scales do not retrace.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jdiff import guidance, samplers
from jdiff.nn import UNet
from jdiff.schedules import Schedule


def make_generate(
    model: UNet,
    schedule: Schedule,
    *,
    shape: tuple[int, ...],
    method: str = "ddim",
    num_steps: int = 50,
    null_class: int | None = None,
    learned_variance: bool = False,
    return_trajectory: bool = False,
    **options,
) -> Callable[..., jax.Array]:
    """Unconditional or class-conditional pixel-space generation.

    Args:
      model: the U-Net; its first `shape[-1]` output channels are the prediction, the rest (a
        learned variance) are used by `method="ddpm"` (variance_type "learned_range").
      shape: [N, H, W, C] of the samples.
      null_class: the class-conditional model's "no class" label; with it, `generate` takes
        `labels` [N] and a `guidance_scale` (classifier-free guidance; 1 is plain conditional).
      return_trajectory: also return the states after every step [S, N, H, W, C].
      options: sampler options (`prediction_type`, `eta`, `timestep_spacing`, ...).

    Returns:
      generate(params, key, labels=None, guidance_scale=1.0) -> [N, H, W, C] in [-1, 1]
      (and the trajectory with `return_trajectory`).
    """
    if learned_variance and method == "ddpm":
        options = {"variance_type": "learned_range", **options}

    def generate(params, key, labels=None, guidance_scale=1.0):
        def model_fn(x, t, **kwargs):
            out = model.apply({"params": params}, x, t, **kwargs)
            keep_variance = learned_variance and method == "ddpm"
            return out if keep_variance else out[..., : shape[-1]]

        fn = model_fn
        if null_class is not None:
            if labels is None:
                raise ValueError("a class-conditional model needs labels [N]")
            uncond = jnp.full_like(labels, null_class)
            fn = guidance.classifier_free(
                model_fn, labels, uncond, guidance_scale, cond_kwarg="class_labels"
            )
        out = samplers.sample(fn, schedule, key, shape, method=method, num_steps=num_steps,
                              return_trajectory=return_trajectory, **options)  # fmt: skip
        if return_trajectory:
            return jnp.clip(out[0], -1.0, 1.0), out[1]
        return jnp.clip(out, -1.0, 1.0)

    return generate
