"""Stable Diffusion XL: a small random-weight SDXL-shaped pipeline built and saved by diffusers
(two text encoders, the second with its projection; a U-Net with the pooled text embedding and
size/crop ids; Euler with leading spacing), loaded by jdiff and run against diffusers'
`StableDiffusionXLPipeline` itself."""

import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from reference import assert_only_the_unet_moved, perturbed, posterior_mode_in, sharp_posterior

from jdiff import interop, pipelines
from jdiff.pipelines.text import SDXLTextEncoders
from jdiff.tokenizer import CLIPTokenizer

PROMPTS = ["a red circle at the top left", "a blue square"]
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
             "prediction_type": "epsilon", "interpolation_type": "linear",
             "use_karras_sigmas": False}  # fmt: skip


def _text(width: int, projection: bool):
    config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=3,
        num_attention_heads=width // 64,
        max_position_embeddings=77,
        hidden_act="gelu" if projection else "quick_gelu",
        projection_dim=width,
    )  # fmt: skip  (SDXL's: OpenAI's CLIP ViT-L quick-GELU, OpenCLIP's bigG GELU)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return perturbed(cls(config))


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    """The tiny SDXL base pipeline as diffusers saves it: U-Net 64/128 channels (no attention at
    the first level, two transformer layers at the second; heads 64 wide, as SDXL's), a
    64 + 128 = 192-wide context, the 128-wide pooled embedding and six 8-wide id embeddings;
    an f=2 VAE (SDXL's scaling 0.13025)."""
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 2),
        transformer_layers_per_block=(1, 2), cross_attention_dim=192,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=128 + 6 * 8,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=0.13025, force_upcast=True,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("sdxl")
    tokenizers = []
    for name, options in (("tokenizer", {}), ("tokenizer_2", {"pad_token": "!"})):
        CLIPTokenizer.default(**options).save_pretrained(folder / name)
        tokenizers.append(transformers.CLIPTokenizer.from_pretrained(folder / name))
    pipe = StableDiffusionXLPipeline(
        vae=perturbed(vae), text_encoder=_text(64, False), text_encoder_2=_text(128, True),
        tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=perturbed(unet),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER),
        force_zeros_for_empty_prompt=True,
    )  # fmt: skip
    pipe.save_pretrained(folder / "pipeline")
    return folder / "pipeline"


@pytest.fixture(scope="module")
def refiner_dir(sdxl_dir, tmp_path_factory):
    """A tiny SDXL refiner as diffusers saves it: the base's second encoder and autoencoder, its
    own U-Net (a 128-wide context from that encoder alone; five ids: sizes, crop, aesthetic
    score), `requires_aesthetics_score`."""
    base = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 2),
        transformer_layers_per_block=2, cross_attention_dim=128, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=128 + 5 * 8,
    )  # fmt: skip
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, text_encoder_2=base.text_encoder_2, tokenizer=None,
        tokenizer_2=base.tokenizer_2, unet=perturbed(unet), scheduler=base.scheduler,
        requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("sdxl_refiner") / "pipeline"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(sdxl_dir):
    return interop.load_pretrained(sdxl_dir)


def test_an_sdxl_directory_loads_both_encoders_and_its_settings(loaded):
    p = loaded
    assert p.is_sdxl and p.unet.addition_embed_type == "text_time"
    assert p.text_encoder.projection_dim is None and p.text_encoder_2.projection_dim == 128
    assert p.tokenizer_2.pad_id == p.tokenizer_2.vocab["!"] != p.tokenizer.pad_id
    assert p.force_zeros_for_empty_prompt and p.autoencoder.scaling_factor == 0.13025
    assert p.scheduler.method == "euler"
    assert set(p.params) == {"unet", "autoencoder", "text_encoder", "text_encoder_2"}
    model = pipelines.LatentDiffusion.from_pretrained(p)
    assert isinstance(model.text_encoder, SDXLTextEncoders)
    assert model.text_encoder.context_dim == p.unet.cross_attention_dim == 192


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((2, 8, 8, 4)).astype(np.float32)


