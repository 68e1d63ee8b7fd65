"""LoRA: the files people share (diffusers / PEFT, Kohya) merged into jdiff's parameter trees,
against diffusers' own `load_lora_weights` on tiny random-weight pipelines; merging as a pure
function (scales as arguments, nothing recompiled, the base untouched); export back.

The LoRAs are made by PEFT on diffusers' and transformers' modules and saved by diffusers'
`save_lora_weights` ("style": attention, LoCon on the residual blocks' first convolutions at
another rank, `proj_in` at another alpha, and the text encoder), and by a Kohya-format writer
("detail": the same layout Kohya's scripts write, with alphas)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import PNDMScheduler, StableDiffusionPipeline
from reference import allow_peft, kohya_file, peft_lora, perturbed, tiny_pipeline

from jdiff import adapters, interop, pipelines
from jdiff.interop import single_file

PROMPTS = ["a red circle at the top left", "a blue square"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@pytest.fixture(autouse=True)
def peft_for_transformers(monkeypatch):
    allow_peft(monkeypatch)


def save_peft_lora(folder, unet_state, unet_config, text_state, text_config):
    """diffusers' `save_lora_weights` of PEFT state dicts, their configs as the metadata."""
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=unet_state, text_encoder_lora_layers=text_state,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )  # fmt: skip


