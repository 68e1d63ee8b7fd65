"""The training run: build every part from a config, loop, cache, checkpoint, sample, stop.

`train(config, workdir)` runs (or resumes) any task of `train.py` ("diffusion", "autoencoder",
"latent_diffusion"): the workdir holds config.json (the model is rebuilt from it by
`jdiff.runs`), checkpoints/, TensorBoard metrics in tb/ and sample grids in samples/. A resume
that changes the model or its data is refused; SIGTERM (on any host) saves a checkpoint and
exits with 128 + SIGTERM; a non-finite loss stops the run without saving.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

import jdiff
from jdiff import (
    autoencoder,
    checkpoints,
    data,
    images,
    models,
    parts,
    programs,
    sharding,
    training,
    validate,
)
from jdiff.data import shapes

# settings that shape the model or its data: a resume must not change them
COMPATIBLE = ("task", "model", "diffusion", "text", "latent", "data.name", "data.image_size",
              "data.channels", "autoencoder.trainable", "optim.accumulate_steps")  # fmt: skip


class NonFiniteLoss(RuntimeError):
    """The loss or its gradient stopped being finite; nothing bad was saved."""


def _lookup(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config.get(part, {}) if isinstance(config, dict) else {}
    return config


def prepare_workdir(
    workdir: pathlib.Path, config: ConfigDict, num_classes: int | None = None
) -> pathlib.Path:
    """Create the workdir and store the config and jdiff version; on resume, refuse a config
    that changes the model or its data (naming the keys)."""
    workdir.mkdir(parents=True, exist_ok=True)
    current = json.loads(config.to_json_best_effort())
    if (workdir / checkpoints.RUN_INFO).exists():
        saved = checkpoints.read_run_info(workdir)["config"]
        changed = [k for k in COMPATIBLE if _lookup(saved, k) != _lookup(current, k)]
        if bool(_lookup(saved, "optim.grad_clip")) != bool(_lookup(current, "optim.grad_clip")):
            changed.append("optim.grad_clip (on or off: the optimizer state's shape)")
        if changed:
            raise ValueError(
                f"{workdir} holds a run whose {', '.join(changed)} differ from this config's; "
                "resume with the same settings or choose a new --workdir"
            )
    checkpoints.write_run_info(workdir, current, version=jdiff.__version__, num_classes=num_classes)
    return workdir


def load_data(config: ConfigDict):
    """The training source and its number of classes (None unless class-conditional).
    Process 0 prepares an embedded data set first; the others then read it."""

    def load():
        return data.load_source(config.data.name, split=config.data.split,
                                data_dir=config.data.data_dir or None)  # fmt: skip

    source = load() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("jdiff data prepared")
    source = source or load()
    conditional = config.model.get("class_conditional", False)
    return source, data.num_classes(source) if conditional else None


task = programs.task  # the config's task, as every program reads it


@dataclasses.dataclass
class Run:
    """A run in training: its state, the compiled step and sampler, and what feeds them."""

    state: training.TrainState  # replaced by every step
    step: Callable  # the jitted train step (state donated)
    sample: Callable | None  # the jitted sample function of the grids
    model: Any
    batches: Any
    manager: Any  # the orbax CheckpointManager of workdir/checkpoints
    k_train: jax.Array
    k_sample: jax.Array
    batch_sharding: jax.sharding.Sharding
    num_classes: int | None
    source: Any
    prompts: tuple = ()
    frozen: tuple = ()  # weights passed to the step and sampler unchanged (a LoRA's base)


def build(config: ConfigDict, workdir: pathlib.Path, source, num_classes: int | None) -> Run:
    """Mesh, model, optimizer, state (restored if the workdir has a checkpoint, else born
    sharded), the jitted train step and the task's sample function."""
    mesh = sharding.make_mesh(data=config.mesh.data, fsdp=config.mesh.fsdp)
    optimizer = training.make_optimizer(config.optim)
    k_init, k_train, k_sample = jax.random.split(jax.random.key(config.seed), 3)
    make_parts = {"diffusion": parts.diffusion_parts, "autoencoder": parts.autoencoder_parts,
                  "latent_diffusion": parts.latent_parts}[task(config)]  # fmt: skip
    made = make_parts(config, workdir, source, num_classes, optimizer, k_init, k_sample)

    abstract = jax.eval_shape(made.init, *made.init_args)
    state_sh = sharding.tree_shardings(mesh, abstract, min_size=config.mesh.fsdp_min_size)
    batch_sh, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    manager = checkpoints.make_manager(
        workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints
    )
    state = checkpoints.restore_latest(manager, sharding.with_shardings(abstract, state_sh))
    # traced with the mesh in context: the attention picks its kernel for the mesh's platform
    state = state or jax.jit(sharding.traced_in(mesh, made.init),
                             out_shardings=state_sh)(*made.init_args)  # fmt: skip
    # frozen weights (a LoRA run's base model): split by the same rule, placed once
    frozen_sh = sharding.tree_shardings(mesh, jax.eval_shape(lambda: made.frozen),
                                        min_size=config.mesh.fsdp_min_size)  # fmt: skip
    frozen = jax.device_put(made.frozen, frozen_sh)
    step_jit = jax.jit(sharding.traced_in(mesh, made.step),
                       in_shardings=(state_sh, batch_sh, replicated, *frozen_sh),
                       out_shardings=(state_sh, replicated), donate_argnums=0)  # fmt: skip
    sample = None
    if made.sample is not None:
        sample = jax.jit(sharding.traced_in(mesh, made.sample), out_shardings=replicated)
    return Run(state, step_jit, sample, made.model, made.batches, manager, k_train, k_sample,
               batch_sh, num_classes, source, made.prompts, frozen)  # fmt: skip


