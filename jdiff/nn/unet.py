"""The U-Net of the reverse process (Ho et al. 2020, App. B; Rombach et al. 2022, §3.3).

One definition covers the DDPM network (self-attention at chosen resolutions) and the Stable
Diffusion network (cross-attention transformers on a `context` sequence). Block types and field
names are diffusers' (`UNet2DModel`, `UNet2DConditionModel`) and submodule names mirror their
parameter trees (`down_blocks_0/resnets_1/conv1` for `down_blocks.0.resnets.1.conv1`), so weights
convert by a rename table (`jdiff.convert`). Images are channels-last [B, H, W, C].

Sizes are in `VARIANTS` (`nn.unet_variants`); `UNet(**VARIANTS["sd_v1"])` is Stable Diffusion
1.x's network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jdiff.nn.attention import IMPLEMENTATIONS, Attention, Transformer2DModel
from jdiff.nn.layers import (
    TIME_SCALE_SHIFTS,
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    conv3x3,
    group_norm,
    timestep_embedding,
)
from jdiff.nn.unet_variants import VARIANTS  # noqa: F401  (the sizes, with the network)

# block type -> the attention after each residual block: none, self-attention, cross-attention
DOWN_BLOCKS = {"DownBlock2D": None, "AttnDownBlock2D": "self", "CrossAttnDownBlock2D": "cross"}
UP_BLOCKS = {"UpBlock2D": None, "AttnUpBlock2D": "self", "CrossAttnUpBlock2D": "cross"}
MID_BLOCKS = {None: None, "UNetMidBlock2D": "self", "UNetMidBlock2DCrossAttn": "cross"}
# added embeddings: SDXL's "text_time" (the pooled text embedding and the size/crop ids)
ADDITION_EMBED_TYPES = (None, "text_time")


@dataclasses.dataclass(frozen=True)
class BlockSettings:
    """What every block shares; built by `UNet` from its fields."""

    groups: int
    eps: float
    dropout: float
    time_embedding_norm: str
    use_linear_projection: bool
    upcast: bool
    implementation: str | None
    dtype: Any
    remat: bool


def _resnet(s: BlockSettings, out_channels: int, name: str) -> nn.Module:
    # static_argnums counts `self`: (x, temb, deterministic) are 1, 2, 3
    cls = nn.remat(ResnetBlock2D, static_argnums=(3,)) if s.remat else ResnetBlock2D
    return cls(out_channels, s.groups, s.eps, s.dropout, s.time_embedding_norm, s.dtype, name=name)


def _attend(s: BlockSettings, kind, channels, heads, layers, name, h, context):
    """Apply the block's attention `kind` ("self" or "cross") to h [B, H, W, channels]."""
    if kind == "self":
        return Attention(
            heads,
            channels // heads,
            channels,
            use_bias=True,
            norm_groups=s.groups,
            norm_eps=s.eps,
            implementation=s.implementation,
            dtype=s.dtype,
            name=name,
        )(h)
    cls = nn.remat(Transformer2DModel) if s.remat else Transformer2DModel
    return cls(
        heads,
        channels // heads,
        layers,
        s.groups,
        s.use_linear_projection,
        s.upcast,
        s.implementation,
        s.dtype,
        name=name,
    )(h, context)


class DownBlock(nn.Module):
    """`num_layers` residual blocks (each followed by attention if `kind`), then a stride-2 conv.

    Returns the output and every intermediate state, which the decoder receives as skips.
    """

    settings: BlockSettings
    out_channels: int
    num_layers: int
    kind: str | None = None
    heads: int = 1
    transformer_layers: int = 1
    downsample: bool = True
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, h, temb, context, deterministic):
        s, skips = self.settings, []
        for j in range(self.num_layers):
            h = _resnet(s, self.out_channels, f"resnets_{j}")(h, temb, deterministic)
            if self.kind:
                name = f"attentions_{j}"
                h = _attend(s, self.kind, self.out_channels, self.heads, self.transformer_layers,
                            name, h, context)  # fmt: skip
            skips.append(h)
        if self.downsample:
            h = Downsample2D(
                self.out_channels, self.downsample_padding, s.dtype, name="downsamplers_0"
            )(h)
            skips.append(h)
        return h, skips


class UpBlock(nn.Module):
    """`len(skips)` residual blocks, each on [h, skip] concatenated on channels (attention after
    each if `kind`), then nearest-neighbour x2 upsampling and a conv."""

    settings: BlockSettings
    out_channels: int
    kind: str | None = None
    heads: int = 1
    transformer_layers: int = 1
    upsample: bool = True

    @nn.compact
    def __call__(self, h, skips, temb, context, deterministic):
        s = self.settings
        for j, skip in enumerate(reversed(skips)):
            h = jnp.concatenate([h, skip], axis=-1)
            h = _resnet(s, self.out_channels, f"resnets_{j}")(h, temb, deterministic)
            if self.kind:
                name = f"attentions_{j}"
                h = _attend(s, self.kind, self.out_channels, self.heads, self.transformer_layers,
                            name, h, context)  # fmt: skip
        if self.upsample:
            h = Upsample2D(self.out_channels, s.dtype, name="upsamplers_0")(h)
        return h


