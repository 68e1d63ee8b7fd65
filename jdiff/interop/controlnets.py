"""ControlNets in and out: diffusers-format directories (`config.json` and
`diffusion_pytorch_model.safetensors`, as `ControlNetModel.save_pretrained` writes them) and
the original single files (`control_model.*`: `input_hint_block`, `zero_convs`,
`middle_block_out`, the encoder in the original U-Net layout), whose shape is the base
U-Net's."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np

from jdiff.interop import configs, files, keys, single_file, templates
from jdiff.nn import UNet
from jdiff.nn.controlnet import ControlNetModel

PREFIX = "control_model."  # the original files' (some converted files drop it)


@dataclasses.dataclass(frozen=True, eq=False)
class ControlNet:
    """A ControlNet and its parameters, what the pipelines take (`controlnet=`)."""

    model: ControlNetModel
    params: Any
    source: str = ""


def original_key(key: str, controlnet: ControlNetModel) -> str:
    """The original layout's name (without `control_model.`) of a diffusers ControlNet key."""
    stages = len(controlnet.conditioning_embedding_out_channels)
    if m := re.fullmatch(r"controlnet_cond_embedding\.conv_in\.(.*)", key):
        return f"input_hint_block.0.{m[1]}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.conv_out\.(.*)", key):
        return f"input_hint_block.{2 * (2 * (stages - 1) + 1)}.{m[1]}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(.*)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.fullmatch(r"controlnet_mid_block\.(.*)", key):
        return f"middle_block_out.0.{m[1]}"
    return single_file.unet_key(key, controlnet)


def _convert(state, controlnet: ControlNetModel, where: str) -> Any:
    try:
        return keys.from_diffusers(state, templates.controlnet_shapes(controlnet))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def load_controlnet(
    path: str | pathlib.Path,
    *,
    unet: UNet | None = None,
    dtype: Any = jnp.float32,
    allow_pickle: bool = False,
) -> ControlNet:
    """A ControlNet from a diffusers-format directory (or its `config.json`'s folder), or from
    an original single file (`.safetensors`; `.pth` with `allow_pickle`), which carries no
    config: its shape is `unet`'s (the base model's U-Net; required then), the conditioning
    embedding's widths read off its tensors.

    Raises:
      FileNotFoundError: a missing path or weights file.
      ValueError: a config jdiff cannot build, or weights that do not fit it (every key named).
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ControlNet {path} does not exist")
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: expected a diffusers "
                                    "ControlNet directory (config.json, "
                                    "diffusion_pytorch_model.safetensors)")  # fmt: skip
        config = files.read_json(path / "config.json")
        model = ControlNetModel(**configs.controlnet_config_from_diffusers(config), dtype=dtype)
        weights = files.component_weights(path, allow_pickle)
        state = files.read_weights(weights, allow_pickle=allow_pickle)
        return ControlNet(model, _convert(state, model, str(path)), str(path))
    if unet is None:
        raise ValueError(
            f"{path} is a single-file ControlNet, which carries no config: "
            "pass the base model's U-Net (unet=pretrained.unet)"
        )
    state = files.read_weights(path, allow_pickle=allow_pickle)
    state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    hint = sorted((int(m[1]), v.shape[0]) for k, v in state.items()
                  if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)))  # fmt: skip
    if not hint:
        raise ValueError(f"{path} is not a ControlNet (no input_hint_block.* tensors)")
    widths = tuple(c for i, c in hint[:-1] if i == 0 or (i // 2) % 2 == 0)
    channels = int(state["input_hint_block.0.weight"].shape[1])
    model = ControlNetModel.from_unet(unet.clone(dtype=dtype), conditioning_channels=channels,
                                      conditioning_embedding_out_channels=widths)  # fmt: skip
    names = keys.torch_keys(templates.controlnet_shapes(model))
    try:
        renamed = {name: state[original_key(name, model)] for name in names}
    except KeyError as e:
        raise ValueError(
            f"{path}: no tensor {e.args[0]} for this base U-Net's ControlNet "
            "(a ControlNet of another model?)"
        ) from None
    return ControlNet(model, _convert(renamed, model, str(path)), str(path))


def save_controlnet(controlnet: ControlNet, directory: str | pathlib.Path) -> pathlib.Path:
    """A diffusers-format ControlNet directory (diffusers' `ControlNetModel.from_pretrained`
    and `load_controlnet` read it)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = configs.controlnet_config_to_diffusers(controlnet.model)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: np.asarray(v) for k, v in keys.to_diffusers(controlnet.params).items()}
    files.save_safetensors(state, directory / "diffusion_pytorch_model.safetensors")
    return directory


def save_single_file(controlnet: ControlNet, path: str | pathlib.Path) -> pathlib.Path:
    """The original single-file layout (`control_model.*` keys) as a `.safetensors` file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = keys.to_diffusers(controlnet.params)
    out = {PREFIX + original_key(k, controlnet.model): np.asarray(v) for k, v in state.items()}
    files.save_safetensors(out, path)
    return path
