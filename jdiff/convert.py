"""Stable Diffusion and DDPM weights: diffusers-format directories and original single-file
checkpoints in, diffusers-format directories out.

jdiff's submodule names mirror diffusers' parameter tree, so conversion is a rename and a
transpose: `down_blocks.0.resnets.1.conv1.weight` [O, I, kh, kw] is
`down_blocks_0/resnets_1/conv1/kernel` [kh, kw, I, O]; a linear layer's [O, I] weight is a
[I, O] kernel; norms' `weight` is `scale`; an embedding's `weight` is `embedding`. The original
(CompVis / Stability) single-file layout is a second rename table on top (`jdiff.single_file`).

    pretrained = convert.load_pretrained("stable-diffusion-v1-5")   # or a .safetensors file
    model = pipelines.LatentDiffusion.from_pretrained(pretrained)
    images = model.txt2img(pretrained.params, ["a photo of a cat"], jax.random.key(0))
    convert.save_pretrained(pretrained, "exported/")                 # diffusers loads it

Nothing here executes code from a weights file: safetensors only, unless the caller allows
pickle-based files explicitly (then read with torch's `weights_only` loader).

CLI: `python -m jdiff.convert SOURCE --workdir DIR` writes an orbax checkpoint that `train.py`
(`config.pretrained`) and `sample.py` read; `python -m jdiff.convert --workdir DIR --export OUT`
writes a diffusers-format directory from one.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import samplers, schedules
from jdiff.nn import UNet
from jdiff.nn.text_encoder import CLIPTextModel
from jdiff.nn.vae import AutoencoderKL
from jdiff.tokenizer import CLIPTokenizer

# diffusers' ModuleLists: `name.N` in a state dict is `name_N` in jdiff
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
          "transformer_blocks", "to_out", "net", "layers")  # fmt: skip

_UNET_FIELDS = (
    "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
    "layers_per_block", "downsample_padding", "norm_num_groups", "norm_eps", "flip_sin_to_cos",
    "freq_shift", "resnet_time_scale_shift",
)  # fmt: skip
_CROSS_FIELDS = ("cross_attention_dim", "transformer_layers_per_block", "use_linear_projection",
                 "upcast_attention")  # fmt: skip
# diffusers options jdiff's U-Net does not have, with the value that means "off"
_UNSUPPORTED = {
    "center_input_sample": False, "time_embedding_type": "positional", "act_fn": "silu",
    "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
    "only_cross_attention": False, "dual_cross_attention": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0,
    "time_embedding_dim": None, "time_cond_proj_dim": None, "attention_type": "default",
    "reverse_transformer_layers_per_block": None, "resnet_skip_time_act": False,
    "timestep_post_act": None, "time_embedding_act_fn": None, "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}  # fmt: skip


def torch_key(path: tuple[str, ...]) -> str:
    """The state-dict key of a jdiff parameter path, e.g. ("mid_block", "attentions_0",
    "to_out_0", "kernel") -> "mid_block.attentions.0.to_out.0.weight"."""
    parts = []
    for name in path[:-1]:
        head, _, index = name.rpartition("_")
        parts.append(f"{head}.{index}" if head in _LISTS and index.isdigit() else name)
    return ".".join([*parts, "bias" if path[-1] == "bias" else "weight"])


def _to_jax(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # conv [O, I, kh, kw] -> [kh, kw, I, O]
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:  # linear [O, I] -> [I, O]
        return value.T
    return value


def from_diffusers(state_dict: Mapping[str, Any], template: Any) -> Any:
    """Convert a diffusers state dict to jdiff parameters shaped like `template`.

    Args:
      state_dict: key -> array (numpy, or anything `np.asarray` accepts; torch tensors via
        `.numpy()`).
      template: the target parameter tree, e.g. `jax.eval_shape(model.init, ...)["params"]`.

    Returns:
      The parameter tree of `template`'s structure, float32 numpy arrays.

    Raises:
      ValueError: naming every missing or unused key and every shape mismatch.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(template)
    used, leaves, errors = set(), [], []
    for path, target in flat:
        names = tuple(p.key for p in path)
        key = torch_key(names)
        if key not in state_dict:
            errors.append(f"missing {key} (for {'/'.join(names)})")
            leaves.append(None)
            continue
        used.add(key)
        value = _to_jax(names[-1], np.asarray(state_dict[key], dtype=np.float32))
        if value.shape != tuple(target.shape):
            errors.append(f"{key}: shape {value.shape} after conversion, expected {target.shape}")
        leaves.append(value)
    errors += [f"unused {k}" for k in sorted(set(state_dict) - used)]
    if errors:
        raise ValueError("state dict does not match the model:\n  " + "\n  ".join(errors))
    return jax.tree_util.tree_unflatten(treedef, leaves)


