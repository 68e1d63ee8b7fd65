"""Generate from a trained run or from pretrained Stable Diffusion / DDPM weights.

    python sample.py --workdir DIR [--step N] [--method ddim] [--num_steps 50] [--seed 0]
                     [--num_samples 64] [--guidance_scale 1.0] [--trajectory]
    python sample.py --workdir LDM_DIR --prompt "a red circle at the top left" [--prompt ...]
                     [--negative_prompt TEXT] [--guidance_scale 3] [--num_samples 8]
                     [--init_image IMAGE.png --strength 0.6]
    python sample.py --workdir DIR --init_image IMAGE.png --mask MASK.png   (or --outpaint
                     left=8,right=8 [--overlap 4]) [--jump_length 10 --jump_n_sample 10] [--eta 0]
    python sample.py --workdir SR_DIR --upscale LOW_RES.png [--noise_level 20] [--prompt ...]
    python sample.py --pretrained /path/to/stable-diffusion-v1-5 --prompt "a photo of a cat"
                     [--guidance_scale 7.5] [--method dpmpp_2m] [--num_steps 25]
                     [--init_image IMAGE.png --strength 0.6] [--dtype bfloat16] [--output_dir D]
                     [--init_image IMAGE.png --mask MASK.png]   (any model)

A text-conditional latent model (train.py's task "latent_diffusion") takes prompts (cycled to
--num_samples images; none: the prompts of its config) and, with --init_image, re-imagines
that image (img2img, SDEdit: noised to --strength, then denoised with the prompt).

The model is rebuilt from DIR/config.json alone; the latest checkpoint (or --step) is restored
and its EMA weights sample (--noema for the raw ones). Writes a PNG grid and an .npz of the
samples (uint8 [N, H, W, C] and labels) to DIR/samples/ and prints their paths. --trajectory
also writes a strip: one data image noised step by step (forward process) above one sample
denoised step by step (reverse process).

--mask repaints --init_image where the mask image is white; --outpaint extends it by the given
pixels per side (or to width=/height=), repainting --overlap pixels of it at each new side and
blending them back with a linear ramp. Any model does both with RePaint (DDIM steps from noise,
the known region replaced by the forward-noised original after each step, jumps back up
--jump_length levels --jump_n_sample times); a Stable Diffusion inpainting model (9-channel
U-Net) inpaints with its own sampler instead. Each writes the results, a side-by-side
comparison (input with the repainted area grey | result) and an .npz with inputs and masks.
A model trained for inpainting (configs/inpaint_shapes.py) does both with its own sampler.
--upscale super-resolves an image with a super-resolution run (configs/sr_shapes.py): the
image is taken to the model's low resolution, and the comparison is bicubic | result.

--pretrained takes a diffusers-format directory, an original single-file .safetensors
(--prediction_type / --image_size where the SD 1.x / 2.x defaults do not fit) or a directory
`python -m jdiff.interop` wrote. Its scheduler's sampler and settings are the defaults (SD 1.5:
PNDM); --method picks another with the same settings. A text-to-image model samples one image
per prompt (--num_samples to cycle them); a pixel-space U-Net (DDPM) --num_samples images.
Outputs go to --output_dir (default ./samples).

The flags become one `jdiff.sampling.Request`; `jdiff.sampling` does the rest.
"""

from __future__ import annotations

import pathlib

from absl import app, flags, logging

from jdiff import cli, samplers, sampling, sharding

