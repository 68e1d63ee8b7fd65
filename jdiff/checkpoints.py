"""Orbax checkpoints of the train state: periodic saves, keep the last N, resume the latest,
and a checksum of every file of every step so a damaged one is found and skipped.

Orbax writes each checkpoint to a temporary directory and renames it when complete, so a run
killed at any moment (even `kill -9`) resumes from the last complete checkpoint. A save waits
for the one before it, whose files are then hashed into `MANIFEST` inside its step directory
(SHA-256 and size of each): a `kill -9` costs at most the interval in progress. A save
that the disk has no room for is refused before it starts, and one that fails as it writes
(the disk filled meanwhile, a file-size limit, no permission) ends the run with
`CheckpointWriteFailed` naming the step, the reason and the intact steps to resume from.
A restore checks the manifest, then that the restored arrays are finite; a step that fails
either (or that orbax cannot read) is reported by path and the next older one is tried. On
several processes every one calls these functions; orbax writes one checkpoint for all of
them and process 0 the manifests.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import re
import shutil
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jdiff.validate import OS_HINTS

MANIFEST = "jdiff_sha256.json"  # in each step directory: {relative path: [bytes, sha256]}

RUN_INFO = "config.json"  # a workdir's record of how its run was made


def make_manager(directory: str | pathlib.Path, *, max_to_keep: int = 3) -> ocp.CheckpointManager:
    """A manager over `directory` that keeps the newest `max_to_keep` checkpoints (the caller
    decides when to save)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


class CheckpointDamaged(RuntimeError):
    """No checkpoint of a directory could be restored intact (each one's reason is named)."""


class CheckpointWriteFailed(RuntimeError):
    """A checkpoint could not be written (a full disk, a file-size limit, no permission): the
    message names the step, the directory, the system's reason and the steps still intact."""


def write_failed(manager: ocp.CheckpointManager, step: int | None, e: BaseException | str,
                 code: int | None = None) -> CheckpointWriteFailed:  # fmt: skip
    """`e`, raised by orbax while writing checkpoint `step` (None: the one in flight), or a
    reason with its errno `code`, as one `CheckpointWriteFailed`; orbax reports an OS error
    as "[os_error_code='28']" in its text."""
    text = str(e)
    if code is None and isinstance(e, OSError):
        code = e.errno
    if code is None and (found := re.search(r"os_error_code='?(\d+)", text)):
        code = int(found.group(1))
    if step is None and (found := re.search(r"/(\d+)\.orbax-checkpoint-tmp", text)):
        step = int(found.group(1))
    if isinstance(e, BaseException):
        text = os.strerror(code) if code else text.strip().splitlines()[0][:300]
    hint = f" ({OS_HINTS[code]})" if code in OS_HINTS else ""
    manager.reload()
    kept = ", ".join(map(str, manager.all_steps())) or "none"
    name = "a checkpoint" if step is None else f"checkpoint {step}"
    return CheckpointWriteFailed(
        f"{name} could not be written to {manager.directory}: {text}{hint}. The checkpoints "
        f"saved before it are intact ({kept}): rerun to resume from the newest"
    )


