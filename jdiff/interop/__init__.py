"""Foreign weights: Stable Diffusion and DDPM from diffusers-format directories, original
single-file checkpoints and jdiff checkpoints in; diffusers-format directories out.

One module a concern, none importing another in a circle, `jdiff.nn` never importing any:

    keys           parameter names <-> state-dict keys (rename + transpose)
    configs        diffusers / transformers config.json <-> module fields
    schedulers     scheduler configs <-> sampler settings
    files          safetensors (and, when allowed, pickle) files
    templates      parameter shapes of a module (the targets the renames fill)
    bundle         `Pretrained`: modules, parameters, scheduler, tokenizer
    diffusers_dir  diffusers-format directories in and out
    single_file    the original CompVis / Stability single-file layout
    lora           LoRA files: diffusers / PEFT and Kohya in, diffusers / PEFT out
    controlnets    ControlNets: diffusers directories and original single files in and out
    converted      jdiff checkpoints (orbax) of a pretrained model
    pretrained     `load_pretrained`: any of the three sources
    cli            `python -m jdiff.interop SOURCE --output DIR`

    pretrained = interop.load_pretrained("stable-diffusion-v1-5")   # or a .safetensors file
    model = pipelines.LatentDiffusion.from_pretrained(pretrained)
    images = model.txt2img(pretrained.params, ["a photo of a cat"], jax.random.key(0))
    interop.save_pretrained(pretrained, "exported/")                 # diffusers loads it
    style = interop.read_lora("style.safetensors", pretrained.unet, pretrained.params)
    params = adapters.merge(pretrained.params, [style], [0.8])        # then txt2img(params, ...)
"""

from jdiff.interop.bundle import Pretrained
from jdiff.interop.configs import (
    clip_config_from_transformers,
    text_encoder_config_from_transformers,
    text_encoder_config_to_transformers,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
    vae_config_from_diffusers,
    vae_config_to_diffusers,
)
from jdiff.interop.controlnets import ControlNet, load_controlnet, save_controlnet
from jdiff.interop.converted import write_converted
from jdiff.interop.diffusers_dir import save_pretrained
from jdiff.interop.files import PICKLE_SUFFIXES, read_weights
from jdiff.interop.keys import (
    clip_from_transformers,
    from_diffusers,
    text_encoder_from_transformers,
    to_diffusers,
    torch_key,
)
from jdiff.interop.lora import read_lora, write_lora
from jdiff.interop.pretrained import load_pretrained
from jdiff.interop.schedulers import (
    SCHEDULER_METHODS,
    SchedulerSettings,
    scheduler_from_diffusers,
    scheduler_to_diffusers,
)
from jdiff.interop.templates import text_encoder_shapes, unet_shapes, vae_shapes

__all__ = [
    "PICKLE_SUFFIXES", "SCHEDULER_METHODS", "ControlNet", "Pretrained", "SchedulerSettings",
    "clip_config_from_transformers", "clip_from_transformers", "from_diffusers", "load_controlnet",
    "load_pretrained",
    "read_lora", "read_weights", "save_controlnet", "save_pretrained", "scheduler_from_diffusers",
    "scheduler_to_diffusers",
    "text_encoder_config_from_transformers", "text_encoder_config_to_transformers",
    "text_encoder_from_transformers", "text_encoder_shapes", "to_diffusers", "torch_key",
    "unet_config_from_diffusers", "unet_config_to_diffusers", "unet_shapes",
    "vae_config_from_diffusers", "vae_config_to_diffusers", "vae_shapes", "write_converted",
    "write_lora",
]  # fmt: skip
