"""Checkpoints you can trust: every saved step carries a manifest of checksums; a damaged
newest step (truncated, zeroed bytes, a missing file, non-finite values) is reported by path
and the next older one is used, by the loaders and by a resuming train.py; a failed write
(a full disk) loses nothing that was saved."""

import collections
import errno
import json
import os
import shlex
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from runs import ROOT, XLA_FLAGS, assert_same_tree, state_at, tiny_config

from jdiff import checkpoints, cli, runs, trainer, training


@pytest.fixture
def run_copy(uninterrupted, tmp_path):
    """A copy of the tiny run (checkpoints 2 and 4, each with its manifest)."""
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted[0], workdir)
    return workdir


def largest_chunk(step_dir):
    return max((p for p in step_dir.rglob("*") if p.is_file() and "/d/" in str(p)),
               key=lambda p: p.stat().st_size)  # fmt: skip


def truncate(step_dir):
    chunk = largest_chunk(step_dir)
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


def zero_bytes(step_dir):
    chunk = largest_chunk(step_dir)
    data = bytearray(chunk.read_bytes())
    data[100:164] = bytes(64)
    chunk.write_bytes(bytes(data))


def remove_file(step_dir):
    largest_chunk(step_dir).unlink()


def test_every_step_has_a_manifest_that_holds(run_copy):
    for step in (2, 4):
        directory = run_copy / "checkpoints" / str(step)
        entries = json.loads((directory / checkpoints.MANIFEST).read_text())
        assert len(entries) > 3 and checkpoints.verify(directory) is None


@pytest.mark.parametrize("damage", [truncate, zero_bytes, remove_file])
def test_a_damaged_newest_step_falls_back_to_the_one_before(run_copy, damage, capsys):
    damage(run_copy / "checkpoints" / "4")
    if damage is not truncate:  # (a truncated chunk may be one orbax never reads back)
        assert "checkpoints/4/" in checkpoints.verify(run_copy / "checkpoints" / "4")
    restored = runs.restore(run_copy)
    err = capsys.readouterr().err
    assert restored.step == 2 and str(run_copy / "checkpoints" / "4") in err, err
    assert "using checkpoint 2 instead" in err
    assert_same_tree(restored.params, state_at(run_copy, 2).params)
    with pytest.raises(checkpoints.CheckpointDamaged, match="4: "):
        runs.restore(run_copy, step=4)  # asked for by number: refused, not replaced


def test_train_resumes_from_the_intact_step_and_redoes_the_damaged_one(run_copy, uninterrupted,
                                                                       capsys):  # fmt: skip
    zero_bytes(run_copy / "checkpoints" / "4")
    trainer.train(tiny_config(), run_copy)  # the tiny config's 4 steps
    err = capsys.readouterr().err
    assert "is damaged" in err and (run_copy / "checkpoints.damaged" / "4").is_dir(), err
    # one interval lost, then the same state as the run that was never damaged
    assert_same_tree(state_at(run_copy, 4), state_at(uninterrupted[0], 4))
    assert checkpoints.verify(run_copy / "checkpoints" / "4") is None


def test_no_intact_step_is_an_error_naming_each(run_copy):
    truncate(run_copy / "checkpoints" / "4")
    remove_file(run_copy / "checkpoints" / "2")
    with pytest.raises(checkpoints.CheckpointDamaged) as e:
        runs.restore(run_copy)
    assert "4: " in str(e.value) and "2: " in str(e.value) and "is missing" in str(e.value)
    assert "no intact checkpoint" in cli.describe(e.value)


def test_non_finite_values_without_a_manifest_fall_back(run_copy, capsys):
    state = state_at(run_copy, 4)
    bad = state.replace(
        params=jax.tree.map(lambda x: x * np.nan, state.params), step=state.step + 2
    )
    manager = checkpoints.make_manager(run_copy / "checkpoints")
    manager.save(6, args=ocp.args.StandardSave(bad), force=True)  # as an older jdiff: no manifest
    manager.wait_until_finished()
    manager.close()
    assert not (run_copy / "checkpoints" / "6" / checkpoints.MANIFEST).exists()
    restored = runs.restore(run_copy)
    assert restored.step == 4 and "non-finite" in capsys.readouterr().err


