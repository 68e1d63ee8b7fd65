"""Attention for the U-Net: DDPM's spatial self-attention and Stable Diffusion's transformer.

Every attention goes through `attention`, whose `implementation` is selectable: "xla" is
`jax.nn.dot_product_attention`'s plain path (the scores of all queries and keys at once),
"cudnn" its fused flash kernel on NVIDIA GPUs (float16/bfloat16 only), "chunked" the pure-JAX
memory-efficient path (`chunked_attention`: queries in blocks, keys in blocks with a running
log-sum-exp, never the whole score matrix; any backend), "pallas" JAX's Pallas flash-attention
kernel for TPUs (`pallas_attention`; inside `shard_map` over the context mesh). None picks per
platform and size when traced (`resolve`): "pallas" for a TPU where the token counts tile,
"cudnn" on an NVIDIA GPU for 16-bit heads it takes, "chunked" on the CPU from 131,072 query x
key tokens (where it is also the fastest), the plain path otherwise. The platform is the
context mesh's (`jax.sharding.use_abstract_mesh`, which the trainer and `jdiff.aot` set while
tracing, so a TPU topology compiled from a CPU gets the TPU kernel), else the default
backend's. Names mirror diffusers' `Attention`, `FeedForward`,
`BasicTransformerBlock` and `Transformer2DModel` parameter trees.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from jdiff.nn.layers import group_norm
from jdiff.nn.ops import target_platform

IMPLEMENTATIONS = (None, "xla", "cudnn", "chunked", "pallas")
BLOCK_Q = 512  # queries per tile of the chunked path (heads from 32 wide: SD's 40, 64, 80)
BLOCK_Q_NARROW = 1024  # for narrower heads, whose tiles cost the softmax more than products
TILE_SCORES = 1 << 20  # scores per tile at most, when heads are grouped (4 MiB in float32)
BLOCK_K = 4096  # keys per block: one block up to 4,096 tokens (SD at 512 px)
PALLAS_TILE = 128  # the Pallas kernel's blocks: token counts must be multiples of it
# and head widths at most it or a multiple of it (SD 1.x's 160-wide heads at 1,280 channels are
# not: there the plain path)


def _blocks(a: jax.Array, size: int, axis: int) -> jax.Array:
    """`a` padded along `axis` to a multiple of `size` and split there: [n, ..., size, ...]."""
    length = a.shape[axis]
    n = -(-length // size)
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, n * size - length)
    a = jnp.pad(a, pad)
    a = a.reshape(*a.shape[:axis], n, size, *a.shape[axis + 1 :])
    return jnp.moveaxis(a, axis, 0)


def _heads_per_tile(n: int, scores_per_head: int) -> int:
    """The largest divisor of n heads whose tiles hold at most `TILE_SCORES` scores (>= 1)."""
    fits = max(1, TILE_SCORES // scores_per_head)
    return max(g for g in range(1, min(n, fits) + 1) if n % g == 0)


def chunked_attention(
    q: Float[Array, "b lq h d"],
    k: Float[Array, "b lk h d"],
    v: Float[Array, "b lk h d"],
    *,
    block_q: int | None = None,
    block_k: int = BLOCK_K,
) -> Float[Array, "b lq h d"]:
    """softmax(q kᵀ / sqrt(d)) v, exact, without the [lq, lk] scores of every head at once.

    The work is cut in tiles, `block_q` queries (by default the CPU's fastest for the head
    width) of as many (batch, head) pairs as keep a tile within `TILE_SCORES` scores, run one
    after another (`lax.map`); in each, `block_k` keys at a time with the running maximum m,
    sum l and output o of the online softmax (Milakov & Gimelshein 2018; Rabe & Staats 2021):
    m' = max(m, max s), l' = l e^{m - m'} + Σ e^{s - m'}, o' = o e^{m - m'} + e^{s - m'} v;
    with one key block that is the plain softmax. A tile's scores stay in cache, where the CPU
    computes them up to 2.5x sooner than all at once (`benchmarks/RESULTS.md`). Each tile is
    rematerialised in the backward pass (`jax.checkpoint`), so training holds one tile of
    scores at a time. Padded keys are masked out; the softmax runs in float32 whatever the
    inputs' dtype."""
    b, lq, h, d = q.shape
    lk = k.shape[1]
    block_q = block_q or (BLOCK_Q if d >= 32 else BLOCK_Q_NARROW)
    block_q, block_k = min(block_q, lq), min(block_k, lk)
    scale = 1.0 / float(d) ** 0.5
    n = b * h
    group = _heads_per_tile(n, block_q * block_k)
    q, k, v = (jnp.swapaxes(a, 1, 2).reshape(n // group, group, -1, d) for a in (q, k, v))
    if lk <= block_k:  # one key block: a column of ones after v makes p·[v, 1] = [p v, Σp]
        v = jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), v.dtype)], axis=-1)
    kb, vb = _blocks(k, block_k, 2), _blocks(v, block_k, 2)  # [nk, n/g, g, block_k, d(+1)]
    padded = kb.shape[0] * block_k != lk
    valid = _blocks(jnp.ones((lk,), bool), block_k, 0)  # [nk, block_k]
    qb = _blocks(q, block_q, 2)  # [nq, n/g, g, block_q, d]
    nq = qb.shape[0]
    tiles = jnp.moveaxis(qb, 0, 1).reshape(-1, group, block_q, d)  # [n/g x nq, g, block_q, d]

    def scores(qi, kj, ok):
        s = jnp.einsum("gqd,gkd->gqk", qi, kj, preferred_element_type=jnp.float32) * scale
        return jnp.where(ok, s, -jnp.inf) if padded else s

    def weighted(p, vj):
        return jnp.einsum("gqk,gkd->gqd", p.astype(vj.dtype), vj,
                          preferred_element_type=jnp.float32)  # fmt: skip

    @jax.checkpoint
    def tile(inputs):  # [g, block_q, d] -> [g, block_q, d]
        index, qi = inputs
        ks, vs = kb[:, index // nq], vb[:, index // nq]  # this tile's heads: [nk, g, block_k, d]
        if kb.shape[0] == 1:  # one key block: the plain softmax, its sum from the ones
            s = scores(qi, ks[0], valid[0])
            o = weighted(jnp.exp(s - s.max(-1, keepdims=True)), vs[0])
            return (o[..., :d] / o[..., d:]).astype(qi.dtype)

        def key_block(carry, inputs):
            m, total, o = carry
            kj, vj, ok = inputs
            s = scores(qi, kj, ok)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            total = total * correction + p.sum(-1)
            return (m_new, total, o * correction[..., None] + weighted(p, vj)), None

        shape = qi.shape[:-1]
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros((*shape, d), jnp.float32))  # fmt: skip
        (_, total, o), _ = jax.lax.scan(key_block, init, (ks, vs, valid))
        return (o / total[..., None]).astype(qi.dtype)

    indices = jnp.arange(tiles.shape[0])
    if tiles.shape[0] == 1:
        out = tile((indices[0], tiles[0]))[None]
    else:
        out = jax.lax.map(tile, (indices, tiles))
    out = out.reshape(n // group, nq, group, block_q, d)
    out = jnp.moveaxis(out, 1, 2).reshape(b, h, nq * block_q, d)[:, :, :lq]
    return jnp.swapaxes(out, 1, 2)


def pallas_attention(
    q: Float[Array, "b lq h d"], k: Float[Array, "b lk h d"], v: Float[Array, "b lk h d"]
) -> Float[Array, "b lq h d"]:
    """softmax(q kᵀ / sqrt(d)) v by JAX's Pallas TPU flash-attention kernel (forward and
    backward kernels; blocks of `PALLAS_TILE` queries and keys; lq and lk multiples of it).

    A Mosaic kernel cannot be partitioned by XLA, so under a context mesh it runs in
    `shard_map`, each device on its share of the batch (split over every mesh axis when the
    batch divides, otherwise whole on each device); without one, on one device. Off a TPU it
    runs only in Pallas' interpret mode (`pltpu.force_tpu_interpret_mode()`), as the tests do.
    16-bit inputs need the default matmul precision when it is lowered: Mosaic has no float32
    ("highest") product of bfloat16 operands.
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    scale = 1.0 / float(q.shape[-1]) ** 0.5

    def kernel(q, k, v):  # the kernel's layout is [b, heads, l, d]
        q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
        return jnp.swapaxes(pallas_flash.flash_attention(q, k, v, sm_scale=scale), 1, 2)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v)
    spec = P(tuple(mesh.axis_names)) if q.shape[0] % mesh.size == 0 else P()
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                         check_vma=False)(q, k, v)  # fmt: skip


CHUNKED_FROM = 1 << 17  # query x key tokens from which None is "chunked" on the CPU


def _tiles(lq: int, lk: int, d: int) -> bool:
    """Whether the Pallas kernel takes lq queries and lk keys of heads d wide."""
    return not (lq % PALLAS_TILE or lk % PALLAS_TILE) and (d <= PALLAS_TILE or d % PALLAS_TILE == 0)


def _cudnn_takes(lq: int, lk: int, d: int, dtype) -> bool:
    """Whether cuDNN's flash attention takes lq queries and lk keys, heads d wide, of `dtype`:
    16-bit, d a multiple of 8 up to 128, even token counts (JAX 0.10.2's gradient refuses odd
    ones, such as a text context's 77 keys: it takes its placeholder for "no bias" for a
    bias)."""
    sizes = d <= 128 and d % 8 == 0 and lq % 2 == 0 and lk % 2 == 0
    return sizes and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def resolve(implementation: str | None, lq: int, lk: int, d: int = 64,
            dtype=jnp.float32) -> str | None:  # fmt: skip
    """The implementation to run for lq queries and lk keys, heads d wide, of `dtype`. None
    stands for "pallas" on a TPU where the kernel tiles them (`PALLAS_TILE`); "cudnn" on an
    NVIDIA GPU for 16-bit heads it takes (`_cudnn_takes`: SD 1.x's 40- and 80-wide, SD 2.x's
    and SDXL's 64, over the image's tokens); "chunked" on the CPU from lq x lk =
    `CHUNKED_FROM` (SD's 4,096 x 77 cross-attention at 512 px and up: faster there, and far
    smaller; below it the tiny models' attention compiles sooner on the plain path); JAX's
    choice (None: the plain path) elsewhere. "pallas" where they do not tile (a text context's
    77 keys, SD 1.x's 160-wide heads) is the plain path, "xla"."""
    if implementation is None:
        platform = target_platform()
        if platform == "tpu" and _tiles(lq, lk, d):
            return "pallas"
        if platform == "gpu" and _cudnn_takes(lq, lk, d, dtype):
            return "cudnn"
        if platform == "cpu" and lq * lk >= CHUNKED_FROM:
            return "chunked"
    if implementation == "pallas" and not _tiles(lq, lk, d):
        return "xla"
    return implementation


def attention(q, k, v, *, implementation: str | None = None, mask=None):
    """Attention over [b, l, heads, d] inputs by `implementation` (see the module's text);
    `mask` (broadcastable to [b, heads, lq, lk], True = attend) takes the "xla" / "cudnn"
    path."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; expected one of {IMPLEMENTATIONS}")
    chosen = resolve(implementation, q.shape[1], k.shape[1], q.shape[-1], q.dtype)
    if mask is not None and (chosen in ("chunked", "pallas") or implementation is None):
        chosen = "xla"  # the tiled paths take no mask, and the default keeps masks plain
    implementation = chosen
    if implementation == "chunked":
        return chunked_attention(q, k, v)
    if implementation == "pallas":
        return pallas_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


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
      implementation: None (per platform), "xla", "cudnn", "chunked" or "pallas"
        (`attention`).
      upcast: compute in float32 whatever the input dtype (diffusers' `upcast_attention`, which
        SD 2.x's v-models need in float16 to keep q kᵀ finite).
    """
    dtype = q.dtype
    if upcast:
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))

    def split(a):
        return a.reshape(*a.shape[:2], heads, a.shape[-1] // heads)

    out = attention(split(q), split(k), split(v), implementation=implementation)
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
