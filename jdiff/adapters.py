"""Low-rank adapters (LoRA, Hu et al. 2021) as pure functions of parameter pytrees.

An adapter changes the kernels of the layers it names by a low-rank product: a linear layer's
kernel W [in, out] becomes

    W' = W + s · (α / r) · down @ up          down [in, r], up [r, out]

and a convolution's [kh, kw, in, out] kernel the same with `down` a [kh, kw, in, r] kernel and
`up` a 1x1 one (LoCon): the composition of the two convolutions, merged. `s` is the user's
scale, α the adapter's `alpha` and r its rank, per layer. Layers are named by their parameter
path in the pipeline's parameter dict, '/'-joined, to the kernel's module:
"unet/down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q",
"text_encoder/text_model/encoder/layers_0/self_attn/q_proj".

    params = adapters.merge(base, [style, detail], [0.8, 0.5])   # one tree, no runtime cost
    images = model.txt2img(params, prompts, key)                  # same shapes: no recompile

`merge` is jitted once per set of adapters and takes the scales as arrays, so a new scale
compiles nothing, and neither does the sampler (the merged tree has the base's shapes). The base
tree is never modified: "unmerging" is using it again, bit for bit. Training keeps the adapter
beside the frozen base (`merge` inside the loss; only `down` and `up` differentiated).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp

# diffusers' `train_text_to_image_lora.py` targets and PEFT's usual text-encoder targets
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@flax.struct.dataclass
class LoRA:
    """A low-rank adapter: for each adapted layer (its path, see the module docstring) `down`
    [..., in, r] and `up` [r, out] (float32), and `alpha` (a float32 scalar array, so that a
    new adapter of the same shapes compiles nothing)."""

    down: dict[str, jax.Array]
    up: dict[str, jax.Array]
    alpha: dict[str, jax.Array]

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(sorted(self.down))

    def rank(self, layer: str) -> int:
        return int(self.down[layer].shape[-1])

    def size(self) -> int:
        """The number of adapter weights (down and up of every layer)."""
        return sum(int(a.size) for a in (*self.down.values(), *self.up.values()))

    def components(self) -> tuple[str, ...]:
        """The pipeline parts it adapts ("unet", "text_encoder", "text_encoder_2")."""
        return tuple(sorted({layer.split("/", 1)[0] for layer in self.down}))


def delta(lora: LoRA, layer: str) -> jax.Array:
    """(α / r) · down @ up for one layer, shaped as its kernel, in float32."""
    down = jnp.asarray(lora.down[layer], jnp.float32)
    up = jnp.asarray(lora.up[layer], jnp.float32)
    return jnp.tensordot(down, up, axes=1) * (lora.alpha[layer] / down.shape[-1])


def kernel(tree: Mapping, layer: str) -> Any:
    """The kernel an adapter layer's path names in a parameter tree (ValueError if none)."""
    node = tree
    for name in layer.split("/"):
        if not isinstance(node, Mapping) or name not in node:
            raise ValueError(f"adapter layer {layer!r}: no such module in these parameters")
        node = node[name]
    if not isinstance(node, Mapping) or "kernel" not in node:
        raise ValueError(f"adapter layer {layer!r} has no kernel in these parameters")
    return node["kernel"]


def _set(tree: Mapping, names: Sequence[str], value: Any) -> dict:
    """A copy of `tree` with tree[names...]["kernel"] = value (only the path's dicts copied)."""
    head, *rest = names
    new = dict(tree)
    new[head] = _set(tree[head], rest, value) if rest else {**tree[head], "kernel": value}
    return new


def check(params: Mapping, lora: LoRA, what: str = "the adapter") -> None:
    """Refuse, naming every one, layers `params` lacks and shapes that do not fit."""
    errors = []
    for layer in lora.layers:
        try:
            weight = kernel(params, layer)
        except ValueError as e:
            errors.append(str(e))
            continue
        down, up = lora.down[layer].shape, lora.up[layer].shape
        want = (*weight.shape[:-1], down[-1]), (down[-1], weight.shape[-1])
        if (tuple(down), tuple(up)) != want:
            errors.append(
                f"{layer}: down {tuple(down)} and up {tuple(up)} do not fit its kernel "
                f"{tuple(weight.shape)} (need {want[0]} and {want[1]})"
            )
    if errors:
        raise ValueError(f"{what} does not fit the model:\n  " + "\n  ".join(errors))


