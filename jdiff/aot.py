"""Sized before it is rented: a run's train step compiled for a TPU topology that is not
attached, and what it needs of each chip.

    python -m jdiff.aot --config configs/sd_finetune.py --topology v5e:4x4 \
        --config.latent.pretrained=sd_v1 --config.mesh.fsdp=4 --config.data.batch_size=64
    python train.py --config ... --compile_for v5e:4x4        # the same report

`jax.experimental.topologies` describes the topology's chips without them (libtpu, the
`[tpu]` extra); the config's mesh is laid over them, the train state exists only as shapes
(`jax.eval_shape`: no weights are read or made, no data is loaded), and XLA's TPU compiler
builds the step on this CPU. The report, per chip: parameters, EMA and optimizer state as the
shardings split them; the compiled program's arguments, temporaries (activations, gradients)
and code against the chip's HBM; FLOPs and HBM traffic; an estimated step time and MFU; the
collectives in the program. `--program=sample` compiles the sampler instead (the whole
denoising loop, guidance, encoder and decoder: one call for `sample.num_samples` images).
The programs come from `jdiff.programs`: a latent model's networks are sized from
`latent.pretrained` (a diffusers directory's config files, or one of
`programs.ARCHITECTURES`) or, for a new one, from its autoencoder's stored config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from jdiff import programs, sharding, validate
from jdiff.validate import InputError


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
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Report:
    """What the compiled step needs of each chip (bytes) and does per step."""

    topology: str
    program: str  # "train step" or "sampler"
    chip: Chip
    chips: int
    mesh: dict[str, int]
    batch_per_chip: float
    state: dict[str, int]  # {"parameters", "EMA parameters", ...: their per-chip shards}
    memory: dict[str, int]  # arguments / outputs / aliased / temporaries / code
    flops: float
    bytes_accessed: float
    estimate_s: float
    estimated_by: str  # "compiler", "compiler+kernels", "roofline" or "mixed" (a sampler's
    # calls by the compiler, the rest by the roofline)
    collectives: dict[str, tuple[int, int]]  # op -> (count, bytes of results)
    compile_s: float
    loop: dict | None = None  # a sampler's model calls its loop repeats (in the totals above)
    kernel_flops: float = 0.0  # of `flops`, Pallas kernels' that XLA cannot cost (`kernel_flops`)
    effort: float = 0.0  # the compiler's optimisation effort it was built with (`EFFORTS`)

    @property
    def total_bytes(self) -> int:
        """Peak per chip: arguments + outputs - donated (aliased) + temporaries + code."""
        m = self.memory
        return m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] + m["code"]

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.chip.hbm_gib * GIB

    @property
    def mfu(self) -> float:
        """The compiler's FLOPs (recomputation included) over the estimated time at peak."""
        return self.flops / (self.estimate_s * self.chip.bf16_tflops * 1e12)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(total_bytes=self.total_bytes, fits=self.fits, mfu=self.mfu,
                 collectives={k: list(v) for k, v in self.collectives.items()})  # fmt: skip
        return d


def chip_of(topology: str, flag: str = "--topology") -> Chip:
    """The chip of a topology name ("v5e:2x2", "v5p:4x4x4", ...); InputError otherwise."""
    kind, sep, shape = topology.partition(":")
    if kind not in CHIPS or not sep or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
        raise InputError(f"{flag} {topology!r}: expected <chip>:<shape> with a chip "
                         f"of {sorted(CHIPS)}: v5e:2x2, v5e:8x8, v5p:2x2x1, ...")  # fmt: skip
    return CHIPS[kind]


