"""LoRA files as people share them, in and out.

Read: the diffusers / PEFT format (`pytorch_lora_weights.safetensors` as `save_lora_weights`
writes it: `unet.<module>.lora_A.weight` / `lora_B.weight`, `.default` or not, ranks and alphas
from the file's `lora_adapter_metadata`), diffusers' older `lora.down` / `lora.up` and
attention-processor keys, and the Kohya / A1111 format (`lora_unet_<module>.lora_down.weight`,
`.lora_up.weight`, `.alpha`; the U-Net's modules in diffusers' names, as kohya-ss trains SD 1.x
and 2.x, or in the original layout's, as it trains SDXL; text encoders as `lora_te_`, SDXL's
`lora_te1_` / `lora_te2_`), LoRAs on convolutions (LoCon) included. Every module name is looked
up in a table built from the model's own parameters, so a key jdiff cannot place is named in the
error, never dropped.

Write: the diffusers / PEFT format that `load_lora_weights` reads, with the ranks and alphas in
its metadata.
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jdiff.adapters import LoRA, check, kernel
from jdiff.interop import files, keys, single_file
from jdiff.nn import UNet

METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry
_PARTS = ("unet", "text_encoder", "text_encoder_2")
# (pattern, role): a key's module name and which tensor it is
_ROLES = [
    (r"(.+)\.lora_A(?:\.default(?:_\d+)?)?\.weight", "down"),  # PEFT
    (r"(.+)\.lora_B(?:\.default(?:_\d+)?)?\.weight", "up"),
    (r"(.+)\.lora(?:_linear_layer)?\.down\.weight", "down"),  # diffusers before PEFT
    (r"(.+)\.lora(?:_linear_layer)?\.up\.weight", "up"),
    (r"(.+)\.lora_down\.weight", "down"),  # Kohya
    (r"(.+)\.lora_up\.weight", "up"),
    (r"(.+)\.alpha", "alpha"),
]
# LoRA variants whose maths differs: named, not misread
_UNSUPPORTED = {"lora_magnitude_vector": "DoRA", "dora_scale": "DoRA", "hada_": "LoHa (LyCORIS)",
                "lokr_": "LoKr (LyCORIS)", "lora_mid": "LoCon with a middle (Tucker) factor",
                "lora_B.bias": "LoRA with a bias (lora_bias)", "diff_b": "a bias difference",
                ".diff": "a full weight difference"}  # fmt: skip


def _kohya_prefixes(params: Mapping) -> dict[str, str]:
    """The part each Kohya text-encoder prefix names: SD 1.x / 2.x one encoder (`lora_te_`),
    SDXL two (`lora_te1_`, `lora_te2_`)."""
    out = {"lora_unet_": "unet"}
    if "text_encoder" in params and "text_encoder_2" in params:
        out |= {"lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
    elif "text_encoder" in params:
        out["lora_te_"] = "text_encoder"
    elif "text_encoder_2" in params:  # SDXL's refiner
        out["lora_te2_"] = "text_encoder_2"
    return out


def module_table(unet: UNet, params: Mapping) -> dict[str, str]:
    """Every name a LoRA file may give an adaptable module of this model -> its jdiff layer
    ("unet/down_blocks_0/.../to_q"): diffusers' dotted names with their part as prefix (a bare
    U-Net name too, as diffusers' oldest files have; a text encoder's with and without
    `text_model.`), Kohya's underscored ones, and for the U-Net the original (SGM) layout's
    underscored names."""
    table: dict[str, str] = {}
    kohya = {part: prefix for prefix, part in _kohya_prefixes(params).items()}
    for part in _PARTS:
        if part not in params:
            continue
        for path, leaf in jax.tree_util.tree_flatten_with_path(params[part])[0]:
            names = tuple(p.key for p in path)
            if names[-1] != "kernel" or np.ndim(leaf) not in (2, 4):
                continue
            layer = "/".join((part, *names[:-1]))
            dotted = keys.torch_key(names).removesuffix(".weight")
            # transformers 5's CLIPTextModel names its modules without `text_model.`
            for name in {dotted, dotted.removeprefix("text_model.")}:
                table[f"{part}.{name}"] = layer
                table[kohya[part] + name.replace(".", "_")] = layer
            if part == "unet":
                table[dotted] = layer
                try:
                    original = single_file.unet_key(f"{dotted}.weight", unet)
                except ValueError:  # self-attention blocks: no original layout
                    continue
                table["lora_unet_" + original.removesuffix(".weight").replace(".", "_")] = layer
    return table


def _module_and_role(key: str) -> tuple[str, str] | None:
    # diffusers' attention-processor LoRAs: attn1.processor.to_q_lora.down.weight
    key = re.sub(r"\.processor\.(to_[qkv]|to_out)_lora\.",
                 lambda m: f".{m[1]}{'.0' if m[1] == 'to_out' else ''}.lora.", key)  # fmt: skip
    for pattern, role in _ROLES:
        if m := re.fullmatch(pattern, key):
            return m[1], role
    return None


def _metadata(path: pathlib.Path) -> dict:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(path, "np") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _peft_alpha(metadata: Mapping, module: str, rank: int) -> float | None:
    """The alpha PEFT would use for `module` ("unet.down_blocks.0...to_q") from a file's
    metadata (its `lora_alpha`, `alpha_pattern`, `use_rslora`); None without metadata."""
    part, _, name = module.partition(".")
    config = {k.removeprefix(f"{part}."): v for k, v in metadata.items()
              if k.startswith(f"{part}.")}  # fmt: skip
    if "lora_alpha" not in config:
        return None
    alpha = float(config["lora_alpha"])
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", name):
            alpha = float(value)
            break
    # rsLoRA scales by alpha / sqrt(r): the same as an alpha of alpha * sqrt(r) over r
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def _factors(down: Any, up: Any, kernel: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Torch-layout factors, down [r, in(, kh, kw)] and up [out, r(, 1, 1)], as jdiff's down
    [(kh, kw,) in, r] and up [r, out] for a kernel of shape `kernel` (jdiff's)."""
    down, up = np.asarray(down, np.float32), np.asarray(up, np.float32)
    r = down.shape[0]
    fits = (
        down.ndim in (2, 4) and up.ndim in (2, 4) and up.shape[2:] in ((), (1, 1))
        and up.shape[:2] == (kernel[-1], r) and math.prod(down.shape[1:]) == math.prod(kernel[:-1])
    )  # fmt: skip
    if not fits:
        torch_kernel = (kernel[-1], *kernel[-2::-1]) if len(kernel) == 4 else kernel[::-1]
        raise ValueError(f"down {down.shape} and up {up.shape} (torch layout) do not fit its "
                         f"kernel {torch_kernel} ([out, in(, kh, kw)])")  # fmt: skip
    down = down.transpose(2, 3, 1, 0) if down.ndim == 4 else down.T
    return down.reshape(*kernel[:-1], r), up.reshape(up.shape[:2]).T


