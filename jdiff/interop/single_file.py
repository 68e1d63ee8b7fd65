"""Original single-file Stable Diffusion checkpoints (the CompVis / Stability layout).

One file holds the U-Net (`model.diffusion_model.`), the autoencoder (`first_stage_model.`) and
the text encoder: SD 1.x's CLIP in transformers' layout (`cond_stage_model.transformer.`),
SD 2.x's OpenCLIP ViT-H (`cond_stage_model.model.`, q/k/v fused in `in_proj`, 24 blocks of which
SD uses the first 23). SDXL's (Stability's `sgm` layout) hold its two encoders as
`conditioner.embedders.0.transformer.` (CLIP ViT-L, transformers' layout) and
`conditioner.embedders.1.model.` (OpenCLIP ViT-bigG, every block, its `text_projection`
stored transposed), the refiner's one as `conditioner.embedders.0.model.`, and the U-Net's
added embedding as `label_emb.0`. `key_map` pairs every diffusers key of the modules with its
place in the file, so the same table reads (`to_diffusers_state`) and writes
(`from_diffusers_state`) the layout. The file holds no configs: `infer_configs` reads the sizes
off the weights' shapes; what shapes cannot tell (heads, v- or ε-prediction, image size, the
ids' embedding width) takes SD 1.x's, SD 2.x's or SDXL's value, which the caller may override.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from jdiff.interop import files, keys, templates
from jdiff.interop.bundle import Pretrained
from jdiff.interop.schedulers import scheduler_from_diffusers
from jdiff.nn import VARIANTS as UNET_VARIANTS
from jdiff.nn import UNet
from jdiff.nn.text_encoder import VARIANTS as TEXT_VARIANTS
from jdiff.nn.text_encoder import CLIPTextModel
from jdiff.nn.unet import UP_BLOCKS
from jdiff.nn.vae import AutoencoderKL
from jdiff.tokenizer import CLIPTokenizer

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP, OPENCLIP = "cond_stage_model.transformer.", "cond_stage_model.model."
EMBEDDERS = "conditioner.embedders."  # SDXL's text encoders: .0 (and .1)

# the schedulers of the SD 1.5 and SD 2.1 diffusers directories
SCHEDULERS = {
    "sd1": {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "clip_sample": False, "prediction_type": "epsilon"},
    "sd2": {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
            "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False,
            "prediction_type": "v_prediction"},
    "sdxl": {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
             "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon",
             "interpolation_type": "linear", "use_karras_sigmas": False},
}  # fmt: skip

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3",
           "conv_shortcut": "skip_connection"}  # fmt: skip
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                  "to_out.0": "proj_out"}  # fmt: skip
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}  # fmt: skip


class Entry(NamedTuple):
    """Where a diffusers key lives in the file: `key`, and how the value differs there:
    "same", "conv1x1" (a [C, C] linear stored as a [C, C, 1, 1] conv) or ("part", i, n) (the
    i-th of n equal slices of a fused tensor along axis 0)."""

    key: str
    how: Any = "same"  # or "T": stored transposed (OpenCLIP's text_projection)


def unet_key(key: str, unet: UNet) -> str:
    """The original (CompVis / SGM) layout's name of a diffusers U-Net key, without the
    `model.diffusion_model.` prefix (`down_blocks.1.attentions.0.proj_in.weight` ->
    `input_blocks.4.1.proj_in.weight` for two layers per block)."""
    L = unet.layers_per_block
    if m := re.fullmatch(r"time_embedding\.linear_([12])\.(.*)", key):
        return f"time_embed.{2 * int(m[1]) - 2}.{m[2]}"
    if m := re.fullmatch(r"class_embedding\.(.*)", key):
        return f"label_emb.{m[1]}"
    if m := re.fullmatch(r"add_embedding\.linear_([12])\.(.*)", key):  # SDXL's
        return f"label_emb.0.{2 * int(m[1]) - 2}.{m[2]}"
    for ours, theirs in (("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"),
                         ("conv_out", "out.2")):  # fmt: skip
        if key.startswith(ours + "."):
            return theirs + key[len(ours) :]

    def resnet(rest):
        name, _, leaf = rest.rpartition(".")
        return f"{_RESNET[name]}.{leaf}"

    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block = 1 + (L + 1) * int(m[1]) + int(m[3])
        inner = f"0.{resnet(m[4])}" if m[2] == "resnets" else f"1.{m[4]}"
        return f"input_blocks.{block}.{inner}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(L + 1) * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block = (L + 1) * int(m[1]) + int(m[3])
        inner = f"0.{resnet(m[4])}" if m[2] == "resnets" else f"1.{m[4]}"
        return f"output_blocks.{block}.{inner}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        slot = 2 if UP_BLOCKS[unet.up_block_types[i]] else 1
        return f"output_blocks.{(L + 1) * i + L}.{slot}.conv.{m[2]}"
    raise ValueError(f"U-Net key {key} has no place in the original layout")


def _vae_key(key: str, levels: int) -> Entry:
    key = key.replace("conv_norm_out", "norm_out")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
        conv = m[3] == "weight" and m[2] != "group_norm"  # q, k, v, proj_out are 1x1 convs
        return Entry(f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}",
                     "conv1x1" if conv else "same")  # fmt: skip
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.*)", key):
        return Entry(f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}")
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        return Entry(
            f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}".replace("conv_shortcut", "nin_shortcut")
        )
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)", key):
        return Entry(f"encoder.down.{m[1]}.downsample.{m[2]}")
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", key):
        level = levels - 1 - int(m[1])  # the original counts decoder levels from the bottom
        return Entry(
            f"decoder.up.{level}.block.{m[2]}.{m[3]}".replace("conv_shortcut", "nin_shortcut")
        )
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)", key):
        return Entry(f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}")
    return Entry(key)  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv


def _openclip_key(key: str) -> Entry:
    rest = key.removeprefix("text_model.")
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight",
             "final_layer_norm.bias": "ln_final.bias"}  # fmt: skip
    if rest in fixed:
        return Entry(fixed[rest])
    if key == "text_projection.weight":  # SDXL's: OpenCLIP multiplies by it on the right
        return Entry("text_projection", "T")
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)", rest)
    if m is None:
        raise ValueError(f"text encoder key {key} has no place in OpenCLIP's layout")
    block = f"transformer.resblocks.{m[1]}"
    if q := re.fullmatch(r"self_attn\.([qkv])_proj", m[2]):
        return Entry(f"{block}.attn.in_proj_{m[3]}", ("part", "qkv".index(q[1]), 3))
    return Entry(f"{block}.{_OPENCLIP_LAYER[m[2]]}.{m[3]}")


def key_map(unet: UNet, vae: AutoencoderKL, text_encoder: CLIPTextModel | None,
            *, openclip: bool, text_encoder_2: CLIPTextModel | None = None,
            ) -> dict[str, dict[str, Entry]]:  # fmt: skip
    """{"unet" | "autoencoder" | "text_encoder" (| "text_encoder_2"): {diffusers key: Entry in
    the file}}. With `text_encoder_2` the layout is SDXL's (`text_encoder` None: the
    refiner's)."""
    if any(k in ("AttnDownBlock2D", "AttnUpBlock2D") for k in
           (*unet.down_block_types, *unet.up_block_types)):  # fmt: skip
        raise ValueError("self-attention U-Net blocks have no single-file layout in jdiff")
    levels = len(vae.block_out_channels)
    maps = {
        "unet": {k: Entry(UNET + unet_key(k, unet)) for k in
                 keys.torch_keys(templates.unet_shapes(unet))},
        "autoencoder": {k: Entry(VAE + e.key, e.how) for k in
                        keys.torch_keys(templates.vae_shapes(vae))
                        for e in [_vae_key(k, levels)]},
    }  # fmt: skip
    if text_encoder_2 is not None:  # SDXL: the embedders, numbered in order
        encoders = [("text_encoder", text_encoder, False), ("text_encoder_2", text_encoder_2, True)]
        encoders = [e for e in encoders if e[1] is not None]
        for i, (name, model, big) in enumerate(encoders):
            text_keys = keys.torch_keys(templates.text_encoder_shapes(model))
            prefix = f"{EMBEDDERS}{i}." + ("model." if big else "transformer.")
            maps[name] = {k: Entry(prefix + e.key, e.how) for k in text_keys
                          for e in [_openclip_key(k) if big else Entry(k)]}  # fmt: skip
        return maps
    text_keys = keys.torch_keys(templates.text_encoder_shapes(text_encoder))
    if openclip:
        maps["text_encoder"] = {k: Entry(OPENCLIP + e.key, e.how) for k in text_keys
                                for e in [_openclip_key(k)]}  # fmt: skip
    else:
        maps["text_encoder"] = {k: Entry(CLIP + k) for k in text_keys}
    return maps


