"""Sharding: meshes and rules, 1 vs 8 devices, two processes vs one, preemption of one host."""

import signal
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest
from jax.sharding import PartitionSpec as P
from runs import (
    ROOT,
    launch,
    max_relative_difference,
    state_at,
    tiny_config,
    wait_for_checkpoint,
)

from jdiff import sharding, trainer


def test_mesh_shapes_and_errors():
    assert jax.device_count() == 8  # conftest
    assert sharding.make_mesh().devices.shape == (8, 1)
    mesh = sharding.make_mesh(data=4, fsdp=2)
    assert mesh.devices.shape == (4, 2) and mesh.axis_names == ("data", "fsdp")
    assert sharding.make_mesh(data=1).devices.size == 1
    with pytest.raises(ValueError, match="fsdp=3 does not divide the 8 devices"):
        sharding.make_mesh(fsdp=3)
    with pytest.raises(ValueError, match="16 > 8 devices"):
        sharding.make_mesh(data=8, fsdp=2)


def test_parameter_rule_splits_big_arrays_on_their_largest_divisible_axis():
    mesh = sharding.make_mesh(data=4, fsdp=2)
    assert sharding.param_sharding(mesh, (3, 3, 64, 128), min_size=1).spec == P(
        None, None, None, "fsdp"
    )
    assert sharding.param_sharding(mesh, (3, 3, 64, 127), min_size=1).spec == P(
        None, None, "fsdp", None
    )
    assert sharding.param_sharding(mesh, (3, 3, 64, 128)).spec == P()  # below min_size
    assert sharding.param_sharding(mesh, ()).spec == P()
    assert sharding.param_sharding(sharding.make_mesh(), (4096, 4096)).spec == P()  # fsdp 1


def run_steps(tmp_path, num_steps=4, **mesh):
    """Train the tiny config on a mesh in this process; the parameters after num_steps."""
    config = tiny_config()
    config.mesh.update(mesh)  # the tiny config's Adam eps (1e-6) keeps this about sharding
    source, num_classes = trainer.load_data(config)
    run = trainer.build(config, tmp_path, source, num_classes)
    assert run.state.params["conv_in"]["kernel"].sharding.mesh.devices.size == (
        mesh.get("data", 8) * mesh.get("fsdp", 1)
    )
    for n in range(num_steps):
        batch = sharding.global_batch(run.batches(n), run.batch_sharding)
        run.state, _ = run.step(run.state, batch, run.k_train)
    run.manager.close()
    return jax.tree.map(np.asarray, run.state.params), run.state


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The tiny config's parameters after its 4 steps on one device: the reference of every
    mesh and of two processes."""
    return run_steps(tmp_path_factory.mktemp("one"), data=1)[0]


def test_one_and_eight_devices_train_alike(one_device, tmp_path):
    eight, _ = run_steps(tmp_path / "eight", data=8)
    assert max_relative_difference(eight, one_device) <= 1e-5
    fsdp, state = run_steps(tmp_path / "fsdp", data=4, fsdp=2, fsdp_min_size=1024)
    spec = state.params["down_blocks_0"]["resnets_0"]["conv2"]["kernel"].sharding.spec
    assert "fsdp" in spec  # the parameters really are split
    assert max_relative_difference(fsdp, one_device) <= 1e-5


def test_importing_does_not_start_a_backend():
    """jax.distributed.initialize must come before any backend: no arrays at import time."""
    for program in ("train", "sample"):
        code = (f"import {program}; from jax._src import xla_bridge as xb; "
                "assert not xb.backends_are_initialized()")  # fmt: skip
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


def two_processes(workdir, *flags):
    port = portpicker.pick_unused_port()
    env = {"JAX_NUM_CPU_DEVICES": "2", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    return [launch(workdir, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                   "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
                   "--config.distributed.timeout_s=60", *flags, env=env)
            for i in range(2)]  # fmt: skip


def finish(processes, timeout=600):
    """Outputs of all processes; every one is killed if any hangs or fails."""
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in processes]
    finally:
        for p in processes:
            p.kill()
    return outputs


def test_two_processes_train_in_lockstep_and_stop_together(one_device, tmp_path):
    """Two processes of two devices each train as one process does; SIGTERM on one host
    stops both at the same step, with one checkpoint of it."""
    processes = two_processes(tmp_path, "--config.train.num_steps=100000",
                              "--config.train.checkpoint_every=4", "--config.train.sample_every=4",
                              "--config.train.keep_checkpoints=1000")  # fmt: skip
    wait_for_checkpoint(processes, tmp_path, 4, timeout=600)
    processes[1].send_signal(signal.SIGTERM)
    outputs = finish(processes)
    assert [p.returncode for p in processes] == [128 + signal.SIGTERM] * 2, outputs[0][-2000:]
    assert "devices: 4 on 2 process(es)" in outputs[0]
    saved = [line for line in outputs[0].splitlines() if "SIGTERM: saved step" in line]
    assert saved, outputs[0][-2000:]
    assert "SIGTERM: saved step" not in outputs[1]  # only process 0 reports and writes
    step = int(saved[0].split("saved step ")[1].split()[0])
    assert step > 4 and (tmp_path / "checkpoints" / str(step)).exists()
    assert (tmp_path / "samples" / "step_0000004.png").exists()
    multi = state_at(tmp_path, 4)
    assert int(multi.step) == 4
    assert max_relative_difference(multi.params, one_device) <= 1e-5
