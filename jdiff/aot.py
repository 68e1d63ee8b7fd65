"""Sized before it is rented: a run's train step compiled for a TPU topology that is not
attached, and what it needs of each chip.

    python -m jdiff.aot --config configs/sd_finetune.py --topology v5e:4x4 \
        --config.latent.pretrained=sd_v1 --config.mesh.fsdp=4 --config.data.batch_size=64
    python train.py --config ... --compile_for v5e:4x4        # the same report
    python -m jdiff.aot --config ... --topology v5e:2x4 --max_batch   # the largest batch

`jax.experimental.topologies` describes the topology's chips without them (libtpu, the
`[tpu]` extra); the config's mesh is laid over them, the train state exists only as shapes
(`jax.eval_shape`: no weights are read or made, no data is loaded), and XLA's TPU compiler
builds the step on this CPU. The report, per chip: parameters, EMA and optimizer state as the
shardings split them; the compiled program's arguments, temporaries (activations, gradients)
and code against the chip's HBM; FLOPs and HBM traffic; an estimated step time and MFU; the
collectives in the program. `--max_batch` finds the largest per-chip batch that fits, a
compile per try (`largest_batch`: a handful, each guess from the bytes of the last), and
reports at it. `--program=sample` compiles the sampler instead (the whole
denoising loop, guidance, encoder and decoder: one call for `sample.num_samples` images).
The programs come from `jdiff.programs`: a latent model's networks are sized from
`latent.pretrained` (a diffusers directory's config files, or one of
`programs.ARCHITECTURES`) or, for a new one, from its autoencoder's stored config.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

import jax

from jdiff import programs, sharding, validate
from jdiff.costs import (
    collectives,
    kernel_flops,
    program_cost,
    program_flops,
    shard_bytes,
)
from jdiff.topologies import CHIPS, Chip, chip_of, topology_devices, usable_gib
from jdiff.validate import InputError

GIB = 2**30


class DoesNotFit(InputError):
    """The TPU compiler's verdict: the program needs more HBM than a chip has (`need`: the
    compiler's words)."""

    def __init__(self, message: str, need: str):
        super().__init__(message)
        self.need = need


@dataclasses.dataclass(frozen=True)
class Report:
    """What the compiled step needs of each chip (bytes) and does per step."""

    topology: str
    program: str  # "train step" or "sampler"
    chip: Chip
    usable_gib: float  # the memory a run may use of a chip (`topologies.usable_gib`)
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
        return self.total_bytes <= self.usable_gib * GIB

    @property
    def mfu(self) -> float:
        """The compiler's FLOPs (recomputation included) over the estimated time at peak."""
        return self.flops / (self.estimate_s * self.chip.bf16_tflops * 1e12)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(total_bytes=self.total_bytes, fits=self.fits, mfu=self.mfu,
                 collectives={k: list(v) for k, v in self.collectives.items()})  # fmt: skip
        return d


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
    chip, mesh = chip_of(topology, flag), _mesh(config, topology, flag)
    usable, (what, count) = usable_gib(chip), _batch_key(config, program)
    if count % mesh.size:
        raise InputError(f"{what}={count} does not split over the mesh's {mesh.size} chips: "
                         f"use a multiple of {mesh.size}")  # fmt: skip
    p = (programs.train_program if program == "train" else programs.sample_program)(config)
    if announce:
        print(f"compiling the {p.name} for {topology} (minutes at SD sizes) ...", flush=True)
    start = time.perf_counter()
    try:
        compiled, in_sh, jaxpr = _compile(p, mesh, config.mesh.fsdp_min_size, effort)
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler's own verdict: it does not fit
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        need = str(e).split("RESOURCE_EXHAUSTED:", 1)[1].strip().splitlines()[0]
        message = (f"the {p.name} does NOT fit {topology} ({chip.name}, {usable:.4g} GiB "
                   f"HBM per chip): XLA's TPU compiler says: {need} Lower {what} (now "
                   f"{count}) or raise mesh.fsdp")  # fmt: skip
        raise DoesNotFit(message, need) from None
    kernels = kernel_flops(jaxpr)  # jdiff's own count only where XLA gives no cost analysis
    counted = program_flops(jaxpr) / mesh.size if chip.platform == "gpu" else 0.0
    flops, traffic, estimate, by = program_cost(compiled, chip, kernels, counted)
    loop = None
    if p.call is not None and by != "peak":  # the loop's body counted once by XLA: the model
        # call's cost, apart (jdiff's own count, "peak", counts each step of a scan)
        call, _, call_jaxpr = _compile(p.call, mesh, config.mesh.fsdp_min_size, effort)
        call_kernels = kernel_flops(call_jaxpr)
        call_flops, call_traffic, call_estimate, call_by = program_cost(call, chip, call_kernels)
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
        return sum(shard_bytes(a, s) for a, s in pairs)

    shares, shard_trees = p.shares(p.args), p.shares(in_sh)
    return Report(
        topology=topology, program=p.name, chip=chip, chips=mesh.size, mesh=dict(mesh.shape),
        usable_gib=usable,
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


def _mesh(config, topology: str, flag: str):
    """The config's ("data", "fsdp") mesh over `topology`'s abstract chips."""
    devices = topology_devices(topology, flag)
    try:
        return sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp, devices=devices)
    except ValueError as e:
        raise InputError(f"config.mesh (data={config.mesh.data}, fsdp={config.mesh.fsdp}) "
                         f"on {topology}'s {len(devices)} chips: {e}") from None  # fmt: skip