def read_lora(path: str | pathlib.Path, unet: UNet, params: Mapping) -> LoRA:
    """A LoRA file (see the module docstring) for the model whose U-Net is `unet` and whose
    pipeline parameters are `params` ({"unet", "text_encoder"(, "text_encoder_2")}).

    Raises:
      FileNotFoundError: no such file.
      ValueError: naming every key that places nowhere in this model, every module with a
        missing factor, a shape that does not fit, and LoRA variants jdiff does not apply
        (DoRA, LyCORIS LoHa / LoKr).
    """
    path = pathlib.Path(path)
    state = files.read_weights(path)
    metadata = _metadata(path)
    for key in state:
        for marker, name in _UNSUPPORTED.items():
            if marker in key:
                raise ValueError(
                    f"{path}: {key} belongs to {name}, which jdiff does not "
                    "apply; use a plain LoRA (lora_A/lora_B or lora_down/lora_up)"
                )
    table = module_table(unet, params)
    found: dict[str, dict[str, Any]] = collections.defaultdict(dict)
    unplaced = []
    for key, value in state.items():
        parsed = _module_and_role(key)
        if parsed is None or parsed[0] not in table:
            unplaced.append(key)
            continue
        module, role = parsed
        found[table[module]][role] = (module, value)
    errors = [f"{k}: no module of this model by that name" for k in sorted(unplaced)]
    down, up, alpha = {}, {}, {}
    for layer, roles in sorted(found.items()):
        if "down" not in roles or "up" not in roles:
            missing = "up" if "down" in roles else "down"
            errors.append(f"{layer}: the file has no {missing} factor for it")
            continue
        module, value = roles["down"]
        try:
            down[layer], up[layer] = _factors(value, roles["up"][1], kernel(params, layer).shape)
        except ValueError as e:
            errors.append(f"{module}: {e}")
            continue
        rank = down[layer].shape[-1]
        given = roles.get("alpha")
        value = float(np.asarray(given[1])) if given else _peft_alpha(metadata, module, rank)
        alpha[layer] = np.float32(rank if value is None else value)
    if errors:
        shown = errors[:20] + ([f"... and {len(errors) - 20} more"] if len(errors) > 20 else [])
        raise ValueError(f"{path} does not fit this model:\n  " + "\n  ".join(shown))
    if not down:
        raise ValueError(f"{path} holds no LoRA weights")
    lora = LoRA(down, up, alpha)
    check(params, lora, str(path))
    return lora


