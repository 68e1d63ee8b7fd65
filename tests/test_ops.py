"""The platform-dependent primitives (`jdiff.nn.ops`) and the host allocator setting."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AbstractDevice, AbstractMesh

from jdiff.nn import layers, ops

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize(
    "stride,padding",
    [(1, ((1, 1), (1, 1))), (2, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1))), (1, ((0, 0), (2, 1)))],
)
def test_im2col_is_the_convolution(stride, padding):
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 5))
    w = jax.random.normal(jax.random.key(1), (3, 3, 5, 4))
    ref = lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=NHWC,
                                   precision="highest")  # fmt: skip
    ours = ops.im2col_conv(x, w, (stride, stride), padding, precision="highest")
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def _primitives(fn, *args):
    return {e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns}


def test_conv_takes_im2col_only_where_the_cpu_runs_it_faster():
    conv = layers.conv3x3(8, jnp.float32, "conv")

    def run(x):
        return conv.apply(conv.init(jax.random.key(0), x), x)

    wide = jnp.zeros((2, 4, 4, ops.IM2COL_WIDE_CHANNELS))  # 32 output positions
    narrow = jnp.zeros((2, 4, 4, 64))
    many = jnp.zeros((2, 64, 64, ops.IM2COL_WIDE_CHANNELS))  # 8,192 positions
    assert jax.default_backend() == "cpu"
    assert "conv_general_dilated" not in _primitives(run, wide)
    assert "dot_general" in _primitives(run, wide)
    assert "conv_general_dilated" in _primitives(run, narrow)
    assert "conv_general_dilated" in _primitives(run, many)
    x = jax.random.normal(jax.random.key(1), wide.shape)  # the im2col form, through nn.Conv
    params = conv.init(jax.random.key(0), x)["params"]
    ref = lax.conv_general_dilated(x, params["kernel"], (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=NHWC, precision="highest")  # fmt: skip
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(run(x), ref + params["bias"], atol=1e-4, rtol=1e-4)
    tpu = AbstractMesh((2,), ("data",), abstract_device=AbstractDevice("TPU v5 lite", 1, "tpu"))
    with jax.sharding.use_abstract_mesh(tpu):  # a TPU program, compiled from this CPU
        assert ops.target_platform() == "tpu"
        assert "conv_general_dilated" in _primitives(run, wide)
    # the parameters are nn.Conv's whichever form runs
    shapes = jax.eval_shape(conv.init, jax.random.key(0), wide)
    assert jax.tree.map(lambda s: s.shape, shapes) == {
        "params": {"kernel": (3, 3, ops.IM2COL_WIDE_CHANNELS, 8), "bias": (8,)}
    }


_RSS_AFTER_FREE = """
import sys, numpy as np
from jdiff import sharding
if sys.argv[1] == "reuse":
    assert sharding.reuse_host_memory()
page = __import__("os").sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
before = rss()
a = np.ones(200 << 20, np.uint8)  # 200 MiB, touched
del a
print((rss() - before) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt, /proc")
def test_reuse_host_memory_keeps_freed_memory_for_the_next_call():
    def kept(mode):
        out = subprocess.run([sys.executable, "-c", _RSS_AFTER_FREE, mode], capture_output=True,
                             text=True, timeout=120, check=True)  # fmt: skip
        return int(out.stdout.split()[-1])

    assert kept("default") < 50  # glibc unmaps a freed block this large at once
    assert kept("reuse") >= 190  # kept, so XLA's next buffers need no new page faults