def _read(state: Mapping[str, Any], entry: Entry) -> np.ndarray:
    value = np.asarray(state[entry.key], np.float32)
    if entry.how == "conv1x1":
        return value.reshape(value.shape[:2])
    if entry.how == "T":
        return value.T
    if entry.how != "same":
        _, i, n = entry.how
        return np.split(value, n, axis=0)[i]
    return value


def to_diffusers_state(state: Mapping[str, Any], maps) -> dict[str, dict[str, np.ndarray]]:
    """The file's tensors as one diffusers state dict per module.

    Raises:
      ValueError: naming every key the modules need that the file lacks, and every tensor under
        a module's prefix that is left over (beyond what SD leaves unused: OpenCLIP's last block,
        projection and logit scale, position-id buffers).
    """
    out, used, missing = {}, set(), []
    for module, entries in maps.items():
        out[module] = {}
        for key, entry in entries.items():
            if entry.key not in state:
                missing.append(f"{entry.key} (for {module} {key})")
                continue
            used.add(entry.key)
            out[module][key] = _read(state, entry)
    prefixes = (UNET, VAE, CLIP, OPENCLIP, EMBEDDERS)
    ignorable = re.compile(r".*(position_ids|logit_scale|text_projection|attn_mask)$")
    last = max((int(m[1]) for name in ("text_encoder", "text_encoder_2")
                for e in maps.get(name, {}).values()
                if (m := re.search(r"resblocks\.(\d+)\.", e.key))), default=-1)  # fmt: skip
    left = []
    for k in state:
        if k in used or not k.startswith(prefixes) or ignorable.match(k):
            continue
        if (m := re.search(r"resblocks\.(\d+)\.", k)) and int(m[1]) > last:
            continue  # OpenCLIP's blocks past the penultimate one
        left.append(k)
    if missing or left:
        raise ValueError("checkpoint does not match the model:\n  "
                         + "\n  ".join([*(f"missing {m}" for m in missing),
                                        *(f"unexpected {k}" for k in sorted(left))]))  # fmt: skip
    return out


