"""The Inception-v3 of FID: the TF-FID network (Heusel et al. 2017) as pytorch-fid ports it.

The 2015-12-05 TensorFlow graph that FID figures in papers come from differs from torchvision's
Inception-v3: its InceptionA/C blocks and the first InceptionE block average-pool without
counting padding, the last InceptionE block max-pools its pool branch, and the classifier has
1008 classes. `FIDInception` is that network up to the 2048-d global average pool ("pool3"),
channels-last, with batch normalisation frozen (eps 1e-3) and parameters named as in
pytorch-fid's checkpoint (`Mixed_5b.branch1x1.conv.weight`, `...bn.running_var`), so
`from_torch_state` loads `pt_inception-2015-12-05-6726825d.pth` directly.

No package ships these weights and nothing is downloaded at run time: obtain the file from
pytorch-fid's releases (`FID_WEIGHTS_URL` in its `inception.py`) and pass its path.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FEATURES = 2048
INPUT_SIZE = 299


class FrozenBatchNorm(nn.Module):
    """Inference-time batch normalisation with the running statistics as parameters."""

    eps: float = 1e-3

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        weight = self.param("weight", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("running_mean", nn.initializers.zeros, (c,))
        var = self.param("running_var", nn.initializers.ones, (c,))
        return (x - mean) * (weight * jax.lax.rsqrt(var + self.eps)) + bias


class BasicConv(nn.Module):
    """Convolution without bias, frozen batch norm, ReLU."""

    features: int
    kernel: tuple[int, int] = (1, 1)
    strides: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        (ph, pw), s = self.padding, self.strides
        x = nn.Conv(self.features, self.kernel, (s, s), padding=((ph, ph), (pw, pw)),
                    use_bias=False, name="conv")(x)  # fmt: skip
        return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool(x):
    """3x3, stride 1, padding 1, padding not counted (TF's and pytorch-fid's)."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
    return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    """Inception-v3's 35x35 block: 1x1, 5x5, double 3x3 and pooled branches."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, name="branch1x1")(x)
        b5 = BasicConv(48, name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Inception-v3's 35 -> 17 grid reduction (strided 3x3 branches and max-pool)."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = BasicConv(64, name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):
    """Inception-v3's 17x17 block: factorised 7x7 branches of `channels_7x7` channels."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c = self.channels_7x7
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of the factorised 7x7
        b1 = BasicConv(192, name="branch1x1")(x)
        b7 = BasicConv(c, name="branch7x7_1")(x)
        b7 = BasicConv(c, row[0], padding=row[1], name="branch7x7_2")(b7)
        b7 = BasicConv(192, col[0], padding=col[1], name="branch7x7_3")(b7)
        bd = BasicConv(c, name="branch7x7dbl_1")(x)
        for i, (k, p) in enumerate((col, row, col, row), start=2):
            bd = BasicConv(192 if i == 5 else c, k, padding=p, name=f"branch7x7dbl_{i}")(bd)
        bp = BasicConv(192, name="branch_pool")(_avg_pool(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Inception-v3's 17 -> 8 grid reduction."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):
    """Inception-v3's 8x8 block: split 1x3 / 3x1 branches (FID's variant pools as TF's graph)."""

    max_pool: bool = False  # the last block of the TF graph max-pools its pool branch

    @nn.compact
    def __call__(self, x):
        def split(y, prefix):  # parallel 1x3 and 3x1 convolutions, concatenated
            a = BasicConv(384, (1, 3), padding=(0, 1), name=f"{prefix}a")(y)
            b = BasicConv(384, (3, 1), padding=(1, 0), name=f"{prefix}b")(y)
            return jnp.concatenate([a, b], axis=-1)

        b1 = BasicConv(320, name="branch1x1")(x)
        b3 = split(BasicConv(384, name="branch3x3_1")(x), "branch3x3_2")
        bd = BasicConv(448, name="branch3x3dbl_1")(x)
        bd = split(BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd),
                   "branch3x3dbl_3")  # fmt: skip
        pooled = _max_pool(x, stride=1, pad=1) if self.max_pool else _avg_pool(x)
        bp = BasicConv(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInception(nn.Module):
    """images [N, H, W, 3] in [-1, 1] (any size: resized bilinearly to 299x299, as pytorch-fid
    does, without antialiasing) -> pool3 features float32 [N, 2048]."""

    @nn.compact
    def __call__(self, images):
        x = jnp.asarray(images, jnp.float32)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"images must be [N, H, W, 3] in [-1, 1]; got shape {x.shape}")
        x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear",
                             antialias=False)  # fmt: skip
        x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = BasicConv(80, name="Conv2d_3b_1x1")(_max_pool(x))
        x = _max_pool(BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x))
        for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = InceptionA(pool, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(c, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE(name="Mixed_7b")(x)
        x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        return x.mean(axis=(1, 2))


def torch_shapes() -> dict[str, tuple[int, ...]]:
    """The state-dict names and shapes (torch layout) the network takes, classifier excluded
    (a fresh dict each call: callers may change it)."""
    return dict(_torch_shapes())


@functools.cache  # a trace of the whole network (a second): once per process
def _torch_shapes() -> dict[str, tuple[int, ...]]:
    shapes = jax.eval_shape(FIDInception().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"]):
        *module, name = (p.key for p in path)
        if name == "kernel":  # HWIO -> OIHW
            h, w, i, o = leaf.shape
            out[".".join([*module, "weight"])] = (o, i, h, w)
        else:
            out[".".join([*module, name])] = tuple(leaf.shape)
    return out


def from_torch_state(state: dict) -> dict:
    """Parameters of `FIDInception` from pytorch-fid's state dict (name -> array); the 1008-way
    classifier (`fc.*`) is dropped. Raises ValueError naming missing, unexpected or mis-shaped
    entries."""
    expected = torch_shapes()
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"not pytorch-fid's FID Inception weights: {len(missing)} missing "
            f"({missing[:3]}...), {len(unexpected)} unexpected ({unexpected[:3]}...)"
        )
    params: dict = {}
    for name, shape in expected.items():
        value = np.asarray(state[name], np.float32)
        if value.shape != shape:
            raise ValueError(f"{name} has shape {value.shape}; expected {shape}")
        *module, leaf = name.split(".")
        if leaf == "weight" and module[-1] == "conv":
            value, leaf = value.transpose(2, 3, 1, 0), "kernel"  # OIHW -> HWIO
        node = params
        for m in module:
            node = node.setdefault(m, {})
        node[leaf] = jnp.asarray(value)
    return params