# the defaults of diffusers' classes for the fields jdiff reads: a config.json written by an
# older diffusers lacks the fields added since (SD 1.5's has no `use_linear_projection`, ...)
_UNET_DEFAULTS = {
    "UNet2DConditionModel": {
        "in_channels": 4, "out_channels": 4, "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, "layers_per_block": 2,
        "downsample_padding": 1, "norm_num_groups": 32, "norm_eps": 1e-5,
        "flip_sin_to_cos": True, "freq_shift": 0, "resnet_time_scale_shift": "default",
        "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
        "use_linear_projection": False, "upcast_attention": False,
    },
    "UNet2DModel": {
        "in_channels": 3, "out_channels": 3, "block_out_channels": (224, 448, 672, 896),
        "down_block_types": ("DownBlock2D",) + ("AttnDownBlock2D",) * 3,
        "up_block_types": ("AttnUpBlock2D",) * 3 + ("UpBlock2D",), "layers_per_block": 2,
        "downsample_padding": 1, "norm_num_groups": 32, "norm_eps": 1e-5,
        "flip_sin_to_cos": True, "freq_shift": 0, "resnet_time_scale_shift": "default",
    },
}  # fmt: skip


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """`UNet` fields from a diffusers `UNet2DModel` / `UNet2DConditionModel` config dict.

    The historic naming is resolved here: in `UNet2DConditionModel`, `attention_head_dim` is the
    number of heads (unless `num_attention_heads` is set); in `UNet2DModel` it is the width of a
    head (None: one head per block).

    Args:
      config: a `config.json` as diffusers saves it, or `model.config`; absent fields take
        the diffusers class's defaults, as diffusers does.

    Raises:
      ValueError: another class, or an option jdiff's U-Net lacks is switched on.
    """
    default = "UNet2DConditionModel" if "cross_attention_dim" in config else "UNet2DModel"
    cls = config.get("_class_name", default)  # `model.config` has no _class_name
    if cls not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ValueError(f"_class_name {cls!r}: expected UNet2DModel or UNet2DConditionModel")
    names = _UNET_FIELDS + (_CROSS_FIELDS if cls == "UNet2DConditionModel" else ())
    config = _UNET_DEFAULTS[cls] | dict(config)  # older config.json files omit defaults
    for key, off in _UNSUPPORTED.items():
        if config.get(key, off) != off:
            raise ValueError(f"{cls} option {key}={config[key]!r} is not supported by jdiff")

    def value(v):
        return tuple(v) if isinstance(v, list | tuple) else v

    fields = {k: value(config[k]) for k in names}
    fields["num_class_embeds"] = config.get("num_class_embeds")
    fields["dropout"] = config.get("dropout", 0.0)
    if cls == "UNet2DModel":
        fields["mid_block_type"] = "UNetMidBlock2D" if config.get("add_attention", True) else None
        groups = config.get("attn_norm_num_groups")
        if (
            fields["mid_block_type"]
            and groups is None
            and fields["resnet_time_scale_shift"] != "default"
        ):
            raise ValueError(
                "this UNet2DModel's mid-block attention has no GroupNorm (diffusers' default with "
                "resnet_time_scale_shift='scale_shift'); jdiff's always normalises: set "
                "attn_norm_num_groups=norm_num_groups"
            )
        if groups not in (None, config["norm_num_groups"]):
            raise ValueError(f"attn_norm_num_groups={groups} must equal norm_num_groups")
        fields["attention_head_dim"] = value(config.get("attention_head_dim", 8))
    else:
        fields["mid_block_type"] = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        fields["num_attention_heads"] = value(heads)
    return fields


_VAE_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
               "latent_channels", "norm_num_groups")  # fmt: skip
_VAE_OPTIONAL = {"scaling_factor": 0.18215, "use_quant_conv": True, "use_post_quant_conv": True,
                 "mid_block_add_attention": True}  # fmt: skip
# diffusers AutoencoderKL options jdiff's autoencoder lacks, with the value that means "off"
_VAE_UNSUPPORTED = {"act_fn": "silu", "shift_factor": None, "latents_mean": None,
                    "latents_std": None}  # fmt: skip