@contextlib.contextmanager
def _captured_output(sink: list[str]):
    """libtpu, loaded off a TPU VM, prints its probes of the missing hardware on the process'
    own stdout and stderr: they are kept in `sink`, not shown."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile("w+") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            f.seek(0)
            sink.append(f.read())


def topology_devices(topology: str, flag: str = "--topology") -> list:
    """The abstract devices of `topology` (no TPU attached needed; libtpu installed is)."""
    chip_of(topology, flag)
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise InputError(f"{flag} {topology}: compiling for a TPU needs libtpu, which is "
                         "not installed: pip install -e '.[tpu]'")  # fmt: skip
    from jax.experimental import topologies

    # libtpu's lockfile keeps a second process off a host's chips; this one uses none, so
    # compiles may run side by side (and on a TPU VM beside its training)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    probes: list[str] = []
    try:
        with _captured_output(probes):
            description = topologies.get_topology_desc(topology_name=topology, platform="tpu")
    except Exception as e:  # libtpu's own errors for a shape it does not have
        first = (str(e).splitlines() or [""])[0][:200]
        raise InputError(f"{flag} {topology}: libtpu has no such topology "
                         f"({type(e).__name__}: {first})") from None  # fmt: skip
    return list(description.devices)


PROGRAMS = ("train", "sample")
# XLA's `exec_time_optimization_effort`, from -1 (least: a quick compile) to 1; 0 is what a
# run compiles with. At -1 an SD-size train step compiles several times sooner on two cores
# and its figures are those of a less optimised program: temporaries and time no smaller
# (measured in benchmarks/RESULTS.md), an upper bound on what the run needs.
EFFORTS = (-1.0, 1.0)


def compile_for(config, topology: str, program: str = "train", flag: str = "--topology", *,
                effort: float = 0.0, announce: bool = False) -> Report:  # fmt: skip
    """Compile the config's train step (`program="train"`) or sampler ("sample") for
    `topology` over the config's mesh at the compiler's `effort` (`EFFORTS`); the report (bad
    input names `flag`, the option that gave the topology)."""
    _cpu_only()
    validate.check_config(config)
    if program not in PROGRAMS:
        raise InputError(f"--program={program!r}; expected one of {PROGRAMS}")
    if not EFFORTS[0] <= effort <= EFFORTS[1]:  # NaN too
        low, high = EFFORTS
        raise InputError(f"--effort={effort}: the compiler's effort is a number from {low:g} "
                         f"(a quick compile) to {high:g}; 0 is a run's")  # fmt: skip
    chip = chip_of(topology, flag)
    devices = topology_devices(topology, flag)
    try:
        mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp, devices=devices)
    except ValueError as e:
        raise InputError(f"config.mesh (data={config.mesh.data}, fsdp={config.mesh.fsdp}) "
                         f"on {topology}'s {len(devices)} chips: {e}") from None  # fmt: skip
    what = "data.batch_size" if program == "train" else "sample.num_samples"
    count = config.data.batch_size if program == "train" else config.sample.num_samples
    if count % mesh.size:
        raise InputError(f"{what}={count} does not split over the mesh's {mesh.size} chips: "
                         f"use a multiple of {mesh.size}")  # fmt: skip
    p = (programs.train_program if program == "train" else programs.sample_program)(config)
    if announce:
        print(f"compiling the {p.name} for {topology} (minutes at SD sizes) ...", flush=True)
    start = time.perf_counter()
    try:
        compiled, in_sh, kernels = _compile(p, mesh, config.mesh.fsdp_min_size, effort)
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler's own verdict: it does not fit
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        need = str(e).split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0]
        raise InputError(f"the {p.name} does NOT fit {topology} ({chip.name}, "
                         f"{chip.hbm_gib:g} GiB HBM per chip): XLA's TPU compiler says: {need} "
                         f"Lower {what} (now {count}) or raise mesh.fsdp") from None  # fmt: skip
    flops, traffic, estimate, by = _cost(compiled, chip, kernels)
    loop = None
    if p.call is not None:  # the loop's body counted once: the model call's cost, apart
        call, _, call_kernels = _compile(p.call, mesh, config.mesh.fsdp_min_size, effort)
        call_flops, call_traffic, call_estimate, call_by = _cost(call, chip, call_kernels)
        kernels += p.uncounted * call_kernels
        loop = {"uncounted_calls": p.uncounted, "call_flops": call_flops,
                "call_bytes_accessed": call_traffic, "call_estimate_s": call_estimate}  # fmt: skip
        flops += p.uncounted * call_flops
        traffic += p.uncounted * call_traffic
        estimate += p.uncounted * call_estimate
        by = by if by == call_by else "mixed"
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()

    def per_chip(tree, shardings) -> int:
        pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
        return sum(_shard_bytes(a, s) for a, s in pairs)

    shares, shard_trees = p.shares(p.args), p.shares(in_sh)
    return Report(
        topology=topology, program=p.name, chip=chip, chips=mesh.size, mesh=dict(mesh.shape),
        batch_per_chip=p.batch_size / mesh.size,
        state={name: per_chip(tree, shard_trees[name]) for name, tree in shares.items()},
        memory={"arguments": memory.argument_size_in_bytes,
                "outputs": memory.output_size_in_bytes, "aliased": memory.alias_size_in_bytes,
                "temporaries": memory.temp_size_in_bytes,
                "code": memory.generated_code_size_in_bytes},
        flops=flops, bytes_accessed=traffic, estimate_s=estimate, estimated_by=by,
        collectives=collectives(compiled.as_text()), compile_s=seconds, loop=loop,
        kernel_flops=kernels, effort=effort,
    )  # fmt: skip


def _compile(p: programs.Abstract, mesh, min_size: int, effort: float = 0.0):
    """(the compiled program, its input shardings, its Pallas kernels' FLOPs per chip that XLA
    does not count): `p` traced with `mesh` as the context mesh (so the model picks the TPU's
    kernels), jitted with its arguments laid over `mesh` as its kinds say, lowered from their
    shapes and compiled."""
    batch, whole = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    def lay(kind, tree):
        if kind == "state":
            return sharding.tree_shardings(mesh, tree, min_size=min_size)
        return jax.tree.map(lambda _: batch if kind == "batch" else whole, tree)

    in_sh = tuple(lay(kind, arg) for kind, arg in zip(p.kinds, p.args, strict=True))
    kinds = p.out_kinds if isinstance(p.out_kinds, tuple) else (p.out_kinds,)
    out_sh = tuple({"state": in_sh[0], "batch": batch, "whole": whole}[k] for k in kinds)
    out_sh = out_sh if isinstance(p.out_kinds, tuple) else out_sh[0]
    jitted = jax.jit(sharding.traced_in(mesh, p.fn), in_shardings=in_sh, out_shardings=out_sh,
                     donate_argnums=p.donate)  # fmt: skip
    traced = jitted.trace(*p.args)
    options = {"exec_time_optimization_effort": effort}
    return traced.lower().compile(options), in_sh, kernel_flops(traced.jaxpr.jaxpr)


def _cost(compiled, chip: Chip, kernels: float = 0.0) -> tuple[float, float, float, str]:
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


def _shard_bytes(leaf, sh) -> int:
    shape = sh.shard_shape(leaf.shape)
    return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize


def _cpu_only() -> None:
    """This process runs nothing on a device: with libtpu installed, JAX would otherwise try
    (and, off a TPU VM, fail noisily) to start a TPU backend for the local computations."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


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


