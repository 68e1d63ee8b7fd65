"""The arrays a latent run trains on, computed once and stored in its workdir: the frozen
autoencoder's posterior of every record with the tokenized captions (latents.npz), and an
image-conditioned model's extra input channels (<kind>.npz). Each is keyed by everything it
depends on and computed again when that changes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from jdiff import (
    autoencoder,
    data,
    inpainting,
    pipelines,
    superres,
)


def conditioning_cache(workdir, kind: str, source, cache: dict, vae_model, vae_params,
                       scaling: float, key: str, config: ConfigDict) -> dict:  # fmt: skip
    """The cache with the "extra" input channels of an image-conditioned latent model.

    "upscale": the low-resolution image of every record (box-downsampled to the latent grid).
    "inpaint": `latent.mask_variants` random masks per record (`inpainting.training_masks`,
    seeded) and the mask + masked-image latents they give (`pipelines.inpaint_extra`); the
    cache's rows become (record, mask) pairs, the record's latents and ids repeated. Stored in
    workdir/<kind>.npz, reused while the autoencoder and settings are the same.
    """
    variants = config.latent.get("mask_variants", 4) if kind == "inpaint" else 1
    size = config.data.image_size
    tag = f"{key}|{kind}|{variants}|{config.seed}|{size}"
    path = workdir / f"{kind}.npz"
    if path.exists() and str(np.load(path)["key"]) == tag:
        extra = np.load(path)["extra"]
    else:
        pixels = np.stack([data.preprocess(source[i]["image"], image_size=size)
                           for i in range(len(source))])  # fmt: skip
        if kind == "upscale":
            extra = superres.downsample(pixels, vae_model.downsample_factor)
        else:
            rng = np.random.default_rng(config.seed)
            masks = inpainting.training_masks(rng, len(pixels) * variants, size)
            both = np.concatenate([np.repeat(pixels, variants, 0), masks], axis=-1)
            form = jax.jit(lambda x: pipelines.inpaint_extra(vae_model, vae_params, x[..., :3],
                                                             x[..., 3:], scaling))  # fmt: skip
            extra = autoencoder.in_chunks(form, both, 256)
        if jax.process_index() == 0:
            tmp = workdir / f"{kind}.tmp.npz"
            np.savez(tmp, key=tag, extra=extra)
            tmp.rename(path)
    if variants > 1:
        cache = {k: np.repeat(v, variants, 0) for k, v in cache.items()}
    return cache | {"extra": extra.astype(np.float32)}


def captions(source) -> list[str]:
    """The captions of a source's records, as str."""
    out = []
    for i in range(len(source)):
        value = source[i]["caption"]
        out.append(value.decode("utf-8") if isinstance(value, bytes) else str(value))
    return out


def latent_cache_key(config: ConfigDict, autoencoder_key: str) -> str:
    """What a latent cache depends on: the autoencoder (its workdir and step, or the pretrained
    weights' path), the data set and split, and the image size the records are resized to."""
    d = config.data
    return f"{autoencoder_key}|{d.name}|{d.split}|{d.image_size}"


def latent_cache(workdir, source, vae_model, vae_params, key: str, tok, size: int) -> dict:
    """{"latent_mean", "latent_std", "ids"} of every training record: the frozen autoencoder's
    posterior (encoded once, cached in workdir/latents.npz under `key`, which names what the
    arrays depend on: the autoencoder, the data set and split, the image size) and the
    tokenized captions. A cache under another key, or of other image or caption sizes, is
    never reused: it is encoded again."""
    path = workdir / "latents.npz"
    if path.exists():
        cached = np.load(path)
        same = str(cached["autoencoder"]) == key and cached["ids"].shape[1] == tok.max_length
        if same and len(cached["ids"]) == len(source):
            return {k: cached[k] for k in ("latent_mean", "latent_std", "ids")}
    pixels = np.stack([data.preprocess(source[i]["image"], image_size=size)
                       for i in range(len(source))])  # fmt: skip
    mean, std = autoencoder.encode_moments(vae_model, vae_params, pixels)
    arrays = {"latent_mean": mean, "latent_std": std, "ids": tok(captions(source))}
    if jax.process_index() == 0:
        tmp = workdir / "latents.tmp.npz"
        np.savez(tmp, autoencoder=key, **arrays)
        tmp.rename(path)
    return arrays


def sdxl_text_cache(source, ids, empty_ids, encoders, params, tokenizer_2, image_size: int):
    """SDXL's frozen text inputs of every record, computed once (not stored: the encoders are
    fast beside the autoencoder): its caption's context [N, L, D] and pooled embedding [N, P]
    (`pipelines.text.SDXLTextEncoders`; `ids` and `empty_ids` [L] the first tokenizer's, the
    second's made here),
    its size ids [N, 6] (the record's own height and width, no crop, the training size), and
    the empty prompt's context [L, D] and pooled embedding [P] that caption dropout uses."""
    texts = captions(source)
    pairs = np.stack([ids, np.asarray(tokenizer_2(texts))], axis=1)  # [N, 2, L]

    @jax.jit
    def encode(pair):
        cond = encoders.encode(params, (pair[:, 0], pair[:, 1]))
        return jnp.concatenate([cond.context.reshape(len(pair), -1), cond.text_embeds], axis=1)

    length, width = ids.shape[1], encoders.context_dim
    flat = autoencoder.in_chunks(encode, pairs, 256)
    empty = np.stack([np.asarray(empty_ids)[None], np.asarray(tokenizer_2([""]))], axis=1)
    empty = np.asarray(encode(empty))
    sizes = [np.shape(source[i]["image"])[:2] for i in range(len(source))]
    time_ids = np.array([[h, w, 0, 0, image_size, image_size] for h, w in sizes], np.float32)
    split = length * width
    return ({"context": flat[:, :split].reshape(-1, length, width), "text_embeds": flat[:, split:],
             "time_ids": time_ids},
            empty[0, :split].reshape(length, width), empty[0, split:])  # fmt: skip