def test_a_full_disk_is_refused_before_the_save_and_loses_nothing(run_copy, monkeypatch):
    """No room for the next checkpoint: the save stops before writing it, saying which steps
    are intact; a write that raises on its own (no permission) is reported the same way."""
    state = state_at(run_copy, 4)
    manager = checkpoints.make_manager(run_copy / "checkpoints")
    free = collections.namedtuple("usage", "total used free")(1 << 30, 1 << 30, 10 << 20)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: free)
    with pytest.raises(checkpoints.CheckpointWriteFailed) as e:
        checkpoints.save(manager, 6, state)
    message = cli.describe(e.value)
    assert message.startswith(f"checkpoint 6 could not be written to {run_copy / 'checkpoints'}")
    assert "MiB are free (the disk is full" in message and "intact (2, 4)" in message
    assert not any(p.name.startswith("6") for p in (run_copy / "checkpoints").iterdir())
    monkeypatch.undo()

    def denied(self, step, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(run_copy / "checkpoints"))

    monkeypatch.setattr(ocp.CheckpointManager, "save", denied)
    with pytest.raises(checkpoints.CheckpointWriteFailed, match="may write to"):
        checkpoints.save(manager, 6, state)
    monkeypatch.undo()
    manager.close()
    assert checkpoints.verify(run_copy / "checkpoints" / "4") is None
    assert runs.restore(run_copy).step == 4


def test_a_write_failing_midway_is_one_line_and_the_rerun_loses_nothing(run_copy, uninterrupted):
    """A real failing write inside orbax's background save (a file-size limit: the chunks
    fail with EFBIG as a full disk's fail with ENOSPC): train.py ends with one line naming the
    step and the intact checkpoints, none of orbax's tracebacks; the rerun redoes the step and
    reaches the state of the run that never failed."""
    shutil.rmtree(run_copy / "checkpoints" / "4")
    command = (f"trap '' XFSZ; ulimit -f 256; exec {shlex.quote(sys.executable)} "
               f"{ROOT / 'train.py'} --config={ROOT / 'configs' / 'default.py'}:tiny "
               f"--config.mesh.data=1 --workdir={run_copy}")  # fmt: skip
    # the tests' compile cache and devices (as runs.launch): the step is the tiny run's, read
    # from the cache, so no cache entry (742 kB) meets the file-size limit
    env = {
        **os.environ,
        "XLA_FLAGS": XLA_FLAGS,
        "JAX_PLATFORMS": "cpu",
        "JAX_NUM_CPU_DEVICES": "8",
        "JDIFF_JAX_CACHE": os.environ.get("JDIFF_JAX_CACHE", str(ROOT / ".jax_cache")),
    }
    env.pop(cli.DEBUG, None)
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert errors == [f"error: checkpoint 4 could not be written to {run_copy / 'checkpoints'}: "
                      "File too large (a file-size limit (ulimit -f) stops it: raise it). The "
                      "checkpoints saved before it are intact (2): rerun to resume from the "
                      "newest"], done.stderr[-3000:]  # fmt: skip
    assert checkpoints.verify(run_copy / "checkpoints" / "2") is None
    trainer.train(tiny_config(), run_copy)
    assert_same_tree(state_at(run_copy, 4), state_at(uninterrupted[0], 4))


def test_the_guard_checks_updated_parameters_and_numbers_steps_as_checkpoints_do():
    import optax

    def loss_fn(params, batch, key):
        return params["w"].sum() * 1e10, {}  # finite loss and gradient (1e10 each)

    optimizer = optax.sgd(1e30)  # an update of 1e40 overflows float32
    step = jax.jit(training.make_step(loss_fn, optimizer))
    params = {"w": np.full((4,), 1e10, np.float32)}
    state = training.init_state(params, optimizer)
    state, metrics = step(state, {}, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert int(state.nonfinite_step) == 1  # the first step, as checkpoint 1 would be named
    np.testing.assert_array_equal(state.params["w"], params["w"])  # not taken