def describe(report: Report) -> str:
    """The report as the lines the programs print."""
    r, gib = report, lambda n: f"{n / GIB:9.4g}"
    mesh = " x ".join(f"{k} {v}" for k, v in r.mesh.items())
    lines = [
        f"{r.program} compiled for {r.topology} ({r.chips} x {r.chip.name}, "
        f"{r.chip.hbm_gib:g} GiB HBM each) in {r.compile_s:.1f} s"
        + (f" at effort {r.effort:g}" if r.effort else "")
        + f": mesh {mesh}, {r.batch_per_chip:g} examples per chip",
        "per chip                     GiB",
        *(f"  {name:<20}  {gib(size)}" for name, size in r.state.items()),
        f"  arguments in all      {gib(r.memory['arguments'])}   (these, the inputs, the key)",
        f"  temporaries           {gib(r.memory['temporaries'])}   (activations"
        + (", gradients)" if r.program == "train step" else ")"),
        f"  code                  {gib(r.memory['code'])}",
        f"  total                 {gib(r.total_bytes)}   of {r.chip.hbm_gib:g}: "
        + ("fits" if r.fits else "does NOT fit"),
        f"per chip per {'step' if r.program == 'train step' else 'call'}: {r.flops:.3g} "
        f"FLOPs, {r.bytes_accessed:.3g} bytes of HBM traffic",
    ]
    if r.kernel_flops:
        lines.append(f"  (of which {r.kernel_flops:.3g} FLOPs in Pallas kernels the compiler"
                     " cannot cost, counted by jdiff from their matrix products)")  # fmt: skip
    if r.loop:
        lines.append(f"  (the model call compiled apart: {r.loop['call_flops']:.3g} FLOPs, "
                     f"{r.loop['call_estimate_s'] * 1e3:.3g} ms; XLA counts a loop's body "
                     f"once, so {r.loop['uncounted_calls']} more calls are added)")  # fmt: skip
    if r.estimated_by == "mixed":
        lines.append(f"estimated time ~{r.estimate_s * 1e3:.4g} ms (the model calls by the "
                     f"compiler's estimate, the rest by a roofline bound: it gave none): "
                     f"~{r.mfu:.1%} MFU of {r.chip.bf16_tflops:g} TFLOP/s bf16")  # fmt: skip
    elif r.estimated_by == "compiler+kernels":
        lines.append(f"estimated time ~{r.estimate_s * 1e3:.4g} ms (the compiler's estimate, "
                     f"plus the Pallas kernels' FLOPs at peak): ~{r.mfu:.1%} MFU of "
                     f"{r.chip.bf16_tflops:g} TFLOP/s bf16")  # fmt: skip
    elif r.estimated_by == "compiler":
        lines.append(f"estimated time {r.estimate_s * 1e3:.4g} ms (the compiler's): "
                     f"{r.mfu:.1%} MFU of {r.chip.bf16_tflops:g} TFLOP/s bf16")  # fmt: skip
    else:
        lines.append(f"estimated time >= {r.estimate_s * 1e3:.4g} ms (a roofline of the "
                     f"FLOPs and HBM traffic at peak: the compiler gave no estimate), so MFU "
                     f"<= {r.mfu:.1%} of {r.chip.bf16_tflops:g} TFLOP/s bf16")  # fmt: skip
    if r.effort:
        lines.append(
            f"(compiled at effort {r.effort:g}, not a run's 0: "
            + (
                "a less optimised program, its memory and time are likely above a run's)"
                if r.effort < 0
                else "a program optimised harder than a run's)"
            )
        )
    parts = [f"{op} {n} ({size / 2**20:.1f} MiB)" for op, (n, size) in r.collectives.items()]
    lines.append(
        f"collectives per {'step' if r.program == 'train step' else 'call'}: "
        + (", ".join(parts) or "none")
    )
    return "\n".join(lines)


