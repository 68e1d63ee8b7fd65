"""Generation pipelines: a network, a schedule and a sampler composed into one function to jit.

`make_generate(...)` returns `generate(params, key, labels=None) -> images` (pixel space,
unconditional or class-conditional); `make_txt2img(...)` the latent, text-conditional one.
Under `jax.jit` the networks and the whole sampling loop compile together once, and new
parameters, keys, labels, prompts or guidance scales do not retrace.

    pixel             make_generate, make_repaint
    latent            make_txt2img, make_img2img, make_inpaint, make_latent_repaint,
                      make_upscale, make_refine (pure factories), inpaint_extra,
                      img2img_start_step
    text              encode_prompts, SDXLTextEncoders (prompts' ids -> Conditioning)
    latent_diffusion  LatentDiffusion (the user-facing class)
    control           ControlNet options of a call, checked and prepared
    trained           load_latent_diffusion, pretrained_from_workdir (a train.py workdir)
"""

from jdiff.pipelines.latent import (
    img2img_start_step,
    inpaint_extra,
    inpainting_inputs,
    make_img2img,
    make_inpaint,
    make_latent_repaint,
    make_refine,
    make_txt2img,
    make_upscale,
)
from jdiff.pipelines.latent_diffusion import LatentDiffusion
from jdiff.pipelines.pixel import make_generate, make_repaint
from jdiff.pipelines.text import SDXLTextEncoders, encode_prompts
from jdiff.pipelines.trained import load_latent_diffusion

__all__ = [
    "LatentDiffusion", "SDXLTextEncoders", "encode_prompts", "img2img_start_step",
    "inpaint_extra", "inpainting_inputs",
    "load_latent_diffusion", "make_generate", "make_img2img", "make_inpaint",
    "make_latent_repaint", "make_refine", "make_repaint", "make_txt2img", "make_upscale",
]  # fmt: skip
