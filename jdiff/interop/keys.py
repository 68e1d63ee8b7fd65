"""Parameter names: jdiff's parameter tree <-> diffusers / transformers state dicts.

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
_LISTS = (
    "down_blocks",
    "up_blocks",
    "resnets",
    "attentions",
    "downsamplers",
    "upsamplers",
    "transformer_blocks",
    "to_out",
    "net",
    "layers",
    "blocks",
    "controlnet_down_blocks",
)  # fmt: skip  (the last two: a ControlNet's)


def torch_key(path: tuple[str, ...]) -> str:
    """The state-dict key of a jdiff parameter path, e.g. ("mid_block", "attentions_0",
    "to_out_0", "kernel") -> "mid_block.attentions.0.to_out.0.weight"."""
    parts = []
    for name in path[:-1]:
        head, _, index = name.rpartition("_")
        parts.append(f"{head}.{index}" if head in _LISTS and index.isdigit() else name)
    return ".".join([*parts, "bias" if path[-1] == "bias" else "weight"])


def torch_keys(tree: Any) -> list[str]:
    """The state-dict key of every leaf of a parameter tree (or its shapes), in tree order."""
    return [torch_key(tuple(p.key for p in path))
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]  # fmt: skip


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


def text_encoder_from_transformers(state_dict: Mapping[str, Any], template: Any) -> Any:
    """A transformers `CLIPTextModel` state dict -> jdiff parameters shaped like `template`
    (`from_diffusers`' rules). Checkpoints name the weights `text_model.encoder...`, the
    in-memory modules of transformers 5 `encoder...`: both are read. The `position_ids` buffer
    some checkpoints carry is dropped; a `CLIPTextModelWithProjection`'s `text_projection` is
    read where the template has one (SDXL's second encoder), else refused as unused."""
    kept = {}
    for key, value in state_dict.items():
        if not key.endswith("position_ids"):
            top = key.startswith(("text_model.", "text_projection."))
            kept[key if top else f"text_model.{key}"] = value
    return from_diffusers(kept, template)


def clip_from_transformers(state_dict: Mapping[str, Any], template: Any) -> Any:
    """A transformers `CLIPModel` state dict -> jdiff parameters shaped like `template`; its
    bare parameters (`class_embedding`, `logit_scale`) are read as `<name>.weight`, the
    `position_ids` buffers dropped."""
    bare = ("vision_model.embeddings.class_embedding", "logit_scale")
    return from_diffusers({(f"{k}.weight" if k in bare else k): v for k, v in state_dict.items()
                           if not k.endswith("position_ids")}, template)  # fmt: skip


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