def save_tiny_pipeline(version, folder, scheduler):
    """The tiny SD `version` pipeline (random weights, perturbed) as diffusers saves it."""
    unet, vae, text, tokenizer = tiny_pipeline(version)
    tokenizer.save_pretrained(folder / "tokenizer")
    StableDiffusionPipeline(
        vae=perturbed(vae), text_encoder=perturbed(text), unet=perturbed(unet),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder / "pipeline")  # fmt: skip
    return folder / "pipeline"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """{"pipeline": the tiny SD 1.x directory, "style": its diffusers LoRA directory,
    "detail": a Kohya-format file}."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd1")
    scheduler = PNDMScheduler.from_config(single_file.SCHEDULERS["sd1"])
    save_tiny_pipeline("sd1", folder, scheduler)
    fresh_unet, _, fresh_text, _ = tiny_pipeline("sd1")
    unet_state, unet_config = peft_lora(
        fresh_unet,
        UNET_TARGETS,
        rank=4,
        alpha=8,
        seed=1,
        rank_pattern={"conv1": 2},
        alpha_pattern={"proj_in": 3},
    )
    text_state, text_config = peft_lora(fresh_text, TEXT_TARGETS, rank=2, alpha=2, seed=2)
    save_peft_lora(folder / "style", unet_state, unet_config, text_state, text_config)
    detail_unet, _, detail_text, _ = tiny_pipeline("sd1")
    state, config = peft_lora(detail_unet, ["to_k", "to_v", "ff.net.2", "conv2"], rank=3,
                              alpha=1.5, seed=3)  # fmt: skip
    text_state, text_config = peft_lora(detail_text, ["q_proj", "fc2"], rank=2, alpha=1.5, seed=4)
    # its twin in diffusers' format: diffusers 0.42 misnames a Kohya file's text-encoder
    # attention LoRAs for transformers 5 (`self_attn.to_q_lora`, left unloaded), so the text
    # encoder's reference reads the same tensors from this file
    save_peft_lora(folder / "detail_twin", state, config, text_state, text_config)
    state = {f"unet.{k}": v for k, v in state.items()}
    state |= {f"text_encoder.{k}": v for k, v in text_state.items()}
    detail = kohya_file(state, folder / "detail.safetensors", alpha=1.5)
    return {"pipeline": folder / "pipeline", "style": folder / "style", "detail": detail,
            "detail_twin": folder / "detail_twin"}  # fmt: skip


@pytest.fixture(scope="module")
def loaded(sd1):
    return interop.load_pretrained(sd1["pipeline"])


def torch_pipeline(sd1, **loras):
    pipe = StableDiffusionPipeline.from_pretrained(sd1["pipeline"], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    for name, path in loras.items():
        if path.is_dir():
            pipe.load_lora_weights(path, adapter_name=name)
        else:
            pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name=name)
    return pipe


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((2, 5, 64)).astype(np.float32)
    return x, context, np.array([10.0, 600.0], np.float32)


def unet_out(pretrained, params, x, context, t):
    return np.asarray(pretrained.unet.apply({"params": params["unet"]}, x, t, context=context))


def torch_unet_out(unet, x, context, t):
    with torch.no_grad():
        out = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                   encoder_hidden_states=torch.from_numpy(context)).sample  # fmt: skip
    return out.permute(0, 2, 3, 1).numpy()


IDS = np.array([[49406, 320, 1125, 3666, 49407, 49407, 49407]])


def text_out(pretrained, params):
    out = pretrained.text_encoder.apply({"params": params["text_encoder"]}, jnp.asarray(IDS))
    return np.asarray(out.last_hidden_state)


def torch_text_out(text):
    with torch.no_grad():
        return text(torch.from_numpy(IDS)).last_hidden_state.numpy()


@pytest.mark.parametrize("name", ["style", "detail"])
def test_lora_files_merge_as_diffusers_loads_them(sd1, loaded, name):
    """Each file's U-Net (attention, feed-forward, LoCon convolutions, per-layer ranks and
    alphas) and text encoder equal diffusers' after `load_lora_weights`, within 1e-4."""
    path = sd1[name] / "pytorch_lora_weights.safetensors" if name == "style" else sd1[name]
    lora = interop.read_lora(path, loaded.unet, loaded.params)
    assert lora.components() == ("text_encoder", "unet")
    if name == "style":  # rank_pattern and alpha_pattern from the file's metadata
        assert lora.rank("unet/down_blocks_0/resnets_0/conv1") == 2
        assert float(lora.alpha["unet/mid_block/attentions_0/proj_in"]) == 3.0
        assert float(lora.alpha["unet/mid_block/attentions_0/transformer_blocks_0/attn1/to_q"]) == 8
    else:
        assert {float(a) for a in lora.alpha.values()} == {1.5}
    merged = adapters.merge(loaded.params, [lora], [1.0])
    pipe = torch_pipeline(sd1, **{name: sd1[name]})
    text_pipe = pipe if name == "style" else torch_pipeline(sd1, twin=sd1["detail_twin"])
    x, context, t = _inputs()
    ours, ref = unet_out(loaded, merged, x, context, t), torch_unet_out(pipe.unet, x, context, t)
    base = unet_out(loaded, loaded.params, x, context, t)
    assert np.abs(ref - base).max() > 0.05  # the adapter changes the output
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    np.testing.assert_allclose(text_out(loaded, merged), torch_text_out(text_pipe.text_encoder),
                               atol=1e-4)  # fmt: skip


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # two adapters: intended
def test_txt2img_with_loras_matches_diffusers_at_any_scale_compiled_once(sd1, loaded):
    """The whole pipeline (PNDM, 10 steps, guidance 7.5, the same latents) with "style" at
    scales 0, 0.5 and 1, and with "style" 1 and "detail" 0.5 together, equals diffusers'
    (`set_adapters`) within 1e-3; the sampler compiles once, and merging once per set of
    adapters (a new scale compiles nothing); the base parameters stay as they were."""
    style = interop.read_lora(sd1["style"] / "pytorch_lora_weights.safetensors", loaded.unet,
                              loaded.params)  # fmt: skip
    detail = interop.read_lora(sd1["detail"], loaded.unet, loaded.params)
    before = jax.tree.map(np.array, loaded.params)
    model = pipelines.LatentDiffusion.from_pretrained(loaded)
    pipe = torch_pipeline(sd1, style=sd1["style"], detail=sd1["detail_twin"])
    latents = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    merges = adapters.merge_jit._cache_size()
    for names, scales in ((["style"], [0.0]), (["style"], [0.5]), (["style"], [1.0]),
                          (["style", "detail"], [1.0, 0.5])):  # fmt: skip
        loras = [{"style": style, "detail": detail}[n] for n in names]
        params = adapters.merge_jit(loaded.params, loras, [jnp.float32(s) for s in scales])
        ours = model.txt2img(params, PROMPTS, jax.random.key(0), num_steps=10, latents=latents)
        pipe.set_adapters(names, scales)
        with torch.no_grad():
            ref = pipe(PROMPTS, num_inference_steps=10, guidance_scale=7.5, output_type="np",
                       latents=torch.from_numpy(latents).permute(0, 3, 1, 2)).images  # fmt: skip
        np.testing.assert_allclose(np.clip((np.asarray(ours) + 1) / 2, 0, 1), ref, atol=1e-3)
    assert len(model._compiled) == 1
    assert adapters.merge_jit._cache_size() - merges == 2  # one per set of adapters
    jax.tree.map(np.testing.assert_array_equal, loaded.params, before)
    # scale 0 is the base bit for bit; the base tree is what "unmerging" returns to
    zero = adapters.merge_jit(loaded.params, [style], [jnp.float32(0)])
    jax.tree.map(np.testing.assert_array_equal, zero, loaded.params)