@pytest.mark.parametrize(
    "negative, prompts_2, sizes",
    [
        # negative prompts and second prompts given; the default size ids
        (["", "green"], ["an oil painting", "a photo"], {}),
        # no negative prompt: zeros (force_zeros_for_empty_prompt); other size / crop ids
        (None, None, {"original_size": (64, 48), "crops_coords_top_left": (4, 0),
                      "target_size": (16, 16)}),
    ],
)  # fmt: skip
def test_txt2img_matches_stable_diffusion_xl_pipeline(sdxl_dir, loaded, negative, prompts_2,
                                                      sizes):  # fmt: skip
    """The same directory, prompts and initial latents: jdiff's images are diffusers'
    StableDiffusionXLPipeline's (its own Euler scheduler, guidance 5, 8 steps)."""
    latents = _latents()
    model = pipelines.LatentDiffusion.from_pretrained(loaded)
    ours = model.txt2img(loaded.params, PROMPTS, jax.random.key(0), negative_prompts=negative,
                         prompts_2=prompts_2, guidance_scale=5.0, num_steps=8, latents=latents,
                         **sizes)  # fmt: skip
    ours = np.clip((np.asarray(ours) + 1) / 2, 0, 1)
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(PROMPTS, prompt_2=prompts_2, negative_prompt=negative, num_inference_steps=8,
                   guidance_scale=5.0, latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
                   output_type="np", **sizes).images  # fmt: skip
    assert ours.shape == ref.shape == (2, 16, 16, 3)
    assert ref.std() > 0.05  # not a flat image
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_sdxl_bad_inputs_name_the_problem(sdxl_dir, loaded, tmp_path):
    model = pipelines.LatentDiffusion.from_pretrained(loaded)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="1 second prompts"):
        model.txt2img(loaded.params, PROMPTS, key, prompts_2=["one"])
    with pytest.raises(ValueError, match="3 negative prompts for 2"):
        model.txt2img(loaded.params, PROMPTS, key, negative_prompts=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"original_size=\(64,\)"):
        model.txt2img(loaded.params, PROMPTS, key, original_size=(64,))
    with pytest.raises(ValueError, match="multiples of 2; got 15x16"):
        model.txt2img(loaded.params, PROMPTS, key, height=15, width=16)
    with pytest.raises(ValueError, match="3 init images for 2 prompts"):
        model.img2img(loaded.params, np.zeros((3, 16, 16, 3)), PROMPTS, key)
    with pytest.raises(ValueError, match=r"\['aesthetic_score'\] do not apply"):
        model.txt2img(loaded.params, PROMPTS, key, aesthetic_score=7.0)
    with pytest.raises(ValueError, match="takes no option"):  # a misspelt option: the sampler's
        model.txt2img(loaded.params, PROMPTS, key, prompt_2="x")
    broken = tmp_path / "no_second_encoder"
    shutil.copytree(sdxl_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match=r"lists \['text_encoder_2'\] but"):
        interop.load_pretrained(broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "text_encoder_2": [None, None]}))
    with pytest.raises(FileNotFoundError, match="needs text_encoder_2/ and tokenizer_2/"):
        interop.load_pretrained(broken)


