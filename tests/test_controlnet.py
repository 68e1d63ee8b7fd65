"""ControlNet: diffusers' `ControlNetModel` (made by `from_unet` from tiny random-weight SD
1.x- and SDXL-shaped U-Nets, its zero convolutions perturbed) loaded by jdiff from its
directory and from the original single-file layout, run against diffusers itself: the module,
the U-Net with its residuals, and the whole pipeline (`StableDiffusionControlNetPipeline`)."""

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline
from reference import perturbed, sharp_posterior, tiny_pipeline

from jdiff import interop
from jdiff.interop import controlnets, single_file
from jdiff.nn.controlnet import ControlNetModel as JaxControlNet

PROMPTS = ["a red circle at the top left", "a blue square"]
EMBEDDING = (8, 16)  # the conditioning embedding's widths: control images 2x the latents


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """{"pipeline": a tiny SD 1.x directory (DDIM), "canny", "depth": two ControlNets of its
    U-Net as diffusers saves them}."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd1_controlnet")
    unet, vae, text, tokenizer = tiny_pipeline("sd1")
    unet = perturbed(unet)
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler = DDIMScheduler.from_config(single_file.SCHEDULERS["sd1"])
    nets = {}
    for name in ("canny", "depth"):
        net = perturbed(ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=EMBEDDING))  # fmt: skip
        net.save_pretrained(folder / name)
        nets[name] = net
    StableDiffusionControlNetPipeline(
        vae=perturbed(vae), text_encoder=perturbed(text), unet=unet, controlnet=nets["canny"],
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder / "pipeline")  # fmt: skip
    return {"pipeline": folder / "pipeline", "canny": folder / "canny", "depth": folder / "depth"}


@pytest.fixture(scope="module")
def loaded(sd1):
    return interop.load_pretrained(sd1["pipeline"])


def _inputs(seed=0, n=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((n, 5, 64)).astype(np.float32)
    image = rng.uniform(size=(n, 16, 16, 3)).astype(np.float32)
    return x, context, image, np.array([10.0, 600.0][:n], np.float32)


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)


def _nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("guess_mode", [False, True])
def test_controlnet_and_unet_with_its_residuals_match_diffusers(sd1, loaded, guess_mode):
    """The directory's ControlNet: its down and mid residuals (scale 0.7; guess mode's
    log-spaced scales) and the U-Net with them equal diffusers' within 1e-4."""
    cn = interop.load_controlnet(sd1["canny"])
    assert cn.model.conditioning_embedding_out_channels == EMBEDDING
    x, context, image, t = _inputs()
    down, mid = cn.model.apply({"params": cn.params}, x, t, image, context=context,
                               conditioning_scale=0.7, guess_mode=guess_mode)  # fmt: skip
    ref = ControlNetModel.from_pretrained(sd1["canny"])
    with torch.no_grad():
        ref_down, ref_mid = ref(_nchw(x), torch.from_numpy(t), torch.from_numpy(context),
                                _nchw(image), conditioning_scale=0.7, guess_mode=guess_mode,
                                return_dict=False)  # fmt: skip
    assert len(down) == len(ref_down) == 4  # conv_in's, one per layer (2), the downsampler's
    for ours, theirs in zip([*down, mid], [*ref_down, ref_mid], strict=True):
        np.testing.assert_allclose(np.asarray(ours), _nhwc(theirs), atol=1e-4)
    unet = StableDiffusionControlNetPipeline.from_pretrained(sd1["pipeline"]).unet
    ours = loaded.unet.apply({"params": loaded.params["unet"]}, x, t, context=context,
                             down_block_additional_residuals=down,
                             mid_block_additional_residual=mid)  # fmt: skip
    with torch.no_grad():
        theirs = unet(_nchw(x), torch.from_numpy(t), torch.from_numpy(context),
                      down_block_additional_residuals=ref_down,
                      mid_block_additional_residual=ref_mid).sample  # fmt: skip
    np.testing.assert_allclose(np.asarray(ours), _nhwc(theirs), atol=1e-4)


def test_sd15_controlnet_has_diffusers_parameter_count():
    from jdiff.nn.controlnet import VARIANTS

    net = JaxControlNet(**VARIANTS["sd_v1"])
    shapes = interop.templates.controlnet_shapes(net)
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == 361_279_120


