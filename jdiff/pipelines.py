"""Generation pipelines: a network, a schedule and a sampler composed into one function to jit.

`make_generate(...)` returns `generate(params, key, labels=None) -> images` (pixel space,
unconditional or class-conditional); `make_txt2img(...)` the latent, text-conditional one.
Under `jax.jit` the networks and the whole sampling loop compile together once, and new
parameters, keys, labels, prompts or guidance scales do not retrace.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jdiff import guidance, samplers
from jdiff.nn import UNet
from jdiff.nn.text_encoder import CLIPTextModel
from jdiff.nn.vae import AutoencoderKL
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


def make_txt2img(
    unet: UNet,
    text_encoder: CLIPTextModel,
    autoencoder: AutoencoderKL,
    schedule: Schedule,
    *,
    latent_shape: tuple[int, int, int, int],
    scaling_factor: float,
    method: str = "ddim",
    num_steps: int = 50,
    guidance_rescale: float = 0.0,
    **options,
) -> Callable[..., jax.Array]:
    """Text-to-image latent diffusion: encode the prompts' token ids, sample latents with
    classifier-free guidance (the conditional and unconditional passes batched into one U-Net
    call), decode them with the autoencoder in its own dtype (float32 by default: reduced-
    precision decodes overflow into black or NaN images).

    Args:
      latent_shape: [N, h, w, c] of the latents (N prompts).
      scaling_factor: the autoencoder's (the U-Net sees scaling_factor · z).

    Returns:
      generate(params, vae_params, ids, uncond_ids, key, guidance_scale=7.5) ->
      images [N, H, W, 3] in [-1, 1]; params = {"unet", "text_encoder"}; ids and uncond_ids
      int [N, L] (the prompts' and the negative prompts' or empty prompt's). Under `jax.jit`
      everything compiles once: new prompts, keys and guidance scales do not retrace.
    """

    def generate(params, vae_params, ids, uncond_ids, key, guidance_scale=7.5):
        def encode(tokens):
            return text_encoder.apply({"params": params["text_encoder"]}, tokens).last_hidden_state

        def model_fn(x, t, context):
            return unet.apply({"params": params["unet"]}, x, t, context=context)

        fn = guidance.classifier_free(
            model_fn, encode(ids), encode(uncond_ids), guidance_scale,
            guidance_rescale=guidance_rescale, cond_kwarg="context",
        )  # fmt: skip
        z = samplers.sample(fn, schedule, key, latent_shape, method=method, num_steps=num_steps,
                            **options)  # fmt: skip
        images = autoencoder.apply({"params": vae_params}, z / scaling_factor, method="decode")
        return jnp.clip(images, -1.0, 1.0)

    return generate
