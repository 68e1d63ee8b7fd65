"""Primitives whose fastest form depends on the platform a program is compiled for.

`target_platform()` is that platform: the context mesh's devices' (`jax.sharding.
use_abstract_mesh`, which the trainer and `jdiff.aot` set while tracing, so a TPU topology
compiled from a CPU is "tpu") or else the default backend's. `conv_general_dilated` is
`lax.conv_general_dilated` with one CPU exception: where XLA's CPU convolution is slow (wide
inputs over few output positions: the inner levels of an SD-sized U-Net) it is the same
convolution written as im2col, the kernel's shifted windows side by side on the channel axis
and one matrix product, which XLA's CPU backend runs about twice as fast there
(`benchmarks/RESULTS.md`). Both are the same sum, so results agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# the CPU's im2col region, measured on 2 AVX-512 cores (benchmarks/RESULTS.md): inputs this
# wide over at most this many output positions (batch x height x width), or any input from
# IM2COL_MIN_CHANNELS over at most IM2COL_SMALL_POSITIONS positions
IM2COL_WIDE_CHANNELS = 1024
IM2COL_WIDE_POSITIONS = 2048
IM2COL_MIN_CHANNELS = 320
IM2COL_SMALL_POSITIONS = 128


_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def target_platform() -> str:
    """The platform a program being traced is for: the context mesh's devices' ("tpu" for a
    TPU topology compiled from this CPU), else the default backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return jax.default_backend() if device is None else device.platform


def _im2col_pays(channels: int, out_positions: int) -> bool:
    return (channels >= IM2COL_WIDE_CHANNELS and out_positions <= IM2COL_WIDE_POSITIONS) or (
        channels >= IM2COL_MIN_CHANNELS and out_positions <= IM2COL_SMALL_POSITIONS
    )


def im2col_conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    precision=None,
) -> jax.Array:
    """A 2-D convolution, NHWC input and HWIO kernel, as one matrix product: the kh x kw
    strided windows of the padded input concatenated on the channel axis [B, H', W', kh kw C]
    times the kernel reshaped to [kh kw C, O]."""
    kh, kw, c, o = rhs.shape
    (sh, sw), ((pt, pb), (pl, pr)) = window_strides, padding
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    limit = (x.shape[0], (ho - 1) * sh + 1, (wo - 1) * sw + 1, c)
    windows = [
        lax.slice(x, (0, i, j, 0), (limit[0], i + limit[1], j + limit[2], c), (1, sh, sw, 1))
        for i in range(kh)
        for j in range(kw)
    ]
    cols = windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)
    return jnp.dot(cols, rhs.reshape(kh * kw * c, o), precision=precision)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
):
    """`lax.conv_general_dilated`, taking the im2col form on the CPU where it is faster (see
    the module's text): NHWC / HWIO, explicit padding, no dilation, one group. Flax's
    `nn.Conv(..., conv_general_dilated=ops.conv_general_dilated)` keeps its parameters."""
    plain = (
        target_platform() != "cpu"
        or lhs.ndim != 4
        or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != _NHWC
        or isinstance(padding, str)
        or any(d != 1 for d in (*(lhs_dilation or (1, 1)), *(rhs_dilation or (1, 1))))
        or feature_group_count != 1
        or batch_group_count != 1
        or preferred_element_type is not None
    )
    if not plain:
        (pt, pb), (pl, pr) = padding
        kh, kw = rhs.shape[:2]
        ho = (lhs.shape[1] + pt + pb - kh) // window_strides[0] + 1
        wo = (lhs.shape[2] + pl + pr - kw) // window_strides[1] + 1
        if _im2col_pays(lhs.shape[-1], lhs.shape[0] * ho * wo):
            return im2col_conv(lhs, rhs, window_strides, padding, precision)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type,
    )  # fmt: skip
