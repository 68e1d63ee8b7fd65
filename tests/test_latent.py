"""Text-conditional latent diffusion: the train step, train.py on a tiny autoencoder, and
txt2img compiled once for new prompts, seeds and guidance scales."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from runs import launch

from jdiff import autoencoder, caches, losses, models, pipelines, schedules, training
from jdiff.nn import UNet
from jdiff.nn import text_encoder as te
from jdiff.nn.unet import VARIANTS
from jdiff.tokenizer import CLIPTokenizer


def tiny_models():
    """A one-level cross-attention U-Net (it compiles sooner) and the tiny text encoder."""
    text = te.CLIPTextModel(**te.VARIANTS["tiny"])  # vocab 1000, width 32, 16 positions
    fields = {**VARIANTS["tiny_cond"], "in_channels": 4, "out_channels": 4,
              "cross_attention_dim": 32, "block_out_channels": (32,),
              "down_block_types": ("CrossAttnDownBlock2D",),
              "up_block_types": ("CrossAttnUpBlock2D",)}  # fmt: skip
    return UNet(**fields), text


def test_latent_step_is_the_diffusion_loss_on_scaled_latents_with_text_context():
    unet, text = tiny_models()
    optimizer = optax.sgd(0.0)
    init = training.make_latent_init(unet, text, optimizer, jax.random.key(0),
                                     latent_shape=(8, 8, 4))  # fmt: skip
    state = jax.jit(init)()  # one compile, not an eager op-by-op init
    assert set(state.params) == {"unet", "text_encoder"}
    schedule = schedules.get_schedule("cosine", 1000)
    rng = np.random.default_rng(0)
    batch = {"latent_mean": jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32),
             "latent_std": jnp.full((2, 8, 8, 4), 0.1),
             "ids": jnp.asarray(rng.integers(0, 1000, (2, 16)), jnp.int32)}  # fmt: skip
    step = training.make_latent_train_step(
        unet, text, schedule, optimizer, empty_ids=jnp.zeros(16, jnp.int32),
        scaling_factor=0.5, caption_dropout=0.0,
    )  # fmt: skip
    key = jax.random.key(7)
    _, metrics = jax.jit(step)(state, batch, key)

    @jax.jit
    def expected_loss(params, batch):
        k_z, _, k_loss, k_dropout = jax.random.split(jax.random.fold_in(key, 0), 4)
        mean = batch["latent_mean"]
        z = 0.5 * (mean + batch["latent_std"] * jax.random.normal(k_z, mean.shape))
        context = text.apply({"params": params["text_encoder"]}, batch["ids"])

        def model_fn(x, t):
            rngs = {"dropout": k_dropout}
            return unet.apply({"params": params["unet"]}, x, t, deterministic=False,
                              context=context.last_hidden_state, rngs=rngs)  # fmt: skip

        return losses.diffusion_loss(model_fn, schedule, z, k_loss)

    expected = expected_loss(state.params, batch)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    with pytest.raises(ValueError, match=r"caption_dropout=1\.5"):
        training.make_latent_train_step(unet, text, schedule, optimizer, empty_ids=batch["ids"][0],
                                        scaling_factor=1.0, caption_dropout=1.5)  # fmt: skip


def test_txt2img_compiles_once(tiny_vae_workdir):
    unet, text = tiny_models()
    vae_model, vae_params, info = autoencoder.load(tiny_vae_workdir)
    params = jax.jit(training.make_latent_init(unet, text, optax.sgd(0.0), jax.random.key(0),
                                               latent_shape=(16, 16, 4)))().params  # fmt: skip
    generate = jax.jit(pipelines.make_txt2img(
        unet, text, vae_model, schedules.get_schedule("cosine", 1000),
        latent_shape=(2, 16, 16, 4), scaling_factor=info["scaling_factor"], num_steps=3,
    ))  # fmt: skip
    tok = CLIPTokenizer.default(max_length=16)
    ids = jnp.asarray(tok(["a red circle at the top left", "a blue square"]) % 1000)
    uncond = jnp.asarray(tok(["", ""]) % 1000)
    a = generate(params, vae_params, ids, uncond, jax.random.key(0), 3.0)
    b = generate(params, vae_params, ids[::-1], uncond, jax.random.key(1), 7.5)
    c = generate(params, vae_params, ids, uncond, jax.random.key(0), 3.0)
    assert a.shape == (2, 32, 32, 3) and a.dtype == jnp.float32
    assert float(jnp.abs(a).max()) <= 1.0 and not np.allclose(a, b)
    np.testing.assert_array_equal(a, c)
    assert generate._cache_size() == 1  # new prompts, seeds and scales did not retrace


@pytest.fixture(scope="module")
def tiny_ldm(tiny_vae_workdir, tmp_path_factory):
    """configs/ldm_shapes.py:tiny trained by trainer.train on the tiny autoencoder."""
    from jdiff import trainer

    workdir = tmp_path_factory.mktemp("ldm_shapes_tiny")
    config = importlib.import_module("configs.ldm_shapes").get_config("tiny")
    config.latent.autoencoder_workdir = str(tiny_vae_workdir)
    config.mesh.data = 1
    config.data.split = "train[:64]"  # encoding all 7,200 images took 13 s of 40
    grid = trainer.train(config, workdir)
    return workdir, config, grid


def test_train_py_trains_a_text_conditional_latent_model(tiny_ldm, tmp_path):
    from jdiff import trainer

    workdir, config, grid = tiny_ldm
    assert grid == workdir / "samples" / "step_0000003.png" and grid.exists()
    cache = np.load(workdir / "latents.npz")
    assert cache["latent_mean"].shape == (64, 16, 16, 4) == cache["latent_std"].shape
    assert cache["ids"].shape == (64, 16) and (cache["ids"][:, 0] == 49406).all()
    assert (workdir / "checkpoints" / "3").exists()

    config = config.copy_and_resolve_references()
    config.train.num_steps = 4  # resumes from step 3 and reuses the cached latents
    trainer.train(config, workdir)
    assert (workdir / "checkpoints" / "4").exists()

    config.data.name = "digits"
    with pytest.raises(ValueError, match="differ"):
        trainer.train(config, workdir)
    with pytest.raises(ValueError, match="trains on captions"):
        trainer.train(config, tmp_path / "digits")


def test_latent_cache_is_keyed_by_what_it_depends_on(tiny_vae_workdir, tmp_path):
    """A changed image size (or data split, or autoencoder) never reuses stale latents."""
    from jdiff import data

    config = importlib.import_module("configs.ldm_shapes").get_config("tiny")
    base = caches.latent_cache_key(config, "vae@3")
    keys = {base, caches.latent_cache_key(config, "vae@4")}
    for field, value in (("image_size", 16), ("split", "train[:8]"), ("name", "other")):
        changed = config.copy_and_resolve_references()
        changed.data[field] = value
        keys.add(caches.latent_cache_key(changed, "vae@3"))
    assert len(keys) == 5
    source = data.load_source("shapes", split="train[:4]")
    vae_model, vae_params, _ = autoencoder.load(tiny_vae_workdir)
    tok = CLIPTokenizer.default(max_length=16)
    first = caches.latent_cache(tmp_path, source, vae_model, vae_params, "a", tok, 32)
    stored = (tmp_path / "latents.npz").stat().st_mtime_ns
    again = caches.latent_cache(tmp_path, source, vae_model, vae_params, "a", tok, 32)
    assert (tmp_path / "latents.npz").stat().st_mtime_ns == stored  # reused, not rewritten
    np.testing.assert_array_equal(again["latent_mean"], first["latent_mean"])
    small = caches.latent_cache(tmp_path, source, vae_model, vae_params, "b", tok, 16)
    assert first["latent_mean"].shape == (4, 16, 16, 4)
    assert small["latent_mean"].shape == (4, 8, 8, 4)  # encoded again at the new size


def test_txt2img_and_img2img_from_the_workdir(tiny_ldm, tiny_vae_workdir):
    workdir = tiny_ldm[0]
    model, params, _ = pipelines.load_latent_diffusion(workdir)
    prompts = ["a red circle at the top left", "a blue square at the bottom right"]
    x = model.txt2img(params, prompts, jax.random.key(0), guidance_scale=3.0, num_steps=2)
    y = model.txt2img(params, prompts[::-1], jax.random.key(1), guidance_scale=7.5,
                      num_steps=2, negative_prompts="a green triangle")  # fmt: skip
    assert x.shape == y.shape == (2, 32, 32, 3) and not np.allclose(x, y)
    (generate,) = model._compiled.values()
    assert generate._cache_size() == 1  # new prompts, seeds, scales: no retrace

    init = np.asarray(x)
    z = model.img2img(params, init, prompts, jax.random.key(2), strength=0.5, num_steps=4)
    assert z.shape == (2, 32, 32, 3)
    with pytest.raises(ValueError, match=r"strength=1\.5"):
        model.img2img(params, init, prompts, jax.random.key(2), strength=1.5)
    with pytest.raises(ValueError, match="multiples of 2"):
        model.img2img(params, np.zeros((2, 33, 33, 3)), prompts, jax.random.key(2))
    with pytest.raises(ValueError, match="no prompts"):
        model.txt2img(params, [], jax.random.key(0))
    with pytest.raises(ValueError, match="negative prompts for 2 prompts"):
        model.txt2img(params, prompts, jax.random.key(0), negative_prompts=["a", "b", "c"])
    with pytest.raises(ValueError, match="not a latent diffusion model"):
        pipelines.load_latent_diffusion(tiny_vae_workdir)


def test_a_fine_tuned_decoder_swaps_in(tiny_ldm, tiny_vae_decoder_workdir, tmp_path):
    from jdiff import trainer

    workdir = tiny_ldm[0]
    model, params, _ = pipelines.load_latent_diffusion(workdir)
    swapped, new, _ = pipelines.load_latent_diffusion(
        workdir, autoencoder_workdir=tiny_vae_decoder_workdir
    )
    _, tuned, _ = autoencoder.load(tiny_vae_decoder_workdir)
    assert swapped.scaling_factor == model.scaling_factor
    np.testing.assert_array_equal(new["autoencoder"]["decoder"]["conv_out"]["kernel"],
                                  tuned["decoder"]["conv_out"]["kernel"])  # fmt: skip
    np.testing.assert_array_equal(new["unet"]["conv_in"]["kernel"],
                                  params["unet"]["conv_in"]["kernel"])  # fmt: skip
    # an autoencoder trained on its own (another seed: another encoder) is refused
    config = importlib.import_module("configs.vae_shapes").get_config("tiny")
    config.mesh.data, config.seed = 1, 1
    trainer.train(config, tmp_path / "other")
    with pytest.raises(ValueError, match="encoder differs"):
        pipelines.load_latent_diffusion(workdir, autoencoder_workdir=tmp_path / "other")


def test_sample_py_prompts_and_evaluation(tiny_ldm, tiny_vae_decoder_workdir):
    from jdiff import evaluation

    workdir = tiny_ldm[0]
    process = launch(workdir, "--prompt=a green circle at the top left",
                     "--prompt=a blue square at the top right", "--num_samples=4",
                     "--num_steps=2", "--guidance_scale=2", script="sample.py")  # fmt: skip
    out = process.communicate(timeout=300)[0]
    assert process.returncode == 0, out[-3000:]
    npz = workdir / "samples" / "txt2img_ddim2_eta1_cfg2_seed0.npz"  # the config's η = 1
    assert str(npz) in out
    stored = np.load(npz)
    assert stored["images"].shape == (4, 32, 32, 3) and len(stored["prompts"]) == 4
    result = evaluation.main([str(npz)])
    # "a blue square at the top right" is held out: (blue 2 + square 1 + top right 1) % 4 == 0
    assert result["held_out"]["count"] == 2 == result["seen"]["count"]
    assert 0 <= result["seen"]["all"] <= result["seen"]["colour"] <= 1

    # img2img from an image file
    from PIL import Image

    Image.fromarray(stored["images"][0]).save(workdir / "init.png")
    # ... with the autoencoder whose decoder was fine-tuned (--vae): outputs in their own folder
    process = launch(workdir, f"--init_image={workdir / 'init.png'}", "--strength=0.5",
                     "--prompt=a red square at the bottom left", "--num_samples=2",
                     "--num_steps=4", "--eta=0", f"--vae={tiny_vae_decoder_workdir}",
                     script="sample.py")  # fmt: skip
    out = process.communicate(timeout=300)[0]
    assert process.returncode == 0, out[-3000:]
    folder = workdir / "samples" / f"with_{tiny_vae_decoder_workdir.name}"
    img2img = np.load(folder / "img2img_s0.5_ddim4_eta0_cfg3_seed0.npz")
    assert img2img["images"].shape == (2, 32, 32, 3)

    # outpainting: 8 pixels on the left (the canvas padded to 40, a multiple of 4, and back)
    process = launch(workdir, f"--init_image={workdir / 'init.png'}", "--outpaint=left=8",
                     "--prompt=a red square at the bottom left", "--num_samples=2",
                     "--num_steps=3", "--jump_n_sample=1", "--projection=0.5",
                     script="sample.py")  # fmt: skip
    out = process.communicate(timeout=300)[0]
    assert process.returncode == 0, out[-3000:]
    stem = workdir / "samples" / "outpaint_3x10x1_eta1_cfg3_seed0"  # the config's η = 1
    wide = np.load(stem.with_suffix(".npz"))
    assert wide["images"].shape == (2, 32, 40, 3) and (wide["masks"][:, :, :12] == 1).all()
    np.testing.assert_array_equal(wide["images"][:, :, 12:], stored["images"][[0, 0], :, 4:])
    assert (stem.parent / f"{stem.name}_comparison.png").exists()


def test_repaint_and_outpaint_with_a_text_model(tiny_ldm):
    """A latent text model not trained for inpainting repaints with RePaint on its latents:
    the known pixels are the original exactly after the paste and its reconstruction before
    it; new seeds, images, masks and prompts reuse the compiled program."""
    from jdiff import inpainting

    model, params, _ = pipelines.load_latent_diffusion(tiny_ldm[0])
    rng = np.random.default_rng(0)
    init = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    masks = inpainting.random_masks(rng, 2, 32, kind="box", min_cover=0.3, max_cover=0.4)
    prompts = ["a red circle at the top left", "a blue square at the bottom right"]
    options = {"num_steps": 4, "jump_length": 2, "jump_n_sample": 2, "guidance_scale": 3.0}
    x, unpasted = model.inpaint(params, init, masks, prompts, jax.random.key(0),
                                return_unpasted=True, **options)  # fmt: skip
    known = masks[..., 0] == 0
    np.testing.assert_array_equal(np.asarray(x)[known], init[known])
    # the same sample: the fill differs only where the decoder sees the pasted known latents
    assert np.abs(np.asarray(x) - np.asarray(unpasted))[~known].max() < 0.05
    assert inpainting.border_mismatch(unpasted, init, masks) > 0.01  # the 3-step VAE's error
    y = model.inpaint(params, init[::-1], masks[0, ..., 0], prompts[::-1], jax.random.key(1),
                      return_unpasted=True, **options)[0]  # fmt: skip
    kept = np.broadcast_to(known[:1], known.shape)  # one [H, W] mask for both images
    np.testing.assert_array_equal(np.asarray(y)[kept], init[::-1][kept])
    assert not np.allclose(np.asarray(y)[~kept], init[::-1][~kept], atol=0.05)
    assert len(model._compiled) == 1
    assert next(iter(model._compiled.values()))._cache_size() == 1
    # without the known pixels projected through the autoencoder: another sample, same paste
    z = model.inpaint(params, init, masks, prompts, jax.random.key(0), project_known_pixels=0.0,
                      **options)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(z)[known], init[known])
    assert np.abs(np.asarray(z) - np.asarray(x))[~known].mean() > 1e-3
    with pytest.raises(ValueError, match="share of the schedule"):
        model.inpaint(params, init, masks, prompts, jax.random.key(0), project_known_pixels=1.5,
                      **options)  # fmt: skip

    wide = model.outpaint(params, init, prompts, jax.random.key(2), right=6, overlap=4,
                          num_steps=2, jump_n_sample=1)  # fmt: skip
    assert wide.shape == (2, 32, 38, 3)
    np.testing.assert_array_equal(wide[:, :, :28], init[:, :, :28])  # beyond the overlap band
    for kwargs, match in (({"strength": 0.5}, "not trained for inpainting"),
                          ({"method": "euler"}, "not trained for inpainting"),
                          ({"use_karras_sigmas": True}, "no option")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            model.inpaint(params, init, masks, prompts, jax.random.key(0), **kwargs)
    with pytest.raises(ValueError, match="mask values must lie in"):
        model.inpaint(params, init, masks * 2, prompts, jax.random.key(0))
    # sample.py's options that this model or task would ignore: refused by name
    from jdiff import sampling
    from jdiff.validate import InputError

    mask = {"init_image": "x.png", "mask": "m.png"}
    for given, fragment in (({"jump_length": 2}, "--jump_length does not apply"),
                            (mask | {"strength": 0.5}, "RePaint starts from noise"),
                            ({"noise_level": 3}, "--noise_level"),
                            ({"upscale": "low.png"}, "super-resolution"),
                            ({"trajectory": True}, "--trajectory"),
                            ({"dtype": "bfloat16"}, "--dtype")):  # fmt: skip
        with pytest.raises(InputError, match=fragment):
            sampling.sample_workdir(tiny_ldm[0], sampling.Request(prompts=("a",), **given))


def test_frozen_text_encoder_is_cached_and_unchanged(tiny_vae_workdir, tiny_ldm, tmp_path):
    """text.frozen: the captions are encoded once, the encoder keeps its initial parameters."""
    import shutil

    from jdiff import trainer

    shutil.copy(tiny_ldm[0] / "latents.npz", tmp_path)  # the same autoencoder's: reused

    config = importlib.import_module("configs.ldm_shapes").get_config("tiny")
    config.latent.autoencoder_workdir = str(tiny_vae_workdir)
    config.mesh.data = 1
    config.data.split = "train[:64]"  # as tiny_ldm's: its cached latents are reused
    config.text.frozen = True
    config.train.update(num_steps=2, checkpoint_every=2)
    trainer.train(config, tmp_path)
    _, trained, _ = pipelines.load_latent_diffusion(tmp_path, ema=False)

    # make_latent_init's text-encoder initialisation (its key's second half), drawn eagerly
    # here, alone: cheaper than the whole init (the U-Net's training is checked above)
    text = models.make_text_encoder(config)
    k_init = jax.random.split(jax.random.key(config.seed), 3)[0]
    ids = jnp.zeros((1, text.max_position_embeddings), jnp.int32)
    initial = text.init(jax.random.split(k_init)[1], ids)["params"]
    for a, b in zip(jax.tree.leaves(trained["text_encoder"]), jax.tree.leaves(initial),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)
