"""Restore any `train.py` workdir from what it stored: one function for every task.

A workdir holds `config.json` (the run's config, the jdiff version and facts such as the data's
number of classes) and orbax checkpoints of the `TrainState`. `restore` reads the parameters,
their EMA and the step of one checkpoint, whatever the task ("diffusion", "autoencoder",
"latent_diffusion", a fine-tuned decoder or converted weights). The abstract target is the
checkpoint's own metadata (shapes and dtypes), so no model or optimizer is rebuilt to learn
the state's shape and the optimizer moments are never read: a restore for sampling costs the
parameters twice, not four times (Adam). The callers build the networks from `Run.config`.

    run = runs.restore("outputs/default")            # the latest checkpoint
    model = models.make_model(run.config, run.num_classes)
    images = model.apply({"params": run.ema_params}, x_t, t, class_labels=labels)
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
from absl import logging

from jdiff import checkpoints, validate

TASKS = {"diffusion": "a diffusion model", "autoencoder": "an autoencoder",
         "latent_diffusion": "a latent diffusion model"}  # fmt: skip
REQUIRED = {"diffusion": ("data", "model", "diffusion"), "autoencoder": ("data", "model"),
            "latent_diffusion": ("data", "model", "diffusion", "latent", "text")}  # fmt: skip


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """One checkpoint of a train.py workdir.

    Attributes:
      workdir: the workdir.
      config: the run's config (an `ml_collections.ConfigDict`), as train.py stored it.
      task: a key of `TASKS`.
      step: the checkpoint's training step.
      params: the trained parameters (a pytree of arrays on `sharding`).
      ema_params: their exponential moving average (what sampling uses by default).
      info: what else `config.json` recorded (e.g. "num_classes", "jdiff_version").
    """

    workdir: pathlib.Path
    config: Any
    task: str
    step: int
    params: Any
    ema_params: Any
    info: dict

    @property
    def num_classes(self) -> int | None:
        """The data's number of classes (class-conditional diffusion), or None."""
        return self.info.get("num_classes")

    def weights(self, ema: bool = True) -> Any:
        """The EMA parameters (default) or the trained ones."""
        return self.ema_params if ema else self.params


def read_config(workdir: str | pathlib.Path) -> tuple[Any, str, dict]:
    """(config, task, other facts) of a train.py workdir's `config.json`, without touching
    its checkpoints; FileNotFoundError naming the workdir if it is not one."""
    from ml_collections import ConfigDict

    stored = checkpoints.read_run_info(pathlib.Path(workdir))
    config = ConfigDict(stored.pop("config"))
    task = config.get("task", "diffusion")
    if task not in TASKS:
        raise ValueError(f"{workdir}: task {task!r} is not one of {sorted(TASKS)}")
    missing = [k for k in REQUIRED[task] if k not in config]
    if missing:
        raise ValueError(f"{workdir}/config.json lacks the section(s) {', '.join(missing)} a "
                         f"{task} run has: not written by train.py, or edited")  # fmt: skip
    kernel = config.get("model", {}).get("attention_implementation", "auto")
    if validate.platform_misfit(kernel, jax.default_backend()):
        # a run trained on a TPU (GPU) read here: every kernel computes the same attention
        config.model.attention_implementation = "auto"
    return config, task, stored


def restore(
    workdir: str | pathlib.Path,
    step: int | None = None,
    *,
    task: str | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> Run:
    """Checkpoint `step` (default: the latest) of the train.py workdir `workdir`.

    Args:
      workdir: a directory `train.py` wrote (config.json, checkpoints/).
      step: the checkpoint to read; None for the latest.
      task: when given, the task the caller expects; another one is refused by name.
      sharding: where the arrays go (default: the first device).

    Returns:
      A `Run` with the config, step, parameters and EMA parameters.

    Raises:
      FileNotFoundError: not a workdir, or no such checkpoint (naming the available ones).
      checkpoints.CheckpointDamaged: no intact checkpoint (with step: that one is damaged);
        with step None a damaged newest one is reported on stderr and the next older used.
      ValueError: the workdir holds another task than `task`.
    """
    import orbax.checkpoint as ocp

    workdir = pathlib.Path(workdir).absolute()  # orbax reads no metadata of a relative path
    config, found, info = read_config(workdir)
    if task is not None and found != task:
        raise ValueError(f"{workdir} holds a {found!r} run, not {TASKS[task]}")
    directory = workdir / "checkpoints"
    manager = checkpoints.make_manager(directory)
    try:
        available = list(manager.all_steps())
    finally:
        manager.close()
    if not available or (step is not None and step not in available):
        raise FileNotFoundError(f"no checkpoint {'' if step is None else step} in {directory} "
                                f"(available: {sorted(available)}); train first")  # fmt: skip
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def read(s: int):
        item = directory / str(s) / "default"  # the manager's one item
        verbosity = logging.get_verbosity()  # orbax warns that the item has no step metadata
        logging.set_verbosity(logging.ERROR)
        try:
            return _read(item)
        finally:
            logging.set_verbosity(verbosity)

    def _read(item: pathlib.Path):
        with ocp.PyTreeCheckpointer() as checkpointer:
            stored = checkpointer.metadata(item).item_metadata.tree
            wanted = {k: stored[k] for k in ("params", "ema_params", "step")}
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), wanted
            )
            restore_args = ocp.checkpoint_utils.construct_restore_args(target)
            return checkpointer.restore(item, args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))  # fmt: skip

    # the newest intact one, or exactly the one asked for (CheckpointDamaged if it is not)
    _, state, _ = checkpoints.restore_intact([step] if step is not None else available,
                                             directory, read)  # fmt: skip
    return Run(workdir, config, found, int(state["step"]), state["params"],
               state["ema_params"], info)  # fmt: skip