def _to_torch(value: np.ndarray, role: str) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if role == "down":
        if value.ndim == 4:  # [kh, kw, in, r] -> [r, in, kh, kw]
            return np.ascontiguousarray(value.transpose(3, 2, 0, 1))
        return np.ascontiguousarray(value.T)
    return np.ascontiguousarray(value.T)


def write_lora(lora: LoRA, path: str | pathlib.Path, params: Mapping) -> pathlib.Path:
    """Write `lora` in the diffusers / PEFT format `load_lora_weights` reads
    (`pytorch_lora_weights.safetensors` when `path` is a directory), its ranks and alphas in
    the metadata; `params` are the model's (a 1x1 convolution's factors keep its 4-d shape)."""
    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        path = path / "pytorch_lora_weights.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    state, metadata = {}, {}
    by_part = collections.defaultdict(list)
    for layer in lora.layers:
        part, *names = layer.split("/")
        # a text encoder's modules as transformers 5 names them, without `text_model.` (a
        # PEFT target name matches any module path it ends, transformers 4's too)
        module = keys.torch_key((*names, "kernel")).removesuffix(".weight")
        module = module.removeprefix("text_model.")
        down = _to_torch(lora.down[layer], "down")
        up = _to_torch(lora.up[layer], "up")
        if np.ndim(kernel(params, layer)) == 4:
            up = up[:, :, None, None]
        state[f"{part}.{module}.lora_A.weight"] = down
        state[f"{part}.{module}.lora_B.weight"] = up
        by_part[part].append((module, lora.rank(layer), float(lora.alpha[layer])))
    for part, modules in by_part.items():
        r = collections.Counter(m[1] for m in modules).most_common(1)[0][0]
        a = collections.Counter(m[2] for m in modules).most_common(1)[0][0]
        metadata |= {
            f"{part}.r": r, f"{part}.lora_alpha": a,
            f"{part}.target_modules": sorted(m[0] for m in modules),
            f"{part}.rank_pattern": {re.escape(m): k for m, k, _ in modules if k != r},
            f"{part}.alpha_pattern": {re.escape(m): v for m, _, v in modules if v != a},
        }  # fmt: skip
    from safetensors.numpy import save_file

    save_file(
        state,
        str(path),
        metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)},
    )
    return path