def write_samples(run: Run, config: ConfigDict, workdir: pathlib.Path, step: int):
    """A grid of samples from the EMA weights (fixed key, so grids of a run compare), or of an
    autoencoder's reconstructions. Every process computes (the parameters may be split over
    them); process 0 writes the PNG."""
    if run.sample is None:
        return write_reconstructions(run, config, workdir, step)
    x = run.sample(run.state.ema_params, *run.frozen)
    if jax.process_index() == 0:
        return images.save_grid(workdir / "samples" / f"step_{step:07d}.png", np.asarray(x))
    return None


def write_trained_lora(run: Run, config: ConfigDict, workdir: pathlib.Path) -> pathlib.Path:
    """A LoRA run's EMA adapter in the diffusers format (`load_lora_weights` reads it; so do
    `sample.py --pretrained BASE --lora FILE` and `interop.read_lora`)."""
    from jdiff import adapters, interop

    lora = adapters.from_tree(jax.device_get(run.state.ema_params), models.lora_alpha(config))
    path = interop.write_lora(lora, workdir / "lora", jax.device_get(run.frozen[0]))
    print(f"LoRA: {path} ({lora.size():,} weights, rank {config.lora.rank})", flush=True)
    return path


def write_trained_controlnet(run: Run, workdir: pathlib.Path) -> pathlib.Path:
    """A ControlNet run's EMA ControlNet as a diffusers directory (`ControlNetModel.
    from_pretrained`, `interop.load_controlnet` and `sample.py --controlnet` read it)."""
    from jdiff import interop

    controlnet = interop.ControlNet(run.model, jax.device_get(run.state.ema_params))
    path = interop.save_controlnet(controlnet, workdir / "controlnet")
    print(f"ControlNet: {path}", flush=True)
    return path


def write_reconstructions(run: Run, config: ConfigDict, workdir: pathlib.Path, step: int):
    """Held-out images (odd rows) over their reconstructions (even rows), EMA weights."""
    x = parts.eval_images(config, config.autoencoder.eval_split, 32, seed=0)
    recon = autoencoder.make_codec(run.model)["reconstruct"](run.state.ema_params, x)
    if jax.process_index() == 0:
        grid = autoencoder.reconstruction_grid(x, np.asarray(recon))
        path = workdir / "samples" / f"reconstructions_{step:07d}.png"
        return images.save_grid(path, grid, ncols=8)
    return None


def measure_autoencoder(run: Run, config: ConfigDict, workdir: pathlib.Path) -> dict:
    """PSNR on the held-out split and the latent scaling factor, stored in autoencoder.json."""
    ae = config.autoencoder
    info = autoencoder.measure(
        run.model, run.state.ema_params,
        train_images=parts.eval_images(config, config.data.split, ae.scaling_images, seed=1),
        eval_images=parts.eval_images(config, ae.eval_split, ae.eval_images, seed=2),
        key=jax.random.fold_in(run.k_sample, 1),
        describe=shapes.describe if config.data.name == "shapes" else None,
    )  # fmt: skip
    info |= {"step": int(run.state.step), "eval_split": ae.eval_split, "weights": "ema"}
    if ae.get("init_from"):  # fine-tuned: which run it started from (its encoder, if frozen)
        source = autoencoder.load_info(ae.init_from)
        info["init_from"] = {"workdir": str(pathlib.Path(ae.init_from).absolute()),
                             "step": source["step"],
                             "trainable": ae.get("trainable", "all")}  # fmt: skip
    if jax.process_index() == 0:
        path = autoencoder.save_info(workdir, info)
        print(f"held-out PSNR {info['psnr_db']:.2f} dB (5th percentile "
              f"{info['psnr_db_p5']:.2f} dB) on {info['num_eval_images']} {ae.eval_split} "
              f"images; latent scaling factor {info['scaling_factor']:.4f} (1/std of z, "
              f"latents {tuple(info['latent_shape'])}): {path}", flush=True)  # fmt: skip
        if "described_alike" in info:
            print(f"reconstructions read as their originals by shapes.describe: "
                  f"{100 * info['described_alike']:.1f}%", flush=True)  # fmt: skip
    return info


