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
collectives in the program. A latent model's U-Net is sized from `latent.pretrained` (a
diffusers directory's config files, or an architecture of `ARCHITECTURES`) or, for a new one,
from its autoencoder's stored config.
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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import models, programs, sharding, training, validate
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

# latent.pretrained architectures sized without their weights: (U-Net variant, text encoder
# variant, latent channels, the autoencoder's downsampling factor)
ARCHITECTURES = {"sd_v1": ("sd_v1", "clip_vit_l14", 4, 8),
                 "sd_v2_1": ("sd_v2_1", "openclip_vit_h14", 4, 8)}  # fmt: skip

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Program:
    """A task's train step as the trainer builds it, and the shapes of one global batch."""

    init: Any  # () -> the step-0 TrainState
    step: Any  # (state, batch, key) -> (state, metrics)
    batch: dict[str, jax.ShapeDtypeStruct]


@dataclasses.dataclass(frozen=True)
class Report:
    """What the compiled step needs of each chip (bytes) and does per step."""

    topology: str
    chip: Chip
    chips: int
    mesh: dict[str, int]
    batch_per_chip: float
    state: dict[str, int]  # parameters / ema / optimizer: their per-chip shards
    memory: dict[str, int]  # arguments / outputs / aliased / temporaries / code
    flops: float
    bytes_accessed: float
    estimate_s: float
    estimated_by: str  # "compiler" or "roofline"
    collectives: dict[str, tuple[int, int]]  # op -> (count, bytes of results)
    compile_s: float

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


def train_program(config) -> Program:
    """The config's init and step (as `trainer.build` makes them) and its batch's shapes,
    without data, weights or caches."""
    from jdiff import trainer

    task = trainer.task(config)
    key = jax.random.key(config.seed)
    b, size, channels = config.data.batch_size, config.data.image_size, config.data.channels
    if task == "autoencoder":
        model, optimizer = (
            models.make_autoencoder(config),
            training.make_autoencoder_optimizer(config),
        )
        init = training.make_init(model, optimizer, key, image_shape=(size, size, channels))
        step = programs.autoencoder_step(config, model, optimizer)
        return Program(init, step, {"image": _spec((b, size, size, channels))})
    optimizer = training.make_optimizer(config.optim)
    if task == "diffusion":
        classes = _num_classes(config)
        model = models.make_model(config, classes)
        init = training.make_init(model, optimizer, key, image_shape=(size, size, channels))
        step = programs.diffusion_step(config, model, models.make_schedule(config.diffusion),
                                       optimizer, classes)  # fmt: skip
        batch = {"image": _spec((b, size, size, channels)), "label": _spec((b,), jnp.int32)}
        return Program(init, step, batch)
    return _latent_program(config, optimizer, key)


def _latent_program(config, optimizer, key) -> Program:
    pretrained = config.latent.get("pretrained") or None
    kind = config.latent.get("conditioning") or None
    if pretrained:
        unet, text, latent_channels, factor = _pretrained_architecture(config, pretrained)
        frozen = True
    else:
        text = models.make_text_encoder(config)
        latent_channels, factor = _autoencoder_shape(config)
        unet = models.make_latent_unet(config, latent_channels, text.hidden_size)
        frozen = config.text.get("frozen", False)
    if config.data.image_size % factor:
        raise InputError(f"data.image_size={config.data.image_size} is not a multiple of the "
                         f"autoencoder's factor {factor}")  # fmt: skip
    h = config.data.image_size // factor
    b, length = config.data.batch_size, text.max_position_embeddings
    latent = (b, h, h, latent_channels)
    batch = {"latent_mean": _spec(latent), "latent_std": _spec(latent),
             "ids": _spec((b, length), jnp.int32)}  # fmt: skip
    empty_context = None
    if frozen:  # trained as train.py does: the captions' encodings cached, the encoder still
        optimizer = training.freeze_text_encoder(optimizer)  # in the state (frozen)
        batch["context"] = _spec((b, length, text.hidden_size), text.dtype)
        empty_context = jnp.zeros((length, text.hidden_size))
    if kind:
        batch["extra"] = _spec((b, h, h, unet.in_channels - latent_channels))
    init = training.make_latent_init(unet, text, optimizer, key, latent_shape=latent[1:])
    prediction = config.diffusion.prediction_type
    step = programs.latent_step(
        config, unet, text, models.make_schedule(config.diffusion), optimizer,
        empty_ids=jnp.zeros(length, jnp.int32), empty_context=empty_context,
        scaling_factor=1.0, prediction_type=prediction, kind=kind,  # a constant: no cost
    )  # fmt: skip
    return Program(init, step, batch)


