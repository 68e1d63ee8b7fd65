"""`load_pretrained`: one entry for every source of weights (diffusers directory, original
single file, jdiff checkpoint), with the user's overrides."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax.numpy as jnp

from jdiff.interop import converted, diffusers_dir, single_file
from jdiff.interop.bundle import Pretrained


def load_pretrained(
    path: str | pathlib.Path,
    *,
    prediction_type: str | None = None,
    image_size: int | None = None,
    allow_pickle: bool = False,
    dtype: Any = jnp.float32,
) -> Pretrained:
    """Load Stable Diffusion or DDPM weights from a diffusers-format directory, an original
    single-file checkpoint (`.safetensors`) or a directory `python -m jdiff.interop` wrote.

    Args:
      path: the directory (with `model_index.json`, or a `UNet2DModel`'s `unet/` and
        `scheduler/`), or the single file.
      prediction_type: overrides the scheduler's ("epsilon", "v_prediction"); a single file
        cannot tell (default: SD 1.x epsilon, SD 2.x v_prediction).
      image_size: overrides the default image size in pixels (single files: SD 1.x 512,
        SD 2.x 768).
      allow_pickle: read pickle-based weights (`.ckpt`, `.bin`) with torch's `weights_only`
        loader; refused otherwise.
      dtype: the U-Net's and text encoder's compute dtype (parameters stay float32; the
        autoencoder computes in float32, where reduced-precision decodes overflow: `clone` it
        to change that).

    Raises:
      FileNotFoundError: a missing file, named.
      ValueError: unsupported components or options, and weights that do not match their
        config (every missing or unexpected key, every shape mismatch, named).
    """

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        loaded = single_file.load(path, allow_pickle=allow_pickle, dtype=dtype,
                                  prediction_type=prediction_type)  # fmt: skip
    elif (path / converted.CONVERTED).exists():
        loaded = converted.load_converted(path, dtype)
    else:
        loaded = diffusers_dir.load_directory(path, allow_pickle, dtype)
    changes = {}
    if prediction_type is not None:
        options = loaded.scheduler.options | {"prediction_type": prediction_type}
        config = loaded.scheduler.config | {"prediction_type": prediction_type}
        changes["scheduler"] = dataclasses.replace(loaded.scheduler, options=options,
                                                   config=config)  # fmt: skip
    if image_size is not None:
        factor = loaded.image_size // loaded.sample_size
        multiple = factor * 2 ** (len(loaded.unet.block_out_channels) - 1)
        if image_size <= 0 or image_size % multiple:
            raise ValueError(f"image_size={image_size} must be a positive multiple of {multiple}")
        changes["sample_size"] = image_size // factor
    return dataclasses.replace(loaded, **changes) if changes else loaded
