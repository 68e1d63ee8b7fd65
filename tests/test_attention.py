"""The chunked attention path: equal to the plain one in forward and gradient (float32 within
1e-5), never the whole score matrix (its compiled temporaries a fraction of the plain path's),
and the default on the CPU for long sequences."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.nn import attention as A


def qkv(lq, lk, heads=3, d=8, b=2, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, lq, heads, d)) * 2  # large scores: the softmax's max matters
    k = rng.standard_normal((b, lk, heads, d)) * 2
    v = rng.standard_normal((b, lk, heads, d))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def plain(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


@pytest.mark.parametrize(
    ("lq", "lk", "block_q", "block_k", "tile_scores"),
    [
        (300, 300, 128, 128, A.TILE_SCORES),  # several blocks of each, both padded
        (300, 300, 128, 128, 2 * 128 * 128),  # tiles of 2 of the 6 (batch, head) pairs
        (300, 77, 64, 4096, 3 * 64 * 77),  # cross-attention: one key block, 3 pairs a tile
        (64, 200, 64, 64, A.TILE_SCORES),  # one query block, padded keys
        (5, 5, 256, 4096, A.TILE_SCORES),  # shorter than a block
    ],
)
def test_chunked_equals_plain_forward_and_gradient(
    lq, lk, block_q, block_k, tile_scores, monkeypatch
):
    monkeypatch.setattr(A, "TILE_SCORES", tile_scores)
    q, k, v = qkv(lq, lk)
    chunked = functools.partial(A.chunked_attention, block_q=block_q, block_k=block_k)
    np.testing.assert_allclose(jax.jit(chunked)(q, k, v), plain(q, k, v), atol=1e-5, rtol=1e-5)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal((*q.shape[:3], 8)),
                            jnp.float32)  # fmt: skip

    def loss(f):
        return jax.jit(jax.grad(lambda *a: (f(*a) * cotangent).sum(), argnums=(0, 1, 2)))

    for ours, ref in zip(loss(chunked)(q, k, v), loss(plain)(q, k, v), strict=True):
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_chunked_in_bfloat16_keeps_its_softmax_in_float32():
    q, k, v = qkv(200, 200, dtype=jnp.bfloat16)
    out = A.chunked_attention(q, k, v, block_q=64, block_k=64)
    assert out.dtype == jnp.bfloat16
    ref = plain(*(a.astype(jnp.float32) for a in (q, k, v)))
    assert float(jnp.abs(out.astype(jnp.float32) - ref).max()) < 0.05


def test_chunked_never_holds_the_whole_score_matrix():
    """Forward and gradient at 2,048 tokens: the plain path's compiled temporaries hold the
    [lq, lk] scores (and their gradient); the chunked path's a block of them."""
    q, k, v = qkv(2048, 2048, heads=2, d=16, b=1)

    def temporaries(f):
        step = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))
        return step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    scores = 2048 * 2048 * 2 * 4  # one float32 [heads, lq, lk]
    chunked = functools.partial(A.chunked_attention, block_q=128, block_k=512)
    assert temporaries(plain) >= scores
    assert temporaries(chunked) < scores / 4


def test_none_is_chunked_on_the_cpu_and_names_are_checked():
    if jax.default_backend() == "cpu":
        assert A.resolve(None, 1024, 1024) == "chunked" and A.resolve(None, 256, 77) is None
        assert A.resolve(None, 4096, 77) == "chunked" and A.resolve(None, 256, 256) is None
    assert A.resolve("xla", 4096, 4096) == "xla"
    q, k, v = qkv(10, 10)
    np.testing.assert_allclose(A.attention(q, k, v), plain(q, k, v), atol=1e-5)
    causal = jnp.tril(jnp.ones((10, 10), bool))
    masked = A.attention(q, k, v, implementation="chunked", mask=causal)  # the plain path
    np.testing.assert_allclose(masked, jax.nn.dot_product_attention(q, k, v, mask=causal),
                               atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="implementation='flash'"):
        A.attention(q, k, v, implementation="flash")


