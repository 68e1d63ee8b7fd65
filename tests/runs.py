"""Helpers for tests that run train.py: the tiny config, launching it, reading its checkpoints."""

import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs import default
from jdiff import checkpoints, models, sharding, training

ROOT = pathlib.Path(__file__).resolve().parents[1]
# every test process, this one and those it launches: the same compiler settings, so the same
# bits (kill-and-resume runs are compared bit for bit with runs in this process)
XLA_FLAGS = "--xla_backend_optimization_level=0"


def tiny_config(**train_overrides) -> ConfigDict:
    """configs/default.py:tiny on the first of this process's 8 devices."""
    config = default.get_config("tiny")
    config.train.update(train_overrides)
    config.mesh.data = 1
    return config


def final_state(workdir) -> training.TrainState:
    """The latest checkpoint of a tiny-config run, on one device whatever mesh wrote it."""
    return state_at(workdir, None)


def state_at(workdir, step: int | None) -> training.TrainState:
    """Checkpoint `step` (None: the latest) of a tiny-config run, on one device."""
    config = tiny_config()
    model = models.make_model(config, num_classes=10)  # the digits' classes
    optimizer = training.make_optimizer(config.optim)
    init = training.make_init(model, optimizer, jax.random.key(0), image_shape=(8, 8, 1))
    abstract = jax.eval_shape(init)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = sharding.with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
    manager = checkpoints.make_manager(pathlib.Path(workdir) / "checkpoints")
    try:
        return checkpoints.restore(manager, manager.latest_step() if step is None else step,
                                   target)  # fmt: skip
    finally:
        manager.close()


def assert_same_tree(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def max_relative_difference(a, b) -> float:
    """max |a - b| / max |b| over all leaves of two parameter trees."""
    diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))  # fmt: skip
    return diff / max(float(np.abs(np.asarray(y)).max()) for y in jax.tree.leaves(b))


def launch(workdir, *flags, env=None, script="train.py") -> subprocess.Popen:
    """Start train.py on the tiny config, or sample.py (output captured), sharing the tests'
    compile cache."""
    env = {
        **os.environ,
        "JDIFF_JAX_CACHE": os.environ.get("JDIFF_JAX_CACHE", str(ROOT / ".jax_cache")),
        "JAX_NUM_CPU_DEVICES": "8",  # as in this process: XLA's CPU threading (so rounding)
        **(env or {}),  # depends on the device count; bit-identical runs need the same
    }
    env["XLA_FLAGS"] = XLA_FLAGS  # no device-count flag from outside; the tests' settings
    command = [sys.executable, str(ROOT / script), f"--workdir={workdir}"]
    if script == "train.py":  # --config before its --config.x overrides
        command.append(f"--config={ROOT / 'configs' / 'default.py'}:tiny")
    command += flags
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def wait_for_checkpoint(processes, directory, step, timeout=300) -> None:
    """Wait until checkpoint `step` exists; kill everything and fail if a process dies first."""
    deadline = time.monotonic() + timeout
    while not (pathlib.Path(directory) / "checkpoints" / str(step)).exists():
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            for p in processes:
                p.kill()
            outputs = [p.communicate()[0][-2000:] for p in processes]
            pytest.fail(f"no checkpoint {step}:\n" + "\n---\n".join(outputs))
        time.sleep(0.2)