def test_sample_py_takes_an_sdxl_directory(sdxl_dir, tmp_path):
    """sample.py's library path (`sampling.sample_pretrained`): one image per prompt with the
    directory's Euler, then img2img from it, and inpainting with RePaint (the base model is
    not an inpainting one): the unmasked pixels kept exactly; an option that does not apply
    refused before anything is written."""
    from jdiff import sampling
    from jdiff.validate import InputError

    r = sampling.Request(prompts=("a red circle", "a blue square"), num_steps=3,
                         output_dir=str(tmp_path))  # fmt: skip
    sampling.sample_pretrained(sdxl_dir, r)
    saved = np.load(tmp_path / "txt2img_euler3_cfg7.5_seed0.npz")
    assert saved["images"].shape == (2, 16, 16, 3) and saved["images"].std() > 0
    image = next(tmp_path.glob("txt2img_*.png"))
    r = sampling.Request(prompts=("a red circle",), num_steps=3, init_image=str(image),
                         strength=0.5, output_dir=str(tmp_path / "img2img"))  # fmt: skip
    sampling.sample_pretrained(sdxl_dir, r)
    (again,) = (tmp_path / "img2img").glob("img2img_*.npz")
    assert np.load(again)["images"].shape[1:] == (16, 16, 3)
    from PIL import Image

    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    single = tmp_path / "single.png"
    Image.fromarray(saved["images"][0]).save(single)
    r = sampling.Request(prompts=("a red circle",), num_steps=3, init_image=str(single),
                         mask=str(tmp_path / "mask.png"),
                         output_dir=str(tmp_path / "repaint"))  # fmt: skip
    sampling.sample_pretrained(sdxl_dir, r)
    (painted,) = (tmp_path / "repaint").glob("*.npz")
    painted = np.load(painted)["images"][0]
    np.testing.assert_array_equal(painted[mask == 0], saved["images"][0][mask == 0])
    assert np.abs(painted[mask > 0].astype(int) - saved["images"][0][mask > 0]).max() > 0
    out = tmp_path / "refused"
    r = sampling.Request(prompts=("x",), eta=0.5, output_dir=str(out))
    with pytest.raises(InputError, match="--eta does not apply"):
        sampling.sample_pretrained(sdxl_dir, r)
    assert not out.exists()


def test_sdxl_round_trips_through_a_jdiff_checkpoint_and_diffusers(sdxl_dir, loaded, tmp_path):
    """`python -m jdiff.interop` to a jdiff checkpoint and on to a diffusers directory: diffusers'
    StableDiffusionXLPipeline loads the same tensors, configs and settings it came from."""
    from jdiff.interop import cli

    cli.main([str(sdxl_dir), "--output", str(tmp_path / "ckpt")])
    back = interop.load_pretrained(tmp_path / "ckpt")
    assert back.is_sdxl and back.force_zeros_for_empty_prompt
    assert back.tokenizer_2(["a cat"]).tolist() == loaded.tokenizer_2(["a cat"]).tolist()
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(back.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    cli.main([str(tmp_path / "ckpt"), "--output", str(tmp_path / "diffusers"),
              "--format", "diffusers"])  # fmt: skip
    original = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    exported = StableDiffusionXLPipeline.from_pretrained(tmp_path / "diffusers")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(original, name).state_dict(), getattr(exported, name).state_dict()
        assert set(a) == set(b), name
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)
    assert type(exported.text_encoder_2) is transformers.CLIPTextModelWithProjection
    assert exported.config.force_zeros_for_empty_prompt
    assert exported.tokenizer_2.pad_token == "!"
    for key in ("addition_embed_type", "projection_class_embeddings_input_dim",
                "transformer_layers_per_block", "cross_attention_dim"):  # fmt: skip
        assert original.unet.config[key] == exported.unet.config[key], key
    assert type(exported.scheduler) is EulerDiscreteScheduler


