"""The PyTorch references the parity tests compare against: diffusers schedulers driven the way
diffusers' pipelines drive them, on a smooth analytic model function written twice (JAX, torch);
`perturbed` for the networks' random-weight parity tests."""

from __future__ import annotations

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from jdiff import samplers
from jdiff.tokenizer import CLIPTokenizer

T = 1000
BETAS = {
    "linear": (1e-4, 0.02),
    "scaled_linear": (0.00085, 0.012),
    "cosine": (1e-4, 0.02),
    "sigmoid": (1e-4, 0.02),
}  # jdiff's defaults, given to diffusers explicitly
DIFFUSERS_SCHEDULE = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
    "sigmoid": "sigmoid",
}
SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_ancestral": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
}
# Options that are ours, not the scheduler's config: passed to step() or not at all.
STEP_OPTIONS = {"eta"}


def model_jax(x, t):
    """A smooth model function of x and t, [B, D] -> [B, D]."""
    c = jnp.cos(t / T * 1.3)[:, None]
    return 0.6 * c * x + 0.3 * jnp.sin(2.0 * x + t[:, None] / 100.0)


def model_torch(x, t):
    t = torch.as_tensor(t, dtype=torch.float32)[:, None]
    return 0.6 * torch.cos(t / T * 1.3) * x + 0.3 * torch.sin(2.0 * x + t / 100.0)


def model_jax_learned(x, t):
    return jnp.concatenate([model_jax(x, t), jnp.tanh(x + t[:, None] / T)], axis=-1)


def model_torch_learned(x, t):
    t32 = torch.as_tensor(t, dtype=torch.float32)[:, None]
    return torch.cat([model_torch(x, t), torch.tanh(x + t32 / T)], dim=-1)


def make_scheduler(method, schedule_name, *, rescale=False, alphas_cumprod=None, **options):
    """The diffusers scheduler of `method` with jdiff's settings.

    With `alphas_cumprod` given (jdiff's float32 ᾱ, computed in float64), the scheduler's own
    float32 cumprod is replaced by it, keeping diffusers' 2⁻²⁴ clamp of a zero terminal ᾱ: the
    schedules are compared on their own, and the trajectories then differ only by the sampler.
    """
    config = {k: v for k, v in options.items() if k not in STEP_OPTIONS}
    if method in ("ddpm", "ddim"):
        config.setdefault("clip_sample", False)
    sched = SCHEDULERS[method](
        num_train_timesteps=T,
        beta_schedule=DIFFUSERS_SCHEDULE[schedule_name],
        beta_start=BETAS[schedule_name][0],
        beta_end=BETAS[schedule_name][1],
        **({"rescale_betas_zero_snr": True} if rescale else {}),
        **config,
    )
    if alphas_cumprod is not None:
        ac = torch.from_numpy(np.array(alphas_cumprod, dtype=np.float32))
        if sched.alphas_cumprod[-1] == 2.0**-24:
            ac[-1] = 2.0**-24
        sched.alphas_cumprod = ac
        if hasattr(sched, "final_alpha_cumprod") and not sched.config.set_alpha_to_one:
            sched.final_alpha_cumprod = ac[0]
    return sched


