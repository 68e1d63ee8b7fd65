"""Reading and writing weight files: safetensors (sharded too), pickle only when allowed.

Nothing here executes code from a weights file: safetensors only, unless the caller allows
pickle-based files explicitly (then read with torch's `weights_only` loader).
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
_WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")


def read_weights(path: str | pathlib.Path, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """A state dict from a safetensors file (or a sharded one's `.index.json`), as numpy arrays
    in the file's dtype (bfloat16 included).

    A damaged safetensors file is a ValueError naming it. Pickle-based files (`.ckpt`, `.bin`,
    `.pt`, `.pth`) can run code when unpickled: refused unless `allow_pickle`, and then read
    with `torch.load(weights_only=True)` (which refuses code objects) and converted to float32.
    """
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    if re.search(r"\.safetensors\.index(\.\w+)?\.json$", path.name):  # a variant's: .fp16
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        out = {}
        for shard in shards:
            out |= read_weights(path.parent / shard, allow_pickle=allow_pickle)
        return out
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as e:  # SafetensorError: a random, truncated or foreign file
            if type(e).__name__ != "SafetensorError":
                raise
            raise ValueError(f"{path} is not a readable .safetensors file ({e}); download or "
                             "copy it again") from None  # fmt: skip
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


def component_weights(folder: pathlib.Path, allow_pickle: bool) -> pathlib.Path:
    """The weights file of a component folder (unet/, vae/, text_encoder/): full-precision
    safetensors first, then sharded, then a variant (fp16), then pickle."""
    for stem in _WEIGHT_STEMS:
        for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json"):
            if (folder / name).exists():
                return folder / name
    # a variant (fp16): sharded (its index, `....safetensors.index.fp16.json`) or one file
    variants = sorted(folder.glob("*.safetensors.index*.json")) + sorted(
        p for p in folder.glob("*.safetensors") if not re.search(r"-\d+-of-\d+\.", p.name)
    )
    if variants:
        return variants[0]
    pickles = [p for p in sorted(folder.iterdir()) if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        return pickles[0]  # read_weights refuses it unless allowed
    raise FileNotFoundError(f"{folder} holds no weights file (diffusion_pytorch_model."
                            f"safetensors or model.safetensors); it has "
                            f"{sorted(p.name for p in folder.iterdir())}")  # fmt: skip


def read_json(path: pathlib.Path) -> dict:
    """A component's JSON config; FileNotFoundError saying the directory is incomplete."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {path.parent.parent} a complete "
                                "diffusers-format directory?")  # fmt: skip
    return json.loads(path.read_text())


def save_safetensors(state: dict[str, np.ndarray], path: pathlib.Path) -> None:
    """Write a state dict as safetensors, tagged with the "pt" format transformers expects."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path, metadata={"format": "pt"})  # transformers wants the format tag