def run(config, topology: str, program: str = "train", json_path: str | None = None,
        flag: str = "--topology", effort: float = 0.0) -> Report:  # fmt: skip
    """Compile, print the report and write it as JSON to `json_path` if given."""
    report = compile_for(config, topology, program, flag, effort=effort, announce=True)
    print(describe(report), flush=True)
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps(report.as_dict(), indent=1))
        print(f"report: {json_path}", flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    """`python -m jdiff.aot --config PATH[:variant] --topology NAME [--program train|sample]
    [--effort E] [--json FILE] [--config.KEY=value ...]`."""
    from absl import app, flags, logging
    from ml_collections import config_flags

    from jdiff import cli

    argv = list(sys.argv if argv is None else argv)
    default = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "default.py")
    cli.check_config_argv(argv, default)
    config = config_flags.DEFINE_config_file("config", default, "Config file (path[:variant]).",
                                             lock_config=True)  # fmt: skip
    topology = flags.DEFINE_string("topology", None, "A TPU topology: v5e:2x2, v5p:4x4x4, ...")
    json_path = flags.DEFINE_string("json", None, "Also write the report to this JSON file.")
    program = flags.DEFINE_enum("program", "train", PROGRAMS, "The train step or the sampler.")
    effort = flags.DEFINE_float("effort", 0.0, "The compiler's effort, -1 (quick: SD sizes "
                                "in minutes, less optimised) to 1; 0 is a run's.")  # fmt: skip

    def run_main(rest):
        if len(rest) > 1:
            raise app.UsageError(f"unexpected arguments: {rest[1:]}")
        if not topology.value:
            raise app.UsageError(f"--topology is required (a chip of {sorted(CHIPS)} and a "
                                 "shape: v5e:2x2, v5p:4x4x4, ...)")  # fmt: skip
        validate.check_applies(config.value, cli.overridden_keys(argv))
        run(config.value, topology.value, program.value, json_path.value, effort=effort.value)

    sys.argv = argv
    logging.set_verbosity(logging.WARNING)  # tfds logs every file it reads at INFO
    cli.run_absl(run_main)


if __name__ == "__main__":
    main()
