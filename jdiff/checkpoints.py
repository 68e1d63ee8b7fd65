"""Orbax checkpoints of the train state: periodic saves, keep the last N, resume the latest.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed at any moment (even `kill -9`) resumes from the last complete checkpoint. On several
processes every one calls these functions; orbax writes one checkpoint for all of them.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


def make_manager(directory: str | pathlib.Path, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """A manager over `directory` that keeps the newest `max_to_keep` checkpoints (the caller
    decides when to save)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Save `state` as checkpoint `step` (asynchronously: `manager.wait_until_finished()`)."""
    manager.save(step, args=ocp.args.StandardSave(state), force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Any | None:
    """The latest checkpoint restored into `abstract_state`'s structure, dtypes and shardings
    (a pytree of `jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape`); None when there is none."""
    step = manager.latest_step()
    if step is None:
        return None
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def abstract(tree: Any) -> Any:
    """The ShapeDtypeStruct (with sharding) of every array of `tree`."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )
