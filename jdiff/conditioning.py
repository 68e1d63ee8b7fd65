"""What a network takes besides (x_t, t), as one pytree, and the one place that turns
(network, params, conditioning) into the `model_fn(x_t, t)` that samplers and losses see.

A `Conditioning` holds every kind of input a denoiser is conditioned on; a field a model does
not use is None (an empty pytree). Because it is a pytree, classifier-free guidance batches
the conditional and the null conditioning field by field (`guidance.classifier_free`), and
`jit`, `scan` and shardings treat it like any other argument. A new model family adds its
fields here (SDXL: `text_embeds`, the pooled text embedding, and `time_ids`, the size/crop ids;
a ControlNet: its control images and scales, `control`, from which
`make_controlled_model_fn` computes the `residuals` it adds inside the U-Net) and its network
reads them in `network_kwargs`; the samplers, losses and guidance do not change.

    cond = Conditioning(context=text_states)                  # [B, L, D]
    null = cond.replace(context=empty_prompt_states)           # broadcast to [B, L, D]
    fn = guidance.classifier_free(make_model_fn(unet, params), cond, null, 7.5)
    x0 = samplers.sample(fn, schedule, key, shape)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Conditioning:
    """A denoiser's inputs besides (x_t, t); absent ones are None.

    Attributes:
      context: [B, L, D] the sequence cross-attention reads (a text encoder's hidden states).
      class_labels: int [B] class indices (the null class for "none"), or a super-resolution
        model's noise level of its low-resolution input.
      concat: [B, h, w, k] channels concatenated to x_t before the network (an inpainting
        model's mask and masked-image latents, a super-resolution model's low-resolution image).
      text_embeds: [B, P] SDXL's pooled, projected text embedding (diffusers' name, in its
        `added_cond_kwargs`).
      time_ids: [B, K] SDXL's micro-conditioning: original size, crop top-left and target size
        (the refiner: an aesthetic score in place of the target size), in pixels.
      control: the ControlNets' inputs (`Control`: their images and scales), read by
        `make_controlled_model_fn`.
      residuals: (down, mid) residuals added to the U-Net's skips and mid block (a
        ControlNet's outputs, computed per call by `make_controlled_model_fn`).
    """

    context: jax.Array | None = None
    class_labels: jax.Array | None = None
    concat: jax.Array | None = None
    text_embeds: jax.Array | None = None
    time_ids: jax.Array | None = None
    control: Control | None = None
    residuals: tuple | None = None


@flax.struct.dataclass
class Control:
    """What the ControlNets of a `make_controlled_model_fn` read, batched like every field.

    Attributes:
      images: one control image per ControlNet, [B, H, W, k] in [0, 1].
      scales: [B, n] each ControlNet's conditioning scale per example (0 switches it off for
        that example: the unconditional half in guess mode).
    """

    images: tuple
    scales: jax.Array


def network_kwargs(cond: Conditioning) -> dict[str, Any]:
    """The keyword arguments of the U-Net's `__call__` that `cond` sets (`context`,
    `class_labels`, `text_embeds`, `time_ids`, a ControlNet's `residuals`); `concat` is
    applied to the input by `make_model_fn`, `control` read by `make_controlled_model_fn`."""
    fields = {"context": cond.context, "class_labels": cond.class_labels,
              "text_embeds": cond.text_embeds, "time_ids": cond.time_ids}  # fmt: skip
    if cond.residuals is not None:
        fields["down_block_additional_residuals"] = cond.residuals[0]
        fields["mid_block_additional_residual"] = cond.residuals[1]
    return {k: v for k, v in fields.items() if v is not None}


def make_model_fn(
    network: Any,
    params: Any,
    *,
    out_channels: int | None = None,
    deterministic: bool = True,
    rngs: dict | None = None,
) -> Callable[[jax.Array, jax.Array, Conditioning], jax.Array]:
    """The conditional model function of a network (a Flax module taking (x, t, **kwargs)).

    Args:
      network: the denoiser (`jdiff.nn.UNet`).
      params: its parameters.
      out_channels: keep this many output channels (a learned variance's extra channels
        dropped); None keeps all.
      deterministic: False applies dropout with `rngs` (training).
      rngs: Flax rngs, e.g. {"dropout": key}.

    Returns:
      model_fn(x_t [B, h, w, c], t [B], cond: Conditioning) -> prediction [B, h, w, c'], with
      `cond.concat` concatenated to x_t's channels and the other fields passed to the network.
    """
    extra = {} if deterministic else {"deterministic": False, "rngs": rngs}

    def model_fn(x, t, cond):
        if cond.concat is not None:
            x = jnp.concatenate([x, cond.concat.astype(x.dtype)], axis=-1)
        out = network.apply({"params": params}, x, t, **network_kwargs(cond), **extra)
        return out if out_channels is None else out[..., :out_channels]

    return model_fn


def make_controlled_model_fn(
    network: Any,
    params: Any,
    controlnets: Sequence[Any],
    controlnet_params: Sequence[Any],
    *,
    guess_mode: bool = False,
    keep: Callable[[jax.Array], jax.Array] | None = None,
    **options,
) -> Callable[[jax.Array, jax.Array, Conditioning], jax.Array]:
    """`make_model_fn(network, params, **options)` with ControlNets: each call runs every
    ControlNet on (x_t, t, its control image, the text fields), sums their residuals, each
    times its scale (`cond.control.scales`, times `keep(t)` [B, n] when given: diffusers'
    `control_guidance_start` / `_end`), and passes them to the U-Net as `cond.residuals`
    (diffusers' `MultiControlNetModel`). A conditioning without `control` is the U-Net alone.

    Args:
      controlnets: `nn.controlnet.ControlNetModel`s, each of the U-Net's shape.
      controlnet_params: their parameters, in order.
      guess_mode: the ControlNets' guess-mode scaling (0.1 at the first skip to 1 at the mid
        block), for every example.
      keep: t [B] -> [B, n] factors of each ControlNet's scale at that timestep.
    """
    base = make_model_fn(network, params, **options)
    extra = {} if options.get("deterministic", True) else {"deterministic": False,
                                                          "rngs": options.get("rngs")}  # fmt: skip

    def model_fn(x, t, cond):
        if cond.control is None:
            return base(x, t, cond)
        scales = cond.control.scales if keep is None else cond.control.scales * keep(t)
        down = mid = None
        text = network_kwargs(cond.replace(residuals=None))
        for i, (net, p) in enumerate(zip(controlnets, controlnet_params, strict=True)):
            d, m = net.apply({"params": p}, x, t, cond.control.images[i].astype(jnp.float32),
                             conditioning_scale=scales[:, i], guess_mode=guess_mode, **text,
                             **extra)  # fmt: skip
            down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        return base(x, t, cond.replace(control=None, residuals=(down, mid)))

    return model_fn


def bind(
    model_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], cond: Any
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """`model_fn(x_t, t)` conditioned on `cond` throughout (no guidance)."""
    return lambda x, t: model_fn(x, t, cond)
