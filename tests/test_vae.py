"""The autoencoder: parameter count, parity with diffusers' AutoencoderKL, posterior, errors;
its train step, and train.py training and measuring one."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from reference import perturbed
from runs import launch

from jdiff import autoencoder, interop, models, training
from jdiff.nn import vae


def num_params(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_stable_diffusion_size():
    model = vae.AutoencoderKL(**vae.VARIANTS["sd"])
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert num_params(shapes) == 83_653_863
    assert model.downsample_factor == 8


# SD-shaped at tiny size: three levels (f = 4), two resnets per encoder level, 4 latents;
# and a variant with neither 1x1 conv nor mid-block attention
DIFFUSERS_TINY = {
    "sd": {"block_out_channels": (16, 32, 32), "layers_per_block": 2, "latent_channels": 4,
           "norm_num_groups": 8,
           "down_block_types": ("DownEncoderBlock2D",) * 3,
           "up_block_types": ("UpDecoderBlock2D",) * 3},
    "bare": {"block_out_channels": (16, 16), "layers_per_block": 1, "latent_channels": 3,
             "norm_num_groups": 4, "use_quant_conv": False, "use_post_quant_conv": False,
             "mid_block_add_attention": False, "scaling_factor": 0.5,
             "down_block_types": ("DownEncoderBlock2D",) * 2,
             "up_block_types": ("UpDecoderBlock2D",) * 2},
}  # fmt: skip


@pytest.mark.parametrize("name", list(DIFFUSERS_TINY))
def test_encode_decode_match_diffusers(name):
    torch_model = perturbed(TorchAutoencoderKL(**DIFFUSERS_TINY[name]))
    fields = interop.vae_config_from_diffusers(dict(torch_model.config))
    model = vae.AutoencoderKL(**fields)
    assert model.scaling_factor == DIFFUSERS_TINY[name].get("scaling_factor", 0.18215)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(x.shape))["params"]
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params = {"params": interop.from_diffusers(state, template)}

    posterior = model.apply(params, jnp.asarray(x), method="encode")
    image = model.apply(params, posterior.mean, method="decode")
    with torch.no_grad():
        ref = torch_model.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
        ref_image = torch_model.decode(ref.mean).sample.permute(0, 2, 3, 1).numpy()
    ref_mean, ref_logvar = (v.permute(0, 2, 3, 1).numpy() for v in (ref.mean, ref.logvar))

    def rel(a, b):
        return np.abs(np.asarray(a) - b).max() / np.abs(b).max()

    assert posterior.mean.shape == ref_mean.shape
    assert rel(posterior.mean, ref_mean) <= 1e-4
    assert rel(posterior.logvar, ref_logvar) <= 1e-4
    assert image.shape == x.shape and rel(image, ref_image) <= 1e-4
    np.testing.assert_allclose(posterior.kl(), ref.kl().numpy(), rtol=1e-4)


@pytest.fixture(scope="module")
def tiny():
    model = vae.AutoencoderKL(**vae.VARIANTS["tiny"])
    x = jax.random.uniform(jax.random.key(1), (3, 8, 8, 3), minval=-1, maxval=1)
    return model, model.init(jax.random.key(0), x), x


def test_posterior_sampling_and_kl(tiny):
    model, params, x = tiny
    recon, posterior = model.apply(params, x)  # no key: the mode
    assert recon.shape == x.shape and recon.dtype == jnp.float32
    assert posterior.mean.shape == (3, 4, 4, 4)  # f = 2, 4 latent channels
    np.testing.assert_array_equal(recon, model.apply(params, posterior.mode(), method="decode"))
    a = posterior.sample(jax.random.key(0))
    np.testing.assert_array_equal(a, posterior.sample(jax.random.key(0)))
    assert not np.array_equal(a, posterior.sample(jax.random.key(1)))
    # many samples: the posterior's own mean and std
    key = jax.random.key(2)
    draws = jax.vmap(posterior.sample)(jax.random.split(key, 4000))
    np.testing.assert_allclose(draws.mean(0), posterior.mean, atol=0.1)
    np.testing.assert_allclose(draws.std(0), posterior.std, rtol=0.1)
    # KL(N(0, 1) || N(0, 1)) = 0; KL of N(1, e^0) = 0.5 per element
    zero = vae.DiagonalGaussian(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 2, 2, 1)))
    np.testing.assert_allclose(zero.kl(), [0.0])
    np.testing.assert_allclose(vae.DiagonalGaussian(zero.mean + 1, zero.logvar).kl(), [2.0])
    clipped = vae.DiagonalGaussian.from_moments(jnp.full((1, 1, 1, 2), 100.0))
    assert float(clipped.logvar.max()) == 20.0


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny):
    model, params, x = tiny
    low = vae.AutoencoderKL(**vae.VARIANTS["tiny"], dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(low.init(jax.random.key(0), x)))
    recon, posterior = low.apply(params, x)
    assert recon.dtype == posterior.mean.dtype == jnp.float32
    np.testing.assert_allclose(recon, model.apply(params, x)[0], atol=0.1)


def test_bad_inputs_and_configs(tiny):
    model, params, _ = tiny
    with pytest.raises(ValueError, match="multiples of 2"):
        model.apply(params, jnp.zeros((1, 7, 8, 3)), method="encode")
    with pytest.raises(ValueError, match=r"images \[B, H, W, 3\]"):
        model.apply(params, jnp.zeros((1, 8, 8, 1)), method="encode")
    with pytest.raises(ValueError, match=r"latents \[B, h, w, 4\]"):
        model.apply(params, jnp.zeros((1, 4, 4, 3)), method="decode")
    with pytest.raises(ValueError, match="multiples of norm_num_groups=32"):
        vae.AutoencoderKL(block_out_channels=(16, 32)).init(
            jax.random.key(0), jnp.zeros((1, 8, 8, 3))
        )
    config = dict(DIFFUSERS_TINY["sd"], _class_name="AutoencoderKL", in_channels=3,
                  out_channels=3, shift_factor=0.0609)  # fmt: skip
    with pytest.raises(ValueError, match=r"shift_factor=0\.0609 is not supported"):
        interop.vae_config_from_diffusers(config)
    with pytest.raises(ValueError, match="expected AutoencoderKL"):
        interop.vae_config_from_diffusers({"_class_name": "AutoencoderTiny"})


# training (jdiff.training.make_autoencoder_step) and train.py's autoencoder task


@pytest.mark.parametrize("reconstruction", ["l1", "l2"])
def test_autoencoder_step_is_reconstruction_plus_weighted_kl(tiny, reconstruction):
    model, variables, _ = tiny
    params = variables["params"]
    optimizer = optax.sgd(0.0)
    state = training.init_state(params, optimizer)
    x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    key, weight = jax.random.key(3), 0.25
    step = training.make_autoencoder_step(
        model, optimizer, reconstruction=reconstruction, kl_weight=weight
    )
    _, metrics = jax.jit(step)(state, {"image": x}, key)

    recon, posterior = model.apply({"params": params}, x, jax.random.fold_in(key, 0))
    error = np.abs(recon - x) if reconstruction == "l1" else np.square(recon - x)
    kl = np.mean(posterior.kl())
    np.testing.assert_allclose(metrics["reconstruction"], error.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], error.mean() + weight * kl / 192, rtol=1e-5)


def train_steps(step, state, seed: int, num_steps: int):
    """`num_steps` jitted steps on one fixed batch of 4 random 8x8 images: (state, losses)."""
    step = jax.jit(step)
    x = jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (4, 8, 8, 3)), jnp.float32)
    losses = []
    for _ in range(num_steps):
        state, metrics = step(state, {"image": x}, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    return state, losses


def test_autoencoder_training_reduces_the_loss(tiny):
    model, variables, _ = tiny
    optimizer = optax.adam(3e-3)
    state = training.init_state(variables["params"], optimizer)
    _, losses = train_steps(training.make_autoencoder_step(model, optimizer), state, 2, 30)
    assert losses[-1] < 0.7 * losses[0]
    with pytest.raises(ValueError, match="reconstruction='l3'"):
        training.make_autoencoder_step(model, optimizer, reconstruction="l3")


def test_decoder_fine_tuning_leaves_the_encoder_exactly_as_it_was(tiny):
    model, variables, _ = tiny
    params = variables["params"]
    # AdamW's weight decay would move every parameter it is given: the encoder gets none
    optimizer = training.freeze_encoder(optax.adamw(1e-3, weight_decay=0.1))
    step = training.make_autoencoder_step(model, optimizer, trainable="decoder", ema_max_decay=0.9)
    state, losses = train_steps(step, training.init_state(params, optimizer), 4, 4)
    assert losses[-1] < losses[0]
    for name in params:
        before = jax.tree.leaves(params[name])
        after, ema = jax.tree.leaves(state.params[name]), jax.tree.leaves(state.ema_params[name])
        if name in training.DECODER_PARAMS:
            assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
            assert any(not np.array_equal(a, b) for a, b in zip(before, ema, strict=True))
        else:  # bit for bit, the EMA too
            for a, b, e in zip(before, after, ema, strict=True):
                np.testing.assert_array_equal(a, b)
                np.testing.assert_array_equal(a, e)
    autoencoder.check_same_encoder(state.ema_params, params)
    nudged = {**params, "quant_conv": jax.tree.map(lambda a: a + 1e-6, params["quant_conv"])}
    with pytest.raises(ValueError, match="encoder differs"):
        autoencoder.check_same_encoder(nudged, params)
    with pytest.raises(ValueError, match="trainable='encoder'"):
        training.make_autoencoder_step(model, optimizer, trainable="encoder")
    with pytest.raises(ValueError, match="not an AutoencoderKL's parameters"):
        training.freeze_encoder(optax.sgd(0.1)).init({"unet": jnp.zeros(2)})


def test_psnr_and_chunks():
    x = np.zeros((2, 4, 4, 1), np.float32)
    y = x.copy()
    y[1] += 0.2  # MSE 0.04 on a peak of 2: 10 log10(4 / 0.04) = 20 dB
    np.testing.assert_allclose(autoencoder.psnr(y, x)[1], 20.0, rtol=1e-6)
    assert autoencoder.psnr(x + 5.0, x)[0] == pytest.approx(10 * np.log10(4.0))  # clipped to 1
    rows = np.arange(10.0)[:, None]
    np.testing.assert_array_equal(autoencoder.in_chunks(lambda c: 2 * c, rows, 4), 2 * rows)


def test_train_py_trains_and_measures_an_autoencoder(tiny_vae_workdir):
    from jdiff import trainer

    tmp_path = tiny_vae_workdir  # configs/vae_shapes.py:tiny, trained by trainer.train
    config = importlib.import_module("configs.vae_shapes").get_config("tiny")
    config.mesh.data = 1
    info = autoencoder.load_info(tmp_path)
    assert info["latent_shape"] == [16, 16, 4] and info["step"] == 3
    assert info["num_eval_images"] == 10 and 0 < info["scaling_factor"] < 1e3
    assert np.isfinite(info["psnr_db"]) and info["psnr_db_p5"] <= info["psnr_db"]
    assert 0 <= info["described_alike"] <= 1
    grid = tmp_path / "samples" / "reconstructions_0000003.png"
    assert grid.exists()
    assert (tmp_path / "checkpoints" / "3").exists()
    process = launch(tmp_path, script="sample.py")
    out = process.communicate(timeout=300)[0]
    assert process.returncode == 2 and "holds an autoencoder" in out, out[-2000:]

    config.model.overrides = {"block_out_channels": (8, 16), "norm_num_groups": 4}
    with pytest.raises(ValueError, match="model differ"):
        trainer.train(config, tmp_path)
    with pytest.raises(FileNotFoundError, match="train the autoencoder"):
        autoencoder.load_info(tmp_path / "nothing")
    config.task = "gan"
    with pytest.raises(ValueError, match="task='gan'"):
        trainer.train(config, tmp_path)


def test_train_py_fine_tunes_the_decoder_alone(tiny_vae_workdir, tiny_vae_decoder_workdir):
    from jdiff import trainer

    _, source, source_info = autoencoder.load(tiny_vae_workdir)
    _, tuned, info = autoencoder.load(tiny_vae_decoder_workdir)
    assert info["step"] == 3 and info["init_from"] == {
        "workdir": str(tiny_vae_workdir), "step": 3, "trainable": "decoder"}  # fmt: skip
    autoencoder.check_same_encoder(tuned, source)  # bit for bit
    assert info["scaling_factor"] == source_info["scaling_factor"]  # the same latents
    assert not np.array_equal(tuned["post_quant_conv"]["kernel"],
                              source["post_quant_conv"]["kernel"])  # fmt: skip

    config = importlib.import_module("configs.vae_shapes_decoder").get_config("tiny")
    config.mesh.data = 1
    config.autoencoder.update(init_from=str(tiny_vae_workdir), trainable="all")
    with pytest.raises(ValueError, match=r"autoencoder\.trainable differ"):
        trainer.train(config, tiny_vae_decoder_workdir)  # resuming it as another kind of run
    config.autoencoder.update(init_from="", trainable="decoder")
    with pytest.raises(ValueError, match=r"set autoencoder\.init_from"):
        trainer.train(config, tiny_vae_decoder_workdir.parent / "no_source")
    config.autoencoder.init_from = str(tiny_vae_workdir)
    config.model.overrides = {"block_out_channels": (8, 16), "norm_num_groups": 4}
    with pytest.raises(ValueError, match="another architecture"):
        trainer.train(config, tiny_vae_decoder_workdir.parent / "other_architecture")
    assert importlib.import_module("configs.vae_shapes_decoder").get_config().autoencoder.to_dict()[
        "init_from"] == "outputs/vae_shapes"  # fmt: skip


def test_vae_shapes_config_is_f4_on_32x32():
    config = importlib.import_module("configs.vae_shapes").get_config()
    model = models.make_autoencoder(config)
    x = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    z = jax.eval_shape(lambda v: model.apply(v, x, method="encode").mean, variables)
    assert z.shape == (1, 8, 8, 4) and config.task == "autoencoder"
    config.model.variant = "huge"
    with pytest.raises(ValueError, match=r"model\.variant='huge'"):
        models.make_autoencoder(config)
