"""Attention for the U-Net: DDPM's spatial self-attention and Stable Diffusion's transformer.

Every attention goes through `jax.nn.dot_product_attention`, whose `implementation` is
selectable: None lets JAX choose, "xla" runs everywhere, "cudnn" is the fused flash kernel on
NVIDIA GPUs (float16/bfloat16 only). Names mirror diffusers' `Attention`, `FeedForward`,
`BasicTransformerBlock` and `Transformer2DModel` parameter trees.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from jdiff.nn.layers import group_norm

IMPLEMENTATIONS = (None, "xla", "cudnn")


def multi_head_attention(
    q: Float[Array, "b lq inner"],
    k: Float[Array, "b lk inner"],
    v: Float[Array, "b lk inner"],
    *,
    heads: int,
    implementation: str | None = None,
    upcast: bool = False,
) -> Float[Array, "b lq inner"]:
    """softmax(q kᵀ / sqrt(d)) v per head, d = inner / heads (Vaswani et al. 2017, eq. 1).

    Args:
      q, k, v: projections, heads concatenated on the last axis.
      heads: number of heads.
      implementation: `jax.nn.dot_product_attention`'s (None, "xla" or "cudnn").
      upcast: compute in float32 whatever the input dtype (diffusers' `upcast_attention`, which
        SD 2.x's v-models need in float16 to keep q kᵀ finite).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; expected one of {IMPLEMENTATIONS}")
    dtype = q.dtype
    if upcast:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))

    def split(a):
        return a.reshape(*a.shape[:2], heads, a.shape[-1] // heads)

    out = jax.nn.dot_product_attention(split(q), split(k), split(v), implementation=implementation)
    return out.reshape(q.shape).astype(dtype)


class Attention(nn.Module):
    """Multi-head attention: to_q, to_k, to_v, to_out_0 (diffusers' `Attention`).

    With `norm_groups` set it is the DDPM self-attention block over an image [B, H, W, C]:
    GroupNorm first and the input added back; otherwise a plain (cross-)attention on [B, L, C].
    """

    heads: int
    dim_head: int
    out_dim: int  # the query's width, also the output's
    use_bias: bool = False  # bias on to_q / to_k / to_v (True in the DDPM block)
    norm_groups: int | None = None
    norm_eps: float = 1e-6
    upcast: bool = False
    implementation: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        residual = x
        if self.norm_groups is not None:
            x = group_norm(self.norm_groups, self.norm_eps, self.dtype, "group_norm")(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        context = x if context is None else context.astype(self.dtype)
        inner = self.heads * self.dim_head

        def dense(name, width, bias):
            return nn.Dense(width, use_bias=bias, dtype=self.dtype, name=name)

        q = dense("to_q", inner, self.use_bias)(x)
        k = dense("to_k", inner, self.use_bias)(context)
        v = dense("to_v", inner, self.use_bias)(context)
        h = multi_head_attention(
            q, k, v, heads=self.heads, implementation=self.implementation, upcast=self.upcast
        )
        h = dense("to_out_0", self.out_dim, True)(h).reshape(*residual.shape[:-1], self.out_dim)
        return h + residual if self.norm_groups is not None else h


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): h ⊙ GELU(g), [h, g] = proj(x); exact (erf) GELU."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, -1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """The transformer's MLP: GEGLU to mult x dim (`net_0`), then back to dim (`net_2`)."""

    dim: int
    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on `context`, feed-forward; each residual."""

    dim: int
    heads: int
    dim_head: int
    upcast: bool = False
    implementation: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "b l d"], context: Float[Array, "b m e"]):
        def norm(name):
            return nn.LayerNorm(1e-5, dtype=self.dtype, use_fast_variance=False, name=name)

        def attention(name):
            return Attention(
                self.heads,
                self.dim_head,
                self.dim,
                upcast=self.upcast,
                implementation=self.implementation,
                dtype=self.dtype,
                name=name,
            )

        x = attention("attn1")(norm("norm1")(x)) + x
        x = attention("attn2")(norm("norm2")(x), context) + x
        return FeedForward(self.dim, dtype=self.dtype, name="ff")(norm("norm3")(x)) + x


class Transformer2DModel(nn.Module):
    """Stable Diffusion's spatial transformer (Rombach et al. 2022, §3.3) on [B, H, W, C].

    GroupNorm (eps 1e-6), `proj_in` to heads x dim_head (a 1x1 conv in SD 1.x, a linear layer
    with `use_linear_projection` in SD 2.x), `num_layers` transformer blocks over the H·W tokens,
    `proj_out` back to C, and the input added back.
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    upcast: bool = False
    implementation: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"], context: Float[Array, "b m e"]):
        b, height, width, channels = x.shape
        inner = self.heads * self.dim_head
        h = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        if self.use_linear_projection:
            h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(b, -1, channels))
        else:
            h = nn.Conv(inner, (1, 1), dtype=self.dtype, name="proj_in")(h).reshape(b, -1, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                inner,
                self.heads,
                self.dim_head,
                upcast=self.upcast,
                implementation=self.implementation,
                dtype=self.dtype,
                name=f"transformer_blocks_{i}",
            )(h, context.astype(self.dtype))
        if self.use_linear_projection:
            h = nn.Dense(channels, dtype=self.dtype, name="proj_out")(h)
            h = h.reshape(b, height, width, channels)
        else:
            h = h.reshape(b, height, width, inner)
            h = nn.Conv(channels, (1, 1), dtype=self.dtype, name="proj_out")(h)
        return h + x
