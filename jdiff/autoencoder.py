"""Using a trained autoencoder: reconstruction PSNR, the latent scaling factor, and the facts
about it that its workdir keeps for the latent diffusion model trained on top of it.

The scaling factor follows LDM: latents z ~ q(z|x) of training images have some overall
standard deviation s; the diffusion model sees z / s, of unit variance, so that the noise
schedule means the same as in pixel space. Stable Diffusion's 0.18215 is 1/s for its own VAE;
every newly trained autoencoder measures its own and stores it in `autoencoder.json`.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jdiff.images import to_uint8
from jdiff.nn.vae import AutoencoderKL

INFO = "autoencoder.json"


def psnr(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of each image of `x` against `reference`, both
    [N, H, W, C] in [-1, 1] (`x` is clipped to it): 10 log10(peak² / MSE), peak 2."""
    x = np.clip(np.asarray(x, np.float64), -1.0, 1.0)
    mse = np.mean(np.square(x - np.asarray(reference, np.float64)), axis=(1, 2, 3))
    return 10.0 * np.log10(4.0 / np.maximum(mse, 1e-12))


@functools.cache  # one set of jitted functions per model: no re-jit per grid or measurement
def make_codec(model: AutoencoderKL) -> dict[str, Callable]:
    """Jitted `reconstruct(params, x)` (decode of the posterior mean), `encode(params, x, key)`
    (a posterior sample z, unscaled) and `decode(params, z)`."""

    def reconstruct(params, x):
        return model.apply({"params": params}, x)[0]

    def encode(params, x, key):
        return model.apply({"params": params}, x, method="encode").sample(key)

    def decode(params, z):
        return model.apply({"params": params}, z, method="decode")

    return {"reconstruct": jax.jit(reconstruct), "encode": jax.jit(encode),
            "decode": jax.jit(decode)}  # fmt: skip


def in_chunks(fn: Callable, x: np.ndarray, size: int, *args) -> np.ndarray:
    """fn(chunk, *args) over `x` in chunks of `size` rows, the last one padded (one shape, one
    compile), results concatenated and cut back to len(x)."""
    out = []
    for start in range(0, len(x), size):
        chunk = x[start : start + size]
        pad = size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
        out.append(np.asarray(fn(chunk, *args))[: size - pad])
    return np.concatenate(out)


def measure(
    model: AutoencoderKL,
    params: Any,
    *,
    train_images: np.ndarray,
    eval_images: np.ndarray,
    key: jax.Array,
    chunk: int = 128,
    describe: Callable[[np.ndarray], list] | None = None,
) -> dict:
    """The figures an autoencoder is judged and used by: held-out reconstruction PSNR (mean and
    5th percentile over images, posterior mean decoded) and the scaling factor 1/std(z) over
    posterior samples of `train_images`. With `describe` (uint8 images -> one description
    each, e.g. `jdiff.data.shapes.describe`), also the share of reconstructions described as
    their originals are: the ceiling of any latent model's prompt adherence."""
    codec = make_codec(model)
    recon = in_chunks(lambda x: codec["reconstruct"](params, x), eval_images, chunk)
    db = psnr(recon, eval_images)
    keys = iter(jax.random.split(key, -(-len(train_images) // chunk)))
    z = in_chunks(lambda x: codec["encode"](params, x, next(keys)), train_images, chunk)
    std = float(np.std(z.astype(np.float64)))
    agreement = {}
    if describe is not None:
        pairs = zip(describe(to_uint8(recon)), describe(to_uint8(eval_images)), strict=True)
        agreement["described_alike"] = float(np.mean([a == b for a, b in pairs]))
    return agreement | {
        "scaling_factor": 1.0 / std,
        "latent_std": std,
        "latent_mean": float(np.mean(z)),
        "latent_shape": list(z.shape[1:]),
        "psnr_db": float(np.mean(db)),
        "psnr_db_p5": float(np.percentile(db, 5)),
        "num_eval_images": len(eval_images),
        "num_scaling_images": len(train_images),
    }


def save_info(workdir: str | pathlib.Path, info: dict) -> pathlib.Path:
    """Write the facts `load_info` reads (PSNR, scaling factor, latent shape, step) to
    workdir/autoencoder.json; returns its path."""
    path = pathlib.Path(workdir) / INFO
    path.write_text(json.dumps(info, indent=2))
    return path


def load_info(workdir: str | pathlib.Path) -> dict:
    """The facts `train.py` stored about the autoencoder trained in `workdir`."""
    path = pathlib.Path(workdir) / INFO
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: train the autoencoder to the end first "
            f"(python train.py --config configs/vae_shapes.py --workdir {workdir})"
        )
    return json.loads(path.read_text())


def reconstruction_grid(x: np.ndarray, recon: np.ndarray, ncols: int = 8) -> np.ndarray:
    """Rows alternating originals and their reconstructions, `ncols` images a row: [2N, ...]."""
    n = len(x) - len(x) % ncols
    rows = []
    for start in range(0, n, ncols):
        rows += [x[start : start + ncols], recon[start : start + ncols]]
    return np.concatenate(rows) if rows else x[:0]


def load(workdir: str | pathlib.Path) -> tuple[AutoencoderKL, Any, dict]:
    """(model, EMA parameters, autoencoder.json facts) of an autoencoder trained by train.py
    in `workdir`, rebuilt from the workdir alone; parameters on the default device."""
    from jdiff import models, runs

    workdir = pathlib.Path(workdir)
    info = load_info(workdir)
    run = runs.restore(workdir, info["step"], task="autoencoder")
    return models.make_autoencoder(run.config), run.ema_params, info


def check_same_encoder(params: Any, reference: Any, name: str = "the autoencoder") -> None:
    """Raise unless `params` has exactly `reference`'s encoder side (everything but
    post_quant_conv and the decoder): a decoder swapped in for another must read the same
    latents (`configs/vae_shapes_decoder.py`)."""
    from jdiff.training import DECODER_PARAMS

    encoder = lambda p: {k: v for k, v in p.items() if k not in DECODER_PARAMS}  # noqa: E731
    a, b = encoder(params), encoder(reference)
    same = jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    if not same:
        raise ValueError(
            f"{name}'s encoder differs from the one the model was trained on, so its latents "
            "would mean something else: use an autoencoder whose decoder alone was fine-tuned "
            "from that one (autoencoder.trainable='decoder', autoencoder.init_from=its workdir)"
        )


def encode_moments(
    model: AutoencoderKL, params: Any, images: np.ndarray, chunk: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """The posterior's mean and standard deviation [N, h, w, latent_channels] of each image
    (float32, unscaled): what a latent model caches to draw z = mean + std · ε per step."""

    @jax.jit
    def moments(params, x):
        posterior = model.apply({"params": params}, x, method="encode")
        return jax.numpy.stack([posterior.mean, posterior.std], axis=1)

    out = in_chunks(lambda x: moments(params, x), images, chunk)
    return out[:, 0], out[:, 1]