def _pretrained_architecture(config, pretrained: str):
    """(U-Net, text encoder, latent channels, factor) of `latent.pretrained` from config
    files alone: an `ARCHITECTURES` name or a diffusers-format directory."""
    from jdiff.interop import configs as foreign
    from jdiff.interop import files
    from jdiff.nn import UNet, text_encoder, vae
    from jdiff.nn.unet import VARIANTS

    dtype = models._dtype(config.model.dtype)
    root = pathlib.Path(pretrained)
    if pretrained in ARCHITECTURES:
        unet_variant, text_variant, channels, factor = ARCHITECTURES[pretrained]
        unet = UNet(**VARIANTS[unet_variant])
        text = text_encoder.CLIPTextModel(**text_encoder.VARIANTS[text_variant])
    elif all((root / part / "config.json").is_file() for part in ("unet", "vae", "text_encoder")):
        read = lambda part: files.read_json(root / part / "config.json")  # noqa: E731
        unet = UNet(**foreign.unet_config_from_diffusers(read("unet")))
        ae = vae.AutoencoderKL(**foreign.vae_config_from_diffusers(read("vae")))
        text = text_encoder.CLIPTextModel(
            **foreign.text_encoder_config_from_transformers(read("text_encoder"))
        )
        channels, factor = ae.latent_channels, ae.downsample_factor
    else:
        raise InputError(f"latent.pretrained={pretrained!r}: to size it without its weights, "
                         f"name a diffusers-format directory (unet/, vae/, text_encoder/ "
                         f"config.json) or one of {sorted(ARCHITECTURES)}")  # fmt: skip
    return (unet.clone(dtype=dtype, remat=config.model.remat), text.clone(dtype=dtype),
            channels, factor)  # fmt: skip


def _autoencoder_shape(config) -> tuple[int, int]:
    """(latent channels, factor) of a new latent model's autoencoder, from the config its
    workdir stored (`latent.autoencoder_workdir`)."""
    from ml_collections import ConfigDict

    from jdiff import checkpoints

    workdir = pathlib.Path(config.latent.autoencoder_workdir)
    if not (workdir / checkpoints.RUN_INFO).exists():
        raise InputError(f"latent.autoencoder_workdir={str(workdir)!r} holds no trained "
                         "autoencoder: its stored config gives the latent shape (train it "
                         "first, or size a pretrained one with latent.pretrained)")  # fmt: skip
    stored = ConfigDict(checkpoints.read_run_info(workdir)["config"])
    ae = models.make_autoencoder(stored)
    return ae.latent_channels, ae.downsample_factor


def _num_classes(config) -> int | None:
    if not config.model.get("class_conditional", False):
        return None
    from jdiff import data

    source = data.load_source(config.data.name, split=config.data.split,
                              data_dir=config.data.data_dir or None)  # fmt: skip
    return data.num_classes(source)


