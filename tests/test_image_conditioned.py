"""Latent models conditioned on an image by concatenation: inpainting (mask + masked latents)
and super-resolution (the low-resolution image), trained by trainer.train on the tiny
autoencoder, sampled in process and by sample.py."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from runs import launch

from jdiff import pipelines


@pytest.mark.parametrize("kind", ["inpaint", "upscale"])
def test_image_conditioned_models_train_and_sample(kind, tiny_vae_workdir, tmp_path):
    """configs/inpaint_shapes.py and configs/sr_shapes.py (tiny, on 64 training images): the
    conditioning cache, the U-Net's extra inputs, sampling compiled once, and sample.py."""
    from PIL import Image

    from jdiff import inpainting, superres, trainer

    name = {"inpaint": "inpaint_shapes", "upscale": "sr_shapes"}[kind]
    config = importlib.import_module(f"configs.{name}").get_config("tiny")
    config.latent.autoencoder_workdir = str(tiny_vae_workdir)
    config.mesh.data = 1
    config.data.split = "train[:64]"
    config.train.update(num_steps=2, checkpoint_every=2)
    config.sample.num_samples = 2
    if kind == "inpaint":
        config.latent.mask_variants = 2
    trainer.train(config, tmp_path)
    extra = np.load(tmp_path / f"{kind}.npz")["extra"]
    model, params, _ = pipelines.load_latent_diffusion(tmp_path)
    rng = np.random.default_rng(0)
    source = importlib.import_module("jdiff.data").load_source("shapes", split="test")
    x = np.stack([source[i]["image"] for i in range(2)]).astype(np.float32) / 127.5 - 1
    prompts = ["a red circle at the top left", "a blue square at the bottom right"]
    if kind == "inpaint":
        assert extra.shape == (128, 16, 16, 5)  # 64 images x 2 masks: mask + 4 latent channels
        assert set(np.unique(extra[..., 0])) == {0.0, 1.0}
        assert model.is_inpainting and model.unet.in_channels == 9
        masks = inpainting.random_masks(rng, 2, 32, kind="box", min_cover=0.3, max_cover=0.5)
        out = model.inpaint(params, x, masks, prompts, jax.random.key(0), num_steps=2,
                            paste=True)  # fmt: skip
        known = masks[..., 0] == 0
        np.testing.assert_array_equal(np.asarray(out)[known], x[known])
        other = inpainting.random_masks(rng, 2, 32, kind="stroke")
        model.inpaint(params, x[::-1], other, prompts, jax.random.key(1), num_steps=2)
        flags = [f"--init_image={tmp_path / 'image.png'}", f"--mask={tmp_path / 'mask.png'}",
                 "--prompt=a blue circle at the top right"]  # fmt: skip
        Image.fromarray(((masks[0, ..., 0]) * 255).astype(np.uint8)).save(tmp_path / "mask.png")
        stem = "inpaint_s1_ddim2_eta1_cfg3_seed0"
    else:
        low = np.load(tmp_path / "upscale.npz")["extra"]
        assert low.shape == (64, 16, 16, 3)  # f = 2: the latent grid
        assert model.is_upscaler and model.unet.in_channels == 7
        low = np.asarray(superres.downsample(x, 2))
        out = model.upscale(params, low, jax.random.key(0), num_steps=2)
        assert out.shape == (2, 32, 32, 3) and float(jnp.abs(out).max()) <= 1
        model.upscale(params, low[::-1], jax.random.key(1), prompts, noise_level=100,
                      guidance_scale=2.0, num_steps=2)  # fmt: skip
        with pytest.raises(ValueError, match=r"noise_level=400; expected 0 \.\. 350"):
            model.upscale(params, low, jax.random.key(0), noise_level=400, num_steps=2)
        with pytest.raises(ValueError, match="super-resolution model"):
            model.txt2img(params, prompts, jax.random.key(0), num_steps=2)
        flags = [f"--upscale={tmp_path / 'image.png'}"]
        stem = "upscale_ddim2_noise20_cfg1_seed0"
    # one program per kind of guidance (upscale: scale 1, the conditional U-Net alone, and 2)
    assert len(model._compiled) == {"inpaint": 1, "upscale": 2}[kind]
    assert all(f._cache_size() == 1 for f in model._compiled.values())  # new seeds: reused
    if kind == "upscale":  # without the projection onto the input: the model's own sample
        plain = model.upscale(params, low, jax.random.key(0), num_steps=2, project_low_res=0.0)
        assert float(jnp.abs(plain - out).mean()) > 1e-4
        with pytest.raises(ValueError, match=r"project_low_res=1\.5"):
            model.upscale(params, low, jax.random.key(0), num_steps=2, project_low_res=1.5)
    Image.fromarray(((x[0] + 1) * 127.5).round().astype(np.uint8)).save(tmp_path / "image.png")
    process = launch(tmp_path, *flags, "--num_samples=2", "--num_steps=2", script="sample.py")
    out = process.communicate(timeout=300)[0]
    assert process.returncode == 0, out[-3000:]
    arrays = np.load(tmp_path / "samples" / f"{stem}.npz")
    assert arrays["images"].shape == (2, 32, 32, 3)
    assert (tmp_path / "samples" / f"{stem}_comparison.png").exists()
