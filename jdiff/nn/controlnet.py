"""ControlNet (Zhang et al. 2023): a trainable copy of a U-Net's encoder that reads a control
image (edges, a mask, a pose ...) and adds its zero-initialised residuals to the frozen
U-Net's skips and mid block.

`ControlNetModel` is diffusers' model of that name, with its field names and parameter tree:
the U-Net's `conv_in`, time (and class, SDXL's added) embeddings, down blocks and mid block;
`controlnet_cond_embedding` (a small conv net taking the control image, [B, H, W, 3] in
[0, 1], down to the latents' grid); and zero 1x1 convolutions, one per skip
(`controlnet_down_blocks_{i}`) and one for the mid block (`controlnet_mid_block`). Its
outputs are what `UNet(..., down_block_additional_residuals=, mid_block_additional_residual=)`
adds (`Conditioning.residuals` carries them).

`ControlNetModel.from_unet(unet)` is the ControlNet of a U-Net's shape (`init_from_unet`
copies its encoder's weights, as training a ControlNet starts); `VARIANTS["sd_v1"]` is SD
1.5's (361,279,120 parameters).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jdiff.nn.layers import conv3x3
from jdiff.nn.unet import UNet
from jdiff.nn.unet_variants import SD_V1, SDXL

# the U-Net's fields a ControlNet has (diffusers' ControlNetModel takes these and no decoder's)
SHARED_FIELDS = (  # (the up blocks' types only so that the U-Net's checks of levels hold)
    "block_out_channels", "down_block_types", "up_block_types", "mid_block_type",
    "layers_per_block", "downsample_padding", "norm_num_groups", "norm_eps",
    "flip_sin_to_cos", "freq_shift", "resnet_time_scale_shift", "num_attention_heads",
    "attention_head_dim", "cross_attention_dim", "transformer_layers_per_block",
    "use_linear_projection", "upcast_attention", "num_class_embeds", "addition_embed_type",
    "addition_time_embed_dim", "projection_class_embeddings_input_dim",
    "attention_implementation", "dtype", "remat",
)  # fmt: skip


def _zero_conv(features: int, dtype: Any, name: str) -> nn.Conv:
    return nn.Conv(features, (1, 1), dtype=dtype, kernel_init=nn.initializers.zeros, name=name)


class ControlNetConditioningEmbedding(nn.Module):
    """The control image [B, H, W, c] -> [B, H/f, W/f, C0]: a 3x3 conv, then per stage a 3x3
    conv and a stride-2 3x3 conv (SiLU after each), then a zero-initialised 3x3 conv to the
    U-Net's first width."""

    out_channels: int
    block_out_channels: Sequence[int] = (16, 32, 96, 256)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        chans = self.block_out_channels
        h = nn.silu(conv3x3(chans[0], self.dtype, "conv_in")(x.astype(self.dtype)))
        for i in range(len(chans) - 1):
            h = nn.silu(conv3x3(chans[i], self.dtype, f"blocks_{2 * i}")(h))
            h = nn.Conv(chans[i + 1], (3, 3), strides=2, padding=((1, 1), (1, 1)),
                        dtype=self.dtype, name=f"blocks_{2 * i + 1}")(h)  # fmt: skip
            h = nn.silu(h)
        return nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                       kernel_init=nn.initializers.zeros, name="conv_out")(h)  # fmt: skip