class MidBlock(nn.Module):
    """The bottleneck: residual block, attention, residual block."""

    settings: BlockSettings
    kind: str
    heads: int = 1
    transformer_layers: int = 1

    @nn.compact
    def __call__(self, h, temb, context, deterministic):
        s, channels = self.settings, h.shape[-1]
        h = _resnet(s, channels, "resnets_0")(h, temb, deterministic)
        h = _attend(s, self.kind, channels, self.heads, self.transformer_layers, "attentions_0",
                    h, context)  # fmt: skip
        return _resnet(s, channels, "resnets_1")(h, temb, deterministic)


def _per_block(value, n: int, name: str) -> tuple:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * n
    if len(values) != n:
        raise ValueError(f"{name}={value!r} has {len(values)} entries for {n} blocks")
    return values


class UNet(nn.Module):
    """ε (or v, x0; 2C outputs for a learned variance) from x_t [B, H, W, in_channels] and t [B].

    The defaults are the DDPM CIFAR-10 network (35,746,307 parameters). Attention heads: give
    `num_attention_heads` (per block or one for all; a diffusers `UNet2DConditionModel` config's
    `attention_head_dim` means this), or `attention_head_dim` channels per head (diffusers'
    `UNet2DModel` meaning), or neither for one head per block (DDPM).
    """

    in_channels: int = 3  # image channels, plus any concatenated conditioning (mask, low-res)
    out_channels: int = 3  # 2 x image channels for a learned variance
    block_out_channels: Sequence[int] = (128, 256, 256, 256)
    down_block_types: Sequence[str] = (
        "DownBlock2D",
        "AttnDownBlock2D",
        "DownBlock2D",
        "DownBlock2D",
    )
    up_block_types: Sequence[str] = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    layers_per_block: int = 2
    downsample_padding: int = 0  # 0: TF "SAME" (pad bottom/right, DDPM); 1: pad all sides (SD)
    norm_num_groups: int = 32
    norm_eps: float = 1e-6  # 1e-6 in DDPM (and the VAE), 1e-5 in the SD U-Net
    flip_sin_to_cos: bool = False  # DDPM False, SD True
    freq_shift: float = 1.0  # DDPM 1, SD 0
    resnet_time_scale_shift: str = "default"  # or "scale_shift" (IDDPM's adaptive GroupNorm)
    num_attention_heads: int | Sequence[int] | None = None
    attention_head_dim: int | Sequence[int] | None = None
    cross_attention_dim: int | None = None  # width of `context`; needed by cross-attention
    transformer_layers_per_block: int | Sequence[int] = 1
    use_linear_projection: bool = False  # SD 2.x: linear proj_in/out instead of 1x1 convs
    upcast_attention: bool = False  # attention in float32 whatever `dtype` is (SD 2.x)
    num_class_embeds: int | None = None  # class-conditional; add one for a null class (CFG)
    # SDXL: "text_time" adds add_embedding([text_embeds, sinusoids of each time id]) to the
    # time embedding; the ids' sinusoids `addition_time_embed_dim` wide (256), the MLP's input
    # `projection_class_embeddings_input_dim` wide (1280 + 6 x 256 = 2816 for SDXL base)
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    dropout: float = 0.1
    attention_implementation: str | None = None  # attention.IMPLEMENTATIONS
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    remat: bool = False  # rematerialise residual and transformer blocks in the backward pass

    @nn.compact
    def __call__(
        self,
        x: Float[Array, "b h w c"],
        t: Float[Array, " b"],
        *,
        context: Float[Array, "b l d"] | None = None,
        class_labels: Int[Array, " b"] | None = None,
        text_embeds: Float[Array, "b p"] | None = None,
        time_ids: Float[Array, "b k"] | None = None,
        down_block_additional_residuals: Sequence[Float[Array, "b h w c"]] | None = None,
        mid_block_additional_residual: Float[Array, "b h w c"] | None = None,
        deterministic: bool = True,
    ) -> Float[Array, "b h w o"]:
        """Predict from x_t and t on the training scale [0, T-1] (float, may be fractional).

        Args:
          x: noisy input [B, H, W, in_channels]; H and W divisible by 2^(levels - 1).
          t: timesteps [B] (or a scalar, broadcast).
          context: [B, L, cross_attention_dim], required by cross-attention blocks.
          class_labels: int [B] in [0, num_class_embeds), required by a class-conditional net.
          text_embeds, time_ids: SDXL's pooled text embedding [B, P] and micro-conditioning
            ids [B, K] (sizes, crop, aesthetic score), required by a "text_time" net.
          down_block_additional_residuals, mid_block_additional_residual: a ControlNet's
            outputs (`nn.controlnet`), added to every skip and to the mid block's output.
          deterministic: False applies dropout (needs a "dropout" PRNG stream).

        Returns:
          float32 [B, H, W, out_channels].
        """
        self._check(x, context, class_labels)
        self._check_added(text_embeds, time_ids)
        self._check_residuals(down_block_additional_residuals, mid_block_additional_residual)
        n = len(self.block_out_channels)
        temb = self._embed(x, t, class_labels, text_embeds, time_ids)
        h = conv3x3(self.block_out_channels[0], self.dtype, "conv_in")(x.astype(self.dtype))
        h, skips = self._encode(h, temb, context, deterministic)
        if down_block_additional_residuals is not None:  # a ControlNet's, one per skip
            skips = [s + r.astype(s.dtype) for s, r in
                     zip(skips, down_block_additional_residuals, strict=True)]  # fmt: skip
        h = self._mid(h, temb, context, deterministic)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.astype(h.dtype)
        s, heads = self._settings(), self.heads_per_block()
        layers = _per_block(self.transformer_layers_per_block, n, "layers")
        for i, kind in enumerate(self.up_block_types):
            k = n - 1 - i  # the encoder level this decoder level mirrors
            block_skips, skips = (
                skips[-(self.layers_per_block + 1) :],
                skips[: -(self.layers_per_block + 1)],
            )
            h = UpBlock(
                s, self.block_out_channels[k], UP_BLOCKS[kind], heads[k], layers[k],
                upsample=i < n - 1, name=f"up_blocks_{i}",
            )(h, block_skips, temb, context, deterministic)  # fmt: skip
        h = nn.silu(group_norm(self.norm_num_groups, self.norm_eps, self.dtype, "conv_norm_out")(h))
        return conv3x3(self.out_channels, self.dtype, "conv_out")(h).astype(jnp.float32)

    def _embed(self, x, t, class_labels, text_embeds, time_ids):
        """The time embedding [B, 4 C0], plus the class's and SDXL's added embeddings."""
        c0 = self.block_out_channels[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        emb = timestep_embedding(
            t, c0, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift
        )
        temb = TimestepEmbedding(4 * c0, self.dtype, name="time_embedding")(emb)
        if self.num_class_embeds is not None:
            embed = nn.Embed(
                self.num_class_embeds, 4 * c0, dtype=self.dtype, name="class_embedding"
            )
            temb = temb + embed(class_labels)
        if self.addition_embed_type == "text_time":
            ids = timestep_embedding(
                jnp.asarray(time_ids, jnp.float32).reshape(-1), self.addition_time_embed_dim,
                flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift,
            ).reshape(x.shape[0], -1)  # fmt: skip
            added = jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), ids], axis=-1)
            temb = temb + TimestepEmbedding(4 * c0, self.dtype, name="add_embedding")(added)
        return temb

    def _encode(self, h, temb, context, deterministic):
        """The down blocks on conv_in's output h: (the innermost state, every skip, conv_in's
        first), the skips in diffusers' `down_block_res_samples` order."""
        s, n, heads = self._settings(), len(self.block_out_channels), self.heads_per_block()
        layers = _per_block(self.transformer_layers_per_block, n, "layers")
        skips = [h]
        for i, (kind, ch) in enumerate(
            zip(self.down_block_types, self.block_out_channels, strict=True)
        ):
            h, new = DownBlock(
                s, ch, self.layers_per_block, DOWN_BLOCKS[kind], heads[i], layers[i],
                downsample=i < n - 1, downsample_padding=self.downsample_padding,
                name=f"down_blocks_{i}",
            )(h, temb, context, deterministic)  # fmt: skip
            skips += new
        return h, skips

    def _mid(self, h, temb, context, deterministic):
        """The bottleneck block (if any)."""
        if self.mid_block_type is None:
            return h
        n = len(self.block_out_channels)
        layers = _per_block(self.transformer_layers_per_block, n, "layers")
        kind = MID_BLOCKS[self.mid_block_type]
        return MidBlock(self._settings(), kind, self.heads_per_block()[-1], layers[-1],
                        name="mid_block")(h, temb, context, deterministic)  # fmt: skip

    def _check_residuals(self, down, mid) -> None:
        """A ControlNet's residuals: one per skip (conv_in's, each layer's, each
        downsampler's), and the mid block's, or none."""
        if down is None and mid is None:
            return
        levels = len(self.block_out_channels)
        count = 1 + levels * self.layers_per_block + levels - 1
        if down is None or mid is None or len(down) != count:
            raise ValueError(
                f"down_block_additional_residuals ({'none' if down is None else len(down)}) "
                f"and mid_block_additional_residual: this U-Net takes both, {count} down "
                "residuals (a ControlNet's outputs for it)"
            )

    def _settings(self) -> BlockSettings:
        return BlockSettings(
            self.norm_num_groups,
            self.norm_eps,
            self.dropout,
            self.resnet_time_scale_shift,
            self.use_linear_projection,
            self.upcast_attention,
            self.attention_implementation,
            self.dtype,
            self.remat,
        )

    @property
    def downsample_factor(self) -> int:
        """How many times smaller the innermost level is: H and W must be multiples of it."""
        return 2 ** (len(self.block_out_channels) - 1)

    def heads_per_block(self) -> tuple[int, ...]:
        """The number of attention heads at each level."""
        n = len(self.block_out_channels)
        if self.num_attention_heads is not None and self.attention_head_dim is not None:
            raise ValueError("give num_attention_heads or attention_head_dim, not both")
        if self.num_attention_heads is not None:
            return _per_block(self.num_attention_heads, n, "num_attention_heads")
        if self.attention_head_dim is not None:
            dims = _per_block(self.attention_head_dim, n, "attention_head_dim")
            return tuple(c // d for c, d in zip(self.block_out_channels, dims, strict=True))
        return (1,) * n

    def _check_added(self, text_embeds, time_ids) -> None:
        """SDXL's added inputs: both given exactly for a "text_time" net, of matching widths."""
        kind = self.addition_embed_type
        if kind not in ADDITION_EMBED_TYPES:
            raise ValueError(f"addition_embed_type: {kind!r} is not one of {ADDITION_EMBED_TYPES}")
        given = text_embeds is not None or time_ids is not None
        if kind is None:
            if given:
                raise ValueError("text_embeds / time_ids were given but this U-Net has no "
                                 "addition_embed_type='text_time'")  # fmt: skip
            return
        if text_embeds is None or time_ids is None:
            raise ValueError("this U-Net (addition_embed_type='text_time', SDXL) needs "
                             "text_embeds=[B, P] and time_ids=[B, K]")  # fmt: skip
        ids, want = self.addition_time_embed_dim, self.projection_class_embeddings_input_dim
        width = text_embeds.shape[-1] + time_ids.shape[-1] * ids
        if text_embeds.ndim != 2 or time_ids.ndim != 2 or width != want:
            raise ValueError(
                f"text_embeds {text_embeds.shape} and time_ids {time_ids.shape}: need [B, P] "
                f"and [B, K] with P + K x {ids} = projection_class_embeddings_input_dim {want}"
            )

    def _check(self, x, context, class_labels) -> None:
        """Name the bad value and what was expected (this runs once, at trace time)."""
        n = len(self.block_out_channels)
        if not len(self.down_block_types) == len(self.up_block_types) == n:
            raise ValueError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types "
                f"({len(self.up_block_types)}) and block_out_channels ({n}) must have one "
                "entry per level"
            )
        for value, allowed, name in (
            (self.down_block_types, DOWN_BLOCKS, "down_block_types"),
            (self.up_block_types, UP_BLOCKS, "up_block_types"),
            ((self.mid_block_type,), MID_BLOCKS, "mid_block_type"),
            ((self.resnet_time_scale_shift,), TIME_SCALE_SHIFTS, "resnet_time_scale_shift"),
            ((self.attention_implementation,), IMPLEMENTATIONS, "attention_implementation"),
        ):
            for v in value:
                if v not in allowed:
                    raise ValueError(f"{name}: {v!r} is not one of {tuple(allowed)}")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {c} not divisible by norm_num_groups")
        kinds = [DOWN_BLOCKS[k] for k in self.down_block_types] + [
            UP_BLOCKS[k] for k in self.up_block_types
        ]
        cross = "cross" in [*kinds, MID_BLOCKS[self.mid_block_type]]
        if cross and (context is None or self.cross_attention_dim is None):
            raise ValueError(
                "this U-Net has cross-attention blocks: set cross_attention_dim and pass "
                "context=[B, L, cross_attention_dim]"
            )
        if not cross and context is not None:
            raise ValueError("context was given but no block cross-attends; use Cross* blocks")
        if context is not None and context.shape[-1] != self.cross_attention_dim:
            raise ValueError(f"context width {context.shape[-1]} != {self.cross_attention_dim}")
        if (class_labels is None) != (self.num_class_embeds is None):
            raise ValueError(
                "class_labels must be given exactly when num_class_embeds is set "
                f"(num_class_embeds={self.num_class_embeds})"
            )
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must be [B, H, W, {self.in_channels}], got {x.shape}")
        factor = self.downsample_factor
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"H, W = {x.shape[1:3]} must be divisible by 2^(levels-1) = {factor}")
