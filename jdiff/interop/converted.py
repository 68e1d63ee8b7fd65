"""jdiff checkpoints of pretrained models: `pretrained.json` (the configs), `tokenizer/` (SDXL:
and `tokenizer_2/`) and the parameters as an orbax checkpoint in `params/`; read back without
torch or the source."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from jdiff.interop import configs, files, templates
from jdiff.interop.bundle import Pretrained
from jdiff.interop.schedulers import scheduler_from_diffusers, scheduler_to_diffusers
from jdiff.nn import UNet
from jdiff.nn.text_encoder import CLIPTextModel
from jdiff.nn.vae import AutoencoderKL
from jdiff.tokenizer import CLIPTokenizer

CONVERTED = "pretrained.json"  # the configs of a converted directory; params/ is orbax


def _configs_of(p: Pretrained) -> dict[str, Any]:
    stored = {"unet": configs.unet_config_to_diffusers(p.unet, p.sample_size),
               "scheduler": scheduler_to_diffusers(p.scheduler),
               "pipeline_class": p.pipeline_class, "source": p.source}  # fmt: skip
    if p.autoencoder is not None:
        stored["vae"] = configs.vae_config_to_diffusers(p.autoencoder, p.image_size)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(p, name) is not None:
            stored[name] = configs.text_encoder_config_to_transformers(getattr(p, name))
    for flag in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
        if getattr(p, flag):
            stored[flag] = True
    return stored


def write_converted(pretrained: Pretrained, directory: str | pathlib.Path) -> pathlib.Path:
    """Write `pretrained` as a jdiff checkpoint: `pretrained.json` (the configs), `tokenizer/`,
    and the parameters as an orbax checkpoint in `params/`. `load_pretrained` reads it back
    without torch or the source files."""
    import orbax.checkpoint as ocp

    root = pathlib.Path(directory).absolute()
    if (root / "params").exists():
        raise FileExistsError(f"{root / 'params'} exists; choose a new directory")
    root.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(pretrained, name) is not None:
            getattr(pretrained, name).save_pretrained(root / name)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(root / "params", pretrained.params)
    (root / CONVERTED).write_text(json.dumps(_configs_of(pretrained), indent=2))
    return root


def load_converted(root: pathlib.Path, dtype: Any) -> Pretrained:
    """The jdiff checkpoint `write_converted` wrote in `root`, U-Net and text encoder computing in
    `dtype`."""
    import orbax.checkpoint as ocp

    stored = files.read_json(root / CONVERTED)
    unet = UNet(**configs.unet_config_from_diffusers(stored["unet"]), dtype=dtype)
    shapes, parts = {"unet": templates.unet_shapes(unet)}, {}
    if "vae" in stored:
        parts["autoencoder"] = AutoencoderKL(**configs.vae_config_from_diffusers(stored["vae"]))
        shapes["autoencoder"] = templates.vae_shapes(parts["autoencoder"])
    for suffix in ("", "_2"):
        if f"text_encoder{suffix}" in stored:
            name = f"text_encoder{suffix}"
            fields = configs.text_encoder_config_from_transformers(stored[name])
            parts[name] = CLIPTextModel(**fields, dtype=dtype)
            shapes[name] = templates.text_encoder_shapes(parts[name])
            parts[f"tokenizer{suffix}"] = CLIPTokenizer.from_pretrained(root / f"tokenizer{suffix}")
    for flag in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):
        if stored.get(flag):
            parts[flag] = True
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(root.absolute() / "params", shapes)
    return Pretrained(unet, params, scheduler_from_diffusers(stored["scheduler"]),
                      sample_size=stored["unet"]["sample_size"],
                      pipeline_class=stored.get("pipeline_class", ""),
                      source=stored.get("source", ""), **parts)  # fmt: skip
