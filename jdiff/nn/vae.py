"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), as Stable Diffusion
uses it: an image x [B, H, W, 3] is encoded to a diagonal Gaussian over latents
z [B, H/f, W/f, latent_channels] (f = 2^(levels - 1)), and decoded back.

Module and parameter names mirror diffusers' `AutoencoderKL` tree (`encoder/down_blocks_0/
resnets_1/conv1`, `quant_conv`, `decoder/mid_block/attentions_0/to_q`, ...), so its weights
convert by `jdiff.interop.from_diffusers`. The defaults are Stable Diffusion's VAE (f = 8,
83,653,863 parameters). Diffusion models see `scaling_factor * z` (unit variance); it is a
property of the trained autoencoder (SD's 0.18215), measured as 1/std(z) on its training data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jdiff.nn.attention import Attention
from jdiff.nn.layers import Downsample2D, ResnetBlock2D, Upsample2D, conv3x3, group_norm

_EPS = 1e-6  # every GroupNorm of diffusers' autoencoder


@flax.struct.dataclass
class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, exp(logvar)), logvar clipped to [-30, 20] as in LDM."""

    mean: Float[Array, "b h w c"]
    logvar: Float[Array, "b h w c"]

    @classmethod
    def from_moments(cls, moments: Float[Array, "b h w 2c"]) -> DiagonalGaussian:
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> Float[Array, "b h w c"]:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> Float[Array, "b h w c"]:
        noise = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Float[Array, "b h w c"]:
        return self.mean

    def kl(self) -> Float[Array, " b"]:
        """KL(q(z|x) || N(0, I)) in nats, summed over the latent's elements."""
        terms = self.mean**2 + jnp.exp(self.logvar) - 1.0 - self.logvar
        return 0.5 * terms.sum(axis=(1, 2, 3))


class _MidBlock(nn.Module):
    """Residual block, single-head self-attention over all positions, residual block."""

    groups: int
    attention: bool
    dtype: Any

    @nn.compact
    def __call__(self, h):
        channels = h.shape[-1]
        h = ResnetBlock2D(channels, self.groups, _EPS, dtype=self.dtype, name="resnets_0")(h, None)
        if self.attention:
            h = Attention(1, channels, channels, use_bias=True, norm_groups=self.groups,
                          norm_eps=_EPS, upcast=True, dtype=self.dtype,
                          name="attentions_0")(h)  # fmt: skip
        return ResnetBlock2D(channels, self.groups, _EPS, dtype=self.dtype, name="resnets_1")(
            h, None
        )


class _Block(nn.Module):
    """`layers` residual blocks, then a x2 down- or upsampling (`resample`) or none: a level
    of the encoder (`DownEncoderBlock2D`) or of the decoder (`UpDecoderBlock2D`)."""

    out_channels: int
    layers: int
    groups: int
    resample: str | None  # "down", "up" or None
    dtype: Any

    @nn.compact
    def __call__(self, h):
        for i in range(self.layers):
            h = ResnetBlock2D(self.out_channels, self.groups, _EPS, dtype=self.dtype,
                              name=f"resnets_{i}")(h, None)  # fmt: skip
        if self.resample == "down":  # bottom/right padding only, as the LDM code
            h = Downsample2D(self.out_channels, padding=0, dtype=self.dtype,
                             name="downsamplers_0")(h)  # fmt: skip
        elif self.resample == "up":
            h = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(h)
        return h


class Encoder(nn.Module):
    """x -> the posterior's moments (mean and log-variance, 2 x latent_channels)."""

    latent_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    mid_block_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = tuple(self.block_out_channels)
        h = conv3x3(channels[0], self.dtype, "conv_in")(x.astype(self.dtype))
        for i, width in enumerate(channels):
            resample = "down" if i < len(channels) - 1 else None
            h = _Block(width, self.layers_per_block, self.groups, resample, self.dtype,
                       name=f"down_blocks_{i}")(h)  # fmt: skip
        h = _MidBlock(self.groups, self.mid_block_attention, self.dtype, name="mid_block")(h)
        h = nn.silu(group_norm(self.groups, _EPS, self.dtype, "conv_norm_out")(h))
        return conv3x3(2 * self.latent_channels, self.dtype, "conv_out")(h)


class Decoder(nn.Module):
    """z -> x; each level has layers_per_block + 1 residual blocks, as diffusers' decoder."""

    out_channels: int
    block_out_channels: Sequence[int]
    layers_per_block: int
    groups: int
    mid_block_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        channels = tuple(reversed(self.block_out_channels))
        h = conv3x3(channels[0], self.dtype, "conv_in")(z.astype(self.dtype))
        h = _MidBlock(self.groups, self.mid_block_attention, self.dtype, name="mid_block")(h)
        for i, width in enumerate(channels):
            resample = "up" if i < len(channels) - 1 else None
            h = _Block(width, self.layers_per_block + 1, self.groups, resample, self.dtype,
                       name=f"up_blocks_{i}")(h)  # fmt: skip
        h = nn.silu(group_norm(self.groups, _EPS, self.dtype, "conv_norm_out")(h))
        return conv3x3(self.out_channels, self.dtype, "conv_out")(h)


class AutoencoderKL(nn.Module):
    """Encoder E, decoder D and the 1x1 `quant_conv`/`post_quant_conv` between them.

    `model.apply(v, x, method="encode")` gives the posterior (`DiagonalGaussian`);
    `model.apply(v, z, method="decode")` the image; calling the module encodes, samples (with
    `key`; the mode without) and decodes, returning (reconstruction, posterior). Outputs are
    float32 whatever the compute dtype.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # Stable Diffusion's; measure it for a new autoencoder
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    def setup(self):
        channels = tuple(self.block_out_channels)
        if any(c % self.norm_num_groups for c in channels):
            raise ValueError(
                f"block_out_channels {channels} must all be multiples of norm_num_groups="
                f"{self.norm_num_groups}"
            )
        self.encoder = Encoder(self.latent_channels, channels, self.layers_per_block,
                               self.norm_num_groups, self.mid_block_add_attention,
                               self.dtype)  # fmt: skip
        self.decoder = Decoder(self.out_channels, channels, self.layers_per_block,
                               self.norm_num_groups, self.mid_block_add_attention,
                               self.dtype)  # fmt: skip
        width = 2 * self.latent_channels
        if self.use_quant_conv:
            self.quant_conv = nn.Conv(width, (1, 1), dtype=self.dtype)
        if self.use_post_quant_conv:
            self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode(self, x: Float[Array, "b h w c"]) -> DiagonalGaussian:
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[-1] != self.in_channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(
                f"the autoencoder encodes images [B, H, W, {self.in_channels}] with H and W "
                f"multiples of {f}; got shape {x.shape}"
            )
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: Float[Array, "b h w l"]) -> Float[Array, "b H W c"]:
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(
                f"the autoencoder decodes latents [B, h, w, {self.latent_channels}]; got shape "
                f"{z.shape}"
            )
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x, key: jax.Array | None = None):
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z), posterior


VARIANTS: dict[str, dict[str, Any]] = {
    # Stable Diffusion 1.x/2.x: f = 8, 83,653,863 parameters
    "sd": {},
    # the tests' size: f = 2
    "tiny": {"block_out_channels": (32, 32), "layers_per_block": 1, "norm_num_groups": 8},
}
