"""Pixel-space pipelines: unconditional or class-conditional generation and RePaint
inpainting with any pixel-space U-Net."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jdiff import conditioning, guidance, samplers
from jdiff.conditioning import Conditioning
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
        keep_variance = learned_variance and method == "ddpm"
        fn = _pixel_model(model, params, shape[-1], null_class, labels, guidance_scale,
                          keep_variance)  # fmt: skip
        out = samplers.sample(fn, schedule, key, shape, method=method, num_steps=num_steps,
                              return_trajectory=return_trajectory, **options)  # fmt: skip
        if return_trajectory:
            return jnp.clip(out[0], -1.0, 1.0), out[1]
        return jnp.clip(out, -1.0, 1.0)

    return generate


def _pixel_model(model, params, channels, null_class, labels, guidance_scale,
                 keep_variance=False):  # fmt: skip
    """The pixel-space model function: the prediction's `channels` (all of them with
    `keep_variance`), classifier-free guided on `labels` for a class-conditional model."""
    fn = conditioning.make_model_fn(model, params, out_channels=None if keep_variance else channels)
    if null_class is None:
        return conditioning.bind(fn, Conditioning())
    if labels is None:
        raise ValueError("a class-conditional model needs labels [N]")
    cond = Conditioning(class_labels=labels)
    null = cond.replace(class_labels=jnp.full_like(labels, null_class))
    return guidance.classifier_free(fn, cond, null, guidance_scale)


def make_repaint(
    model: UNet,
    schedule: Schedule,
    *,
    shape: tuple[int, ...],
    num_steps: int = 50,
    null_class: int | None = None,
    return_unpasted: bool = False,
    **options,
) -> Callable[..., jax.Array]:
    """Inpainting with any pixel-space model, unconditional or class-conditional: RePaint
    (`samplers.repaint`) in one `lax.scan`.

    Args:
      shape: [N, H, W, C] of the images (a multiple of `model.downsample_factor` in H and W).
      options: `samplers.REPAINT_DEFAULTS` (eta, jump_length, jump_n_sample, prediction_type,
        clip_sample).

    Returns:
      inpaint(params, images [N, H, W, C] in [-1, 1], masks [N, H, W, 1] in {0, 1} (1 =
      repaint; see `inpainting.check_masks`), key, labels=None, guidance_scale=1.0) -> images
      in [-1, 1], the original exactly where the mask is 0 (and, with return_unpasted, the
      last step's prediction everywhere, before the known region is put back).
    """
    check_repaint(schedule, num_steps, options)

    def inpaint(params, images, masks, key, labels=None, guidance_scale=1.0):
        fn = _pixel_model(model, params, shape[-1], null_class, labels, guidance_scale)
        out = samplers.repaint(fn, schedule, key, images, masks, num_steps=num_steps,
                               return_unpasted=True, **options)  # fmt: skip
        x, unpasted = (jnp.clip(o, -1.0, 1.0) for o in out)
        return (x, unpasted) if return_unpasted else x

    return inpaint


def check_repaint(schedule, num_steps, options):
    """Raise ValueError at build time for bad RePaint settings (not at the first call)."""
    samplers.resolve_repaint_options(schedule.num_timesteps, num_steps, options)
