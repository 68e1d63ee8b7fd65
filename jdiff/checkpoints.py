"""Orbax checkpoints of the train state: periodic saves, keep the last N, resume the latest.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed at any moment (even `kill -9`) resumes from the last complete checkpoint. On several
processes every one calls these functions; orbax writes one checkpoint for all of them.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import orbax.checkpoint as ocp

RUN_INFO = "config.json"  # a workdir's record of how its run was made


def make_manager(directory: str | pathlib.Path, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """A manager over `directory` that keeps the newest `max_to_keep` checkpoints (the caller
    decides when to save)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Save `state` as checkpoint `step` (asynchronously: `manager.wait_until_finished()`)."""
    manager.save(step, args=ocp.args.StandardSave(state), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """Checkpoint `step` restored into `abstract_state`'s structure, dtypes and shardings (a
    pytree of `jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape`)."""
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Any | None:
    """The latest checkpoint, restored as `restore` does; None when there is none."""
    step = manager.latest_step()
    return None if step is None else restore(manager, step, abstract_state)


def write_run_info(workdir: pathlib.Path, config: dict, *, version: str, **extra: Any) -> None:
    """Record the run's config (a JSON-able dict), the jdiff version and `extra` facts (e.g. the
    data's number of classes) in workdir/config.json, from which the model can be rebuilt."""
    info = {"jdiff_version": version, **extra, "config": config}
    (pathlib.Path(workdir) / RUN_INFO).write_text(json.dumps(info, indent=2))


def read_run_info(workdir: pathlib.Path) -> dict:
    """The dict `write_run_info` stored; FileNotFoundError naming the workdir if there is none."""
    path = pathlib.Path(workdir) / RUN_INFO
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a train.py workdir?")
    return json.loads(path.read_text())
