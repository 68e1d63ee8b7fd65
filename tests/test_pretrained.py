"""Stable Diffusion weights: diffusers-format directories and original single files in, diffusers
directories and jdiff checkpoints out, each against diffusers and transformers themselves.

The models are small random-weight SD 1.x- and SD 2.x-shaped pipelines built with diffusers and
transformers in the test and saved with their own `save_pretrained` (no hub)."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DModel,
)
from reference import assert_only_the_unet_moved, perturbed, posterior_mode_in, tiny_pipeline

from jdiff import interop, pipelines, samplers
from jdiff.interop import cli, configs, single_file

SD1_SCHEDULER = dict(single_file.SCHEDULERS["sd1"])
SD2_SCHEDULER = dict(single_file.SCHEDULERS["sd2"])
PROMPTS = ["a red circle at the top left", "a blue square"]
NEGATIVE = ["", "green"]


@pytest.fixture(scope="module")
def sd_dirs(tmp_path_factory):
    """{"sd1" | "sd2": directory}: the tiny pipelines as diffusers saves them."""
    out = {}
    for version, scheduler in (("sd1", PNDMScheduler.from_config(SD1_SCHEDULER)),
                               ("sd2", DDIMScheduler.from_config(SD2_SCHEDULER))):  # fmt: skip
        unet, vae, text, tokenizer = tiny_pipeline(version)
        folder = tmp_path_factory.mktemp(version)
        tokenizer.save_pretrained(folder / "tokenizer_files")
        torch_tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer_files")
        pipe = StableDiffusionPipeline(
            vae=perturbed(vae), text_encoder=perturbed(text), tokenizer=torch_tokenizer,
            unet=perturbed(unet), scheduler=scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
        pipe.save_pretrained(folder / "pipeline")
        out[version] = folder / "pipeline"
    return out


@pytest.fixture(scope="module")
def loaded(sd_dirs):
    return {v: interop.load_pretrained(path) for v, path in sd_dirs.items()}


def torch_pipeline(path, scheduler=None):
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    if scheduler is not None:
        pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_directory_loads_with_its_configs_and_scheduler(sd_dirs, loaded):
    sd1, sd2 = loaded["sd1"], loaded["sd2"]
    half = interop.load_pretrained(sd_dirs["sd1"], dtype=jnp.bfloat16)
    assert half.unet.dtype == half.text_encoder.dtype == jnp.bfloat16
    assert half.autoencoder.dtype == jnp.float32  # reduced-precision decodes overflow
    assert sd1.unet.heads_per_block() == (8, 8) and not sd1.unet.use_linear_projection
    assert sd2.unet.heads_per_block() == (1, 2) and sd2.unet.use_linear_projection
    assert sd2.unet.upcast_attention and sd2.text_encoder.hidden_act == "gelu"
    assert sd1.image_size == 16 and sd1.autoencoder.downsample_factor == 2
    assert sd1.scheduler.method == "pndm" and sd2.scheduler.method == "ddim"
    assert sd1.scheduler.options_for() == {
        "prediction_type": "epsilon", "steps_offset": 1, "set_alpha_to_one": False,
        "skip_prk_steps": True, "timestep_spacing": "leading",
    }  # fmt: skip
    # another method takes what applies to it, as DDIMScheduler.from_config would
    assert sd2.scheduler.options_for("euler") == {"prediction_type": "v_prediction",
                                                  "steps_offset": 1,
                                                  "timestep_spacing": "leading"}  # fmt: skip
    assert sd2.tokenizer.pad_id == sd2.tokenizer.vocab["!"]
    assert set(sd1.params) == {"unet", "autoencoder", "text_encoder"}


def _latents(seed=0):
    return np.random.default_rng(seed).standard_normal((2, 8, 8, 4)).astype(np.float32)


@pytest.mark.parametrize(
    "version, method, scheduler",
    # DDIM: the SD 2.x directory's own scheduler (v-prediction); the inpainting test's too
    [("sd1", "dpmpp_2m", DPMSolverMultistepScheduler), ("sd2", None, None)],
)  # fmt: skip
def test_txt2img_matches_stable_diffusion_pipeline(sd_dirs, loaded, version, method, scheduler):
    """The same directory, prompts, negative prompts and initial latents: jdiff's images are
    diffusers' StableDiffusionPipeline's (classifier-free guidance 7.5, 10 steps)."""
    latents = _latents()
    model = pipelines.LatentDiffusion.from_pretrained(loaded[version])
    ours = model.txt2img(loaded[version].params, PROMPTS, jax.random.key(0), method=method,
                         negative_prompts=NEGATIVE, num_steps=10, latents=latents)  # fmt: skip
    ours = np.clip((np.asarray(ours) + 1) / 2, 0, 1)
    pipe = torch_pipeline(sd_dirs[version], scheduler)
    with torch.no_grad():
        ref = pipe(PROMPTS, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5,
                   latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
                   output_type="np").images  # fmt: skip
    assert ours.shape == ref.shape == (2, 16, 16, 3)
    assert ref.std() > 0.05  # not a flat image
    np.testing.assert_allclose(ours, ref, atol=1e-3)


def test_inpainting_matches_stable_diffusion_inpaint_pipeline(tmp_path, monkeypatch):
    """A 9-channel inpainting U-Net (latents, mask, masked-image latents): jdiff's inpaint gives
    diffusers' StableDiffusionInpaintPipeline's images (the masked image's latents taken at
    the posterior mode on both sides; diffusers samples them with torch's generator)."""
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as module

    unet, vae, text, tokenizer = tiny_pipeline("sd1", in_channels=9)
    tokenizer.save_pretrained(tmp_path / "tokenizer_files")
    pipe = StableDiffusionInpaintPipeline(
        vae=perturbed(vae), text_encoder=perturbed(text), unet=perturbed(unet),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer_files"),
        scheduler=DDIMScheduler.from_config(SD1_SCHEDULER), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(tmp_path / "inpaint")
    p = interop.load_pretrained(tmp_path / "inpaint")
    model = pipelines.LatentDiffusion.from_pretrained(p)
    assert p.unet.in_channels == 9 and model.is_inpainting
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    mask = np.zeros((2, 16, 16, 1), np.float32)
    mask[:, 4:12, 2:10] = 1.0
    ours = model.inpaint(p.params, image, mask, PROMPTS, jax.random.key(0), num_steps=10,
                         negative_prompts=NEGATIVE, latents=_latents())  # fmt: skip
    ours = np.clip((np.asarray(ours) + 1) / 2, 0, 1)

    posterior_mode_in(monkeypatch, module)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = pipe(PROMPTS, image=torch.from_numpy(image).permute(0, 3, 1, 2),
                   mask_image=torch.from_numpy(mask).permute(0, 3, 1, 2),
                   negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=7.5,
                   height=16, width=16, latents=torch.from_numpy(_latents()).permute(0, 3, 1, 2),
                   output_type="np").images  # fmt: skip
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    with pytest.raises(ValueError, match="use inpaint"):
        model.txt2img(p.params, PROMPTS, jax.random.key(0))
    with pytest.raises(ValueError, match="do not fit images of shape"):
        model.inpaint(p.params, image, mask[:, :8], PROMPTS, jax.random.key(0))
    with pytest.raises(ValueError, match=r"mask values must lie in \[0, 1\]"):
        model.inpaint(p.params, image, mask * 255, PROMPTS, jax.random.key(0))


def test_export_round_trips_through_diffusers(sd_dirs, loaded, tmp_path):
    """jdiff -> save_pretrained -> diffusers loads it: the same tensors and configs as the
    directory it came from."""
    out = interop.save_pretrained(loaded["sd2"], tmp_path / "exported")
    original = torch_pipeline(sd_dirs["sd2"])
    exported = torch_pipeline(out)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, name).state_dict(), getattr(exported, name).state_dict()
        assert set(a) == set(b), name
        for key in a:
            np.testing.assert_array_equal(a[key].numpy(), b[key].numpy(), err_msg=key)
    for key in ("block_out_channels", "attention_head_dim", "use_linear_projection",
                "upcast_attention", "cross_attention_dim", "sample_size"):  # fmt: skip
        assert original.unet.config[key] == exported.unet.config[key], key
    assert type(exported.scheduler) is DDIMScheduler
    assert exported.scheduler.config.prediction_type == "v_prediction"
    assert exported.tokenizer.pad_token == "!"
    assert exported.tokenizer("a cat").input_ids == original.tokenizer("a cat").input_ids
    # and back into jdiff
    again = interop.load_pretrained(out)
    for a, b in zip(jax.tree.leaves(loaded["sd2"].params), jax.tree.leaves(again.params),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_jdiff_checkpoint_cli_round_trip(sd_dirs, loaded, tmp_path, capsys):
    cli.main([str(sd_dirs["sd1"]), "--output", str(tmp_path / "ckpt")])
    printed = capsys.readouterr().out
    assert "jdiff checkpoint:" in printed and re.search(r"unet [0-9,]{7,}", printed)
    back = interop.load_pretrained(tmp_path / "ckpt")
    assert back.scheduler.options_for() == loaded["sd1"].scheduler.options_for()
    assert back.tokenizer(["a cat"]).tolist() == loaded["sd1"].tokenizer(["a cat"]).tolist()
    for a, b in zip(jax.tree.leaves(loaded["sd1"].params), jax.tree.leaves(back.params),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    cli.main([str(tmp_path / "ckpt"), "--output", str(tmp_path / "diffusers"),
                  "--format", "diffusers"])  # fmt: skip
    pipe = torch_pipeline(tmp_path / "diffusers")
    assert type(pipe.scheduler) is PNDMScheduler
    with pytest.raises(ValueError, match="not an empty directory"):
        cli.main([str(sd_dirs["sd1"]), "--output", str(tmp_path / "ckpt")])


# ----------------------------------------------------------------------------- single files


def original_file(pretrained, path, *, extras=True):
    """`pretrained` written in the original single-file layout, with what real files carry
    beside the modules (EMA copies, schedule buffers, OpenCLIP's last block and projection)."""
    from safetensors.numpy import save_file

    maps = single_file.key_map(pretrained.unet, pretrained.autoencoder, pretrained.text_encoder,
                               openclip=pretrained.text_encoder.hidden_act == "gelu")  # fmt: skip
    states = {k: interop.to_diffusers(v) for k, v in pretrained.params.items()}
    state = single_file.from_diffusers_state(states, maps)
    if extras:
        state["alphas_cumprod"] = np.ones(1000, np.float32)
        state["model_ema.decay"] = np.ones((), np.float32)
        if pretrained.text_encoder.hidden_act == "gelu":
            p = single_file.OPENCLIP
            last = f"{p}transformer.resblocks.2."
            for k in [k for k in state if k.startswith(f"{p}transformer.resblocks.1.")]:
                state[last + k.split("resblocks.1.")[1]] = state[k]
            state[p + "text_projection"] = np.eye(64, dtype=np.float32)
            state[p + "logit_scale"] = np.ones((), np.float32)
    save_file(state, path)
    return state


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_single_file_layout_matches_diffusers_converter(loaded, version, tmp_path):
    """Our original-layout table against diffusers' own single-file converters: the file jdiff
    writes converts, by diffusers, back to exactly the tensors of the diffusers directory."""
    from diffusers.loaders import single_file_utils as sfu

    p = loaded[version]
    state = original_file(p, tmp_path / "model.safetensors")
    checkpoint = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
    unet_config = interop.unet_config_to_diffusers(p.unet, p.sample_size)
    vae_config = interop.vae_config_to_diffusers(p.autoencoder, p.image_size)
    got = {"unet": sfu.convert_ldm_unet_checkpoint(checkpoint, unet_config),
           "autoencoder": sfu.convert_ldm_vae_checkpoint(checkpoint, vae_config)}  # fmt: skip
    if version == "sd1":
        got["text_encoder"] = sfu.convert_ldm_clip_checkpoint(checkpoint)
    else:
        config = transformers.CLIPTextConfig(
            **interop.text_encoder_config_to_transformers(p.text_encoder)
        )
        text = transformers.CLIPTextModel(config)
        got["text_encoder"] = sfu.convert_open_clip_checkpoint(text, checkpoint)
    for module, tree in p.params.items():
        expected = interop.to_diffusers(tree)
        theirs = {k if k.startswith("text_model.") or module != "text_encoder"
                  else f"text_model.{k}": v for k, v in got[module].items()}  # fmt: skip
        theirs = {k: v for k, v in theirs.items() if not k.endswith("position_ids")}
        if module == "text_encoder" and version == "sd2":  # diffusers keeps every block
            theirs = {k: v for k, v in theirs.items() if "layers.2." not in k
                      and "projection" not in k}  # fmt: skip
        assert set(theirs) == set(expected), (module, set(theirs) ^ set(expected))
        for key, value in expected.items():
            np.testing.assert_array_equal(np.asarray(theirs[key], np.float32).reshape(value.shape),
                                          value, err_msg=f"{module} {key}")  # fmt: skip


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_single_file_loads_like_the_directory(loaded, version, tmp_path):
    p = loaded[version]
    original_file(p, tmp_path / "model.safetensors")
    q = interop.load_pretrained(tmp_path / "model.safetensors", image_size=16)
    for field in (
        "block_out_channels",
        "num_attention_heads",
        "use_linear_projection",
        "cross_attention_dim",
        "in_channels",
        "down_block_types",
        "up_block_types",
    ):
        assert tuple(np.ravel(getattr(q.unet, field))) == tuple(np.ravel(getattr(p.unet, field)))
    assert q.text_encoder.num_hidden_layers == 2 and q.image_size == 16
    assert q.scheduler.method == p.scheduler.method
    method = p.scheduler.method
    assert samplers.resolve_options(method, q.scheduler.options_for()) == (
        samplers.resolve_options(method, p.scheduler.options_for())
    )
    assert q.tokenizer(PROMPTS).tolist() == p.tokenizer(PROMPTS).tolist()
    for a, b in zip(jax.tree.leaves(p.params), jax.tree.leaves(q.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("version", ["sd1", "sd2"])
def test_single_file_export_reads_back(loaded, version, tmp_path):
    """`single_file.save` (`python -m jdiff.interop ... --format single_file`): the file reads
    back to the same parameters (SD 2.x's with OpenCLIP's unused last block, zeroed)."""
    p = loaded[version]
    single_file.save(p, tmp_path / "model.safetensors")
    q = interop.load_pretrained(tmp_path / "model.safetensors", image_size=16)
    assert q.text_encoder.num_hidden_layers == p.text_encoder.num_hidden_layers
    for a, b in zip(jax.tree.leaves(p.params), jax.tree.leaves(q.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_single_file_defaults_overrides_and_errors(loaded, tmp_path):
    original_file(loaded["sd2"], tmp_path / "sd2.safetensors")
    sd2 = interop.load_pretrained(tmp_path / "sd2.safetensors")
    assert sd2.image_size == 768 and sd2.scheduler.options["prediction_type"] == "v_prediction"
    base = interop.load_pretrained(tmp_path / "sd2.safetensors", prediction_type="epsilon")
    assert base.image_size == 512 and base.scheduler.options["prediction_type"] == "epsilon"
    state = original_file(loaded["sd1"], tmp_path / "sd1.safetensors", extras=False)
    assert interop.load_pretrained(tmp_path / "sd1.safetensors").image_size == 512

    from safetensors.numpy import save_file

    for key in ("first_stage_model.encoder.conv_in.weight",  # read for the config
                "first_stage_model.decoder.mid.attn_1.q.bias"):  # fmt: skip
        save_file({k: v for k, v in state.items() if k != key}, tmp_path / "missing.safetensors")
        with pytest.raises(ValueError, match=f"missing {key}"):
            interop.load_pretrained(tmp_path / "missing.safetensors")
    narrow = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    save_file(state | {narrow: state[narrow][:, :32]}, tmp_path / "narrow.safetensors")
    with pytest.raises(ValueError, match=r"text encoder is 32 wide.*attention heads"):
        interop.load_pretrained(tmp_path / "narrow.safetensors")  # once a division by zero
    save_file(state | {"model.diffusion_model.extra.weight": np.ones(2, np.float32)},
              tmp_path / "extra.safetensors")  # fmt: skip
    with pytest.raises(ValueError, match=r"unexpected model\.diffusion_model\.extra\.weight"):
        interop.load_pretrained(tmp_path / "extra.safetensors")
    torch.save({"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}},
               tmp_path / "model.ckpt")  # fmt: skip
    with pytest.raises(ValueError, match=r"pickle-based.*allow_pickle"):
        interop.load_pretrained(tmp_path / "model.ckpt")
    pickled = interop.load_pretrained(tmp_path / "model.ckpt", allow_pickle=True)
    for a, b in zip(jax.tree.leaves(loaded["sd1"].params), jax.tree.leaves(pickled.params),
                    strict=True):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- real configs

# the config.json files of the released directories, as they are on the hub (written by older
# diffusers versions: fields added since are absent and take the class defaults)
SD15_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
}  # fmt: skip
SD21_UNET = SD15_UNET | {
    "_diffusers_version": "0.10.0.dev0", "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024, "dual_cross_attention": False, "num_class_embeds": None,
    "only_cross_attention": False, "sample_size": 96, "use_linear_projection": True,
    "upcast_attention": True,
}  # fmt: skip
SD15_VAE = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}  # fmt: skip
DDPM_CIFAR10_UNET = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
    "attention_head_dim": None, "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}  # fmt: skip


def test_released_configs_build_the_released_networks():
    """The released directories' own config files give exactly the networks whose parameter
    counts test_unet / test_vae check (SD 1.5 859,520,964; SD 2.1 865,910,724; VAE 83,653,863;
    DDPM CIFAR-10 35,746,307)."""
    from jdiff.nn import VARIANTS, UNet
    from jdiff.nn import vae as jvae

    def architecture(unet):  # every field that shapes the network (dropout does not)
        per_block = ("transformer_layers_per_block",)
        n = len(unet.block_out_channels)
        fields = {f: getattr(unet, f) for f in configs._UNET_FIELDS + configs._CROSS_FIELDS
                  if f not in per_block}  # fmt: skip
        fields["layers"] = np.broadcast_to(unet.transformer_layers_per_block, n).tolist()
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
        return fields | {"heads": unet.heads_per_block(), "mid": unet.mid_block_type,
                         "classes": unet.num_class_embeds}  # fmt: skip

    for config, variant in ((SD15_UNET, "sd_v1"), (SD21_UNET, "sd_v2_1"),
                            (DDPM_CIFAR10_UNET, "ddpm_cifar10")):  # fmt: skip
        ours = UNet(**interop.unet_config_from_diffusers(config))
        assert architecture(ours) == architecture(UNet(**VARIANTS[variant])), variant
    vae = jvae.AutoencoderKL(**interop.vae_config_from_diffusers(SD15_VAE))
    for field in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                  "in_channels", "scaling_factor", "use_quant_conv"):  # fmt: skip
        assert getattr(vae, field) == getattr(jvae.AutoencoderKL(), field), field


# ----------------------------------------------------------------------------- errors, DDPM


def test_directory_errors_name_the_problem(sd_dirs, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(sd_dirs["sd1"], bad)
    weights = bad / "vae" / "diffusion_pytorch_model.safetensors"
    from safetensors.numpy import load_file, save_file

    state = load_file(weights)
    state["decoder.conv_in.weight"] = state["decoder.conv_in.weight"][:, :2]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"(?s)vae: .*decoder.conv_in.weight: shape .* expected"):
        interop.load_pretrained(bad)
    weights.unlink()
    (bad / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="pickle-based"):
        interop.load_pretrained(bad)
    index = json.loads((bad / "model_index.json").read_text())
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"lists \['text_encoder_2'\] but .* no such"):
        interop.load_pretrained(bad)
    index["transformer"] = ["diffusers", "SD3Transformer2DModel"]
    (bad / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"components \['transformer \(SD3Transformer2DModel\)'\]"):
        interop.load_pretrained(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        interop.load_pretrained(tmp_path / "nowhere")


def test_scheduler_configs_map_to_samplers():
    s = interop.scheduler_from_diffusers({"_class_name": "DDIMScheduler",
                                          "beta_schedule": "squaredcos_cap_v2"})  # fmt: skip
    assert s.method == "ddim" and s.options["clip_sample"] is True  # diffusers' default
    assert s.schedule == {"name": "cosine", "num_timesteps": 1000,
                          "rescale_zero_terminal_snr": False}  # fmt: skip
    s = interop.scheduler_from_diffusers({"_class_name": "EulerDiscreteScheduler",
                                          "rescale_betas_zero_snr": True,
                                          "beta_schedule": "scaled_linear",
                                          "beta_start": 0.00085, "beta_end": 0.012})  # fmt: skip
    assert s.method == "euler" and float(s.make_schedule().alphas_cumprod[-1]) == 0.0
    with pytest.warns(UserWarning, match="LMSDiscreteScheduler has no jdiff sampler"):
        s = interop.scheduler_from_diffusers({"_class_name": "LMSDiscreteScheduler"})
    assert s.method == "ddim"
    with pytest.warns(UserWarning, match="thresholding"):
        interop.scheduler_from_diffusers({"_class_name": "DDPMScheduler", "thresholding": True})
    with pytest.raises(ValueError, match="beta_schedule 'exp'"):
        interop.scheduler_from_diffusers({"beta_schedule": "exp"})


def test_pixel_space_ddpm_directory(tmp_path):
    """A DDPM-paper-shaped UNet2DModel directory (google/ddpm-cifar10-32's layout) loads and
    its U-Net matches diffusers'; make_generate samples from it."""
    from diffusers import DDPMPipeline, DDPMScheduler

    unet = perturbed(UNet2DModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    ))  # fmt: skip
    DDPMPipeline(unet, DDPMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path)
    p = interop.load_pretrained(tmp_path)
    assert not p.is_latent and p.image_size == 8 and p.scheduler.method == "ddpm"
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    t = np.array([10.0, 900.0], np.float32)
    ours = p.unet.apply({"params": p.params["unet"]}, jnp.asarray(x), jnp.asarray(t))
    with torch.no_grad():
        ref = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t)).sample
    ref = ref.permute(0, 2, 3, 1).numpy()
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4 * np.abs(ref).max()
    generate = pipelines.make_generate(p.unet, p.scheduler.make_schedule(), shape=(1, 8, 8, 3),
                                       method="ddim", num_steps=2,
                                       **p.scheduler.options_for("ddim"))  # fmt: skip
    assert np.isfinite(np.asarray(jax.jit(generate)(p.params["unet"], jax.random.key(0)))).all()


def test_sample_py_pretrained(sd_dirs, tmp_path):
    """`python sample.py --pretrained DIR --prompt ...` writes one image per prompt with the
    directory's scheduler (PNDM); a bad path is a one-line error."""
    import subprocess
    import sys

    from conftest import ROOT

    command = [sys.executable, str(ROOT / "sample.py"), f"--pretrained={sd_dirs['sd1']}",
               "--prompt=a red circle", "--prompt=a blue square", "--num_steps=4",
               f"--output_dir={tmp_path}", "--negative_prompt=green"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    npz = tmp_path / "txt2img_pndm4_cfg7.5_seed0.npz"
    assert f"arrays: {npz}" in done.stdout
    saved = np.load(npz)
    assert saved["images"].shape == (2, 16, 16, 3) and saved["images"].dtype == np.uint8
    assert list(saved["prompts"]) == ["a red circle", "a blue square"]
    assert (tmp_path / "txt2img_pndm4_cfg7.5_seed0.png").exists()
    bad = subprocess.run([*command[:2], f"--pretrained={tmp_path / 'nowhere'}", "--prompt=x"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert bad.returncode == 2 and "error:" in bad.stderr and "does not exist" in bad.stderr
    # options these weights would ignore: refused by name, nothing written
    from jdiff import sampling
    from jdiff.validate import InputError

    out = tmp_path / "refused"
    for given, fragment in (({"eta": 0.5}, "--eta does not apply.*sampling with pndm"),
                            ({"step": 3}, "--step does not apply"),
                            ({"trajectory": True}, "--trajectory"),
                            ({"jump_length": 2}, "--jump_length"),
                            ({"upscale": "low.png"}, "--upscale")):  # fmt: skip
        r = sampling.Request(prompts=("x",), output_dir=str(out), **given)
        with pytest.raises(InputError, match=fragment):
            sampling.sample_pretrained(sd_dirs["sd1"], r)
    assert not out.exists()


def test_train_py_fine_tunes_pretrained_weights(sd_dirs, loaded, tmp_path):
    """configs/sd_finetune.py:tiny on the SD 1.x-shaped directory: the U-Net trains from the
    converted weights, the autoencoder and text encoder stay as loaded; the workdir samples."""
    import importlib

    from jdiff import trainer

    config = importlib.import_module("configs.sd_finetune").get_config("tiny")
    config.latent.pretrained = str(sd_dirs["sd1"])
    config.mesh.data = 1
    grid = trainer.train(config, tmp_path)
    assert grid.exists()
    model, params, _ = pipelines.load_latent_diffusion(tmp_path, ema=False)
    before = loaded["sd1"].params
    assert_only_the_unet_moved(before, params, ("text_encoder", "autoencoder"))
    assert model.method == "pndm" and model.image_size == 16  # sample.py --workdir samples it
    assert np.load(tmp_path / "latents.npz")["latent_mean"].shape == (64, 8, 8, 4)