def vae_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """`jdiff.nn.vae.AutoencoderKL` fields from a diffusers `AutoencoderKL` config dict.

    Raises:
      ValueError: another class, or an option jdiff lacks (SD3's
        `shift_factor`, other activations or block types).
    """
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ValueError(f"_class_name {cls!r}: expected AutoencoderKL")
    config = {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (64,),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
    } | dict(config)
    for key, off in _VAE_UNSUPPORTED.items():
        if config.get(key, off) != off:
            raise ValueError(f"AutoencoderKL option {key}={config[key]!r} is not supported")
    n = len(config["block_out_channels"])
    for key, kind in (("down_block_types", "DownEncoderBlock2D"),
                      ("up_block_types", "UpDecoderBlock2D")):  # fmt: skip
        if tuple(config.get(key, (kind,) * n)) != (kind,) * n:
            raise ValueError(f"AutoencoderKL {key}={config[key]!r}: jdiff has only {kind}")
    fields = {k: config[k] for k in _VAE_FIELDS}
    fields["block_out_channels"] = tuple(fields["block_out_channels"])
    fields |= {k: config.get(k, v) if config.get(k) is not None else v
               for k, v in _VAE_OPTIONAL.items()}  # fmt: skip
    return fields


_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings", "hidden_act")  # fmt: skip
_TEXT_OPTIONAL = {"layer_norm_eps": 1e-5, "eos_token_id": 2}


_CLIP_TEXT_DEFAULTS = {  # transformers' CLIPTextConfig defaults
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
}


def text_encoder_config_from_transformers(config: Mapping[str, Any]) -> dict[str, Any]:
    """`jdiff.nn.text_encoder.CLIPTextModel` fields from a transformers `CLIPTextModel` config
    dict (a `text_encoder/config.json` of a diffusers-format Stable Diffusion directory).

    Raises:
      ValueError: another architecture, or an activation jdiff lacks.
    """
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if not set(architectures) & {"CLIPTextModel", "CLIPTextModelWithProjection"}:
        raise ValueError(f"architectures {architectures}: expected CLIPTextModel")
    config = _CLIP_TEXT_DEFAULTS | dict(config)
    if config["hidden_act"] not in ("quick_gelu", "gelu"):
        raise ValueError(f"hidden_act={config['hidden_act']!r} is not supported")
    fields = {k: config[k] for k in _TEXT_FIELDS}
    return fields | {k: config.get(k, v) for k, v in _TEXT_OPTIONAL.items()}


def text_encoder_from_transformers(state_dict: Mapping[str, Any], template: Any) -> Any:
    """A transformers `CLIPTextModel` state dict -> jdiff parameters shaped like `template`
    (`from_diffusers`' rules). Checkpoints name the weights `text_model.encoder...`, the
    in-memory modules of transformers 5 `encoder...`: both are read. The `position_ids` buffer
    some checkpoints carry is dropped; a `CLIPTextModelWithProjection`'s `text_projection` is
    refused as unused."""
    kept = {}
    for key, value in state_dict.items():
        if not key.endswith("position_ids"):
            kept[key if key.startswith("text_model.") else f"text_model.{key}"] = value
    return from_diffusers(kept, template)


_CLIP_TEXT = _CLIP_TEXT_DEFAULTS | {"layer_norm_eps": 1e-5, "eos_token_id": 49407}
_CLIP_VISION = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
                "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}  # fmt: skip


def clip_config_from_transformers(config: Mapping[str, Any]) -> dict[str, Any]:
    """`jdiff.nn.clip.CLIPModel` fields from a transformers `CLIPModel` config.json (its
    defaults for the fields a file leaves out)."""
    if "CLIPModel" not in (config.get("architectures") or ["CLIPModel"]):
        raise ValueError(f"architectures {config.get('architectures')}: expected CLIPModel")
    text = {k: (config.get("text_config") or {}).get(k, v) for k, v in _CLIP_TEXT.items()}
    vision = {k: (config.get("vision_config") or {}).get(k, v) for k, v in _CLIP_VISION.items()}
    for tower in (text, vision):
        if tower["hidden_act"] not in ("quick_gelu", "gelu"):
            raise ValueError(f"hidden_act={tower['hidden_act']!r} is not supported")
    return {"text": text, "vision": vision, "projection_dim": config.get("projection_dim", 512)}


def clip_from_transformers(state_dict: Mapping[str, Any], template: Any) -> Any:
    """A transformers `CLIPModel` state dict -> jdiff parameters shaped like `template`; its
    bare parameters (`class_embedding`, `logit_scale`) are read as `<name>.weight`, the
    `position_ids` buffers dropped."""
    bare = ("vision_model.embeddings.class_embedding", "logit_scale")
    return from_diffusers({(f"{k}.weight" if k in bare else k): v for k, v in state_dict.items()
                           if not k.endswith("position_ids")}, template)  # fmt: skip


# ----------------------------------------------------------------------------- export


