"""What a compiled program costs a chip, read off the program itself: the TPU generations'
published figures (`CHIPS`); FLOPs, HBM traffic and time from XLA's cost analysis
(`program_cost`); the FLOPs of Pallas kernels XLA cannot cost (`kernel_flops`, from the
traced jaxpr); the collectives in compiled HLO text (`collectives`); an array's bytes on one
chip (`shard_bytes`). `jdiff.aot` puts them in its report."""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from jdiff.topologies import Chip

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def program_cost(compiled, chip: Chip, kernels: float = 0.0,
                 counted: float = 0.0) -> tuple[float, float, float, str]:  # fmt: skip
    """(FLOPs, bytes accessed, estimated seconds, how it was estimated) per chip; `kernels`
    are FLOPs the compiler does not see (Pallas kernels without a cost estimate). XLA's GPU
    compiler gives no cost analysis for a GPU it cannot see: then the FLOPs are `counted`
    (jdiff's count of the program, `program_flops`, a chip's share), the traffic unknown (0)
    and the time the FLOPs at the bf16 peak ("peak": a lower bound)."""
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    if not cost:
        return counted, 0.0, counted / (chip.bf16_tflops * 1e12), "peak"
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


def _attention_flops(eqn) -> float:
    """JAX's cuDNN flash attention: 4·B·H·Lq·Lk·D for the forward (q kᵀ and p v), 10 for the
    backward (the scores again, then dV, dP, dQ, dK)."""
    q, k = (v.aval.shape for v in eqn.invars[:2])
    keys = k[2] if "BNTH" in str(eqn.params.get("layout")) else k[1]
    return (4.0 if "fwd" in eqn.primitive.name else 10.0) * math.prod(q) * keys


def program_flops(jaxpr) -> float:
    """The FLOPs of `jaxpr`'s matrix products, convolutions and cuDNN attentions (2 per
    multiply-add; other ops are not counted): a scan's body times its length, the costlier
    branch of a conditional, a while loop's body once (its trip count is unknown)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name, out = eqn.primitive.name, eqn.outvars[0].aval.shape if eqn.outvars else ()
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(out) * math.prod(lhs[i] for i in contracting)
        elif name == "conv_general_dilated":  # each output: a sum over the kernel's window
            rhs, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec
            total += 2.0 * math.prod(out) * math.prod(rhs[i] for i in spec[1:])
        elif name.startswith("dot_product_attention_") and name.endswith("_wrapper"):
            total += _attention_flops(eqn)
        elif name == "scan":
            total += eqn.params["length"] * program_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "cond":
            total += max(program_flops(b.jaxpr) for b in eqn.params["branches"])
        else:
            total += sum(program_flops(sub) for sub in _subjaxprs(eqn))
    return total


def kernel_flops(jaxpr) -> float:
    """The FLOPs of the Pallas kernels in a traced program that carry no cost estimate, per
    device (inside `shard_map` the shapes are a device's share): each kernel's body's matrix
    products (`program_flops`) times its grid. XLA's cost analysis counts a kernel only by the
    estimate it carries (JAX's flash attention gives one for its forward kernel, none for its
    two backward kernels). Like XLA, a kernel inside a loop counts once."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            if eqn.params.get("cost_estimate") is None:
                grid = eqn.params["grid_mapping"].grid
                total += math.prod(grid) * program_flops(eqn.params["jaxpr"])
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
