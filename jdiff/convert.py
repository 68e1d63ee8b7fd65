"""diffusers (PyTorch) weights and configs -> jdiff parameters and module fields.

jdiff's submodule names mirror diffusers' parameter tree, so conversion is a rename and a
transpose: `down_blocks.0.resnets.1.conv1.weight` [O, I, kh, kw] is
`down_blocks_0/resnets_1/conv1/kernel` [kh, kw, I, O]; a linear layer's [O, I] weight is a
[I, O] kernel; norms' `weight` is `scale`; an embedding's `weight` is `embedding`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

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


def unet_config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """`UNet` fields from a diffusers `UNet2DModel` / `UNet2DConditionModel` config dict.

    The historic naming is resolved here: in `UNet2DConditionModel`, `attention_head_dim` is the
    number of heads (unless `num_attention_heads` is set); in `UNet2DModel` it is the width of a
    head (None: one head per block).

    Args:
      config: the full config (a `config.json` as diffusers saves it, or `model.config`).

    Raises:
      ValueError: a field is missing, or an option jdiff's U-Net lacks is switched on.
    """
    default = "UNet2DConditionModel" if "cross_attention_dim" in config else "UNet2DModel"
    cls = config.get("_class_name", default)  # `model.config` has no _class_name
    if cls not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ValueError(f"_class_name {cls!r}: expected UNet2DModel or UNet2DConditionModel")
    names = _UNET_FIELDS + (_CROSS_FIELDS if cls == "UNet2DConditionModel" else ())
    missing = [k for k in names if k not in config]
    if missing:
        raise ValueError(f"{cls} config lacks {missing}; pass the full config.json")
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
      ValueError: another class, a missing field, or an option jdiff lacks (SD3's
        `shift_factor`, other activations or block types).
    """
    cls = config.get("_class_name", "AutoencoderKL")
    if cls != "AutoencoderKL":
        raise ValueError(f"_class_name {cls!r}: expected AutoencoderKL")
    missing = [k for k in _VAE_FIELDS if k not in config]
    if missing:
        raise ValueError(f"AutoencoderKL config lacks {missing}; pass the full config.json")
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


def text_encoder_config_from_transformers(config: Mapping[str, Any]) -> dict[str, Any]:
    """`jdiff.nn.text_encoder.CLIPTextModel` fields from a transformers `CLIPTextModel` config
    dict (a `text_encoder/config.json` of a diffusers-format Stable Diffusion directory).

    Raises:
      ValueError: another architecture, a missing field, or an activation jdiff lacks.
    """
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if not set(architectures) & {"CLIPTextModel", "CLIPTextModelWithProjection"}:
        raise ValueError(f"architectures {architectures}: expected CLIPTextModel")
    missing = [k for k in _TEXT_FIELDS if k not in config]
    if missing:
        raise ValueError(f"CLIPTextModel config lacks {missing}; pass the full config.json")
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