def test_single_files_round_trip_through_diffusers_converter(sd1, loaded, tmp_path):
    """The original layout jdiff writes is what diffusers' converter reads back to the
    directory's exact tensors; jdiff reads it (the base U-Net giving its shape) to the same
    parameters; a directory saved by jdiff loads into diffusers. (SD's four-stage conditioning
    embedding: diffusers' converter knows no other.)"""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    from safetensors.numpy import load_file

    unet = UNet2DConditionModel.from_pretrained(sd1["pipeline"] / "unet")
    perturbed(ControlNetModel.from_unet(unet)).save_pretrained(tmp_path / "sd_embedding")
    cn = interop.load_controlnet(tmp_path / "sd_embedding")
    path = controlnets.save_single_file(cn, tmp_path / "control_canny.safetensors")
    state = load_file(path)
    assert "control_model.input_hint_block.14.weight" in state
    assert "control_model.zero_convs.3.0.weight" in state
    assert "control_model.middle_block_out.0.bias" in state
    config = ControlNetModel.from_pretrained(tmp_path / "sd_embedding").config
    converted = convert_controlnet_checkpoint({k: torch.from_numpy(v) for k, v in state.items()},
                                              dict(config))  # fmt: skip
    reference = ControlNetModel.from_pretrained(tmp_path / "sd_embedding").state_dict()
    assert set(converted) == set(reference)
    for k, v in reference.items():
        np.testing.assert_array_equal(converted[k].numpy(), v.numpy())
    again = interop.load_controlnet(path, unet=loaded.unet)
    jax.tree.map(np.testing.assert_array_equal, again.params, cn.params)
    out = controlnets.save_controlnet(again, tmp_path / "exported")
    back = ControlNetModel.from_pretrained(out).state_dict()
    for k, v in reference.items():
        np.testing.assert_array_equal(back[k].numpy(), v.numpy())
    with pytest.raises(ValueError, match="pass the base model's U-Net"):
        interop.load_controlnet(path)
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        interop.load_controlnet(tmp_path)