_WORKDIR = flags.DEFINE_string("workdir", None, "A train.py workdir.")
_PRETRAINED = flags.DEFINE_string(
    "pretrained",
    None,
    "A diffusers-format directory, single-file checkpoint or jdiff.interop output.",
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_VAE = flags.DEFINE_string(
    "vae",
    None,
    "Latent --workdir models: encode and decode with this train.py autoencoder instead of the "
    "model's own, one whose decoder alone was fine-tuned from it (configs/vae_shapes_decoder.py);"
    " outputs go to samples/with_<its name>/.",
)
_METHOD = flags.DEFINE_enum(
    "method",
    None,
    list(samplers.METHODS),
    "Sampler (default: ddim; --pretrained: its scheduler's).",
)
_NUM_STEPS = flags.DEFINE_integer("num_steps", 50, "Sampler steps.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_NUM_SAMPLES = flags.DEFINE_integer(
    "num_samples", None, "How many samples (default 64; --pretrained text models: one per prompt)."
)
_GUIDANCE = flags.DEFINE_float(
    "guidance_scale",
    None,
    "Classifier-free guidance (default: 1 for class models, the config's for text models).",
)
_ETA = flags.DEFINE_float("eta", None, "DDIM's η (0 deterministic, 1 DDPM-like); ddim only.")
_EMA = flags.DEFINE_bool("ema", None, "Sample with the EMA weights (default; --noema: raw).")
_TRAJECTORY = flags.DEFINE_bool("trajectory", False, "Also write the forward/reverse strip.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Text prompt(s) (latent text models).")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Negative prompt (latent text models).")
_INIT_IMAGE = flags.DEFINE_string("init_image", None, "Image to re-imagine (img2img).")
_STRENGTH = flags.DEFINE_float(
    "strength", None, "img2img / inpainting: how far to noise the image (0..1; 0.8 / 1)."
)
_MASK = flags.DEFINE_string(
    "mask", None, "Inpaint --init_image where this mask image is white (any model)."
)
_OUTPAINT = flags.DEFINE_string(
    "outpaint",
    None,
    "Extend --init_image: comma-separated left=,right=,top=,bottom= pixels (or width=,height=).",
)
_OVERLAP = flags.DEFINE_integer(
    "overlap",
    None,
    "--outpaint: pixels of the original repainted and blended at each new side (4).",
)
_UPSCALE = flags.DEFINE_string(
    "upscale", None, "Super-resolve this image (a super-resolution run, configs/sr_shapes.py)."
)
_NOISE_LEVEL = flags.DEFINE_integer(
    "noise_level", None, "--upscale: noise augmentation of the low-resolution input (0..350; 20)."
)
_PROJECTION = flags.DEFINE_float(
    "projection",
    None,
    "Latent --mask/--outpaint/--upscale: share of the schedule (noisiest first) over which each "
    "prediction is projected onto the known pixels (default 0.6) or the low-resolution input "
    "(0.9); 0 turns it off.",
)
_JUMP_LENGTH = flags.DEFINE_integer(
    "jump_length", None, "RePaint (--mask/--outpaint, any model): levels per jump (10)."
)
_JUMP_N_SAMPLE = flags.DEFINE_integer(
    "jump_n_sample", None, "RePaint: times each jump is taken (10; 1 = no resampling)."
)
_PREDICTION = flags.DEFINE_enum(
    "prediction_type",
    None,
    ["epsilon", "v_prediction"],
    "--pretrained: override the scheduler's (single files: SD1 eps, SD2 v).",
)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "--pretrained: image height and width.")
_ALLOW_PICKLE = flags.DEFINE_bool(
    "allow_pickle", False, "--pretrained: read pickle-based .ckpt/.bin (trusted files only)."
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    None,
    ["float32", "bfloat16"],
    "--pretrained: U-Net and text-encoder compute dtype (float32; the VAE stays float32).",
)
_LORA = flags.DEFINE_multi_string(
    "lora", None, "--pretrained: a LoRA file merged at a scale, FILE or FILE:SCALE (1); repeatable."
)
_CONTROLNET = flags.DEFINE_multi_string(
    "controlnet",
    None,
    "--pretrained: a ControlNet (diffusers directory or single file); repeatable.",
)
_CONTROL_IMAGE = flags.DEFINE_multi_string(
    "control_image", None, "The control image of each ControlNet, in order (values 0..255)."
)
_CONTROL_SCALE = flags.DEFINE_multi_float(
    "controlnet_conditioning_scale", None, "ControlNet scale(s): one for all or one each (1)."
)
_GUESS_MODE = flags.DEFINE_bool("guess_mode", False, "ControlNets in diffusers' guess mode.")
_CONTROL_START = flags.DEFINE_float(
    "control_guidance_start", None, "The fraction of the steps where ControlNets start (0)."
)
_CONTROL_END = flags.DEFINE_float(
    "control_guidance_end", None, "The fraction of the steps where ControlNets stop (1)."
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "--pretrained: where to write (default ./samples)."
)


def request() -> sampling.Request:
    """The flags as a typed `sampling.Request` (the only place they are read)."""
    return sampling.Request(
        step=_STEP.value, ema=_EMA.value, vae=_VAE.value, method=_METHOD.value,
        num_steps=_NUM_STEPS.value, seed=_SEED.value, num_samples=_NUM_SAMPLES.value,
        guidance_scale=_GUIDANCE.value, eta=_ETA.value, trajectory=_TRAJECTORY.value,
        prompts=tuple(_PROMPT.value or ()), negative_prompt=_NEGATIVE.value,
        init_image=_INIT_IMAGE.value, strength=_STRENGTH.value, mask=_MASK.value,
        outpaint=_OUTPAINT.value, overlap=_OVERLAP.value, upscale=_UPSCALE.value,
        noise_level=_NOISE_LEVEL.value, projection=_PROJECTION.value,
        jump_length=_JUMP_LENGTH.value, jump_n_sample=_JUMP_N_SAMPLE.value,
        prediction_type=_PREDICTION.value, image_size=_IMAGE_SIZE.value,
        allow_pickle=_ALLOW_PICKLE.value, dtype=_DTYPE.value, output_dir=_OUTPUT_DIR.value,
        loras=tuple(_LORA.value or ()), controlnets=tuple(_CONTROLNET.value or ()),
        control_images=tuple(_CONTROL_IMAGE.value or ()),
        controlnet_conditioning_scale=tuple(_CONTROL_SCALE.value or ()),
        guess_mode=_GUESS_MODE.value, control_guidance_start=_CONTROL_START.value,
        control_guidance_end=_CONTROL_END.value,
    )  # fmt: skip


def main(argv) -> None:
    """Sample from --workdir or --pretrained as the flags ask; expected failures end in one line
    (`jdiff.cli`)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    print(f"compilation cache: {sharding.enable_compilation_cache()}", flush=True)
    if (_WORKDIR.value is None) == (_PRETRAINED.value is None):
        raise app.UsageError("pass exactly one of --workdir (a train.py run) or --pretrained")
    sharding.reuse_host_memory()  # XLA's CPU buffers without page faults each call
    if _PRETRAINED.value:
        sampling.sample_pretrained(pathlib.Path(_PRETRAINED.value), request())
    else:
        sampling.sample_workdir(pathlib.Path(_WORKDIR.value).absolute(), request())


if __name__ == "__main__":
    cli.run_absl(main)