def merge(params: Mapping, adapters: Sequence[LoRA], scales: Sequence[Any]) -> dict:
    """`params` with every adapter's low-rank update added, each times its scale.

    Args:
      params: the pipeline's parameters ({"unet": ..., "text_encoder": ..., ...}).
      adapters: LoRAs whose layers name kernels of `params`.
      scales: one per adapter (floats or scalar arrays; 0 leaves the weights as they are).

    Returns:
      A new tree: the adapted kernels replaced (in their own dtype), everything else shared.
    """
    if len(adapters) != len(scales):
        raise ValueError(f"{len(adapters)} adapters but {len(scales)} scales: give one each")
    updates: dict[str, jax.Array] = {}
    for lora, scale in zip(adapters, scales, strict=True):
        for layer in lora.layers:
            d = delta(lora, layer) * jnp.asarray(scale, jnp.float32)
            updates[layer] = updates[layer] + d if layer in updates else d
    out = dict(params)
    for layer, d in updates.items():
        weight = kernel(params, layer)
        out = _set(out, layer.split("/"), (weight.astype(jnp.float32) + d).astype(weight.dtype))
    return out


merge_jit = jax.jit(merge)


def init(
    key: jax.Array,
    params: Mapping,
    *,
    rank: int,
    alpha: float | None = None,
    components: Mapping[str, Iterable[str]] | None = None,
) -> LoRA:
    """A new adapter for training, as PEFT initialises one: `down` uniform in ±1/sqrt(fan-in)
    (Kaiming-uniform with a = sqrt(5)), `up` zeros, so the adapted model starts as the base.

    Args:
      key: PRNG key.
      params: the pipeline's parameters.
      rank: r.
      alpha: α (default: r, a scale of 1).
      components: {part: module names to adapt}, a name matching a kernel's module (its last
        path entry, e.g. "to_q", "to_out_0") in that part; default {"unet": UNET_TARGETS}.
    """
    if rank < 1:
        raise ValueError(f"rank={rank}: must be at least 1")
    components = {"unet": UNET_TARGETS} if components is None else components
    alpha = float(rank if alpha is None else alpha)
    layers = []
    for part, targets in components.items():
        if part not in params:
            raise ValueError(f"LoRA on {part!r}: the parameters have no such part "
                             f"({sorted(params)})")  # fmt: skip
        targets, found = set(targets), set()
        for path, _ in jax.tree_util.tree_flatten_with_path(params[part])[0]:
            names = tuple(p.key for p in path)
            if names[-1] == "kernel" and names[-2] in targets:
                layers.append("/".join((part, *names[:-1])))
                found.add(names[-2])
        if missing := sorted(targets - found):
            raise ValueError(f"LoRA targets {missing} match no layer of {part!r}")
    down, up = {}, {}
    for layer, k in zip(layers, jax.random.split(key, len(layers)), strict=True):
        weight = kernel(params, layer)
        fan_in = math.prod(weight.shape[:-1])
        bound = 1.0 / math.sqrt(fan_in)
        down[layer] = jax.random.uniform(k, (*weight.shape[:-1], rank), jnp.float32, -bound, bound)
        up[layer] = jnp.zeros((rank, weight.shape[-1]), jnp.float32)
    return LoRA(down, up, {layer: jnp.float32(alpha) for layer in layers})


def as_tree(lora: LoRA) -> dict:
    """The adapter's factors as a nested dict shaped like the parameters it adapts, each layer
    {"down", "up"} ({"unet": {"down_blocks_0": {... "to_q": {"down": A, "up": B}}}}): what a
    LoRA run trains, shards and checkpoints (path keys carry no "/")."""
    tree: dict = {}
    for layer in lora.layers:
        node = tree
        for name in layer.split("/"):
            node = node.setdefault(name, {})
        node.update(down=lora.down[layer], up=lora.up[layer])
    return tree


def from_tree(tree: Mapping, alpha: float | Mapping[str, Any]) -> LoRA:
    """The LoRA of `as_tree`'s factors, with one `alpha` for every layer or one per layer."""
    down, up = {}, {}

    def walk(node, path):
        if "down" in node and "up" in node:
            layer = "/".join(path)
            down[layer], up[layer] = node["down"], node["up"]
            return
        for name, child in node.items():
            walk(child, (*path, name))

    walk(tree, ())
    alphas = {k: jnp.float32(alpha[k] if isinstance(alpha, Mapping) else alpha) for k in down}
    return LoRA(down, up, alphas)