def _batch_key(config, program: str) -> tuple[str, int]:
    """The config's key holding the program's examples per call over all chips, and its value."""
    if program == "train":
        return "data.batch_size", config.data.batch_size
    return "sample.num_samples", config.sample.num_samples


def _compile(p: programs.Abstract, mesh, min_size: int, effort: float = 0.0):
    """(the compiled program, its input shardings, its traced jaxpr): `p` traced with `mesh`
    as the context mesh (so the model picks the platform's kernels), jitted with its arguments
    laid over `mesh` as its kinds say, lowered from their shapes and compiled."""
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
    options: dict = {"exec_time_optimization_effort": effort} if effort else {}
    if mesh.devices.flat[0].platform == "gpu":  # without a GPU to autotune on, XLA's Triton
        # matrix products find no tiling for some shapes (SD's [32768, 320] projections): the
        # products go to cuBLAS, which XLA also uses on a GPU where Triton's are not faster
        options["xla_gpu_enable_triton_gemm"] = False
    return traced.lower().compile(options), in_sh, traced.jaxpr.jaxpr


def _cpu_only() -> None:
    """This process runs nothing on a device: with libtpu installed, JAX would otherwise try
    (and, off a TPU VM, fail noisily) to start a TPU backend for the local computations."""
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


def describe(report: Report) -> str:
    """The report as the lines the programs print."""
    r, gib = report, lambda n: f"{n / GIB:9.4g}"
    mesh = " x ".join(f"{k} {v}" for k, v in r.mesh.items())
    lines = [
        f"{r.program} compiled for {r.topology} ({r.chips} x {r.chip.name}, "
        f"{r.chip.hbm_gib:.4g} GiB HBM each) in {r.compile_s:.1f} s"
        + (f" at effort {r.effort:g}" if r.effort else "")
        + f": mesh {mesh}, {r.batch_per_chip:g} examples per chip",
        "per chip                     GiB",
        *(f"  {name:<20}  {gib(size)}" for name, size in r.state.items()),
        f"  arguments in all      {gib(r.memory['arguments'])}   (these, the inputs, the key)",
        f"  temporaries           {gib(r.memory['temporaries'])}   (activations"
        + (", gradients)" if r.program == "train step" else ")"),
        f"  code                  {gib(r.memory['code'])}",
        f"  total                 {gib(r.total_bytes)}   of {r.usable_gib:.4g}"
        + (
            f" (JAX's share of the {r.chip.hbm_gib:.4g}: XLA_PYTHON_CLIENT_MEM_FRACTION)"
            if r.usable_gib != r.chip.hbm_gib
            else ""
        )
        + ": "
        + ("fits" if r.fits else "does NOT fit"),
        f"per chip per {'step' if r.program == 'train step' else 'call'}: {r.flops:.3g} "
        + (
            f"FLOPs, {r.bytes_accessed:.3g} bytes of HBM traffic"
            if r.estimated_by != "peak"
            else "FLOPs (jdiff's count of the products, convolutions and attentions: XLA "
            "gives no cost analysis for a GPU it cannot see)"
        ),
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
    elif r.estimated_by == "peak":
        lines.append(f"estimated time >= {r.estimate_s * 1e3:.4g} ms (those FLOPs at the "
                     f"{r.chip.bf16_tflops:g} TFLOP/s bf16 peak; a run reaches a fraction: "
                     f"at 40% MFU {r.estimate_s / 0.4 * 1e3:.4g} ms)")  # fmt: skip
    else:
        lines.append(f"estimated time >= {r.estimate_s * 1e3:.4g} ms (a roofline of the "
                     f"FLOPs and HBM traffic at peak: the compiler gave no estimate), so MFU "
                     f"<= {r.mfu:.1%} of {r.chip.bf16_tflops:g} TFLOP/s bf16")  # fmt: skip
    what, per = ("examples", "step") if r.program == "train step" else ("images", "call")
    bound = "<= " if r.estimated_by in ("peak", "roofline") else "~"
    chips = f"the {r.chips} chips" if r.chips > 1 else "the chip"
    lines.append(f"  so {bound}{r.batch_per_chip * r.chips / r.estimate_s:.4g} {what}/s over "
                 f"{chips} ({r.batch_per_chip:g} per chip per {per})")  # fmt: skip
    if r.effort:
        lines.append(f"(compiled at effort {r.effort:g}, not a run's 0: " + (
            "a less optimised program, its memory and time are likely above a run's)"
            if r.effort < 0 else "a program optimised harder than a run's)"))  # fmt: skip
    parts = [f"{op} {n} ({size / 2**20:.1f} MiB)" for op, (n, size) in r.collectives.items()]
    lines.append(f"collectives per {per}: " + (", ".join(parts) or "none"))
    return "\n".join(lines)


SEARCH_COMPILES = 8  # compiles a batch search may take at most
SEARCH_GROWTH = 8  # a guess at most this many times the largest batch known to fit


@dataclasses.dataclass(frozen=True)
class BatchSearch:
    """The largest per-chip batch that fits, and every batch compiled on the way."""

    largest: int  # examples per chip; 0: not even one fits
    tried: dict[int, int | None]  # per-chip batch -> bytes per chip (None: the compiler refused)
    verified: bool  # largest + 1 was compiled and does not fit (or nothing fits at 1)


def _next_batch(tried: dict[int, int | None], capacity: int) -> int | None:
    """The per-chip batch to compile next, or None when the largest that fits is bracketed
    (it fits, one more does not). Bytes grow about linearly with the batch (activations, on
    top of the fixed parameters and optimizer state), so the next guess is the line through
    the two largest batches that fit, met with the capacity; with one such batch, twice it;
    a guess at or past the smallest batch that does not fit halves the gap instead."""
    fit = sorted(b for b, need in tried.items() if need is not None and need <= capacity)
    low = fit[-1] if fit else 0
    high = min((b for b in tried if b > low), default=None)
    if high == low + 1:
        return None
    if low == 0:  # nothing fits yet: halve the smallest that does not
        return high // 2
    guess = 2 * low
    if len(fit) >= 2 and tried[low] > tried[fit[-2]]:
        slope = (tried[low] - tried[fit[-2]]) / (low - fit[-2])
        guess = low + int((capacity - tried[low]) // slope)
    guess = min(guess, SEARCH_GROWTH * low)
    if high is not None and guess >= high:
        guess = (low + high) // 2
    return max(guess, low + 1)


def largest_batch(measure, start: int, capacity: int,
                  compiles: int = SEARCH_COMPILES) -> BatchSearch:  # fmt: skip
    """The largest per-chip batch b whose `measure(b)` (bytes per chip, None where the
    compiler refuses it) is within `capacity`, from `start`, in at most `compiles` calls of
    `measure` (`_next_batch` picks each)."""
    tried: dict[int, int | None] = {}
    batch: int | None = max(1, start)
    while batch is not None and len(tried) < compiles:
        tried[batch] = measure(batch)
        batch = _next_batch(tried, capacity)
    fit = [b for b, need in tried.items() if need is not None and need <= capacity]
    return BatchSearch(max(fit, default=0), tried, verified=batch is None)


def search_batch(config, topology: str, program: str = "train", flag: str = "--topology", *,
                 effort: float = 0.0) -> tuple[Report | None, BatchSearch]:  # fmt: skip
    """The largest per-chip batch of the config's program that fits `topology`'s chips
    (`largest_batch`, each try a compile of the config with its batch key set, one line
    printed), and the report at it (None when not even one example per chip fits)."""
    chip, mesh = chip_of(topology, flag), _mesh(config, topology, flag)
    key, count = _batch_key(config, program)
    reports: dict[int, Report] = {}
    print(f"finding the largest {key} per chip that fits {topology} ({mesh.size} x "
          f"{chip.name}, {usable_gib(chip):.4g} GiB each): a compile per try",
          flush=True)  # fmt: skip

    def measure(batch: int) -> int | None:
        trial = config.copy_and_resolve_references()
        section, name = key.split(".")
        trial[section][name] = batch * mesh.size
        try:
            report = compile_for(trial, topology, program, flag, effort=effort)
        except DoesNotFit as e:
            print(f"  {batch:6d} per chip ({key}={batch * mesh.size}): does NOT fit "
                  f"(XLA's TPU compiler: {e.need})", flush=True)  # fmt: skip
            return None
        reports[batch] = report
        verdict = "fits" if report.fits else "does NOT fit"
        print(f"  {batch:6d} per chip ({key}={batch * mesh.size}): "
              f"{report.total_bytes / GIB:.3f} GiB, {verdict} "
              f"(compiled in {report.compile_s:.0f} s)", flush=True)  # fmt: skip
        return report.total_bytes

    found = largest_batch(measure, count // mesh.size, int(usable_gib(chip) * GIB))
    return reports.get(found.largest), found


def describe_search(found: BatchSearch, topology: str, chips: int, key: str) -> str:
    """The search's answer in a line."""
    if found.largest == 0:
        return f"not even one example per chip fits {topology}: raise mesh.fsdp"
    n = found.largest
    over = min((b for b in found.tried if b > n), default=None)  # the smallest that does not
    if found.verified:
        bound = f"{n + 1} per chip does not"
    elif over is not None:
        gap = f"{n + 1}" if over == n + 2 else f"{n + 1}-{over - 1}"
        bound = (f"{over} does not; {gap} not tried: the search stopped after "
                 f"{len(found.tried)} compiles")  # fmt: skip
    else:
        bound = f"at least; the search stopped after {len(found.tried)} compiles"
    return (
        f"largest batch that fits {topology}: {n} per chip ({bound}), "
        f"{key}={n * chips} over its {chips} chips"
    )


def run(config, topology: str, program: str = "train", json_path: str | None = None,
        flag: str = "--topology", effort: float = 0.0,
        max_batch: bool = False) -> Report:  # fmt: skip
    """Compile, print the report and write it as JSON to `json_path` if given; with
    `max_batch`, find the largest per-chip batch that fits first (`search_batch`) and
    report at it."""
    found = None
    if max_batch:
        report, found = search_batch(config, topology, program, flag, effort=effort)
        if report is None:
            name = "train step" if program == "train" else "sampler"
            raise InputError(f"the {name} does NOT fit {topology} even at one example per "
                             "chip: raise mesh.fsdp or use a chip with more HBM")  # fmt: skip
    else:
        report = compile_for(config, topology, program, flag, effort=effort, announce=True)
    print(describe(report), flush=True)
    if found is not None:
        print(describe_search(found, topology, report.chips, _batch_key(config, program)[0]),
              flush=True)  # fmt: skip
    if json_path:
        out = report.as_dict()
        if found is not None:
            tried = {str(b): n for b, n in found.tried.items()}
            out["batch_search"] = {"largest_batch_per_chip": found.largest,
                                   "verified": found.verified, "tried": tried}  # fmt: skip
        pathlib.Path(json_path).write_text(json.dumps(out, indent=1))
        print(f"report: {json_path}", flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    """`python -m jdiff.aot --config PATH[:variant] --topology NAME [--program train|sample]
    [--effort E] [--max_batch] [--json FILE] [--config.KEY=value ...]`."""
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
    max_batch = flags.DEFINE_bool("max_batch", False, "Find the largest per-chip batch that "
                                  "fits (a compile per try, at most "
                                  f"{SEARCH_COMPILES}) and report at it.")  # fmt: skip

    def run_main(rest):
        if len(rest) > 1:
            raise app.UsageError(f"unexpected arguments: {rest[1:]}")
        if not topology.value:
            raise app.UsageError(f"--topology is required (a chip of {sorted(CHIPS)} and a "
                                 "shape: v5e:2x2, v5p:4x4x4, ...)")  # fmt: skip
        validate.check_applies(config.value, cli.overridden_keys(argv))
        run(config.value, topology.value, program.value, json_path.value, effort=effort.value,
            max_batch=max_batch.value)  # fmt: skip

    sys.argv = argv
    logging.set_verbosity(logging.WARNING)  # tfds logs every file it reads at INFO
    cli.run_absl(run_main)


if __name__ == "__main__":
    main()
