"""Config translation: diffusers' and transformers' `config.json` <-> jdiff module fields
(U-Net, autoencoder, CLIP text encoder, CLIP), with their classes' defaults for absent fields."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jdiff.nn import UNet
from jdiff.nn.controlnet import SHARED_FIELDS as CONTROLNET_FIELDS
from jdiff.nn.controlnet import ControlNetModel
from jdiff.nn.text_encoder import CLIPTextModel
from jdiff.nn.vae import AutoencoderKL

_UNET_FIELDS = (
    "in_channels", "out_channels", "block_out_channels", "down_block_types", "up_block_types",
    "layers_per_block", "downsample_padding", "norm_num_groups", "norm_eps", "flip_sin_to_cos",
    "freq_shift", "resnet_time_scale_shift",
)  # fmt: skip
_ADDED_FIELDS = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")  # SDXL
_CROSS_FIELDS = ("cross_attention_dim", "transformer_layers_per_block", "use_linear_projection",
                 "upcast_attention")  # fmt: skip
# diffusers options jdiff's U-Net does not have, with the value that means "off"
_UNSUPPORTED = {
    "center_input_sample": False, "time_embedding_type": "positional", "act_fn": "silu",
    "class_embed_type": None, "encoder_hid_dim": None,
    "only_cross_attention": False, "dual_cross_attention": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0,
    "time_embedding_dim": None, "time_cond_proj_dim": None, "attention_type": "default",
    "reverse_transformer_layers_per_block": None, "resnet_skip_time_act": False,
    "timestep_post_act": None, "time_embedding_act_fn": None, "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}  # fmt: skip

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
        kind = config.get("addition_embed_type")
        if kind not in (None, "text_time"):
            raise ValueError(f"{cls} option addition_embed_type={kind!r} is not supported by "
                             "jdiff (only SDXL's 'text_time')")  # fmt: skip
        if kind:
            fields.update({k: config.get(k) for k in _ADDED_FIELDS}, addition_embed_type=kind)
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
    """`jdiff.nn.text_encoder.CLIPTextModel` fields from a transformers `CLIPTextModel` or
    `CLIPTextModelWithProjection` config dict (a `text_encoder/config.json` of a diffusers-format
    Stable Diffusion directory; SDXL's `text_encoder_2` has the projection).

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
    if "CLIPTextModelWithProjection" in architectures:
        fields["projection_dim"] = config.get("projection_dim", 512)
    return fields | {k: config.get(k, v) for k, v in _TEXT_OPTIONAL.items()}


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
        if unet.addition_embed_type:
            config |= {k: getattr(unet, k) for k in ("addition_embed_type", *_ADDED_FIELDS)}
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
    projected = text_encoder.projection_dim is not None
    return {"architectures": ["CLIPTextModelWithProjection" if projected else "CLIPTextModel"],
            "model_type": "clip_text_model", **config,
            "bos_token_id": 0, "pad_token_id": 1, "attention_dropout": 0.0,
            "initializer_factor": 1.0, "initializer_range": 0.02,
            "projection_dim": text_encoder.projection_dim or text_encoder.hidden_size}  # fmt: skip


# a diffusers ControlNetModel's own fields, with its defaults
_CONTROLNET_OWN = {"conditioning_channels": 3,
                   "conditioning_embedding_out_channels": (16, 32, 96, 256),
                   "global_pool_conditions": False}  # fmt: skip


def controlnet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """`ControlNetModel` fields from a diffusers `ControlNetModel` config: its encoder's
    fields read as a `UNet2DConditionModel`'s (the same defaults, the same refusals), plus the
    conditioning image's. A BGR channel order is refused."""
    cls = config.get("_class_name", "ControlNetModel")
    if cls != "ControlNetModel":
        raise ValueError(f"_class_name {cls!r}: expected ControlNetModel")
    order = config.get("controlnet_conditioning_channel_order", "rgb")
    if order != "rgb":
        raise ValueError(f"controlnet_conditioning_channel_order={order!r}: jdiff reads RGB "
                         "control images; convert the images and set 'rgb'")  # fmt: skip
    own = {k: config.get(k, v) for k, v in _CONTROLNET_OWN.items()}
    own["conditioning_embedding_out_channels"] = tuple(own["conditioning_embedding_out_channels"])
    unet_like = {k: v for k, v in config.items() if k not in _CONTROLNET_OWN}
    down = unet_like.get("down_block_types",
                         _UNET_DEFAULTS["UNet2DConditionModel"]["down_block_types"])  # fmt: skip
    unet_like |= {"_class_name": "UNet2DConditionModel",
                  "up_block_types": [d.replace("Down", "Up") for d in reversed(down)]}  # fmt: skip
    fields = unet_config_from_diffusers(unet_like)
    return {k: v for k, v in fields.items() if k in (*CONTROLNET_FIELDS, "in_channels")} | own


def controlnet_config_to_diffusers(controlnet: ControlNetModel) -> dict[str, Any]:
    """The diffusers `config.json` of a jdiff ControlNet (`controlnet_config_from_diffusers`
    reads it back)."""
    config = unet_config_to_diffusers(controlnet, sample_size=32)
    for key in ("up_block_types", "out_channels", "sample_size", "dropout"):
        config.pop(key, None)
    own = {k: _plain(getattr(controlnet, k)) for k in _CONTROLNET_OWN}
    return {**config, "_class_name": "ControlNetModel", **own,
            "controlnet_conditioning_channel_order": "rgb"}  # fmt: skip
