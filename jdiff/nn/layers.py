"""The U-Net's convolutional parts: timestep embedding, residual block, down- and upsampling.

Images are channels-last, [B, H, W, C]. Submodule names mirror diffusers' parameter tree
(`norm1`, `conv1`, `time_emb_proj`, ...), so a diffusers state dict converts by renaming
(`jdiff.interop`). Parameters are float32; `dtype` is the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from jdiff.nn import ops

TIME_SCALE_SHIFTS = ("default", "scale_shift")


def timestep_embedding(
    t: Float[Array, " b"],
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    max_period: float = 10_000.0,
) -> Float[Array, "b dim"]:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, §3.5).

    Frequency k of dim/2 is ω_k = max_period^(-k / (dim/2 - freq_shift)); the embedding is
    [sin(t ω), cos(t ω)] (or [cos, sin] with `flip_sin_to_cos`). The DDPM U-Net uses
    freq_shift=1 and sin first, Stable Diffusion freq_shift=0 and cos first.

    Args:
      t: timesteps [B] on the training scale.
      dim: embedding width (an odd width is zero-padded by one).

    Returns:
      float32 [B, dim].
    """
    half = dim // 2
    # the frequencies are constants: computed in float64 and rounded once
    freqs = np.exp(-math.log(max_period) * np.arange(half) / (half - freq_shift))
    angles = jnp.asarray(t, jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


def group_norm(groups: int, eps: float, dtype: Any, name: str) -> nn.GroupNorm:
    """torch.nn.GroupNorm's numerics: two-pass variance, statistics in float32."""
    return nn.GroupNorm(
        num_groups=groups, epsilon=eps, dtype=dtype, use_fast_variance=False, name=name
    )


def conv3x3(features: int, dtype: Any, name: str, stride: int = 1, padding: Any = 1) -> nn.Conv:
    """A 3x3 convolution with torch's symmetric zero padding (not XLA's "SAME" for stride 2),
    by `ops.conv_general_dilated` (im2col where the CPU runs that faster)."""
    pad = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    return nn.Conv(features, (3, 3), strides=(stride, stride), padding=pad, dtype=dtype, name=name,
                   conv_general_dilated=ops.conv_general_dilated)  # fmt: skip


class TimestepEmbedding(nn.Module):
    """The MLP after the sinusoidal embedding: linear_1, SiLU, linear_2 (DDPM, Ho et al. 2020)."""

    features: int  # time_embed_dim, 4 x the first block's channels in DDPM and SD
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, emb: Float[Array, "b d"]) -> Float[Array, "b f"]:
        emb = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(emb)
        return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(emb))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added between (or IDDPM's scale-shift norm).

    h = conv1(silu(norm1(x))); h = norm2(h + W·silu(temb))  (or norm2(h)(1 + s) + b with
    scale_shift); out = shortcut(x) + conv2(dropout(silu(h))). The 1x1 `conv_shortcut` exists
    only when the channel count changes. With temb None (the autoencoder's blocks) there is no
    `time_emb_proj`.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-6
    dropout: float = 0.0
    time_embedding_norm: str = "default"  # or "scale_shift" (Nichol & Dhariwal 2021)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb, deterministic: bool = True):
        h = conv3x3(self.out_channels, self.dtype, "conv1")(
            nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        )
        norm2 = group_norm(self.groups, self.eps, self.dtype, "norm2")
        if temb is None:  # the autoencoder's blocks have no time embedding
            h = norm2(h)
        elif self.time_embedding_norm == "scale_shift":
            temb = nn.Dense(2 * self.out_channels, dtype=self.dtype, name="time_emb_proj")(
                nn.silu(temb)
            )
            scale, shift = jnp.split(temb[:, None, None, :], 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            temb = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(
                nn.silu(temb)
            )
            h = norm2(h + temb[:, None, None, :])
        h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
        h = conv3x3(self.out_channels, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Downsample2D(nn.Module):
    """A stride-2 3x3 convolution (`conv`). padding=1 pads 1 on every side (diffusers, SD);
    padding=0 pads only bottom/right, as TF's "SAME" in the original DDPM code."""

    out_channels: int
    padding: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
        return conv3x3(self.out_channels, self.dtype, "conv", stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 convolution (`conv`)."""

    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv3x3(self.out_channels, self.dtype, "conv")(x)
