"""Parameter templates: the shapes of a module's parameters (`jax.eval_shape`, nothing
allocated), the target trees that the key renames fill."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jdiff.nn import UNet
from jdiff.nn.controlnet import ControlNetModel
from jdiff.nn.text_encoder import CLIPTextModel
from jdiff.nn.vae import AutoencoderKL


def _shapes(module, *args, **kwargs):
    """The parameter shapes of `module` (`jax.eval_shape`: nothing allocated)."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]


def unet_shapes(unet: UNet) -> Any:
    """The U-Net's parameter tree as `jax.ShapeDtypeStruct`s (for its class labels and
    cross-attention too, where it has them)."""
    f = 2 ** (len(unet.block_out_channels) - 1)
    kwargs = {}
    if unet.cross_attention_dim is not None:
        kwargs["context"] = jnp.zeros((1, 1, unet.cross_attention_dim))
    if unet.num_class_embeds is not None:
        kwargs["class_labels"] = jnp.zeros((1,), jnp.int32)
    if unet.addition_embed_type:  # its MLP's input width is all that sizes it: one id
        width = unet.projection_class_embeddings_input_dim - unet.addition_time_embed_dim
        kwargs |= {"text_embeds": jnp.zeros((1, width)), "time_ids": jnp.zeros((1, 1))}
    return _shapes(unet, jnp.zeros((1, f, f, unet.in_channels)), jnp.zeros((1,)), **kwargs)


def vae_shapes(vae: AutoencoderKL) -> Any:
    """The autoencoder's parameter tree as `jax.ShapeDtypeStruct`s."""
    f = vae.downsample_factor
    return _shapes(vae, jnp.zeros((1, f, f, vae.in_channels)))


def text_encoder_shapes(text_encoder: CLIPTextModel) -> Any:
    """The text encoder's parameter tree as `jax.ShapeDtypeStruct`s."""
    return _shapes(text_encoder, jnp.zeros((1, 1), jnp.int32))


def controlnet_shapes(controlnet: ControlNetModel) -> Any:
    """A ControlNet's parameter tree as `jax.ShapeDtypeStruct`s."""
    args, kwargs = controlnet.example_inputs()
    return _shapes(controlnet, *args, **kwargs)