def check_space(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Refuse to start checkpoint `step` where the disk has not room for its arrays (and 64
    MiB to spare): a save that fills the disk fails half-written (`CheckpointWriteFailed`)."""
    need = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))  # global sizes
    free = shutil.disk_usage(manager.directory).free
    if free < need + (64 << 20):
        mib = 1 << 20
        raise write_failed(manager, step, f"it needs {need / mib:.0f} MiB and {free / mib:.0f} "
                           "MiB are free", errno.ENOSPC)  # fmt: skip


def step_dir(manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
    """The directory of checkpoint `step`."""
    return pathlib.Path(manager.directory) / str(step)


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
    """Save `state` as checkpoint `step` asynchronously (`finish` waits for it), after the save
    in flight, if any, has finished and been given its manifest."""
    finish(manager)
    check_space(manager, step, state)
    try:
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
    except (OSError, ValueError) as e:  # orbax's OS errors arrive as ValueError("OUT_OF_RANGE...")
        raise write_failed(manager, step, e) from e


def finish(manager: ocp.CheckpointManager) -> None:
    """Wait for the save in flight and write the manifest of every step that lacks one."""
    try:
        manager.wait_until_finished()
    except (OSError, ValueError) as e:
        raise write_failed(manager, None, e) from e
    if jax.process_index() == 0:
        for step in manager.all_steps():
            if not (step_dir(manager, step) / MANIFEST).exists():
                write_manifest(step_dir(manager, step))


def _files(directory: pathlib.Path):
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: pathlib.Path) -> None:
    """Hash every file under a finished step `directory` into its `MANIFEST` (atomically)."""
    entries = {str(p.relative_to(directory)): [p.stat().st_size, _sha256(p)]
               for p in _files(directory)}  # fmt: skip
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(entries, indent=0))
    os.replace(tmp, directory / MANIFEST)


def verify(directory: pathlib.Path) -> str | None:
    """Why the step `directory` is damaged (a file missing, of another size or checksum than
    its manifest says), or None: intact, or saved without a manifest (older jdiff, or killed
    before it was written), in which case only the restore itself can tell."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return f"its manifest {path} is unreadable ({e})"
    for name, (size, digest) in entries.items():
        file = directory / name
        if not file.is_file():
            return f"{file} is missing"
        if file.stat().st_size != size:
            return f"{file} has {file.stat().st_size} bytes, {size} were written"
        if _sha256(file) != digest:
            return f"{file} does not match the checksum written with it"
    return None


def all_finite(tree: Any) -> bool:
    """Whether every floating-point array of `tree` is finite (sharded arrays included)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return True
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in xs])))(leaves))


def restore_intact(steps: list[int], directory: pathlib.Path, read: Callable[[int], Any],
                   *, what: str = "checkpoint") -> tuple[int, Any, dict[int, str]]:  # fmt: skip
    """(step, state, {damaged step: reason}) of the newest of `steps` that `read(step)`
    restores intact: its manifest holds, orbax reads it and its arrays are finite. Each damaged
    one is reported on stderr by path; CheckpointDamaged when none is intact."""
    damaged = {}
    for step in sorted(steps, reverse=True):
        path = directory / str(step)
        reason = verify(path)
        state = None
        if reason is None:
            try:
                state = read(step)
            except Exception as e:  # orbax raises many kinds (OUT_OF_RANGE, ValueError, OSError)
                reason = f"it cannot be read ({str(e).strip().splitlines()[0][:300]})"
        if reason is None and not all_finite(state):
            reason = "it holds non-finite values"
        if reason is None:
            if damaged:
                print(f"warning: using {what} {step} instead", file=sys.stderr, flush=True)
            return step, state, damaged
        damaged[step] = reason
        print(f"warning: {what} {path} is damaged: {reason}", file=sys.stderr, flush=True)
    raise CheckpointDamaged(
        f"no intact checkpoint in {directory}: "
        + "; ".join(f"{s}: {r}" for s, r in damaged.items())
        + ". Move the damaged steps away to start again from scratch."
    )


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """Checkpoint `step` restored into `abstract_state`'s structure, dtypes and shardings (a
    pytree of `jax.ShapeDtypeStruct`, e.g. from `jax.eval_shape`)."""
    return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Any | None:
    """The newest intact checkpoint (`restore_intact`), restored as `restore` does; None when
    there is none. Damaged newer steps are moved to `<directory>.damaged/` (process 0), so the
    run can save those steps again."""
    steps = list(manager.all_steps())
    if not steps:
        return None
    directory = pathlib.Path(manager.directory)
    _, state, damaged = restore_intact(
        steps, directory, lambda s: restore(manager, s, abstract_state)
    )
    if damaged:
        quarantine = directory.parent / (directory.name + ".damaged")
        if jax.process_index() == 0:
            quarantine.mkdir(exist_ok=True)
            for bad in damaged:  # all newer than `step`
                target, n = quarantine / str(bad), 1
                while target.exists():
                    target, n = quarantine / f"{bad}.{n}", n + 1
                os.replace(directory / str(bad), target)
                print(f"moved {directory / str(bad)} to {target}", file=sys.stderr, flush=True)
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jdiff damaged checkpoints moved")
        manager.reload()
    return state


def write_run_info(workdir: pathlib.Path, config: dict, *, version: str, **extra: Any) -> None:
    """Record the run's config (a JSON-able dict), the jdiff version and `extra` facts (e.g. the
    data's number of classes) in workdir/config.json, from which the model can be rebuilt."""
    info = {"jdiff_version": version, **extra, "config": config}
    (pathlib.Path(workdir) / RUN_INFO).write_text(json.dumps(info, indent=2))


def read_run_info(workdir: pathlib.Path) -> dict:
    """The dict `write_run_info` stored; FileNotFoundError naming the workdir if there is none."""
    path = pathlib.Path(workdir) / RUN_INFO
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {workdir} a train.py workdir?")
    try:
        info = json.loads(path.read_text())
    except (ValueError, UnicodeError) as e:
        raise ValueError(f"{path} is not the JSON train.py writes ({e})") from None
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise ValueError(f"{path} holds no 'config' section: is {workdir} a train.py workdir?")
    return info