class ControlNetModel(UNet):
    """The residuals a ControlNet adds to a U-Net of its shape (fields: the U-Net's encoder
    side, `SHARED_FIELDS`; the U-Net's decoder fields are ignored).

    `conditioning_channels` is the control image's channels (3); `global_pool_conditions`
    averages each residual over the image (diffusers' shuffle ControlNets).
    """

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256)
    global_pool_conditions: bool = False

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "b h w c"],
        t: Float[Array, " b"],
        controlnet_cond: Float[Array, "b H W k"],
        *,
        conditioning_scale: Any = 1.0,
        guess_mode: bool = False,
        context=None,
        class_labels=None,
        text_embeds=None,
        time_ids=None,
        deterministic: bool = True,
    ) -> tuple[list[jax.Array], jax.Array]:
        """(down residuals, one per skip of the U-Net, and the mid block's), float32.

        Args:
          x: the U-Net's input x_t [B, h, w, in_channels] (as scaled for it).
          t: timesteps [B].
          controlnet_cond: the control image [B, H, W, conditioning_channels] in [0, 1],
            H = h x 2^(stages - 1) of `conditioning_embedding_out_channels` (8 for SD).
          conditioning_scale: multiplies every residual; a scalar or [B] (per example).
          guess_mode: scale the residuals from 0.1 (the first skip) to 1 (the mid block)
            on a log scale, as diffusers' guess mode does (the prompt may then be empty).
          context, class_labels, text_embeds, time_ids: as the U-Net's.
        """
        self._check(x, context, class_labels)
        self._check_added(text_embeds, time_ids)
        factor = 2 ** (len(self.conditioning_embedding_out_channels) - 1)
        want = (x.shape[0], x.shape[1] * factor, x.shape[2] * factor, self.conditioning_channels)
        if controlnet_cond.shape != want:
            raise ValueError(f"controlnet_cond {controlnet_cond.shape}: need {want} (the "
                             f"control image at {factor}x the latents' size, "
                             f"{self.conditioning_channels} channels)")  # fmt: skip
        temb = self._embed(x, t, class_labels, text_embeds, time_ids)
        c0 = self.block_out_channels[0]
        h = conv3x3(c0, self.dtype, "conv_in")(x.astype(self.dtype))
        h = h + ControlNetConditioningEmbedding(
            c0, self.conditioning_embedding_out_channels, self.dtype,
            name="controlnet_cond_embedding",
        )(controlnet_cond)  # fmt: skip
        h, skips = self._encode(h, temb, context, deterministic)
        h = self._mid(h, temb, context, deterministic)
        down = [_zero_conv(s.shape[-1], self.dtype, f"controlnet_down_blocks_{i}")(s)
                for i, s in enumerate(skips)]  # fmt: skip
        mid = _zero_conv(h.shape[-1], self.dtype, "controlnet_mid_block")(h)
        outs = [*down, mid]
        scale = jnp.asarray(conditioning_scale, jnp.float32).reshape(-1, 1, 1, 1)
        if guess_mode and not self.global_pool_conditions:
            levels = jnp.logspace(-1.0, 0.0, len(outs))
            outs = [o.astype(jnp.float32) * levels[i] * scale for i, o in enumerate(outs)]
        else:
            outs = [o.astype(jnp.float32) * scale for o in outs]
        if self.global_pool_conditions:
            outs = [jnp.mean(o, axis=(1, 2), keepdims=True) for o in outs]
        return outs[:-1], outs[-1]

    def example_inputs(self) -> tuple[tuple, dict]:
        """(args, kwargs) of one call at the smallest size: what `init` and shape templates
        take."""
        f = 2 ** (len(self.block_out_channels) - 1)
        g = 2 ** (len(self.conditioning_embedding_out_channels) - 1)
        kwargs = {}
        if self.cross_attention_dim is not None:
            kwargs["context"] = jnp.zeros((1, 1, self.cross_attention_dim))
        if self.num_class_embeds is not None:
            kwargs["class_labels"] = jnp.zeros((1,), jnp.int32)
        if self.addition_embed_type:
            width = self.projection_class_embeddings_input_dim - self.addition_time_embed_dim
            kwargs |= {"text_embeds": jnp.zeros((1, width)), "time_ids": jnp.zeros((1, 1))}
        image = jnp.zeros((1, f * g, f * g, self.conditioning_channels))
        return (jnp.zeros((1, f, f, self.in_channels)), jnp.zeros((1,)), image), kwargs

    @classmethod
    def from_unet(cls, unet: UNet, **fields) -> ControlNetModel:
        """The ControlNet of `unet`'s shape (its encoder's fields), with `fields` set."""
        shared = {f: getattr(unet, f) for f in SHARED_FIELDS}
        return cls(in_channels=unet.in_channels, **shared, **fields)


def init_from_unet(controlnet_params: dict, unet_params: dict) -> dict:
    """ControlNet parameters whose encoder is the U-Net's (`conv_in`, the embeddings, the down
    blocks and mid block copied), the conditioning embedding and zero convolutions as given
    (zero at initialisation): how a ControlNet's training starts (Zhang et al. 2023, §3.2)."""
    out = dict(controlnet_params)
    for name in unet_params:
        if name in out:
            if jax.tree.structure(out[name]) != jax.tree.structure(unet_params[name]):
                raise ValueError(f"{name}: the U-Net's parameters do not fit this ControlNet")
            out[name] = jax.tree.map(jnp.array, unet_params[name])
    return out


VARIANTS: dict[str, dict[str, Any]] = {
    # SD 1.5's ControlNets (lllyasviel/sd-controlnet-*): 361,279,120 parameters
    "sd_v1": {f: v for f, v in SD_V1.items() if f in (*SHARED_FIELDS, "in_channels")},
    # SDXL's (diffusers/controlnet-*-sdxl-1.0)
    "sdxl": {f: v for f, v in SDXL.items() if f in (*SHARED_FIELDS, "in_channels")},
}