def test_a_jdiff_written_lora_loads_into_diffusers(sd1, loaded, tmp_path):
    """`write_lora` of the Kohya file: diffusers' `load_lora_weights` reads it (ranks and
    alphas from its metadata) to the same U-Net and text encoder outputs, and jdiff reads it
    back to the same factors."""
    lora = interop.read_lora(sd1["detail"], loaded.unet, loaded.params)
    path = interop.write_lora(lora, tmp_path / "exported", loaded.params)
    assert path.name == "pytorch_lora_weights.safetensors"
    again = interop.read_lora(path, loaded.unet, loaded.params)
    jax.tree.map(np.testing.assert_array_equal, again, lora)
    pipe = torch_pipeline(sd1, exported=path.parent)
    merged = adapters.merge(loaded.params, [lora], [1.0])
    x, context, t = _inputs(1)
    np.testing.assert_allclose(unet_out(loaded, merged, x, context, t),
                               torch_unet_out(pipe.unet, x, context, t), atol=1e-4)  # fmt: skip
    np.testing.assert_allclose(text_out(loaded, merged), torch_text_out(pipe.text_encoder),
                               atol=1e-4)  # fmt: skip


def test_lora_files_that_do_not_fit_are_refused_naming_the_keys(sd1, loaded, tmp_path):
    from safetensors.numpy import load_file, save_file

    style = load_file(sd1["style"] / "pytorch_lora_weights.safetensors")
    stray = dict(style)
    stray["unet.down_blocks.7.attentions.0.proj_in.lora_A.weight"] = np.zeros((4, 32), np.float32)
    save_file(stray, tmp_path / "stray.safetensors")
    with pytest.raises(ValueError, match=r"down_blocks\.7\.attentions\.0\.proj_in\.lora_A.*no "
                                         "module of this model"):  # fmt: skip
        interop.read_lora(tmp_path / "stray.safetensors", loaded.unet, loaded.params)
    half = {k: v for k, v in style.items() if "mid_block" not in k or "lora_B" not in k}
    save_file(half, tmp_path / "half.safetensors")
    with pytest.raises(ValueError, match=r"unet/mid_block/.*: the file has no up factor"):
        interop.read_lora(tmp_path / "half.safetensors", loaded.unet, loaded.params)
    dora = dict(style)
    dora["unet.mid_block.attentions.0.proj_in.lora_magnitude_vector"] = np.ones(64, np.float32)
    save_file(dora, tmp_path / "dora.safetensors")
    with pytest.raises(ValueError, match="DoRA, which jdiff does not apply"):
        interop.read_lora(tmp_path / "dora.safetensors", loaded.unet, loaded.params)
    wide = {k: np.concatenate([v, v], axis=-1) if "lora_A" in k and v.ndim == 2 else v
            for k, v in style.items()}  # fmt: skip
    save_file(wide, tmp_path / "wide.safetensors")
    with pytest.raises(
        ValueError,
        match=r"attn1.to_q: down \(4, 64\) and up \(32, 4\) .* do not fit its kernel \(32, 32\)",
    ):
        interop.read_lora(tmp_path / "wide.safetensors", loaded.unet, loaded.params)
    lora = interop.read_lora(sd1["detail"], loaded.unet, loaded.params)
    with pytest.raises(ValueError, match="2 adapters but 1 scales"):
        adapters.merge(loaded.params, [lora, lora], [1.0])
    with pytest.raises(ValueError, match="no such module"):
        adapters.merge({"unet": loaded.params["unet"]}, [lora], [1.0])