def from_diffusers_state(states: Mapping[str, Mapping[str, Any]], maps) -> dict[str, np.ndarray]:
    """Diffusers state dicts per module -> one state dict in the original layout."""
    out: dict[str, np.ndarray] = {}
    for module, entries in maps.items():
        for key, entry in entries.items():
            value = np.asarray(states[module][key], np.float32)
            if entry.how == "conv1x1":
                out[entry.key] = value.reshape(*value.shape, 1, 1)
            elif entry.how == "T":  # contiguous: safetensors writes the buffer as it lies
                out[entry.key] = np.ascontiguousarray(value.T)
            elif entry.how != "same":
                _, i, n = entry.how
                parts = out.setdefault(entry.key, [None] * n)
                parts[i] = value
            else:
                out[entry.key] = value
    return {k: np.concatenate(v) if isinstance(v, list) else v for k, v in out.items()}


def _count(state, pattern: str) -> int:
    """1 + the largest index captured by `pattern` among the keys (0 if none match)."""
    found = [int(m[1]) for k in state if (m := re.match(pattern, k))]
    return max(found) + 1 if found else 0


def _heads(width: int, what: str) -> int:
    """The attention heads of a `width`-wide layer in Stable Diffusion's convention (heads 64
    wide); ValueError where the width does not determine them."""
    if width < 64 or width % 64:
        raise ValueError(
            f"the {what} is {width} wide, so its number of attention heads cannot be read off "
            "the file (SD's heads are 64 wide; its widths multiples of 64): load it from a "
            "diffusers-format directory, whose config.json names the heads"
        )
    return width // 64