@pytest.mark.parametrize("batch", [8, 3])  # split over the 8 devices, and whole on each
def test_pallas_equals_plain_forward_and_gradient_in_a_mesh(batch):
    """JAX's Pallas TPU flash kernel, run by Pallas' interpreter on the CPU: in `shard_map`
    over a data 4 x fsdp 2 mesh (the trainer's context mesh), and alone; float32 within 1e-5."""
    from jax.experimental.pallas import tpu as pltpu

    from jdiff import sharding

    q, k, v = qkv(256, 384, heads=2, d=16, b=batch)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def value_and_grad(implementation):
        def loss(*a):
            return (A.attention(*a, implementation=implementation) * cotangent).sum()

        return jax.value_and_grad(lambda *a: (loss(*a), A.attention(*a, implementation=
                                  implementation)), argnums=(0, 1, 2), has_aux=True)  # fmt: skip

    (_, ref), ref_grads = jax.jit(value_and_grad("xla"))(q, k, v)
    mesh = sharding.make_mesh(data=4, fsdp=2)
    laid = sharding.batch_sharding(mesh) if batch % 8 == 0 else sharding.replicated(mesh)
    in_mesh = jax.jit(sharding.traced_in(mesh, value_and_grad("pallas")), in_shardings=laid)
    # the generic interpreter (True): plain XLA ops, so it runs under shard_map on the CPU
    with pltpu.force_tpu_interpret_mode(True):
        for fn in (jax.jit(value_and_grad("pallas")), in_mesh):
            (_, out), grads = fn(q, k, v)
            np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
            for ours, theirs in zip(grads, ref_grads, strict=True):
                np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-5)
        traced = in_mesh.trace(q, k, v)
    kernels = [e for e in traced.jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
    assert len(kernels) == 3  # the loss's and the output's forward kernels, the backward's
    forward = [tuple(spec) for spec in kernels[0].params["in_specs"]]  # q, k, v
    assert forward == [(("data", "fsdp"),) if batch % 8 == 0 else ()] * 3  # split, or whole


def test_none_is_pallas_for_a_tpu_mesh_where_the_tokens_tile():
    """The platform is the context mesh's: a TPU topology's chips, compiled from the CPU."""
    from jax.sharding import AbstractDevice, AbstractMesh

    tpu = AbstractMesh((2, 2), ("data", "fsdp"),
                       abstract_device=AbstractDevice("TPU v5 lite", 1, "tpu"))  # fmt: skip
    with jax.sharding.use_abstract_mesh(tpu):
        assert A.target_platform() == "tpu"
        assert A.resolve(None, 4096, 4096) == "pallas" and A.resolve(None, 1024, 256) == "pallas"
        assert A.resolve(None, 4096, 77) is None  # a text context's 77 keys: JAX's choice
        assert A.resolve(None, 64, 64) is None
        assert A.resolve(None, 256, 256, 160) is None  # SD 1.x's widest heads: the kernel's no
        assert A.resolve(None, 256, 256, 256) == "pallas" and A.resolve(None, 256, 256, 40)
        assert A.resolve("chunked", 4096, 4096) == "chunked"  # an explicit choice holds
    assert A.resolve("pallas", 4096, 77) == "xla"  # untileable: the plain path
    assert A.resolve("pallas", 256, 256, 160) == "xla"
    assert A.target_platform() == jax.default_backend()


def test_a_kernel_of_another_platform_is_refused_by_name():
    from jdiff import validate

    config = importlib.import_module("configs.default").get_config("tiny")
    config.model.attention_implementation = "pallas"
    validate.check_platform(config, "tpu")  # fits
    with pytest.raises(validate.InputError, match="runs on a TPU only, and this run is on the cpu"):
        validate.check_platform(config, "cpu")
    assert validate.platform_misfit("cudnn", "cpu") == "gpu"
    assert validate.platform_misfit("chunked", "tpu") is None