def _to_torch(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:  # [kh, kw, I, O] -> [O, I, kh, kw]
        return value.transpose(3, 2, 0, 1)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def to_diffusers(params: Any) -> dict[str, np.ndarray]:
    """jdiff parameters -> a diffusers / transformers state dict of float32 numpy arrays (the
    inverse of `from_diffusers`)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = tuple(p.key for p in path)
        value = _to_torch(names[-1], np.asarray(leaf, np.float32))
        out[torch_key(names)] = np.ascontiguousarray(value)
    return out


def _plain(value):
    return list(value) if isinstance(value, list | tuple) else value


def unet_config_to_diffusers(unet: UNet, sample_size: int) -> dict[str, Any]:
    """The diffusers `config.json` of a jdiff U-Net (`UNet2DConditionModel` when it
    cross-attends, else `UNet2DModel`); `unet_config_from_diffusers` reads it back."""
    heads = unet.heads_per_block()
    config = {k: _plain(getattr(unet, k)) for k in _UNET_FIELDS}
    config |= {"num_class_embeds": unet.num_class_embeds, "dropout": unet.dropout,
               "sample_size": sample_size}  # fmt: skip
    if unet.cross_attention_dim is not None:
        config |= {k: _plain(getattr(unet, k)) for k in _CROSS_FIELDS}
        # diffusers' historic name for the number of heads in this class
        config |= {"attention_head_dim": list(heads), "mid_block_type": unet.mid_block_type}
        return {"_class_name": "UNet2DConditionModel", **config}
    widths = {c // h for c, h in zip(unet.block_out_channels, heads, strict=True)}
    if all(h == 1 for h in heads):
        head_dim = None  # one head per block
    elif len(widths) == 1:
        head_dim = widths.pop()
    else:
        raise ValueError(f"heads {heads} give different head widths per block; a diffusers "
                         "UNet2DModel has one attention_head_dim for all")  # fmt: skip
    if unet.mid_block_type not in (None, "UNetMidBlock2D"):
        raise ValueError(f"mid_block_type {unet.mid_block_type!r} needs cross_attention_dim")
    return {"_class_name": "UNet2DModel", **config, "attention_head_dim": head_dim,
            "add_attention": unet.mid_block_type is not None,
            "attn_norm_num_groups": unet.norm_num_groups}  # fmt: skip


def vae_config_to_diffusers(vae: AutoencoderKL, sample_size: int) -> dict[str, Any]:
    """The diffusers `config.json` of a jdiff autoencoder."""
    n = len(vae.block_out_channels)
    config = {k: _plain(getattr(vae, k)) for k in (*_VAE_FIELDS, *_VAE_OPTIONAL)}
    return {"_class_name": "AutoencoderKL", **config, "act_fn": "silu",
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "sample_size": sample_size}  # fmt: skip


def text_encoder_config_to_transformers(text_encoder: CLIPTextModel) -> dict[str, Any]:
    """The transformers `config.json` of a jdiff CLIP text encoder."""
    config = {k: getattr(text_encoder, k) for k in (*_TEXT_FIELDS, *_TEXT_OPTIONAL)}
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **config,
            "bos_token_id": 0, "pad_token_id": 1, "attention_dropout": 0.0,
            "initializer_factor": 1.0, "initializer_range": 0.02,
            "projection_dim": text_encoder.hidden_size}  # fmt: skip


# ----------------------------------------------------------------------------- schedulers

SCHEDULER_METHODS = {
    "DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "PNDMScheduler": "pndm",
    "DPMSolverMultistepScheduler": "dpmpp_2m", "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral", "HeunDiscreteScheduler": "heun",
}  # fmt: skip
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                   "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}  # fmt: skip
_OPTION_NAMES = sorted({name for opts in samplers.DEFAULTS.values() for name in opts})
# scheduler settings jdiff's samplers lack, with the value (or values) that mean "off"
_SCHEDULER_UNSUPPORTED = {
    "thresholding": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
    "use_flow_sigmas": (False,), "use_lu_lambdas": (False,), "euler_at_final": (False,),
    "timestep_type": ("discrete",), "interpolation_type": ("linear",),
    "algorithm_type": ("dpmsolver++",), "solver_order": (2,), "solver_type": ("midpoint",),
    "sigma_min": (None,), "sigma_max": (None,),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
}  # fmt: skip
_DPM_ONLY = ("algorithm_type", "solver_order", "solver_type")


@dataclasses.dataclass(frozen=True, eq=False)
class SchedulerSettings:
    """A diffusers scheduler config as jdiff sampler settings.

    Attributes:
      method: the sampler of the scheduler's class (`SCHEDULER_METHODS`).
      schedule: `schedules.get_schedule` arguments (or `trained_betas`), and
        `rescale_zero_terminal_snr`.
      options: the sampler options the config sets, named as in diffusers (`prediction_type`,
        `timestep_spacing`, `steps_offset`, `set_alpha_to_one`, ...).
      config: the config itself, written back by `save_pretrained`.
    """

    method: str
    schedule: dict
    options: dict
    config: dict

    def make_schedule(self) -> schedules.Schedule:
        kwargs = dict(self.schedule)
        rescale = kwargs.pop("rescale_zero_terminal_snr", False)
        if "trained_betas" in kwargs:
            schedule = schedules.from_betas(np.asarray(kwargs["trained_betas"], np.float64))
        else:
            schedule = schedules.get_schedule(**kwargs)
        return schedules.rescale_zero_terminal_snr(schedule) if rescale else schedule

    def options_for(self, method: str | None = None) -> dict:
        """The options that apply to `method` (default: the scheduler's own), as diffusers'
        `OtherScheduler.from_config(config)` would take them over."""
        method = method or self.method
        if method not in samplers.DEFAULTS:
            raise ValueError(f"unknown sampler method {method!r}; choose one of {samplers.METHODS}")
        return {k: v for k, v in self.options.items() if k in samplers.DEFAULTS[method]}


def scheduler_from_diffusers(config: Mapping[str, Any]) -> SchedulerSettings:
    """A diffusers `scheduler_config.json` as `SchedulerSettings`.

    A scheduler class jdiff lacks falls back to DDIM on the same noise schedule, and settings
    jdiff's samplers lack are dropped, each with a warning (the user can choose another method).

    Raises:
      ValueError: a beta schedule jdiff cannot build.
    """
    config = dict(config)
    cls = config.get("_class_name", "DDPMScheduler")
    method = SCHEDULER_METHODS.get(cls)
    if method is None:
        warnings.warn(f"scheduler {cls} has no jdiff sampler: using ddim on its noise schedule "
                      f"(choose one of {samplers.METHODS})", stacklevel=2)  # fmt: skip
        method = "ddim"
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        schedule = {"trained_betas": list(config["trained_betas"])}
    else:
        beta = config.get("beta_schedule", "linear")
        if beta not in _BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {beta!r} is not supported; jdiff has "
                             f"{sorted(_BETA_SCHEDULES)}")  # fmt: skip
        schedule = {"name": _BETA_SCHEDULES[beta], "num_timesteps": T}
        if beta != "squaredcos_cap_v2":
            schedule |= {"beta_start": float(config.get("beta_start", 1e-4)),
                         "beta_end": float(config.get("beta_end", 0.02))}  # fmt: skip
    schedule["rescale_zero_terminal_snr"] = bool(config.get("rescale_betas_zero_snr", False))
    ignored = []
    for key, off in _SCHEDULER_UNSUPPORTED.items():
        if (method == "dpmpp_2m" or key not in _DPM_ONLY) and config.get(key, off[0]) not in off:
            warnings.warn(f"{cls} setting {key}={config[key]!r} is not supported by jdiff's "
                          f"{method} sampler; ignored", stacklevel=2)  # fmt: skip
            ignored.append(key)
    options = {k: config[k] for k in _OPTION_NAMES
               if k in config and config[k] is not None and k not in ignored}  # fmt: skip
    if method in ("ddpm", "ddim"):  # diffusers' default is True, jdiff's False
        options.setdefault("clip_sample", True)
    if method != "ddpm" or options.get("variance_type") not in samplers.DDPM_VARIANCES:
        options.pop("variance_type", None)
    return SchedulerSettings(method, schedule, options, config)


def scheduler_to_diffusers(settings: SchedulerSettings) -> dict[str, Any]:
    """The diffusers `scheduler_config.json` of `settings` (its own config when it was read
    from one)."""
    if settings.config:
        return dict(settings.config)
    classes = {v: k for k, v in SCHEDULER_METHODS.items()}
    schedule = dict(settings.schedule)
    rescale = schedule.pop("rescale_zero_terminal_snr", False)
    config = {"_class_name": classes[settings.method], "rescale_betas_zero_snr": rescale}
    if "trained_betas" in schedule:
        config |= {"trained_betas": schedule["trained_betas"],
                   "num_train_timesteps": len(schedule["trained_betas"])}  # fmt: skip
    else:
        names = {v: k for k, v in _BETA_SCHEDULES.items()}
        config |= {"beta_schedule": names[schedule["name"]],
                   "num_train_timesteps": schedule.get("num_timesteps", 1000)}  # fmt: skip
        config |= {k: schedule[k] for k in ("beta_start", "beta_end") if k in schedule}
    return config | samplers.resolve_options(settings.method, settings.options_for())


# ----------------------------------------------------------------------------- files

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def read_weights(path: str | pathlib.Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """A state dict from a safetensors file (or a sharded one's `.index.json`), as numpy arrays
    in the file's dtype (bfloat16 included).

    Pickle-based files (`.ckpt`, `.bin`, `.pt`, `.pth`) can run code when unpickled: refused
    unless `allow_pickle`, and then read with `torch.load(weights_only=True)` (which refuses
    code objects) and converted to float32.
    """
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        out = {}
        for shard in shards:
            out |= read_weights(path.parent / shard, allow_pickle=allow_pickle)
        return out
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise ValueError(
                f"{path} is a pickle-based checkpoint, which can execute code when loaded; "
                "convert it to safetensors, or, if you trust its source, pass allow_pickle=True "
                "(--allow_pickle): it is then read with torch.load(weights_only=True)"
            )
        import torch  # the `torch` extra

        obj = torch.load(path, map_location="cpu", weights_only=True)
        obj = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        return {k: v.float().numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise ValueError(f"{path}: unknown weights format; expected .safetensors")


def _component_weights(folder: pathlib.Path, allow_pickle: bool) -> pathlib.Path:
    """The weights file of a component folder (unet/, vae/, text_encoder/): full-precision
    safetensors first, then sharded, then a variant (fp16), then pickle."""
    for stem in _WEIGHT_STEMS:
        for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json"):
            if (folder / name).exists():
                return folder / name
    variants = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.safetensors.index*"))
    if variants:
        return variants[0]
    pickles = [p for p in sorted(folder.iterdir()) if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        return pickles[0]  # read_weights refuses it unless allowed
    raise FileNotFoundError(f"{folder} holds no weights file (diffusion_pytorch_model."
                            f"safetensors or model.safetensors); it has "
                            f"{sorted(p.name for p in folder.iterdir())}")  # fmt: skip


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {path.parent.parent} a complete "
                                "diffusers-format directory?")  # fmt: skip
    return json.loads(path.read_text())


def _save_safetensors(state: dict[str, np.ndarray], path: pathlib.Path) -> None:
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path, metadata={"format": "pt"})  # transformers wants the format tag


# ----------------------------------------------------------------------------- templates


def _shapes(module, *args, **kwargs):
    """The parameter shapes of `module` (`jax.eval_shape`: nothing allocated)."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]


def unet_shapes(unet: UNet) -> Any:
    f = 2 ** (len(unet.block_out_channels) - 1)
    kwargs = {}
    if unet.cross_attention_dim is not None:
        kwargs["context"] = jnp.zeros((1, 1, unet.cross_attention_dim))
    if unet.num_class_embeds is not None:
        kwargs["class_labels"] = jnp.zeros((1,), jnp.int32)
    return _shapes(unet, jnp.zeros((1, f, f, unet.in_channels)), jnp.zeros((1,)), **kwargs)


def vae_shapes(vae: AutoencoderKL) -> Any:
    f = vae.downsample_factor
    return _shapes(vae, jnp.zeros((1, f, f, vae.in_channels)))


def text_encoder_shapes(text_encoder: CLIPTextModel) -> Any:
    return _shapes(text_encoder, jnp.zeros((1, 1), jnp.int32))


# ----------------------------------------------------------------------------- whole models


@dataclasses.dataclass(frozen=True, eq=False)
class Pretrained:
    """A pretrained model as jdiff modules and parameters: a latent text-to-image model (Stable
    Diffusion: U-Net, autoencoder, text encoder, tokenizer) or a pixel-space U-Net (DDPM).

    `params` is {"unet": ...} plus "autoencoder" and "text_encoder" where present: the layout
    `pipelines.LatentDiffusion` takes. `sample_size` is the U-Net's default height and width
    (in latents for a latent model).
    """

    unet: UNet
    params: dict
    scheduler: SchedulerSettings
    sample_size: int
    text_encoder: CLIPTextModel | None = None
    autoencoder: AutoencoderKL | None = None
    tokenizer: CLIPTokenizer | None = None
    pipeline_class: str = ""
    source: str = ""

    @property
    def is_latent(self) -> bool:
        return self.autoencoder is not None

    @property
    def image_size(self) -> int:
        """The default image height and width in pixels."""
        return self.sample_size * (self.autoencoder.downsample_factor if self.is_latent else 1)


_KNOWN_COMPONENTS = {"unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker",
                     "feature_extractor", "image_encoder"}  # fmt: skip


def load_pretrained(
    path: str | pathlib.Path,
    *,
    prediction_type: str | None = None,
    image_size: int | None = None,
    allow_pickle: bool = False,
    dtype: Any = jnp.float32,
) -> Pretrained:
    """Load Stable Diffusion or DDPM weights from a diffusers-format directory, an original
    single-file checkpoint (`.safetensors`) or a directory `python -m jdiff.convert` wrote.

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
    from jdiff import single_file

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        loaded = single_file.load(path, allow_pickle=allow_pickle, dtype=dtype,
                                  prediction_type=prediction_type)  # fmt: skip
    elif (path / CONVERTED).exists():
        loaded = _load_converted(path, dtype)
    else:
        loaded = _load_directory(path, allow_pickle, dtype)
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


def _load_directory(root: pathlib.Path, allow_pickle: bool, dtype: Any) -> Pretrained:
    index = _read_json(root / "model_index.json") if (root / "model_index.json").exists() else {}
    unknown = [f"{name} ({value[1]})" for name, value in index.items()
               if isinstance(value, list) and value[0] is not None
               and name not in _KNOWN_COMPONENTS]  # fmt: skip
    if unknown:
        raise ValueError(f"{root}: components {unknown} are not supported by jdiff (Stable "
                         "Diffusion 1.x/2.x and DDPM pipelines are)")  # fmt: skip
    if not (root / "unet").is_dir():
        raise FileNotFoundError(f"{root} has no unet/ folder: expected a diffusers-format "
                                "directory (model_index.json, unet/, scheduler/, ...)")  # fmt: skip

    def weights(folder):
        return read_weights(_component_weights(root / folder, allow_pickle),
                            allow_pickle=allow_pickle)  # fmt: skip

    def convert(folder, state, shapes, rule=from_diffusers):
        try:
            return rule(state, shapes)
        except ValueError as e:
            raise ValueError(f"{root / folder}: {e}") from None

    unet_config = _read_json(root / "unet" / "config.json")
    unet = UNet(**unet_config_from_diffusers(unet_config), dtype=dtype)
    params = {"unet": convert("unet", weights("unet"), unet_shapes(unet))}
    size = unet_config.get("sample_size") or 64
    parts = {"sample_size": int(size[0] if isinstance(size, list) else size)}
    if (root / "vae").is_dir():
        vae = AutoencoderKL(**vae_config_from_diffusers(_read_json(root / "vae" / "config.json")))
        params["autoencoder"] = convert("vae", weights("vae"), vae_shapes(vae))
        parts["autoencoder"] = vae
    if (root / "text_encoder").is_dir():
        text_config = _read_json(root / "text_encoder" / "config.json")
        text = CLIPTextModel(**text_encoder_config_from_transformers(text_config), dtype=dtype)
        params["text_encoder"] = convert("text_encoder", weights("text_encoder"),
                                         text_encoder_shapes(text),
                                         text_encoder_from_transformers)  # fmt: skip
        parts["text_encoder"] = text
    if (root / "tokenizer").is_dir():
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(root / "tokenizer")
    if "text_encoder" in parts and "tokenizer" not in parts:
        raise FileNotFoundError(f"{root} has a text_encoder/ but no tokenizer/ folder")
    scheduler_file = root / "scheduler" / "scheduler_config.json"
    scheduler = scheduler_from_diffusers(_read_json(scheduler_file))
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
        _save_safetensors(to_diffusers(params), root / folder / weights_name)

    write("unet", unet_config_to_diffusers(p.unet, p.sample_size), p.params["unet"])
    index = {"unet": ["diffusers", "UNet2DConditionModel" if p.unet.cross_attention_dim
                      else "UNet2DModel"]}  # fmt: skip
    if p.autoencoder is not None:
        write("vae", vae_config_to_diffusers(p.autoencoder, p.image_size),
              p.params["autoencoder"])  # fmt: skip
        index["vae"] = ["diffusers", "AutoencoderKL"]
    if p.text_encoder is not None:
        write("text_encoder", text_encoder_config_to_transformers(p.text_encoder),
              p.params["text_encoder"], "model.safetensors")  # fmt: skip
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
    if p.tokenizer is not None:
        p.tokenizer.save_pretrained(root / "tokenizer")
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    scheduler = scheduler_to_diffusers(p.scheduler)
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    if p.is_latent:
        pipeline = p.pipeline_class or "StableDiffusionPipeline"
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None],
                  "requires_safety_checker": False}  # fmt: skip
    else:
        pipeline = p.pipeline_class or "DDPMPipeline"
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **index},
                                                      indent=2))  # fmt: skip
    return root


# ----------------------------------------------------------------------------- jdiff checkpoints

CONVERTED = "pretrained.json"  # the configs of a converted directory; params/ is orbax


def _configs(p: Pretrained) -> dict[str, Any]:
    configs = {"unet": unet_config_to_diffusers(p.unet, p.sample_size),
               "scheduler": scheduler_to_diffusers(p.scheduler),
               "pipeline_class": p.pipeline_class, "source": p.source}  # fmt: skip
    if p.autoencoder is not None:
        configs["vae"] = vae_config_to_diffusers(p.autoencoder, p.image_size)
    if p.text_encoder is not None:
        configs["text_encoder"] = text_encoder_config_to_transformers(p.text_encoder)
    return configs


def write_converted(pretrained: Pretrained, directory: str | pathlib.Path) -> pathlib.Path:
    """Write `pretrained` as a jdiff checkpoint: `pretrained.json` (the configs), `tokenizer/`,
    and the parameters as an orbax checkpoint in `params/`. `load_pretrained` reads it back
    without torch or the source files."""
    import orbax.checkpoint as ocp

    root = pathlib.Path(directory).absolute()
    if (root / "params").exists():
        raise FileExistsError(f"{root / 'params'} exists; choose a new directory")
    root.mkdir(parents=True, exist_ok=True)
    if pretrained.tokenizer is not None:
        pretrained.tokenizer.save_pretrained(root / "tokenizer")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(root / "params", pretrained.params)
    (root / CONVERTED).write_text(json.dumps(_configs(pretrained), indent=2))
    return root


def _load_converted(root: pathlib.Path, dtype: Any) -> Pretrained:
    import orbax.checkpoint as ocp

    configs = _read_json(root / CONVERTED)
    unet = UNet(**unet_config_from_diffusers(configs["unet"]), dtype=dtype)
    shapes, parts = {"unet": unet_shapes(unet)}, {}
    if "vae" in configs:
        parts["autoencoder"] = AutoencoderKL(**vae_config_from_diffusers(configs["vae"]))
        shapes["autoencoder"] = vae_shapes(parts["autoencoder"])
    if "text_encoder" in configs:
        fields = text_encoder_config_from_transformers(configs["text_encoder"])
        parts["text_encoder"] = CLIPTextModel(**fields, dtype=dtype)
        shapes["text_encoder"] = text_encoder_shapes(parts["text_encoder"])
        parts["tokenizer"] = CLIPTokenizer.from_pretrained(root / "tokenizer")
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(root.absolute() / "params", shapes)
    return Pretrained(unet, params, scheduler_from_diffusers(configs["scheduler"]),
                      sample_size=configs["unet"]["sample_size"],
                      pipeline_class=configs.get("pipeline_class", ""),
                      source=configs.get("source", ""), **parts)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """`python -m jdiff.convert SOURCE --output DIR` (a diffusers directory or single file to a
    jdiff checkpoint, or with `--format diffusers` to a diffusers-format directory)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m jdiff.convert",
        description="Convert Stable Diffusion / DDPM weights: a diffusers-format directory, an "
        "original single-file .safetensors or a jdiff checkpoint in; a jdiff checkpoint (orbax) "
        "or a diffusers-format directory out.",
    )
    parser.add_argument("source", help="diffusers directory, .safetensors file or jdiff checkpoint")
    parser.add_argument("--output", required=True, help="the directory to write (must be new)")
    parser.add_argument(
        "--format",
        choices=("jdiff", "diffusers"),
        default="jdiff",
        help="jdiff: orbax checkpoint + configs; diffusers: diffusers-format",
    )
    parser.add_argument(
        "--prediction_type",
        choices=("epsilon", "v_prediction"),
        default=None,
        help="override (single files cannot tell; SD1 epsilon, SD2 v)",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="override the default image size (single files: SD1 512, SD2 768)",
    )
    parser.add_argument(
        "--allow_pickle",
        action="store_true",
        help="read pickle-based .ckpt/.bin files (only from sources you trust)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    output = pathlib.Path(args.output)
    if output.exists() and any(output.iterdir()):
        sys.exit(f"error: {output} exists and is not empty; choose a new directory")
    try:
        pretrained = load_pretrained(
            args.source,
            prediction_type=args.prediction_type,
            image_size=args.image_size,
            allow_pickle=args.allow_pickle,
        )
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    write = write_converted if args.format == "jdiff" else save_pretrained
    written = write(pretrained, output)
    counts = {name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
              for name, tree in pretrained.params.items()}  # fmt: skip
    print(f"{args.format} checkpoint: {written}")
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    print(f"scheduler: {pretrained.scheduler.method} {pretrained.scheduler.options_for()}")


if __name__ == "__main__":
    main()