def _spec(shape, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def compile_train_step(config, topology: str, flag: str = "--topology", *,
                       announce: bool = False) -> Report:  # fmt: skip
    """Compile the config's train step for `topology` with the config's mesh; the report
    (bad input names `flag`, the option that gave the topology)."""
    _cpu_only()
    validate.check_config(config)
    chip = chip_of(topology, flag)
    devices = topology_devices(topology, flag)
    try:
        mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp, devices=devices)
    except ValueError as e:
        raise InputError(f"config.mesh (data={config.mesh.data}, fsdp={config.mesh.fsdp}) "
                         f"on {topology}'s {len(devices)} chips: {e}") from None  # fmt: skip
    if config.data.batch_size % mesh.size:
        raise InputError(f"data.batch_size={config.data.batch_size} does not split over the "
                         f"mesh's {mesh.size} chips: use a multiple of {mesh.size}")  # fmt: skip
    program = train_program(config)
    abstract = jax.eval_shape(program.init)
    state_sh = sharding.tree_shardings(mesh, abstract, min_size=config.mesh.fsdp_min_size)
    batch_sh, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    key = jax.eval_shape(lambda: jax.random.key(0))
    step = jax.jit(program.step, in_shardings=(state_sh, batch_sh, replicated),
                   out_shardings=(state_sh, replicated), donate_argnums=0)  # fmt: skip
    if announce:
        print(f"compiling the train step for {topology} (minutes at SD sizes) ...", flush=True)
    start = time.perf_counter()
    compiled = step.lower(abstract, program.batch, key).compile()
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops, traffic = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    estimate, by = float(cost.get("optimal_seconds", -1.0)), "compiler"
    if not estimate > 0:  # the compiler gives none: the roofline's lower bound
        estimate = max(flops / (chip.bf16_tflops * 1e12), traffic / (chip.hbm_gbps * 1e9))
        by = "roofline"

    def per_chip(tree, shardings) -> int:
        pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True)
        return sum(_shard_bytes(a, s) for a, s in pairs)

    return Report(
        topology=topology, chip=chip, chips=mesh.size, mesh=dict(mesh.shape),
        batch_per_chip=config.data.batch_size / mesh.size,
        state={"parameters": per_chip(abstract.params, state_sh.params),
               "ema": per_chip(abstract.ema_params, state_sh.ema_params),
               "optimizer": per_chip(abstract.opt_state, state_sh.opt_state)},
        memory={"arguments": memory.argument_size_in_bytes,
                "outputs": memory.output_size_in_bytes, "aliased": memory.alias_size_in_bytes,
                "temporaries": memory.temp_size_in_bytes,
                "code": memory.generated_code_size_in_bytes},
        flops=flops, bytes_accessed=traffic, estimate_s=estimate, estimated_by=by,
        collectives=collectives(compiled.as_text()), compile_s=seconds,
    )  # fmt: skip


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
        f"compiled for {r.topology} ({r.chips} x {r.chip.name}, {r.chip.hbm_gib:g} GiB HBM "
        f"each) in {r.compile_s:.1f} s: mesh {mesh}, {r.batch_per_chip:g} examples per chip",
        "per chip                     GiB",
        f"  parameters            {gib(r.state['parameters'])}",
        f"  EMA parameters        {gib(r.state['ema'])}",
        f"  optimizer state       {gib(r.state['optimizer'])}",
        f"  arguments in all      {gib(r.memory['arguments'])}   (state, batch, key)",
        f"  temporaries           {gib(r.memory['temporaries'])}   (activations, gradients)",
        f"  code                  {gib(r.memory['code'])}",
        f"  total                 {gib(r.total_bytes)}   of {r.chip.hbm_gib:g}: "
        + ("fits" if r.fits else "does NOT fit"),
        f"per chip per step: {r.flops:.3g} FLOPs, {r.bytes_accessed:.3g} bytes of HBM traffic",
    ]
    if r.estimated_by == "compiler":
        lines.append(f"estimated step time {r.estimate_s * 1e3:.3g} ms (the compiler's): "
                     f"{r.mfu:.1%} MFU of {r.chip.bf16_tflops:g} TFLOP/s bf16")  # fmt: skip
    else:
        lines.append(f"estimated step time >= {r.estimate_s * 1e3:.3g} ms (a roofline of the "
                     f"FLOPs and HBM traffic at peak: the compiler gave no estimate), so MFU "
                     f"<= {r.mfu:.1%} of {r.chip.bf16_tflops:g} TFLOP/s bf16")  # fmt: skip
    parts = [f"{op} {n} ({size / 2**20:.1f} MiB)" for op, (n, size) in r.collectives.items()]
    lines.append("collectives per step: " + (", ".join(parts) or "none"))
    return "\n".join(lines)


def run(config, topology: str, json_path: str | None = None, flag: str = "--topology") -> Report:
    """Compile, print the report and write it as JSON to `json_path` if given."""
    report = compile_train_step(config, topology, flag, announce=True)
    print(describe(report), flush=True)
    if json_path:
        pathlib.Path(json_path).write_text(json.dumps(report.as_dict(), indent=1))
        print(f"report: {json_path}", flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    """`python -m jdiff.aot --config PATH[:variant] --topology NAME [--json FILE]
    [--config.KEY=value ...]`."""
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

    def run_main(rest):
        if len(rest) > 1:
            raise app.UsageError(f"unexpected arguments: {rest[1:]}")
        if not topology.value:
            raise app.UsageError(f"--topology is required (a chip of {sorted(CHIPS)} and a "
                                 "shape: v5e:2x2, v5p:4x4x4, ...)")  # fmt: skip
        validate.check_applies(config.value, cli.overridden_keys(argv))
        run(config.value, topology.value, json_path.value)

    sys.argv = argv
    logging.set_verbosity(logging.WARNING)  # tfds logs every file it reads at INFO
    cli.run_absl(run_main)


if __name__ == "__main__":
    main()