def test_sample_py_takes_loras_with_scales(sd1, tmp_path):
    """`sample.py --pretrained DIR --lora FILE[:SCALE]`'s library path: the two LoRAs merged
    at their scales change the image, the same seed without them gives the base's; bad
    --lora values are one line each, before anything loads."""
    from jdiff import sampling
    from jdiff.request import lora_spec
    from jdiff.validate import InputError

    style = sd1["style"] / "pytorch_lora_weights.safetensors"
    outputs = {}
    for name, loras in (("base", ()), ("lora", (f"{style}:0.7", str(sd1["detail"])))):
        r = sampling.Request(prompts=("a red circle",), num_steps=2, loras=loras,
                             output_dir=str(tmp_path / name))  # fmt: skip
        sampling.sample_pretrained(sd1["pipeline"], r)
        (saved,) = (tmp_path / name).glob("*.npz")
        outputs[name] = np.load(saved)["images"].astype(int)
    assert np.abs(outputs["lora"] - outputs["base"]).max() > 0
    assert lora_spec("a:b/c.safetensors:0.5") == ("a:b/c.safetensors", 0.5)
    assert lora_spec("dir:x/file.safetensors") == ("dir:x/file.safetensors", 1.0)
    for loras, message in (((f"{style}:nan",), "the scale nan must be a finite number"),
                           ((str(tmp_path / "none.safetensors"),), "no file"),
                           ((f"{style}:20",), ">= -10.0 and <= 10.0")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            sampling.sample_pretrained(
                sd1["pipeline"], sampling.Request(prompts=("x",), loras=loras)
            )


def test_an_sd2_lora_merges_as_diffusers_loads_it(tmp_path):
    """SD 2.x's shapes (linear projections, 64-channel heads, an OpenCLIP-style GELU text
    encoder): a diffusers-format LoRA equals diffusers' after `load_lora_weights`, within 1e-4."""
    from diffusers import DDIMScheduler

    torch.manual_seed(1)
    save_tiny_pipeline("sd2", tmp_path, DDIMScheduler.from_config(single_file.SCHEDULERS["sd2"]))
    fresh_unet, _, fresh_text, _ = tiny_pipeline("sd2")
    unet_state, unet_config = peft_lora(fresh_unet, UNET_TARGETS, rank=4, alpha=4, seed=8)
    text_state, text_config = peft_lora(fresh_text, TEXT_TARGETS, rank=2, alpha=1, seed=9)
    save_peft_lora(tmp_path / "lora", unet_state, unet_config, text_state, text_config)
    loaded = interop.load_pretrained(tmp_path / "pipeline")
    lora = interop.read_lora(tmp_path / "lora" / "pytorch_lora_weights.safetensors", loaded.unet,
                             loaded.params)  # fmt: skip
    assert np.ndim(lora.down["unet/mid_block/attentions_0/proj_in"]) == 2  # linear in SD 2.x
    merged = adapters.merge(loaded.params, [lora], [1.0])
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", safety_checker=None)
    pipe.load_lora_weights(tmp_path / "lora")
    x, _, t = _inputs(2)
    context = np.random.default_rng(2).standard_normal((2, 5, 64)).astype(np.float32)
    np.testing.assert_allclose(unet_out(loaded, merged, x, context, t),
                               torch_unet_out(pipe.unet, x, context, t), atol=1e-4)  # fmt: skip
    np.testing.assert_allclose(text_out(loaded, merged), torch_text_out(pipe.text_encoder),
                               atol=1e-4)  # fmt: skip


def test_train_py_trains_a_lora_that_diffusers_loads(sd1, loaded, tmp_path):
    """configs/sd_finetune.py:tiny with lora.rank on the SD 1.x directory (U-Net and text
    encoder adapters): the checkpoint and optimizer state hold the adapter alone, the base
    model is untouched, the exported diffusers-format file is the EMA adapter, and diffusers'
    pipeline with it makes jdiff's images (within 1e-3)."""
    import importlib

    from jdiff import runs, trainer

    config = importlib.import_module("configs.sd_finetune").get_config("tiny")
    config.latent.pretrained = str(sd1["pipeline"])
    config.mesh.data = 1
    config.lora.update(rank=4, alpha=8.0, text_encoder=True)
    config.optim.learning_rate = 3e-2
    assert trainer.train(config, tmp_path).exists()
    run = runs.restore(tmp_path)
    lora = adapters.from_tree(run.ema_params, 8.0)
    assert lora.components() == ("text_encoder", "unet")
    size = lambda tree: sum(int(np.size(a)) for a in jax.tree.leaves(tree))  # noqa: E731
    assert size(run.params) == lora.size() < size(loaded.params) // 10
    exported = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    again = interop.read_lora(exported, loaded.unet, loaded.params)
    jax.tree.map(np.testing.assert_array_equal, again, lora)
    assert max(np.abs(u).max() for u in lora.up.values()) > 0  # trained from zero
    model, params, _ = pipelines.load_latent_diffusion(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params,
                 adapters.merge(loaded.params, [lora], [1.0]))  # fmt: skip
    pipe = torch_pipeline(sd1, trained=exported.parent)
    latents = np.random.default_rng(4).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ours = model.txt2img(params, PROMPTS, jax.random.key(0), num_steps=4, latents=latents)
    with torch.no_grad():
        ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=7.5, output_type="np",
                   latents=torch.from_numpy(latents).permute(0, 3, 1, 2)).images  # fmt: skip
    np.testing.assert_allclose(np.clip((np.asarray(ours) + 1) / 2, 0, 1), ref, atol=1e-3)