def test_base_and_refiner_as_an_ensemble_of_experts_match_diffusers(sdxl_dir, refiner_dir, loaded):
    """The base denoises the first 80% of the schedule (`denoising_end`), the refiner the rest
    from its latents (`denoising_start`, aesthetic-score ids): jdiff's images are those of
    diffusers' StableDiffusionXLPipeline handing over to StableDiffusionXLImg2ImgPipeline."""
    refiner = interop.load_pretrained(refiner_dir)
    assert refiner.is_sdxl and refiner.text_encoder is None and refiner.requires_aesthetics_score
    base_model = pipelines.LatentDiffusion.from_pretrained(loaded)
    refiner_model = pipelines.LatentDiffusion.from_pretrained(refiner)
    assert refiner_model.is_refiner and not base_model.is_refiner
    latents = _latents(1)
    key = jax.random.key(0)
    handed = base_model.txt2img(loaded.params, PROMPTS, key, negative_prompts=["", "green"],
                                guidance_scale=5.0, num_steps=10, latents=latents,
                                denoising_end=0.8)  # fmt: skip
    assert handed.shape == (2, 8, 8, 4)
    ours = refiner_model.refine(refiner.params, handed, PROMPTS, key, denoising_start=0.8,
                                negative_prompts=["", "green"], num_steps=10)  # fmt: skip
    ours = np.clip((np.asarray(ours) + 1) / 2, 0, 1)
    base = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    second = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_dir)
    for pipe in (base, second):
        pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        theirs = base(PROMPTS, negative_prompt=["", "green"], num_inference_steps=10,
                      guidance_scale=5.0, latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
                      denoising_end=0.8, output_type="latent").images  # fmt: skip
        np.testing.assert_allclose(np.asarray(handed), theirs.permute(0, 2, 3, 1).numpy(),
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
        ref = second(PROMPTS, image=theirs, negative_prompt=["", "green"], num_inference_steps=10,
                     denoising_start=0.8, output_type="np").images  # fmt: skip
    assert ours.shape == ref.shape == (2, 16, 16, 3) and ref.std() > 0.05
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    with pytest.raises(ValueError, match="call refine"):
        refiner_model.txt2img(refiner.params, PROMPTS, key)
    with pytest.raises(ValueError, match="leaves none of the 10 steps"):
        base_model.txt2img(loaded.params, PROMPTS, key, num_steps=10, denoising_end=0.999)
    with pytest.raises(ValueError, match="first-order sampler"):
        refiner_model.refine(refiner.params, handed, PROMPTS, key, denoising_start=0.8,
                             method="heun")  # fmt: skip


def test_img2img_matches_stable_diffusion_xl_img2img_pipeline(sdxl_dir, loaded):
    """SDXL img2img (strength 0.6, second prompts, the image's size ids): jdiff's images are
    StableDiffusionXLImg2ImgPipeline's given the same image and noise. The autoencoder's
    posterior is made near-deterministic (log-variance -30) in both, so that diffusers' draw
    from it does not matter; the noise is its generator's next draw."""
    image = np.random.default_rng(3).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    params, noise = sharp_posterior(pipe, loaded.params)
    model = pipelines.LatentDiffusion.from_pretrained(loaded)
    ours = model.img2img(params, 2 * image - 1, PROMPTS, jax.random.key(0), strength=0.6,
                         negative_prompts=["", "green"], prompts_2=["an oil painting", "a photo"],
                         guidance_scale=5.0, num_steps=10, noise=noise)  # fmt: skip
    ours = np.clip((np.asarray(ours) + 1) / 2, 0, 1)
    with torch.no_grad():
        ref = pipe(PROMPTS, image=image, strength=0.6, negative_prompt=["", "green"],
                   prompt_2=["an oil painting", "a photo"], guidance_scale=5.0,
                   num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                   output_type="np").images  # fmt: skip
    assert ours.shape == ref.shape == (2, 16, 16, 3) and ref.std() > 0.05
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def sdxl_file(pretrained, path):
    """`pretrained` (base or refiner) written in SDXL's original single-file layout, with what
    real files carry beside the modules (OpenCLIP's logit scale, CLIP's position ids)."""
    from safetensors.numpy import save_file

    from jdiff.interop import single_file

    p = pretrained
    maps = single_file.key_map(p.unet, p.autoencoder, p.text_encoder, openclip=False,
                               text_encoder_2=p.text_encoder_2)  # fmt: skip
    states = {k: interop.to_diffusers(v) for k, v in p.params.items()}
    state = single_file.from_diffusers_state(states, maps)
    second = "0" if p.text_encoder is None else "1"
    state[f"conditioner.embedders.{second}.model.logit_scale"] = np.ones((), np.float32)
    if p.text_encoder is not None:
        ids = np.arange(77, dtype=np.int64)[None]
        state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = ids
    save_file(state, path)
    return state


def test_sdxl_single_file_layout_matches_diffusers_converter(loaded, tmp_path):
    """Our SDXL single-file table against diffusers' own converters: the file jdiff writes
    converts, by diffusers, back to exactly the directory's tensors (U-Net with its added
    embedding, VAE, CLIP ViT-L, OpenCLIP with its transposed projection)."""
    from diffusers.loaders import single_file_utils as sfu

    p = loaded
    state = sdxl_file(p, tmp_path / "sdxl.safetensors")
    checkpoint = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    config = transformers.CLIPTextConfig(
        **interop.text_encoder_config_to_transformers(p.text_encoder_2)
    )
    got = {
        "unet": sfu.convert_ldm_unet_checkpoint(
            checkpoint, interop.unet_config_to_diffusers(p.unet, p.sample_size)),
        "autoencoder": sfu.convert_ldm_vae_checkpoint(
            checkpoint, interop.vae_config_to_diffusers(p.autoencoder, p.image_size)),
        "text_encoder": sfu.convert_ldm_clip_checkpoint(checkpoint),
        "text_encoder_2": sfu.convert_open_clip_checkpoint(
            transformers.CLIPTextModelWithProjection(config), checkpoint,
            prefix="conditioner.embedders.1.model."),
    }  # fmt: skip
    for module, tree in p.params.items():
        expected = interop.to_diffusers(tree)
        theirs = {k if k.startswith(("text_model.", "text_projection")) or "text" not in module
                  else f"text_model.{k}": v for k, v in got[module].items()
                  if not k.endswith("position_ids")}  # fmt: skip
        assert set(theirs) == set(expected), (module, set(theirs) ^ set(expected))
        for key, value in expected.items():
            np.testing.assert_array_equal(np.asarray(theirs[key], np.float32).reshape(value.shape),
                                          value, err_msg=f"{module} {key}")  # fmt: skip


def test_sdxl_single_files_load_like_the_directories(loaded, refiner_dir, tmp_path):
    """Base and refiner single files read back to the directories' parameters and settings:
    the architecture, the second encoder's projection and padding, the scheduler, the ids'
    embedding width, and `force_zeros_for_empty_prompt` / `requires_aesthetics_score`."""
    refiner = interop.load_pretrained(refiner_dir)
    for p, name in ((loaded, "base"), (refiner, "refiner")):
        sdxl_file(p, tmp_path / f"{name}.safetensors")
        q = interop.load_pretrained(tmp_path / f"{name}.safetensors")
        assert q.unet == p.unet or name == "refiner"  # the refiner's depth is per level here
        for field in ("block_out_channels", "num_attention_heads", "cross_attention_dim",
                      "addition_time_embed_dim", "projection_class_embeddings_input_dim",
                      "down_block_types", "up_block_types", "use_linear_projection"):  # fmt: skip
            assert getattr(q.unet, field) == getattr(p.unet, field), (name, field)
        for ours, theirs in ((q.text_encoder, p.text_encoder),
                             (q.text_encoder_2, p.text_encoder_2)):  # fmt: skip
            # the end token's id: transformers 5 writes 49407, SDXL's files 2 ("the largest
            # id"): the same token either way
            assert theirs is None or ours.clone(eos_token_id=theirs.eos_token_id) == theirs
        assert q.tokenizer_2.pad_id == q.tokenizer_2.vocab["!"]
        assert q.is_sdxl and q.autoencoder.scaling_factor == 0.13025
        assert q.force_zeros_for_empty_prompt == (name == "base")
        assert q.requires_aesthetics_score == (name == "refiner")
        assert q.scheduler.method == "euler" and q.image_size == 1024  # SDXL's default size
        assert set(q.params) == set(p.params)
        for a, b in zip(jax.tree.leaves(p.params), jax.tree.leaves(q.params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sdxl_exports_to_a_single_file_and_reads_back(loaded, sdxl_dir, tmp_path):
    """`python -m jdiff.interop DIR --format single_file --output F.safetensors`: the file
    reads back to the directory's parameters; an existing or non-.safetensors output is
    refused."""
    from jdiff.interop import cli

    out = tmp_path / "sdxl.safetensors"
    cli.main([str(sdxl_dir), "--output", str(out), "--format", "single_file"])
    back = interop.load_pretrained(out)
    assert back.is_sdxl and back.pipeline_class == "StableDiffusionXLPipeline"
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(back.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for bad in (out, tmp_path / "sdxl.ckpt"):
        with pytest.raises(ValueError, match=r"writes a new \.safetensors file"):
            cli.main([str(sdxl_dir), "--output", str(bad), "--format", "single_file"])


def test_inpainting_matches_stable_diffusion_xl_inpaint_pipeline(loaded, sdxl_dir, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    """SDXL's 9-channel inpainting U-Net (latents, mask, masked-image latents): jdiff's inpaint
    gives StableDiffusionXLInpaintPipeline's images (strength 1, the same initial latents; the
    masked image's latents at the posterior mode on both sides, where diffusers would draw
    them with torch's generator)."""
    from diffusers import StableDiffusionXLInpaintPipeline
    from diffusers.pipelines.stable_diffusion_xl import (
        pipeline_stable_diffusion_xl_inpaint as module,
    )

    base = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
    pipe = StableDiffusionXLInpaintPipeline(
        vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=perturbed(unet),
        scheduler=base.scheduler, force_zeros_for_empty_prompt=True,
    )  # fmt: skip
    pipe.save_pretrained(tmp_path / "inpaint")
    p = interop.load_pretrained(tmp_path / "inpaint")
    model = pipelines.LatentDiffusion.from_pretrained(p)
    assert p.is_sdxl and model.is_inpainting
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    mask = np.zeros((2, 16, 16, 1), np.float32)
    mask[:, 4:12, 2:10] = 1.0
    ours = model.inpaint(p.params, image, mask, PROMPTS, jax.random.key(0), num_steps=8,
                         negative_prompts=["", "green"], guidance_scale=5.0,
                         latents=_latents())  # fmt: skip
    ours = np.clip((np.asarray(ours) + 1) / 2, 0, 1)
    posterior_mode_in(monkeypatch, module)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(PROMPTS, image=torch.from_numpy(image).permute(0, 3, 1, 2),
                   mask_image=torch.from_numpy(mask).permute(0, 3, 1, 2), strength=1.0,
                   negative_prompt=["", "green"], num_inference_steps=8, guidance_scale=5.0,
                   height=16, width=16, latents=torch.from_numpy(_latents()).permute(0, 3, 1, 2),
                   output_type="np").images  # fmt: skip
    assert ref.std() > 0.05
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_train_py_fine_tunes_an_sdxl_unet(sdxl_dir, loaded, tmp_path):
    """configs/sd_finetune.py:tiny on the SDXL directory: the U-Net trains from the converted
    weights on cached latents, contexts, pooled embeddings and size ids; both text encoders
    and the autoencoder stay as loaded; the workdir samples as an SDXL model."""
    import importlib

    from jdiff import trainer

    config = importlib.import_module("configs.sd_finetune").get_config("tiny")
    config.latent.pretrained = str(sdxl_dir)
    config.mesh.data = 1
    assert trainer.train(config, tmp_path).exists()  # the sample grid
    model, params, _ = pipelines.load_latent_diffusion(tmp_path, ema=False)
    before = loaded.params
    assert_only_the_unet_moved(before, params, ("text_encoder", "text_encoder_2", "autoencoder"))
    assert model.is_sdxl and model.method == "euler"
    images = model.txt2img(params, PROMPTS, jax.random.key(0), num_steps=2)
    assert images.shape == (2, 16, 16, 3)


def test_an_sdxl_train_step_is_sized_for_a_tpu_topology(sdxl_dir):
    """`python -m jdiff.aot` on an SDXL directory's config files (no weights read): its
    fine-tuning step (both encoders frozen in the state, the pooled embeddings and size ids
    in the batch) compiles for four v5p chips with fsdp 4 and fits."""
    pytest.importorskip("libtpu", reason="the TPU compiler comes with the [tpu] extra")
    import importlib

    from jdiff import aot

    config = importlib.import_module("configs.sd_finetune").get_config("tiny")
    config.latent.pretrained = str(sdxl_dir)
    config.mesh.update(fsdp=4, fsdp_min_size=1)
    config.data.batch_size = 8
    report = aot.compile_for(config, "v5p:2x2x1", effort=-1.0)
    assert report.fits and report.batch_per_chip == 2 and report.flops > 0
    shapes = interop.load_pretrained(sdxl_dir).params
    whole = sum(a.size * 4 for k, v in shapes.items() if k != "autoencoder"
                for a in jax.tree.leaves(v))  # fmt: skip
    assert whole / 4 <= report.state["parameters"] < 0.3 * whole  # split over the four chips
    assert "all-gather" in report.collectives


def test_fp16_variants_and_sharded_weights_load(sdxl_dir, loaded, tmp_path):
    """A directory saved as diffusers' fp16 variant with its weights sharded (the index
    files): jdiff reads it to the float32 parameters' float16 roundings."""
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, torch_dtype=torch.float16)
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16", max_shard_size="200KB")
    assert list((tmp_path / "fp16" / "unet").glob("*.safetensors.index.fp16.json"))
    p = interop.load_pretrained(tmp_path / "fp16")
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(p.params), strict=True):
        expected = np.asarray(a).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(np.asarray(b), expected)


def test_new_prompts_seeds_scales_and_size_ids_do_not_retrace(loaded):
    """One compiled program per shape, sampler and step count: new prompts, second prompts,
    seeds, guidance scales and size ids reuse it."""
    model = pipelines.LatentDiffusion.from_pretrained(loaded)
    model.txt2img(loaded.params, PROMPTS, jax.random.key(0), num_steps=2, guidance_scale=5.0)
    (fn,) = model._compiled.values()
    before = fn._cache_size()
    model.txt2img(loaded.params, ["a green triangle", "a cat"], jax.random.key(7), num_steps=2,
                  guidance_scale=3.0, prompts_2=["x", "y"], original_size=(512, 384),
                  crops_coords_top_left=(16, 8), target_size=(1024, 1024))  # fmt: skip
    assert len(model._compiled) == 1 and fn._cache_size() == before == 1


def test_a_kohya_sdxl_lora_merges_as_diffusers_loads_it(sdxl_dir, loaded, tmp_path,
                                                        monkeypatch):  # fmt: skip
    """A Kohya-format SDXL LoRA as kohya-ss writes one (the U-Net's modules in the original
    layout's names, `input_blocks_4_1_...`; `lora_te1_` / `lora_te2_`; LoCon on the residual
    blocks' convolutions): the U-Net and both text encoders equal diffusers' after
    `load_lora_weights`, within 1e-4."""
    from reference import allow_peft, kohya_file, peft_lora

    from jdiff import adapters
    from jdiff.interop import single_file

    allow_peft(monkeypatch)
    fresh = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    unet_state, _ = peft_lora(fresh.unet, ["to_q", "to_v", "to_out.0", "proj_in", "conv1"],
                              rank=4, alpha=2, seed=5)  # fmt: skip
    state = {f"unet.{k}": v for k, v in unet_state.items()}
    for part, seed in (("text_encoder", 6), ("text_encoder_2", 7)):
        text_state, _ = peft_lora(getattr(fresh, part), ["fc1", "fc2"], rank=2, alpha=2,
                                  seed=seed)  # fmt: skip
        state |= {f"{part}.{k}": v for k, v in text_state.items()}
    path = kohya_file(
        state, tmp_path / "sdxl_kohya.safetensors", alpha=2,
        unet_name=lambda m: single_file.unet_key(f"{m}.weight", loaded.unet)[: -len(".weight")],
        text_prefixes={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
    )  # fmt: skip
    lora = interop.read_lora(path, loaded.unet, loaded.params)
    assert lora.components() == ("text_encoder", "text_encoder_2", "unet")
    assert "unet/up_blocks_0/attentions_1/transformer_blocks_1/attn1/to_q" in lora.layers
    merged = adapters.merge(loaded.params, [lora], [1.0])
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    pipe.load_lora_weights(tmp_path, weight_name=path.name)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((2, 5, 192)).astype(np.float32)
    pooled = rng.standard_normal((2, 128)).astype(np.float32)
    ids = np.array([[16, 16, 0, 0, 16, 16]] * 2, np.float32)
    t = np.array([10.0, 700.0], np.float32)
    ours = loaded.unet.apply({"params": merged["unet"]}, x, t, context=context,
                             text_embeds=pooled, time_ids=ids)  # fmt: skip
    with torch.no_grad():
        ref = pipe.unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                        encoder_hidden_states=torch.from_numpy(context),
                        added_cond_kwargs={"text_embeds": torch.from_numpy(pooled),
                                           "time_ids": torch.from_numpy(ids)}).sample  # fmt: skip
    np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    tokens = np.array([[49406, 320, 1125, 49407, 49407]])
    for part, module in (("text_encoder", loaded.text_encoder),
                         ("text_encoder_2", loaded.text_encoder_2)):  # fmt: skip
        out = module.apply({"params": merged[part]}, tokens)
        with torch.no_grad():
            want = getattr(pipe, part)(torch.from_numpy(tokens)).last_hidden_state.numpy()
        np.testing.assert_allclose(np.asarray(out.last_hidden_state), want, atol=1e-4)


def test_an_sdxl_controlnet_matches_diffusers(sdxl_dir, loaded, tmp_path):
    """A ControlNet of the SDXL U-Net's shape (its added text/time embedding too), made by
    diffusers' `from_unet` and saved: its residuals equal diffusers' (within 1e-4), and
    StableDiffusionXLControlNetPipeline's images equal jdiff's (within 1e-3)."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    base = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    net = perturbed(
        ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16))
    )
    net.save_pretrained(tmp_path / "controlnet")
    cn = interop.load_controlnet(tmp_path / "controlnet")
    assert cn.model.addition_embed_type == "text_time"
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((2, 5, 192)).astype(np.float32)
    pooled = rng.standard_normal((2, 128)).astype(np.float32)
    ids = np.array([[16, 16, 0, 0, 16, 16]] * 2, np.float32)
    edges = rng.uniform(size=(2, 16, 16, 3)).astype(np.float32)
    t = np.array([10.0, 700.0], np.float32)
    down, mid = cn.model.apply({"params": cn.params}, x, t, edges, context=context,
                               text_embeds=pooled, time_ids=ids)  # fmt: skip
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    with torch.no_grad():
        ref_down, ref_mid = net(nchw(x), torch.from_numpy(t), torch.from_numpy(context),
                                nchw(edges), added_cond_kwargs={
                                    "text_embeds": torch.from_numpy(pooled),
                                    "time_ids": torch.from_numpy(ids)},
                                return_dict=False)  # fmt: skip
    for ours, theirs in zip([*down, mid], [*ref_down, ref_mid], strict=True):
        np.testing.assert_allclose(np.asarray(ours), theirs.permute(0, 2, 3, 1).numpy(),
                                   atol=1e-4)  # fmt: skip
    latents = _latents(8)
    model = pipelines.LatentDiffusion.from_pretrained(loaded)
    ours = model.txt2img(loaded.params, PROMPTS, jax.random.key(0), num_steps=6,
                         guidance_scale=5.0, latents=latents, controlnet=cn, control_image=edges,
                         controlnet_conditioning_scale=0.6)  # fmt: skip
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(sdxl_dir, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(PROMPTS, image=nchw(edges), num_inference_steps=6, guidance_scale=5.0,
                   latents=nchw(latents), controlnet_conditioning_scale=0.6,
                   output_type="np").images  # fmt: skip
    np.testing.assert_allclose(np.clip((np.asarray(ours) + 1) / 2, 0, 1), ref, atol=1e-3)
