"""Training end to end on the tiny config: checkpoints, exact resume, errors, non-finite stop."""

import importlib
import json
import pathlib
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runs import assert_same_tree, final_state, launch, tiny_config, wait_for_checkpoint

from jdiff import checkpoints, models, runs, trainer, training


def test_train_writes_checkpoints_config_metrics_and_samples(uninterrupted):
    workdir, grid = uninterrupted
    assert grid.exists() and grid.suffix == ".png"
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2",
        "4",
    ]
    stored = json.loads((workdir / "config.json").read_text())
    assert stored["jdiff_version"] and stored["config"]["data"]["name"] == "digits"
    assert any((workdir / "tb").iterdir())
    state = final_state(workdir)
    assert int(state.step) == 4 and int(state.nonfinite_step) == -1
    assert not all(
        np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(state.params), jax.tree.leaves(state.ema_params), strict=True
        )
    )


def test_runs_restore_reads_any_checkpoint_without_the_optimizer(uninterrupted, monkeypatch):
    workdir = uninterrupted[0]
    state = final_state(workdir)
    run = runs.restore(workdir)
    assert run.task == "diffusion" and run.step == 4 and run.num_classes == 10
    assert run.config.data.name == "digits"
    assert_same_tree(run.params, state.params)
    assert_same_tree(run.weights(), state.ema_params)
    assert runs.restore(workdir, 2).step == 2
    monkeypatch.chdir(workdir.parent)  # a relative workdir, as configs name them
    assert_same_tree(runs.restore(pathlib.Path(workdir.name)).params, state.params)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint 3 .*available: \[2, 4\]"):
        runs.restore(workdir, 3)
    with pytest.raises(ValueError, match="holds a 'diffusion' run, not an autoencoder"):
        runs.restore(workdir, task="autoencoder")
    with pytest.raises(FileNotFoundError, match=r"is .* a train\.py workdir"):
        runs.restore(workdir / "checkpoints")


def test_resume_is_bit_identical(uninterrupted, tmp_path):
    trainer.train(tiny_config(num_steps=2), tmp_path)
    trainer.train(tiny_config(), tmp_path)  # resumes at step 2
    assert_same_tree(final_state(tmp_path), final_state(uninterrupted[0]))


def test_resume_refuses_a_different_model(uninterrupted):
    config = tiny_config()
    config.model.overrides = {"layers_per_block": 2, "norm_num_groups": 8}
    with pytest.raises(ValueError, match="model differ"):
        trainer.prepare_workdir(uninterrupted[0], config)


ONE_DEVICE = "--config.mesh.data=1"  # as tiny_config(), whose run is the reference


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_state(uninterrupted, tmp_path, sig):
    """After kill -9 the run resumes from its last complete checkpoint; SIGTERM saves first.
    Either way the resumed run ends bit-identical to the uninterrupted one."""
    # every checkpoint kept: with warm caches the signal can come many steps after the second,
    # which keeping the newest 3 would have deleted (then the resume started from nothing)
    flags = ["--config.train.num_steps=400", "--config.train.checkpoint_every=2",
             "--config.train.keep_checkpoints=1000", ONE_DEVICE]  # fmt: skip
    process = launch(tmp_path, *flags)
    try:
        wait_for_checkpoint([process], tmp_path, 2)
        process.send_signal(sig)
        out = process.communicate(timeout=120)[0]
    finally:
        process.kill()
    if sig == signal.SIGTERM:
        assert process.returncode == 128 + signal.SIGTERM, out[-3000:]
        assert "SIGTERM: saved step" in out
    # roll back to step 2 (the kill may have come later), keeping any half-written checkpoint
    for path in (tmp_path / "checkpoints").iterdir():
        if path.name.isdigit() and int(path.name) > 2:
            shutil.rmtree(path)
    resumed = launch(tmp_path, ONE_DEVICE)  # the tiny config's own 4 steps
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert "resuming from step 2" in out and "samples:" in out, out[-3000:]
    assert_same_tree(final_state(tmp_path), final_state(uninterrupted[0]))


def test_nonfinite_loss_stops_without_changing_the_state(tmp_path):
    config = tiny_config()
    source, num_classes = trainer.load_data(config)
    run = trainer.build(config, trainer.prepare_workdir(tmp_path, config), source, num_classes)
    before = jax.tree.map(np.asarray, run.state)
    batch = run.batches(0)
    batch["image"][0, 0, 0, 0] = np.nan
    state, metrics = run.step(run.state, batch, run.k_train)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 1 and int(state.nonfinite_step) == 1
    assert_same_tree(state.params, before.params)
    with pytest.raises(trainer.NonFiniteLoss, match="non-finite at step 1"):
        trainer.check_finite(state, run.manager)
    run.manager.close()


def test_ema_warmup():
    np.testing.assert_allclose(training.ema_decay(0, 0.9999), 0.1)
    np.testing.assert_allclose(training.ema_decay(90, 0.9999), 91 / 100)
    np.testing.assert_allclose(training.ema_decay(10**7, 0.9999), 0.9999)