def _clip_fields(state, shape, t: str) -> dict[str, Any]:
    """A CLIP text encoder's fields (transformers' layout under `t`)."""
    width = shape[f"{t}embeddings.token_embedding.weight"][1]
    return dict(
        TEXT_VARIANTS["clip_vit_l14"],
        vocab_size=shape[f"{t}embeddings.token_embedding.weight"][0],
        hidden_size=width,
        intermediate_size=shape[f"{t}encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=_count(state, rf"{re.escape(t)}encoder\.layers\.(\d+)\."),
        num_attention_heads=_heads(width, "text encoder"),
        max_position_embeddings=shape[f"{t}embeddings.position_embedding.weight"][0],
    )


def _openclip_fields(state, shape, t: str, *, sdxl: bool) -> dict[str, Any]:
    """An OpenCLIP text tower's fields (under `t`): SD 2.x's all but its last block, SDXL's
    every block and its projection."""
    width = shape[f"{t}token_embedding.weight"][1]
    blocks = _count(state, rf"{re.escape(t)}transformer\.resblocks\.(\d+)\.")
    fields = dict(TEXT_VARIANTS["openclip_vit_bigg14" if sdxl else "openclip_vit_h14"],
                  vocab_size=shape[f"{t}token_embedding.weight"][0], hidden_size=width,
                  intermediate_size=shape[f"{t}transformer.resblocks.0.mlp.c_fc.weight"][0],
                  num_hidden_layers=blocks if sdxl else blocks - 1,
                  num_attention_heads=_heads(width, "text encoder"),
                  max_position_embeddings=shape[f"{t}positional_embedding"][0])  # fmt: skip
    if sdxl:
        fields["projection_dim"] = shape[f"{t}text_projection"][1]
    return fields


def infer_configs(state: Mapping[str, Any]) -> dict[str, Any]:
    """The modules' fields (and the version: "sd1", "sd2", "sdxl" or "sdxl_refiner") read off
    the weights' shapes."""
    if not any(k.startswith(UNET) for k in state):
        raise ValueError(f"no U-Net weights ({UNET}*): not a Stable Diffusion checkpoint")
    openclip = any(k.startswith(OPENCLIP) for k in state)
    sdxl = any(k.startswith(EMBEDDERS) for k in state)
    if not openclip and not sdxl and not any(k.startswith(CLIP) for k in state):
        raise ValueError("no text encoder weights (cond_stage_model.*, conditioner.*): jdiff "
                         "reads SD 1.x/2.x/XL checkpoints")  # fmt: skip
    version = "sd2" if openclip else "sd1"
    if sdxl:
        version = (
            "sdxl_refiner" if any(k.startswith(f"{EMBEDDERS}0.model.") for k in state) else "sdxl"
        )
    u = UNET
    shape = {k: tuple(np.shape(v)) for k, v in state.items()}
    levels = 1 + sum(1 for k in state if re.fullmatch(rf"{re.escape(u)}input_blocks\.\d+\.0\.op"
                                                     r"\.weight", k))  # fmt: skip
    inputs = _count(state, rf"{re.escape(u)}input_blocks\.(\d+)\.")
    L = inputs // levels - 1
    channels, down, up, depth = [], [], [], []
    for i in range(levels):
        first = f"{u}input_blocks.{1 + (L + 1) * i}"
        channels.append(shape[f"{first}.0.out_layers.3.weight"][0])
        cross = f"{first}.1.transformer_blocks.0.attn2.to_k.weight" in shape
        if not cross and any(k.startswith(f"{first}.1.") for k in shape):
            raise ValueError("self-attention U-Net blocks are not supported in single files")
        down.append("CrossAttnDownBlock2D" if cross else "DownBlock2D")
        depth.append(_count(state, rf"{re.escape(first)}\.1\.transformer_blocks\.(\d+)\."))
        up_cross = f"{u}output_blocks.{(L + 1) * i}.1.transformer_blocks.0.attn2.to_k.weight"
        up.append("CrossAttnUpBlock2D" if up_cross in shape else "UpBlock2D")
    attn = next(k for k in shape if k.endswith("attn2.to_k.weight") and k.startswith(u))
    proj_in = next(k for k in shape if k.endswith("proj_in.weight") and k.startswith(u))
    heads = 8 if version == "sd1" else tuple(_heads(c, "U-Net") for c in channels)
    # a level without attention: depth 1, but the innermost one's is the middle block's
    middle = _count(state, rf"{re.escape(u)}middle_block\.1\.transformer_blocks\.(\d+)\.")
    depth = [d or (middle if i == levels - 1 else 1) for i, d in enumerate(depth)]
    unet = dict(UNET_VARIANTS["sdxl_base" if sdxl else "sd_v1"],
                in_channels=shape[f"{u}input_blocks.0.0.weight"][1],
                out_channels=shape[f"{u}out.2.weight"][0], block_out_channels=tuple(channels),
                down_block_types=tuple(down), up_block_types=tuple(up), layers_per_block=L,
                num_attention_heads=heads, cross_attention_dim=shape[attn][1],
                transformer_layers_per_block=tuple(depth),
                use_linear_projection=len(shape[proj_in]) == 2,
                upcast_attention=version == "sd2")  # fmt: skip
    if sdxl:  # the added embedding's MLP input: the pooled text, then 6 (refiner: 5) ids
        width = shape[f"{u}label_emb.0.0.weight"][1]
        pooled = next(v[1] for k, v in shape.items() if k.startswith(EMBEDDERS)
                      and k.endswith(".model.text_projection"))  # fmt: skip
        ids = 5 if version == "sdxl_refiner" else 6
        unet.update(
            projection_class_embeddings_input_dim=width,
            addition_time_embed_dim=(width - pooled) // ids,
        )
    if f"{u}middle_block.1.transformer_blocks.0.attn2.to_k.weight" not in shape:
        raise ValueError("the U-Net's middle block has no cross-attention: not SD 1.x/2.x")

    v = VAE
    vae_levels = _count(state, rf"{re.escape(v)}encoder\.down\.(\d+)\.")
    vae = {
        "in_channels": shape[f"{v}encoder.conv_in.weight"][1],
        "out_channels": shape[f"{v}decoder.conv_out.weight"][0],
        "block_out_channels": tuple(shape[f"{v}encoder.down.{i}.block.0.conv2.weight"][0]
                                    for i in range(vae_levels)),
        "layers_per_block": _count(state, rf"{re.escape(v)}encoder\.down\.0\.block\.(\d+)\."),
        "latent_channels": shape[f"{v}post_quant_conv.weight"][0],
        "norm_num_groups": 32,
        "scaling_factor": 0.13025 if sdxl else 0.18215,
    }  # fmt: skip
    if sdxl:
        second = f"{EMBEDDERS}{0 if version == 'sdxl_refiner' else 1}.model."
        text = None
        if version == "sdxl":
            text = _clip_fields(state, shape, f"{EMBEDDERS}0.transformer.text_model.")
        return {"version": version, "unet": unet, "vae": vae, "text_encoder": text,
                "text_encoder_2": _openclip_fields(state, shape, second, sdxl=True)}  # fmt: skip

    if openclip:
        text = _openclip_fields(state, shape, OPENCLIP, sdxl=False)
    else:
        text = _clip_fields(state, shape, CLIP + "text_model.")
    return {"version": version, "unet": unet, "vae": vae, "text_encoder": text}


def load(
    path, *, allow_pickle: bool = False, dtype: Any = None, prediction_type: str | None = None
) -> Pretrained:
    """A single-file checkpoint as `Pretrained` (see `interop.load_pretrained`)."""
    import jax.numpy as jnp

    state = files.read_weights(path, allow_pickle=allow_pickle)
    # pre-transformers-4.31 CLIP checkpoints lack the "text_model." level
    state = {(CLIP + "text_model." + k[len(CLIP):]
              if k.startswith(CLIP) and not k.startswith(CLIP + "text_model.") else k): v
             for k, v in state.items()}  # fmt: skip
    try:
        configs = infer_configs(state)
    except KeyError as e:
        raise ValueError(f"{path}: missing {e.args[0]}: not a complete SD 1.x/2.x "
                         "checkpoint") from None  # fmt: skip
    dtype = dtype or jnp.float32
    version = configs["version"]
    unet = UNet(**configs["unet"], dtype=dtype)
    vae = AutoencoderKL(**configs["vae"])  # float32: see interop.load_pretrained
    texts = {name: CLIPTextModel(**configs[name], dtype=dtype)
             for name in ("text_encoder", "text_encoder_2") if configs.get(name)}  # fmt: skip
    maps = key_map(unet, vae, texts.get("text_encoder"), openclip=version == "sd2",
                   text_encoder_2=texts.get("text_encoder_2"))  # fmt: skip
    try:
        states = to_diffusers_state(state, maps)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    shapes = {"unet": templates.unet_shapes(unet), "autoencoder": templates.vae_shapes(vae),
              **{name: templates.text_encoder_shapes(m) for name, m in texts.items()}}  # fmt: skip
    params = {name: keys.from_diffusers(states[name], shapes[name]) for name in shapes}
    sdxl = version.startswith("sdxl")
    scheduler = dict(SCHEDULERS["sdxl" if sdxl else version])
    if prediction_type is not None:
        scheduler["prediction_type"] = prediction_type
    v_model = scheduler["prediction_type"] == "v_prediction"
    image_size = 1024 if sdxl else 768 if version == "sd2" and v_model else 512
    tokenizers = {}
    for name, text in texts.items():  # SD 2.x's and SDXL's OpenCLIP tokenizer pads with "!"
        pad = version == "sd2" or name == "text_encoder_2"
        tokenizers[name.replace("text_encoder", "tokenizer")] = CLIPTokenizer.default(
            max_length=text.max_position_embeddings, **({"pad_token": "!"} if pad else {})
        )
    inpaint = unet.in_channels == 2 * unet.out_channels + 1
    pipeline = {"sdxl": "StableDiffusionXLPipeline",
                "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline"}.get(version, (
        "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"))  # fmt: skip
    return Pretrained(
        unet, jax.tree.map(jnp.asarray, params), scheduler_from_diffusers(scheduler),
        sample_size=image_size // vae.downsample_factor, autoencoder=vae, source=str(path),
        pipeline_class=pipeline, **texts, **tokenizers,
        force_zeros_for_empty_prompt=version == "sdxl",
        requires_aesthetics_score=version == "sdxl_refiner",
    )  # fmt: skip


def save(pretrained: Pretrained, path) -> Any:
    """Write a latent text-to-image model (SD 1.x, SD 2.x, SDXL base or refiner) as one
    original-layout .safetensors file, which `load` and diffusers' `from_single_file` read.
    SD 2.x's OpenCLIP gets its unused last block as zeros (released files carry one; readers
    skip it)."""
    import pathlib

    from safetensors.numpy import save_file

    p = pretrained
    if p.autoencoder is None or (p.text_encoder is None and p.text_encoder_2 is None):
        raise ValueError(f"{p.source}: only a latent text-to-image model (U-Net, autoencoder, "
                         "text encoder) has a single-file layout")  # fmt: skip
    sd2 = p.text_encoder_2 is None and p.text_encoder.hidden_act == "gelu"
    maps = key_map(p.unet, p.autoencoder, p.text_encoder, openclip=sd2,
                   text_encoder_2=p.text_encoder_2)  # fmt: skip
    states = {name: keys.to_diffusers(p.params[name]) for name in maps}
    state = from_diffusers_state(states, maps)
    if sd2:  # the block SD 2.x leaves unused, as released files carry it
        last = f"{OPENCLIP}transformer.resblocks.{p.text_encoder.num_hidden_layers - 1}."
        extra = f"{OPENCLIP}transformer.resblocks.{p.text_encoder.num_hidden_layers}."
        for k in [k for k in state if k.startswith(last)]:
            state[extra + k[len(last) :]] = np.zeros_like(state[k])
    path = pathlib.Path(path)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
    return path