def _torch_pipe(sd1, cls=StableDiffusionControlNetPipeline, **components):
    pipe = cls.from_pretrained(sd1["pipeline"], safety_checker=None, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(result):
    return np.clip((np.asarray(result) + 1) / 2, 0, 1)


def test_txt2img_with_controlnets_matches_diffusers(sd1, loaded):
    """StableDiffusionControlNetPipeline (DDIM, 10 steps, guidance 7.5, the same latents):
    one ControlNet at scale 0.8 from 20% to 80% of the steps; then two ControlNets (scales 1
    and 0.5) in guess mode. jdiff's images equal diffusers' within 1e-3; another control
    image and scale reuse the compiled program."""
    from diffusers import MultiControlNetModel

    from jdiff import pipelines

    model = pipelines.LatentDiffusion.from_pretrained(loaded)
    assert loaded.controlnet is not None  # the pipeline directory's own
    canny, depth = loaded.controlnet, interop.load_controlnet(sd1["depth"])
    rng = np.random.default_rng(5)
    latents = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    edges, heights = (rng.uniform(size=(2, 16, 16, 3)).astype(np.float32) for _ in range(2))
    ours = model.txt2img(loaded.params, PROMPTS, jax.random.key(0), num_steps=10,
                         latents=latents, controlnet=canny, control_image=edges,
                         controlnet_conditioning_scale=0.8, control_guidance_start=0.2,
                         control_guidance_end=0.8)  # fmt: skip
    pipe = _torch_pipe(sd1)
    with torch.no_grad():
        ref = pipe(PROMPTS, image=_nchw(edges), num_inference_steps=10, guidance_scale=7.5,
                   latents=_nchw(latents), controlnet_conditioning_scale=0.8,
                   control_guidance_start=0.2, control_guidance_end=0.8,
                   output_type="np").images  # fmt: skip
    np.testing.assert_allclose(_images(ours), ref, atol=1e-3)
    plain = model.txt2img(loaded.params, PROMPTS, jax.random.key(0), num_steps=10,
                          latents=latents)  # fmt: skip
    assert np.abs(_images(plain) - ref).max() > 0.01  # the ControlNet changed the images
    compiled = len(model._compiled)
    model.txt2img(loaded.params, PROMPTS, jax.random.key(1), num_steps=10, latents=latents,
                  controlnet=canny, control_image=heights, controlnet_conditioning_scale=0.3,
                  control_guidance_start=0.2, control_guidance_end=0.8)  # fmt: skip
    assert len(model._compiled) == compiled
    ours = model.txt2img(loaded.params, PROMPTS, jax.random.key(0), num_steps=10,
                         latents=latents, controlnet=[canny, depth],
                         control_image=[edges, heights], controlnet_conditioning_scale=[1.0, 0.5],
                         guess_mode=True)  # fmt: skip
    nets = MultiControlNetModel([ControlNetModel.from_pretrained(sd1[n]) for n in
                                 ("canny", "depth")])  # fmt: skip
    pipe = _torch_pipe(sd1, controlnet=nets)
    with torch.no_grad():
        ref = pipe(PROMPTS, image=[_nchw(edges), _nchw(heights)], num_inference_steps=10,
                   guidance_scale=7.5, latents=_nchw(latents),
                   controlnet_conditioning_scale=[1.0, 0.5], guess_mode=True,
                   output_type="np").images  # fmt: skip
    np.testing.assert_allclose(_images(ours), ref, atol=1e-3)


def test_img2img_with_a_controlnet_matches_diffusers(sd1, loaded):
    """StableDiffusionControlNetImg2ImgPipeline (strength 0.6, 10 steps): the same image,
    control image and noise give the same images within 1e-3 (the autoencoder's posterior
    made near-deterministic in both, as the SDXL img2img test does)."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    from jdiff import pipelines

    rng = np.random.default_rng(6)
    image, edges = (rng.uniform(size=(2, 16, 16, 3)).astype(np.float32) for _ in range(2))
    pipe = _torch_pipe(sd1, StableDiffusionControlNetImg2ImgPipeline)
    params, noise = sharp_posterior(pipe, loaded.params)
    model = pipelines.LatentDiffusion.from_pretrained(loaded)
    ours = model.img2img(params, 2 * image - 1, PROMPTS, jax.random.key(0), strength=0.6,
                         num_steps=10, noise=noise, controlnet=loaded.controlnet,
                         control_image=edges, controlnet_conditioning_scale=0.7)  # fmt: skip
    with torch.no_grad():
        ref = pipe(PROMPTS, image=image, control_image=_nchw(edges), strength=0.6,
                   num_inference_steps=10, guidance_scale=7.5,
                   controlnet_conditioning_scale=0.7,
                   generator=torch.Generator().manual_seed(0), output_type="np").images  # fmt: skip
    np.testing.assert_allclose(_images(ours), ref, atol=1e-3)


def test_controlnet_options_are_checked_before_compiling(sd1, loaded):
    from jdiff import pipelines

    model = pipelines.LatentDiffusion.from_pretrained(loaded)
    edges = np.zeros((2, 16, 16, 3), np.float32)
    cn = loaded.controlnet
    cases = [
        (dict(control_image=edges), r"\['control_image'\] apply with a controlnet="),
        (dict(controlnet=cn, control_image=np.zeros((2, 8, 8, 3))),
         r"has shape \(2, 8, 8, 3\): this ControlNet takes \[2, 16, 16, 3\]"),
        (dict(controlnet=cn, control_image=edges + 2), r"in \[0, 1\] \(got 2 .. 2\)"),
        (dict(controlnet=[cn, cn], control_image=edges, controlnet_conditioning_scale=[1.0]),
         "1 values for 2 ControlNets"),
        (dict(controlnet=cn, control_image=edges, control_guidance_start=0.9,
              control_guidance_end=0.5), "need 0 <= start < end <= 1"),
        (dict(controlnet=cn, control_image=edges, controlnet_conditioning_scale=float("nan")),
         "must be finite"),
        (dict(controlnet=cn, control_image=edges, control_guidance_end=0.5, method="pndm"),
         "calls the model more than once per step"),
        (dict(controlnet="canny", control_image=edges), "give what interop.load_controlnet"),
    ]  # fmt: skip
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            model.txt2img(loaded.params, PROMPTS, jax.random.key(0), num_steps=2, **kwargs)
    assert not model._compiled


def test_sample_py_takes_controlnets_and_control_images(sd1, loaded, tmp_path):
    """sample.py's library path: a ControlNet pipeline directory's own ControlNet with
    --control_image; then --controlnet twice (a directory and a single file) with a scale
    each, in guess mode; bad ControlNet flags are one line each, before anything loads."""
    from PIL import Image

    from jdiff import sampling
    from jdiff.validate import InputError

    rng = np.random.default_rng(8)
    for name in ("edges", "heights"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            tmp_path / f"{name}.png")  # fmt: skip
    single = controlnets.save_single_file(loaded.controlnet, tmp_path / "canny.safetensors")
    runs = {
        "own": dict(control_images=(str(tmp_path / "edges.png"),)),
        "two": dict(controlnets=(str(single), str(sd1["depth"])),
                    control_images=(str(tmp_path / "edges.png"), str(tmp_path / "heights.png")),
                    controlnet_conditioning_scale=(1.0, 0.5), guess_mode=True),
    }  # fmt: skip
    out = {}
    for name, flags in runs.items():
        r = sampling.Request(prompts=("a red circle",), num_steps=2,
                             output_dir=str(tmp_path / name), **flags)  # fmt: skip
        sampling.sample_pretrained(sd1["pipeline"], r)
        (saved,) = (tmp_path / name).glob("*.npz")
        assert "_controlnet" in saved.name
        out[name] = np.load(saved)["images"].astype(int)
    assert np.abs(out["two"] - out["own"]).max() > 0
    bad = [
        (dict(controlnets=(str(sd1["depth"]),)), "--control_image: 0 given for 1 --controlnet"),
        (dict(controlnets=(str(tmp_path / "missing"),), control_images=("x.png",)),
         "--controlnet .*missing: no such directory or file"),
        (dict(control_images=(str(tmp_path / "edges.png"),),
              controlnet_conditioning_scale=(1.0, 2.0, 3.0)), "3 values for 0 ControlNets"),
        (dict(control_images=(str(tmp_path / "edges.png"),), control_guidance_start=0.9,
              control_guidance_end=0.5), "must be below --control_guidance_end"),
        (dict(control_images=(str(tmp_path / "edges.png"),), init_image=str(tmp_path / "x.png"),
              mask=str(tmp_path / "m.png")), "--control_image does not apply"),
    ]  # fmt: skip
    for flags, message in bad:
        with pytest.raises((InputError, FileNotFoundError), match=message):
            sampling.sample_pretrained(sd1["pipeline"], sampling.Request(prompts=("x",), **flags))


def test_train_py_trains_a_controlnet_on_the_frozen_model(sd1, loaded, tmp_path):
    """configs/sd_finetune.py:tiny with controlnet.conditioning on the SD 1.x directory and
    the shapes: the state holds the ControlNet alone (its encoder the U-Net's at step 0, its
    zero convolutions zero), the control images are the training images' silhouettes with
    colour-only prompts, the written directory loads into diffusers, and the zero
    convolutions have moved."""
    import importlib

    from jdiff import parts, runs, trainer
    from jdiff.data import shapes

    config = importlib.import_module("configs.sd_finetune").get_config("tiny")
    config.latent.pretrained = str(sd1["pipeline"])
    config.mesh.data = 1
    config.controlnet.update(conditioning="silhouette", embedding="8,16")
    config.optim.learning_rate = 1e-2
    source = [{"image": im, "caption": sc.caption} for sc, im in shapes.examples("train", 1, 0)]
    cache = parts.control_cache(config, source[:6], "silhouette", loaded.tokenizer)
    assert cache["control"].shape == (6, 16, 16, 3) and set(np.unique(cache["control"])) == {0, 255}
    words = [loaded.tokenizer.decode(ids) for ids in cache["ids"]]
    assert all(" shape" in w and " at " not in w for w in words)  # colour only
    assert trainer.train(config, tmp_path).exists()
    run = runs.restore(tmp_path)
    cn = interop.load_controlnet(tmp_path / "controlnet")
    jax.tree.map(np.testing.assert_array_equal, cn.params, jax.device_get(run.ema_params))
    assert set(run.params) == set(cn.params)  # the ControlNet's parameters, nothing else
    zero = cn.params["controlnet_mid_block"]["kernel"]
    assert np.abs(zero).max() > 0  # trained from zero
    from jdiff.nn.controlnet import init_from_unet  # how step 0 was made: the U-Net's encoder

    start = init_from_unet(cn.params, loaded.params["unet"])
    jax.tree.map(np.testing.assert_array_equal, start["down_blocks_0"],
                 loaded.params["unet"]["down_blocks_0"])  # fmt: skip
    np.testing.assert_array_equal(start["controlnet_mid_block"]["kernel"], zero)
    reference = ControlNetModel.from_pretrained(tmp_path / "controlnet")
    assert reference.config.conditioning_embedding_out_channels == [8, 16]
    with pytest.raises(ValueError, match="trained a ControlNet"):
        from jdiff import pipelines

        pipelines.load_latent_diffusion(tmp_path)
