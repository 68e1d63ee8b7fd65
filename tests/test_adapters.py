"""LoRA: the files people share (diffusers / PEFT, Kohya) merged into jdiff's parameter trees,
against diffusers' own `load_lora_weights` on tiny random-weight pipelines; merging as a pure
function (scales as arguments, nothing recompiled, the base untouched); export back.

The LoRAs are made by PEFT on diffusers' and transformers' modules and saved by diffusers'
`save_lora_weights` ("style": attention, LoCon on the residual blocks' first convolutions at
another rank, `proj_in` at another alpha, and the text encoder), and by a Kohya-format writer
("detail": the same layout Kohya's scripts write, with alphas)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from diffusers import PNDMScheduler, StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from reference import perturbed, tiny_pipeline
from safetensors.torch import save_file

from jdiff import adapters, interop, pipelines
from jdiff.interop import lora as lora_io
from jdiff.interop import single_file

PROMPTS = ["a red circle at the top left", "a blue square"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]


@pytest.fixture(autouse=True)
def peft_for_transformers(monkeypatch):
    """transformers 5.24 asks for PEFT >= 0.22, which the registries do not have yet; 0.21's
    LoRA layers are what its text-encoder loading uses, so the reference runs with it."""
    import transformers.integrations.peft as integration

    monkeypatch.setattr(integration, "check_peft_version", lambda **_: None)


def peft_lora(module, targets, *, rank, alpha, seed, **patterns):
    """PEFT's LoRA on `module` (a fresh copy's shapes suffice) with random up factors (PEFT
    starts them at zero): its state dict as `save_lora_weights` takes it, and its config."""
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                        init_lora_weights="gaussian", **patterns)  # fmt: skip
    inject_adapter_in_model(config, module)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return get_peft_model_state_dict(module), config


def kohya_file(state, path, *, alpha, unet_name=lambda m: m, text_prefixes=None):
    """A Kohya-format file of a diffusers-format LoRA state dict: `lora_unet_` + the module's
    name (`unet_name` maps diffusers' to another layout) with "." -> "_", `lora_te_` for the
    text encoder, `lora_down` / `lora_up` and an `alpha` per module."""
    text_prefixes = text_prefixes or {"text_encoder": "lora_te_"}
    out = {}
    for key, value in state.items():
        part, rest = key.split(".", 1)
        module, role = re.fullmatch(r"(.+)\.lora_([AB])\.weight", rest).groups()
        if part == "unet":
            name = "lora_unet_" + unet_name(module).replace(".", "_")
        else:
            module = module if module.startswith("text_model.") else f"text_model.{module}"
            name = text_prefixes[part] + module.replace(".", "_")
        out[f"{name}.lora_{'down' if role == 'A' else 'up'}.weight"] = value.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    save_file(out, path)
    return path


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """{"pipeline": the tiny SD 1.x directory, "style": its diffusers LoRA directory,
    "detail": a Kohya-format file}."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd1")
    unet, vae, text, tokenizer = tiny_pipeline("sd1")
    tokenizer.save_pretrained(folder / "tokenizer")
    scheduler = PNDMScheduler.from_config(single_file.SCHEDULERS["sd1"])
    StableDiffusionPipeline(
        vae=perturbed(vae), text_encoder=perturbed(text), unet=perturbed(unet),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder / "pipeline")  # fmt: skip
    fresh_unet, _, fresh_text, _ = tiny_pipeline("sd1")
    unet_state, unet_config = peft_lora(fresh_unet, UNET_TARGETS, rank=4, alpha=8, seed=1,
                                        rank_pattern={"conv1": 2}, alpha_pattern={"proj_in": 3})
    text_state, text_config = peft_lora(fresh_text, TEXT_TARGETS, rank=2, alpha=2, seed=2)
    StableDiffusionPipeline.save_lora_weights(
        folder / "style", unet_lora_layers=unet_state, text_encoder_lora_layers=text_state,
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )  # fmt: skip
    detail_unet, _, detail_text, _ = tiny_pipeline("sd1")
    state, config = peft_lora(detail_unet, ["to_k", "to_v", "ff.net.2", "conv2"], rank=3,
                              alpha=1.5, seed=3)  # fmt: skip
    text_state, text_config = peft_lora(detail_text, ["q_proj", "fc2"], rank=2, alpha=1.5, seed=4)
    # its twin in diffusers' format: diffusers 0.42 misnames a Kohya file's text-encoder
    # attention LoRAs for transformers 5 (`self_attn.to_q_lora`, left unloaded), so the text
    # encoder's reference reads the same tensors from this file
    StableDiffusionPipeline.save_lora_weights(
        folder / "detail_twin", unet_lora_layers=state, text_encoder_lora_layers=text_state,
        unet_lora_adapter_metadata=config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )  # fmt: skip
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
