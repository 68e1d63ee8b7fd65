"""diffusers-format directories (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/) in and out."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from jdiff.interop import configs, files, keys, templates
from jdiff.interop.bundle import Pretrained
from jdiff.interop.controlnets import load_controlnet, save_controlnet
from jdiff.interop.schedulers import scheduler_from_diffusers, scheduler_to_diffusers
from jdiff.nn import UNet
from jdiff.nn.text_encoder import CLIPTextModel
from jdiff.nn.vae import AutoencoderKL
from jdiff.tokenizer import CLIPTokenizer

_KNOWN_COMPONENTS = {"unet", "vae", "text_encoder", "tokenizer", "text_encoder_2",
                     "tokenizer_2", "scheduler", "safety_checker", "feature_extractor",
                     "image_encoder", "controlnet"}  # fmt: skip


_FOLDERS = {
    "unet",
    "vae",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "scheduler",
    "controlnet",
}  # the components jdiff reads, each from its folder


def load_directory(root: pathlib.Path, allow_pickle: bool, dtype: Any) -> Pretrained:
    """A diffusers-format directory as `Pretrained` (see `load_pretrained`)."""
    has_index = (root / "model_index.json").exists()
    index = files.read_json(root / "model_index.json") if has_index else {}
    unknown = [f"{name} ({value[1]})" for name, value in index.items()
               if isinstance(value, list) and value[0] is not None
               and name not in _KNOWN_COMPONENTS]  # fmt: skip
    if unknown:
        raise ValueError(f"{root}: components {unknown} are not supported by jdiff (Stable "
                         "Diffusion 1.x/2.x/XL and DDPM pipelines are)")  # fmt: skip
    listed = [name for name, value in index.items()
              if isinstance(value, list) and value[0] is not None and name in _FOLDERS
              and not (root / name).is_dir()]  # fmt: skip
    if listed:
        raise FileNotFoundError(f"{root}: model_index.json lists {listed} but the directory has "
                                "no such folder")  # fmt: skip
    if not (root / "unet").is_dir():
        raise FileNotFoundError(f"{root} has no unet/ folder: expected a diffusers-format "
                                "directory (model_index.json, unet/, scheduler/, ...)")  # fmt: skip

    def weights(folder):
        return files.read_weights(files.component_weights(root / folder, allow_pickle),
                            allow_pickle=allow_pickle)  # fmt: skip

    def convert(folder, state, shapes, rule=keys.from_diffusers):
        try:
            return rule(state, shapes)
        except ValueError as e:
            raise ValueError(f"{root / folder}: {e}") from None

    unet_config = files.read_json(root / "unet" / "config.json")
    unet = UNet(**configs.unet_config_from_diffusers(unet_config), dtype=dtype)
    params = {"unet": convert("unet", weights("unet"), templates.unet_shapes(unet))}
    size = unet_config.get("sample_size") or 64
    parts = {"sample_size": int(size[0] if isinstance(size, list) else size)}
    if (root / "vae").is_dir():
        vae_config = files.read_json(root / "vae" / "config.json")
        vae = AutoencoderKL(**configs.vae_config_from_diffusers(vae_config))
        params["autoencoder"] = convert("vae", weights("vae"), templates.vae_shapes(vae))
        parts["autoencoder"] = vae
    for suffix in ("", "_2"):  # SDXL: a second text encoder and its tokenizer
        encoder, tokenizer = f"text_encoder{suffix}", f"tokenizer{suffix}"
        if (root / encoder).is_dir():
            text_config = files.read_json(root / encoder / "config.json")
            fields = configs.text_encoder_config_from_transformers(text_config)
            text = CLIPTextModel(**fields, dtype=dtype)
            params[encoder] = convert(encoder, weights(encoder),
                                      templates.text_encoder_shapes(text),
                                      keys.text_encoder_from_transformers)  # fmt: skip
            parts[encoder] = text
        if (root / tokenizer).is_dir():
            parts[tokenizer] = CLIPTokenizer.from_pretrained(root / tokenizer)
        if encoder in parts and tokenizer not in parts:
            raise FileNotFoundError(f"{root} has a {encoder}/ but no {tokenizer}/ folder")
    if unet.addition_embed_type == "text_time" and "text_encoder_2" not in parts:
        raise FileNotFoundError(f"{root}: an SDXL U-Net (addition_embed_type 'text_time') "
                                "needs text_encoder_2/ and tokenizer_2/")  # fmt: skip
    if (root / "controlnet").is_dir():  # a ControlNet pipeline's (one ControlNet)
        parts["controlnet"] = load_controlnet(root / "controlnet", dtype=dtype,
                                              allow_pickle=allow_pickle)  # fmt: skip
    for flag in ("force_zeros_for_empty_prompt", "requires_aesthetics_score"):  # SDXL's
        if flag in index:
            parts[flag] = bool(index[flag])
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    scheduler = scheduler_from_diffusers(files.read_json(scheduler_file))
    return Pretrained(unet, jax.tree.map(jnp.asarray, params), scheduler,
                      pipeline_class=index.get("_class_name", ""), source=str(root),
                      **parts)  # fmt: skip


def save_pretrained(pretrained: Pretrained, directory: str | pathlib.Path) -> pathlib.Path:
    """Write `pretrained` as a diffusers-format directory (safetensors weights, configs,
    tokenizer, scheduler) that diffusers' `from_pretrained` and `load_pretrained` read."""
    root = pathlib.Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    p = pretrained

    def write(folder, config, params, weights_name="diffusion_pytorch_model.safetensors"):
        (root / folder).mkdir(exist_ok=True)
        (root / folder / "config.json").write_text(json.dumps(config, indent=2))
        files.save_safetensors(keys.to_diffusers(params), root / folder / weights_name)

    write("unet", configs.unet_config_to_diffusers(p.unet, p.sample_size), p.params["unet"])
    index = {"unet": ["diffusers", "UNet2DConditionModel" if p.unet.cross_attention_dim
                      else "UNet2DModel"]}  # fmt: skip
    if p.autoencoder is not None:
        write("vae", configs.vae_config_to_diffusers(p.autoencoder, p.image_size),
              p.params["autoencoder"])  # fmt: skip
        index["vae"] = ["diffusers", "AutoencoderKL"]
    for suffix in ("", "_2"):  # SDXL: and the second encoder, with its projection
        encoder, tokenizer = getattr(p, f"text_encoder{suffix}"), getattr(p, f"tokenizer{suffix}")
        if encoder is not None:
            config = configs.text_encoder_config_to_transformers(encoder)
            write(f"text_encoder{suffix}", config, p.params[f"text_encoder{suffix}"],
                  "model.safetensors")  # fmt: skip
            index[f"text_encoder{suffix}"] = ["transformers", config["architectures"][0]]
        if tokenizer is not None:
            tokenizer.save_pretrained(root / f"tokenizer{suffix}")
            index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
    if p.controlnet is not None:
        save_controlnet(p.controlnet, root / "controlnet")
        index["controlnet"] = ["diffusers", "ControlNetModel"]
    scheduler = scheduler_to_diffusers(p.scheduler)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    if p.is_sdxl:
        pipeline = p.pipeline_class or "StableDiffusionXLPipeline"
        index |= {"force_zeros_for_empty_prompt": p.force_zeros_for_empty_prompt,
                  "requires_aesthetics_score": p.requires_aesthetics_score}  # fmt: skip
    elif p.is_latent:
        pipeline = p.pipeline_class or "StableDiffusionPipeline"
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None],
                  "requires_safety_checker": False}  # fmt: skip
    else:
        pipeline = p.pipeline_class or "DDPMPipeline"
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **index},
                                                      indent=2))  # fmt: skip
    return root
