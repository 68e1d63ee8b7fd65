"""What a compiled program costs a chip, read off the program itself: the TPU generations'
published figures (`CHIPS`); FLOPs, HBM traffic and time from XLA's cost analysis
(`program_cost`); the FLOPs of Pallas kernels XLA cannot cost (`kernel_flops`, from the
traced jaxpr); the collectives in compiled HLO text (`collectives`); an array's bytes on one
chip (`shard_bytes`). `jdiff.aot` puts them in its report."""

from __future__ import annotations

import dataclasses
import math
import re

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core


@dataclasses.dataclass(frozen=True)
class Chip:
    """A TPU generation's published figures: HBM per chip, dense bf16 peak, HBM bandwidth."""

    name: str
    hbm_gib: float
    bf16_tflops: float
    hbm_gbps: float


CHIPS = {
    "v4": Chip("TPU v4", 32, 275, 1228),
    "v5e": Chip("TPU v5e", 16, 197, 819),
    "v5p": Chip("TPU v5p", 95, 459, 2765),
    "v6e": Chip("TPU v6e", 32, 918, 1640),
}


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def program_cost(compiled, chip: Chip, kernels: float = 0.0) -> tuple[float, float, float, str]:
    """(FLOPs, bytes accessed, estimated seconds, "compiler" or "roofline") per chip; `kernels`
    are FLOPs the compiler does not see (Pallas kernels without a cost estimate)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0)) + kernels
    traffic = float(cost.get("bytes accessed", 0.0))
    estimate = float(cost.get("optimal_seconds", -1.0))
    if estimate > 0 and kernels:  # the kernels it could not cost, at the chip's peak
        return flops, traffic, estimate + kernels / (chip.bf16_tflops * 1e12), "compiler+kernels"
    if estimate > 0:
        return flops, traffic, estimate, "compiler"
    # no estimate from the compiler (a kernel it cannot cost): the roofline's lower bound
    bound = max(flops / (chip.bf16_tflops * 1e12), traffic / (chip.hbm_gbps * 1e9))
    return flops, traffic, bound, "roofline"


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, tuple | list) else (value,):
            if isinstance(v, jax_core.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jax_core.Jaxpr):
                yield v


def _dot_flops(jaxpr) -> float:
    """2·M·N·K of every matrix product in `jaxpr`: a scan's body times its length, the
    costlier branch of a conditional, a while loop's body once (its trip count is unknown)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
                lhs[i] for i in contracting)  # fmt: skip
        elif name == "scan":
            total += eqn.params["length"] * _dot_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(_dot_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            total += sum(_dot_flops(sub) for sub in _subjaxprs(eqn))
    return total


def kernel_flops(jaxpr) -> float:
    """The FLOPs of the Pallas kernels in a traced program that carry no cost estimate, per
    device (inside `shard_map` the shapes are a device's share): each kernel's body's matrix
    products (`_dot_flops`) times its grid. XLA's cost analysis counts a kernel only by the
    estimate it carries (JAX's flash attention gives one for its forward kernel, none for its
    two backward kernels). Like XLA, a kernel inside a loop counts once."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            if eqn.params.get("cost_estimate") is None:
                grid = eqn.params["grid_mapping"].grid
                total += math.prod(grid) * _dot_flops(eqn.params["jaxpr"])
        else:
            total += sum(kernel_flops(sub) for sub in _subjaxprs(eqn))
    return total


def shard_bytes(leaf, sh) -> int:
    """The bytes of `leaf` (an array or its shape) on one chip under sharding `sh`."""
    shape = sh.shard_shape(leaf.shape)
    return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}  # fmt: skip
_OP = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")


def collectives(hlo: str) -> dict[str, tuple[int, int]]:
    """{op: (count, bytes of the results)} of the collectives in compiled HLO text: an op
    inside a loop counts once; an async op's "-start" counts (its outputs: the second half of
    its tuple), its "-done" not."""
    found: dict[str, list[int]] = {}
    for line in hlo.splitlines():
        match = _OP.search(line)
        if not match:
            continue
        shapes = [(dtype, dims) for dtype, dims in _SHAPE.findall(match.group(1))]
        if match.group(3) and len(shapes) >= 2:
            shapes = shapes[len(shapes) // 2 :]
        size = sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
                   for d, dims in shapes)  # fmt: skip
        entry = found.setdefault(match.group(2), [0, 0])
        entry[0] += 1
        entry[1] += size
    return {op: tuple(found[op]) for op in COLLECTIVES if op in found}