def diffusers_trajectory(
    method,
    schedule_name,
    x_T,
    num_steps,
    step_key,
    *,
    rescale=False,
    start_step=0,
    learned=False,
    alphas_cumprod=None,
    **options,
):
    """The reference: the scheduler's states after each jdiff step, as numpy [S, B, D].

    Stochastic schedulers receive exactly the noise jdiff draws at each grid step.
    """
    sched = make_scheduler(
        method, schedule_name, rescale=rescale, alphas_cumprod=alphas_cumprod, **options
    )
    sched.set_timesteps(num_steps)
    module = importlib.import_module(type(sched).__module__)
    holder = {}
    original = getattr(module, "randn_tensor", None)
    if original is not None:
        module.randn_tensor = lambda *a, **k: holder["noise"]
    try:
        timesteps = sched.timesteps
        if start_step:
            timesteps = timesteps[start_step * sched.order :]
            sched.set_begin_index(start_step * sched.order) if hasattr(
                sched, "set_begin_index"
            ) else None
        x = torch.from_numpy(np.array(x_T))
        if not start_step:
            x = x * sched.init_noise_sigma
        out_states = []
        fn = model_torch_learned if learned else model_torch
        for i, t in enumerate(timesteps):
            grid_index = start_step + (i + 1) // 2 if method == "heun" else start_step + i
            noise = torch.from_numpy(np.asarray(samplers.step_noise(step_key, grid_index, x.shape)))
            holder["noise"] = noise
            x_in = sched.scale_model_input(x, t)
            out = fn(x_in, torch.full((x.shape[0],), float(t)))
            kwargs = {"eta": options["eta"], "variance_noise": noise} if options.get("eta") else {}
            x = sched.step(out, t, x, **kwargs).prev_sample
            out_states.append(x.numpy().copy())
    finally:
        if original is not None:
            module.randn_tensor = original
    states = np.stack(out_states)
    if method == "heun":  # a jdiff Heun step is diffusers' first- and second-order call together
        states = np.concatenate([states[1::2], states[-1:]]) if len(states) % 2 else states[1::2]
    return states


def perturbed(model):
    """The reference's random init with every parameter moved, so norms and biases carry weight."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def assert_only_the_unet_moved(before, after, frozen) -> None:
    """A fine-tune's parameters against the loaded ones: every tensor of the `frozen`
    modules bit-identical, every U-Net tensor moved."""
    for name in frozen:
        for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(before["unet"]), jax.tree.leaves(after["unet"]),
                             strict=True)]  # fmt: skip
    assert min(moved) > 0


def posterior_mode_in(monkeypatch, module) -> None:
    """Make a diffusers pipeline `module` take its autoencoder's posterior at the mode (as
    jdiff's inpainting does) where it would draw from it with torch's generator."""
    original = module.retrieve_latents
    monkeypatch.setattr(module, "retrieve_latents",
                        lambda out, generator=None, sample_mode="sample":
                        original(out, generator, "argmax"))  # fmt: skip


def tiny_pipeline(version: str, in_channels: int = 4):
    """The parts of an SD 1.x- or 2.x-shaped pipeline (random weights): U-Net 32/64 channels
    (SD 2.x: 64/128, 64-channel heads, linear projections, upcast attention), an f=2 VAE, a
    2-layer CLIP text encoder with the real 49,408-token vocabulary."""
    sd2 = version == "sd2"
    width = 64
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128) if sd2 else (32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(1, 2) if sd2 else 8, cross_attention_dim=width,
        use_linear_projection=sd2, upcast_attention=sd2,
    )  # fmt: skip
    vae = AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=1, max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
    ))  # fmt: skip
    tokenizer = CLIPTokenizer.default(**({"pad_token": "!"} if sd2 else {}))
    return unet, vae, text, tokenizer


def allow_peft(monkeypatch) -> None:
    """transformers 5.24 asks for PEFT >= 0.22, which the registries do not have yet; 0.21's
    LoRA layers are what its text-encoder loading uses, so the references run with it."""
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


def sharp_posterior(pipe, params: dict) -> tuple[dict, np.ndarray]:
    """The autoencoder's posterior made near-deterministic (log-variance -30) in a diffusers
    pipeline and in jdiff's `params` alike, so that diffusers' draw from it does not matter to
    an img2img comparison; returns (jdiff's params, the img2img noise [2, 8, 8, 4] diffusers'
    generator seeded 0 draws after the posterior's draw)."""
    with torch.no_grad():
        pipe.vae.quant_conv.bias[4:] = -30.0
    params = dict(params)
    vae = dict(params["autoencoder"])
    vae["quant_conv"] = dict(vae["quant_conv"], bias=vae["quant_conv"]["bias"].at[4:].set(-30.0))
    params["autoencoder"] = vae
    generator = torch.Generator().manual_seed(0)
    torch.randn((2, 4, 8, 8), generator=generator)  # the posterior's draw
    return params, torch.randn((2, 4, 8, 8), generator=generator).permute(0, 2, 3, 1).numpy()