@pytest.mark.parametrize(
    "section, key, value, match",
    [
        ("optim", "name", "sgd", "optim.name='sgd'"),
        ("optim", "learning_rate", -1.0, "learning_rate must be > 0"),
        ("model", "variant", "huge", "model.variant='huge'"),
        ("model", "dtype", "float16", "model.dtype='float16'"),
        ("diffusion", "loss", "l1", "loss='l1'"),
        ("diffusion", "schedule", "exp", "exp"),
    ],
)
def test_bad_config_values_are_named(section, key, value, match):
    config = tiny_config()
    config[section][key] = value
    with pytest.raises(ValueError, match=match):
        model = models.make_model(config, num_classes=10)
        training.make_optimizer(config.optim)
        schedule = models.make_schedule(config.diffusion)
        training.make_train_step(model, schedule, training.make_optimizer(config.optim),
                                 loss=config.diffusion.loss)  # fmt: skip


def test_class_conditional_needs_labels():
    config = tiny_config()
    config.model.class_conditional = True
    with pytest.raises(ValueError, match="class labels"):
        models.make_model(config, num_classes=None)
    model = models.make_model(config, num_classes=10)
    assert model.num_class_embeds == 11


def test_gradient_accumulation_updates_every_k_steps():
    config = tiny_config()
    config.optim.update(accumulate_steps=2, warmup_steps=0)
    optimizer = training.make_optimizer(config.optim)
    params = {"w": jnp.ones(3)}
    state = training.init_state(params, optimizer)
    grads = {"w": jnp.ones(3)}
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    np.testing.assert_array_equal(updates["w"], 0.0)  # first micro-step: no update yet
    updates, _ = optimizer.update(grads, opt_state, params)
    assert np.all(np.asarray(updates["w"]) < 0)


def test_sample_py_rebuilds_the_model_from_the_workdir(uninterrupted):
    workdir = uninterrupted[0]
    process = launch(workdir, "--num_samples=4", "--num_steps=3", "--method=dpmpp_2m",
                     "--trajectory", script="sample.py")  # fmt: skip
    out = process.communicate(timeout=300)[0]
    assert process.returncode == 0, out[-3000:]
    arrays = np.load(workdir / "samples" / "dpmpp_2m3_seed0_step4.npz")
    assert arrays["images"].shape == (4, 8, 8, 1) and arrays["images"].dtype == np.uint8
    assert (workdir / "samples" / "trajectory_seed0.png").exists()
    assert str(workdir / "samples" / "dpmpp_2m3_seed0_step4.png") in out


def test_sample_py_inpaints_a_pixel_model(uninterrupted):
    """--init_image + --mask with the class-conditional digits model (RePaint): the result, a
    comparison image and an .npz whose known pixels are the input's exactly."""
    from PIL import Image

    workdir = uninterrupted[0]
    digit = np.zeros((8, 8), np.uint8)
    digit[1:7, 3:5] = 255  # a "1"
    mask = np.zeros((8, 8), np.uint8)
    mask[4:, :] = 255  # repaint the bottom half
    Image.fromarray(digit).save(workdir / "digit.png")
    Image.fromarray(mask).save(workdir / "mask.png")
    process = launch(workdir, f"--init_image={workdir / 'digit.png'}",
                     f"--mask={workdir / 'mask.png'}", "--num_samples=3", "--num_steps=5",
                     "--jump_length=2", "--jump_n_sample=2", "--guidance_scale=2",
                     script="sample.py")  # fmt: skip
    out = process.communicate(timeout=300)[0]
    assert process.returncode == 0, out[-3000:]
    stem = workdir / "samples" / "repaint_5x2x2_eta0_cfg2_seed0_step4"
    assert f"comparison: {stem}_comparison.png" in out and stem.with_suffix(".png").exists()
    arrays = np.load(stem.with_suffix(".npz"))
    assert arrays["images"].shape == (3, 8, 8, 1) and arrays["labels"].tolist() == [0, 1, 2]
    np.testing.assert_array_equal(arrays["masks"][0], mask // 255)
    np.testing.assert_array_equal(arrays["images"][:, :4], arrays["inputs"][:, :4])
    np.testing.assert_array_equal(arrays["inputs"][0, ..., 0], digit)

    process = launch(workdir, f"--mask={workdir / 'mask.png'}", script="sample.py")
    assert "--mask needs --init_image" in process.communicate(timeout=300)[0]
    assert process.returncode == 2


def test_a_workdir_without_a_run_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is .* a train\.py workdir"):
        checkpoints.read_run_info(tmp_path)


@pytest.mark.parametrize(
    "name, expected", [("ddpm_cifar10", 35_746_307), ("iddpm_cifar10", None), ("default", None)]
)
def test_configs_build_their_models(name, expected):
    config = importlib.import_module(f"configs.{name}").get_config()
    model = models.make_model(config, 10 if config.model.class_conditional else None)
    optimizer = training.make_optimizer(config.optim)
    size, channels = config.data.image_size, config.data.channels
    init = training.make_init(
        model, optimizer, jax.random.key(0), image_shape=(size, size, channels)
    )
    state = jax.eval_shape(init)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    assert expected is None or count == expected
    learned = config.diffusion.loss == "hybrid"
    assert model.out_channels == channels * (2 if learned else 1)
    assert models.make_schedule(config.diffusion).num_timesteps == 1000