def check_finite(state: training.TrainState, manager) -> None:
    """Raise `NonFiniteLoss` if a step went non-finite (the state records the first, numbered
    as the checkpoints are)."""
    bad = int(state.nonfinite_step)
    if bad >= 0:
        raise NonFiniteLoss(
            f"the loss, its gradient or the updated parameters became non-finite at step {bad}; "
            f"stopped without saving (the latest checkpoint, step {manager.latest_step()}, is "
            "intact). Lower optim.learning_rate or set optim.grad_clip, then rerun to resume."
        )


def preemption_check():
    """preempted(step) -> bool. One process: a SIGTERM handler. Several: JAX's preemption sync
    point, which is True on every process at the same step once any of them got SIGTERM."""
    if jax.process_count() > 1:
        return multihost_utils.reached_preemption_sync_point, lambda: None
    stop = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    return (lambda step: bool(stop)), lambda: signal.signal(signal.SIGTERM, previous)


def train(config: ConfigDict, workdir: pathlib.Path) -> pathlib.Path | None:
    """Run (or resume) training to config.train.num_steps; returns the final sample grid
    (None on processes other than 0)."""
    main = jax.process_index() == 0
    workdir = pathlib.Path(workdir).absolute()
    validate.check_config(config)  # at the door: before data, compiles or writes
    validate.check_platform(config, jax.default_backend())
    validate.check_workdir(workdir)
    task(config)
    source, num_classes = load_data(config)
    if main:
        prepare_workdir(workdir, config, num_classes)
        print(f"workdir: {workdir}\ndevices: {jax.device_count()} on {jax.process_count()} "
              f"process(es)", flush=True)  # fmt: skip
    multihost_utils.sync_global_devices("jdiff workdir ready")
    run = build(config, workdir, source, num_classes)
    if int(run.state.step) and main:
        print(f"resuming from step {int(run.state.step)}", flush=True)
    preempted, restore_signals = preemption_check()
    writer = _summary_writer(workdir) if main else None
    try:
        _loop(run, config, workdir, writer, preempted)
        manager = run.manager
        if manager.latest_step() != int(run.state.step):
            check_finite(run.state, manager)
            checkpoints.save(manager, int(run.state.step), run.state)
        checkpoints.finish(manager)
        grid = write_samples(run, config, workdir, int(run.state.step))
        if config.get("lora", {}).get("rank") and main:
            write_trained_lora(run, config, workdir)
        if (config.get("controlnet") or {}).get("conditioning") and main:
            write_trained_controlnet(run, workdir)
        if task(config) == "autoencoder":
            measure_autoencoder(run, config, workdir)
    finally:
        restore_signals()
        if writer is not None:
            writer.close()
        run.manager.close()
    if main:
        print(f"samples: {grid}\ncheckpoints: {workdir / 'checkpoints'}", flush=True)
    return grid


def _loop(run: Run, config: ConfigDict, workdir: pathlib.Path, writer, preempted) -> None:
    """Steps start+1 .. num_steps: log, sample and checkpoint when due; on preemption save
    and exit with 128 + SIGTERM."""
    manager, start, main = run.manager, int(run.state.step), jax.process_index() == 0
    bar = tqdm.tqdm(total=config.train.num_steps, initial=start, unit="step",
                    dynamic_ncols=True, disable=not main)  # fmt: skip
    batches = run.batches.iterate(start)
    last_log = (start, time.perf_counter())
    for n in range(start + 1, config.train.num_steps + 1):
        batch = sharding.global_batch(next(batches), run.batch_sharding)
        run.state, metrics = run.step(run.state, batch, run.k_train, *run.frozen)
        bar.update()
        stop = preempted(n)
        if n % config.train.log_every == 0 or n == config.train.num_steps or stop:
            check_finite(run.state, manager)
            rate = (n - last_log[0]) / (time.perf_counter() - last_log[1])
            last_log = (n, time.perf_counter())
            values = {k: float(v) for k, v in metrics.items()} | {"steps_per_s": rate}
            bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
            for k, v in values.items():
                if writer is not None:
                    writer.add_scalar(f"train/{k}", v, n)
        if config.train.sample_every and n % config.train.sample_every == 0:
            write_samples(run, config, workdir, n)
        if stop or n % config.train.checkpoint_every == 0:
            check_finite(run.state, manager)  # never checkpoint after a bad step
            checkpoints.save(manager, n, run.state)
        if stop:
            checkpoints.finish(manager)
            if main:
                print(f"\nSIGTERM: saved step {n} to {workdir / 'checkpoints'}; rerun to resume")
            sys.exit(128 + signal.SIGTERM)
    bar.close()


def _summary_writer(workdir: pathlib.Path):
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(workdir / "tb"))
