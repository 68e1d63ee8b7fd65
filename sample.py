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
"""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from jdiff import (
    data,
    diffusion,
    images,
    inpainting,
    pipelines,
    runs,
    samplers,
    sharding,
    superres,
    training,
)

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
_EMA = flags.DEFINE_bool("ema", True, "Sample with the EMA weights.")
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
    "overlap", 4, "--outpaint: pixels of the original repainted and blended at each new side."
)
_UPSCALE = flags.DEFINE_string(
    "upscale", None, "Super-resolve this image (a super-resolution run, configs/sr_shapes.py)."
)
_NOISE_LEVEL = flags.DEFINE_integer(
    "noise_level", 20, "--upscale: noise augmentation of the low-resolution input (0..350)."
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
    "float32",
    ["float32", "bfloat16"],
    "--pretrained: U-Net and text-encoder compute dtype (VAE: float32).",
)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "--pretrained: where to write (default ./samples)."
)


def load_run(workdir: pathlib.Path, step: int | None = None):
    """(config, num_classes, model, schedule, run) of a diffusion train.py workdir."""
    config, task, _ = runs.read_config(workdir)
    if task == "autoencoder":
        raise ValueError(
            f"{workdir} holds an autoencoder (task={config.task!r}), not a diffusion model: its "
            "reconstructions are in samples/ and its PSNR and scaling factor in autoencoder.json"
        )
    run = runs.restore(workdir, step)
    model = training.make_model(config, run.num_classes)
    return config, run.num_classes, model, training.make_schedule(config.diffusion), run


def trajectory_strip(config, model, schedule, params, key, frames: int = 10,
                     num_classes: int | None = None) -> np.ndarray:  # fmt: skip
    """Two rows of `frames` images: a data image noised at evenly spaced t (q_sample), and a
    sample's states at evenly spaced steps of a DDPM run (T steps would be slow: 100)."""
    size, channels = config.data.image_size, config.data.channels
    source = data.load_source(config.data.name, split=config.data.split,
                              data_dir=config.data.data_dir or None)  # fmt: skip
    x0 = data.preprocess(source[0]["image"], image_size=size)[None]
    t = np.linspace(0, schedule.num_timesteps - 1, frames).round().astype(np.int32)
    k_noise, k_sample = jax.random.split(key)
    noise = jax.random.normal(k_noise, (1, size, size, channels))
    forward = jax.vmap(lambda ti: diffusion.q_sample(schedule, x0, ti[None], noise)[0])(t)
    generate = pipelines.make_generate(
        model, schedule, shape=(1, size, size, channels), method="ddpm", num_steps=100,
        learned_variance=config.diffusion.loss == "hybrid", return_trajectory=True,
        prediction_type=config.diffusion.prediction_type, null_class=num_classes,
    )  # fmt: skip
    labels = None if model.num_class_embeds is None else jnp.zeros(1, int)
    _, states = jax.jit(generate)(params, k_sample, labels)
    reverse = states[np.linspace(0, len(states) - 1, frames).round().astype(int), 0]
    return images.make_grid(images.to_uint8(np.concatenate([forward, reverse])), ncols=frames)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    print(f"compilation cache: {sharding.enable_compilation_cache()}", flush=True)
    if (_WORKDIR.value is None) == (_PRETRAINED.value is None):
        raise app.UsageError("pass exactly one of --workdir (a train.py run) or --pretrained")
    if _PRETRAINED.value:
        if _VAE.value:
            raise app.UsageError("--vae swaps the autoencoder of a latent --workdir run; "
                                 "--pretrained weights bring their own")  # fmt: skip
        try:
            return sample_pretrained(pathlib.Path(_PRETRAINED.value))
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
    workdir = pathlib.Path(_WORKDIR.value).absolute()
    try:
        _, task, _ = runs.read_config(workdir)
        if task == "latent_diffusion":
            return sample_text(workdir)
        if _VAE.value:
            raise ValueError(f"--vae applies to latent diffusion runs; {workdir} holds a "
                             f"{task} run")  # fmt: skip
        config, num_classes, model, schedule, state = load_run(workdir, _STEP.value)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    params = state.ema_params if _EMA.value else state.params
    if _UPSCALE.value:
        sys.exit("error: --upscale needs a super-resolution run (configs/sr_shapes.py); "
                 f"{workdir} holds a pixel-space model")  # fmt: skip
    if _MASK.value or _OUTPAINT.value:
        try:
            return repaint_pixels(model, schedule, params, config.data.image_size,
                                  config.data.channels, num_classes,
                                  {"prediction_type": config.diffusion.prediction_type},
                                  workdir / "samples", f"_step{int(state.step)}")  # fmt: skip
        except (ValueError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
    size, channels, n = config.data.image_size, config.data.channels, _NUM_SAMPLES.value or 64
    method = _METHOD.value or "ddim"
    generate = pipelines.make_generate(
        model, schedule, shape=(n, size, size, channels), method=method,
        num_steps=_NUM_STEPS.value, null_class=num_classes,
        learned_variance=config.diffusion.loss == "hybrid",
        prediction_type=config.diffusion.prediction_type,
        **({} if _ETA.value is None else {"eta": _ETA.value}),
    )  # fmt: skip
    labels = None if num_classes is None else jnp.arange(n) % num_classes
    key = jax.random.key(_SEED.value)
    scale = 1.0 if _GUIDANCE.value is None else _GUIDANCE.value
    # the scale compiled in: at 1 (the default) the conditional model alone, one U-Net call
    x = np.asarray(jax.jit(functools.partial(generate, guidance_scale=scale))(params, key, labels))
    eta = "" if _ETA.value is None else f"_eta{_ETA.value:g}"
    guided = "" if num_classes is None or scale == 1 else f"_cfg{scale:g}"
    stem = f"{method}{_NUM_STEPS.value}{eta}{guided}_seed{_SEED.value}_step{int(state.step)}"
    grid = images.save_grid(workdir / "samples" / f"{stem}.png", x)
    npz = workdir / "samples" / f"{stem}.npz"
    np.savez(
        npz, images=images.to_uint8(x), labels=np.asarray(labels if labels is not None else [])
    )
    print(f"samples: {grid}\narrays: {npz}")
    if _TRAJECTORY.value:
        strip = trajectory_strip(config, model, schedule, params, key, num_classes=num_classes)
        path = images.save_png(workdir / "samples" / f"trajectory_seed{_SEED.value}.png", strip,
                               scale=max(1, 64 // config.data.image_size))  # fmt: skip
        print(f"trajectory: {path}")


def load_image(path: str, size: int, channels: int = 3) -> np.ndarray:
    """An image file as float32 [size, size, channels] in [-1, 1] (centre-cropped, resized;
    one channel: greyscale)."""
    from PIL import Image

    try:
        image = np.asarray(Image.open(path).convert("RGB" if channels == 3 else "L"))
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"--init_image {path}: {e}") from None
    return data.preprocess(image.reshape(*image.shape[:2], -1), image_size=size)


def load_mask(path: str, size: int) -> np.ndarray:
    """A mask image as float32 [size, size, 1] in [0, 1] (white = 1 = repaint), centre-cropped
    as `load_image` crops the image, resized with nearest neighbours."""
    from PIL import Image

    try:
        mask = Image.open(path).convert("L")
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"--mask {path}: {e}") from None
    w, h = mask.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    mask = mask.crop(box).resize((size, size), Image.Resampling.NEAREST)
    return (np.asarray(mask, np.float32) / 255.0)[..., None]


def image_task(size: int, channels: int, n: int, multiple: int):
    """The inputs of --mask / --outpaint: (images [n, H, W, C], masks [n, H, W, 1], canvas or
    None), the image repeated n times; outpainting grows the canvas (to `multiple`)."""
    if _MASK.value and _OUTPAINT.value:
        raise ValueError("pass --mask (inpainting) or --outpaint, not both")
    if not _INIT_IMAGE.value:
        flag = "--mask" if _MASK.value else "--outpaint"
        raise ValueError(f"{flag} needs --init_image (the image to repaint or extend)")
    init = np.repeat(load_image(_INIT_IMAGE.value, size, channels)[None], n, 0)
    if _MASK.value:
        return init, inpainting.check_masks(load_mask(_MASK.value, size), init), None
    canvas = inpainting.outpaint_canvas(init, **inpainting.parse_sides(_OUTPAINT.value),
                                        overlap=_OVERLAP.value, multiple=multiple)  # fmt: skip
    return canvas.image, canvas.masks, canvas


def check_repaint_flags() -> None:
    if _METHOD.value not in (None, "ddim") or _STRENGTH.value is not None:
        raise ValueError(
            "--mask/--outpaint repaint with RePaint's DDIM steps from noise: no --method or "
            "--strength (use --eta, --jump_length, --jump_n_sample)"
        )


def repaint_options() -> dict:
    """The RePaint settings given on the command line."""
    given = {"eta": _ETA.value, "jump_length": _JUMP_LENGTH.value,
             "jump_n_sample": _JUMP_N_SAMPLE.value}  # fmt: skip
    return {k: v for k, v in given.items() if v is not None}


def repaint_stem(options: dict, guidance: float | None) -> str:
    o = samplers.REPAINT_DEFAULTS | options
    mode = "outpaint" if _OUTPAINT.value else "repaint"
    cfg = "" if guidance is None else f"_cfg{guidance:g}"
    return (f"{mode}_{_NUM_STEPS.value}x{o['jump_length']}x{o['jump_n_sample']}_eta{o['eta']:g}"
            f"{cfg}_seed{_SEED.value}")  # fmt: skip


def save_image_task(out: pathlib.Path, stem: str, x, inputs, masks, canvas, **arrays) -> None:
    """Write the results (grid PNG), a side-by-side comparison (input with the repainted area
    grey | result, one pair per row) and an .npz of results, inputs and masks; print paths."""
    x = np.asarray(x)
    if canvas is not None:  # blend the overlap band, crop the padding
        x = canvas.finish(x)
        inputs, masks = inputs[:, : x.shape[1], : x.shape[2]], masks[:, : x.shape[1], : x.shape[2]]
    shown = np.where(masks >= 0.5, 0.0, inputs)
    save_results(out, stem, x, shown, inputs=images.to_uint8(inputs),
                 masks=masks[..., 0].astype(np.uint8), **arrays)  # fmt: skip


def save_results(out: pathlib.Path, stem: str, x, shown, **arrays) -> None:
    """Results (grid PNG), the comparison (`shown` | result, a pair per row) and an .npz."""
    grid = images.save_grid(out / f"{stem}.png", x)
    pairs = np.stack([shown, x], 1).reshape(-1, *x.shape[1:])
    comparison = images.save_grid(out / f"{stem}_comparison.png", pairs, ncols=2)
    npz = out / f"{stem}.npz"
    np.savez(npz, images=images.to_uint8(x), **arrays)
    print(f"results: {grid}\ncomparison: {comparison}\narrays: {npz}")


def repaint_pixels(model, schedule, params, size, channels, num_classes, settings, out,
                   suffix="") -> None:  # fmt: skip
    """--mask / --outpaint with a pixel-space model: RePaint, classifier-free guided for a
    class-conditional model (labels cycling 0..K-1); `settings`: the model's sampler settings
    (prediction_type, ...) that RePaint takes."""
    check_repaint_flags()
    if _PROJECTION.value is not None:
        raise ValueError("--projection is for latent models; a pixel model's known region is "
                         "kept exactly without it")  # fmt: skip
    n = _NUM_SAMPLES.value or 8
    inputs, masks, canvas = image_task(size, channels, n, model.downsample_factor)
    settings = {k: v for k, v in settings.items() if k in samplers.REPAINT_DEFAULTS}
    options = settings | repaint_options()
    inpaint = pipelines.make_repaint(model, schedule, shape=inputs.shape,
                                     num_steps=_NUM_STEPS.value, null_class=num_classes,
                                     **options)  # fmt: skip
    labels = None if num_classes is None else jnp.arange(n) % num_classes
    scale = 1.0 if _GUIDANCE.value is None else _GUIDANCE.value
    print(f"repainting {n} image(s) of {inputs.shape[1]}x{inputs.shape[2]} with RePaint, "
          f"{_NUM_STEPS.value} steps (the first call compiles)", flush=True)  # fmt: skip
    x = jax.jit(inpaint)(params, inputs, masks, jax.random.key(_SEED.value), labels, scale)
    stem = repaint_stem(options, scale if num_classes is not None else None) + suffix
    save_image_task(out, stem, x, inputs, masks, canvas,
                    labels=np.asarray(labels if labels is not None else []))  # fmt: skip


def sample_text(workdir: pathlib.Path) -> None:
    """txt2img (or img2img with --init_image) from a latent text-conditional run."""
    model, params, config = pipelines.load_latent_diffusion(
        workdir, _STEP.value, ema=_EMA.value, autoencoder_workdir=_VAE.value
    )
    out = workdir / "samples"
    if _VAE.value:
        out = out / f"with_{pathlib.Path(_VAE.value).absolute().name}"
    prompts = _PROMPT.value or list(config.sample.get("prompts", ()))
    method = _METHOD.value or "ddim"
    guidance = config.sample.guidance_scale if _GUIDANCE.value is None else _GUIDANCE.value
    # the sampler options of the config (η = 1 for DDIM) when its sampler is the one asked for
    options = dict(config.sample.get("options", {})) if method == config.sample.method else {}
    generate_text(model, params, prompts, _NUM_SAMPLES.value or 64, method, guidance, options,
                  config.data.image_size, out)  # fmt: skip


def generate_text(model, params, prompts, n, method, guidance, options, size, out) -> None:
    """txt2img, img2img (--init_image), inpainting / outpainting (--mask / --outpaint) or
    super-resolution (--upscale) for `prompts` cycled to n images; writes a grid (and for the
    image tasks a comparison) and an .npz to `out`."""
    if _ETA.value is not None:
        options["eta"] = _ETA.value
    if _UPSCALE.value:
        return upscale_text(model, params, _PROMPT.value, n, method, guidance, options, size, out)
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable)")
    prompts = (prompts * n)[:n]
    if (_MASK.value or _OUTPAINT.value) and not model.is_inpainting:
        return repaint_text(model, params, prompts, n, guidance, options, size, out)
    common = {"negative_prompts": _NEGATIVE.value, "guidance_scale": guidance,
              "num_steps": _NUM_STEPS.value, "method": method, **options}  # fmt: skip
    key = jax.random.key(_SEED.value)
    print(f"sampling {n} image(s) with {method} x {_NUM_STEPS.value} steps, guidance "
          f"{guidance:g} (the first call compiles)", flush=True)  # fmt: skip
    eta = f"_eta{options['eta']:g}" if "eta" in options else ""
    suffix = f"_{method}{_NUM_STEPS.value}{eta}_cfg{guidance:g}_seed{_SEED.value}"
    if _MASK.value or _OUTPAINT.value:  # a model trained for inpainting
        if _PROJECTION.value is not None:
            raise ValueError("--projection is RePaint's (models not trained for inpainting); "
                             "this model sees the known pixels itself")  # fmt: skip
        multiple = model.autoencoder.downsample_factor * model.unet.downsample_factor
        inputs, masks, canvas = image_task(size, 3, n, multiple)
        strength = 1.0 if _STRENGTH.value is None else _STRENGTH.value
        x = model.inpaint(params, inputs, masks, prompts, key, strength=strength, paste=True,
                          **common)  # fmt: skip
        stem = f"{'outpaint' if canvas else 'inpaint'}_s{strength:g}{suffix}"
        return save_image_task(out, stem, x, inputs, masks, canvas, prompts=np.asarray(prompts))
    if _INIT_IMAGE.value:
        init = load_image(_INIT_IMAGE.value, size)
        strength = 0.8 if _STRENGTH.value is None else _STRENGTH.value
        x = model.img2img(params, np.repeat(init[None], n, 0), prompts, key,
                          strength=strength, **common)  # fmt: skip
        stem = f"img2img_s{strength:g}"
    else:
        x = model.txt2img(params, prompts, key, **common)
        stem = "txt2img"
    x = np.asarray(x)
    grid = images.save_grid(out / f"{stem}{suffix}.png", x)
    npz = out / f"{stem}{suffix}.npz"
    np.savez(npz, images=images.to_uint8(x), prompts=np.asarray(prompts))
    print(f"samples: {grid}\narrays: {npz}")


def upscale_text(model, params, prompts, n, method, guidance, options, size, out) -> None:
    """--upscale with a super-resolution latent model: the image, centre-cropped and resized
    to the model's low resolution (its image size / the autoencoder's factor), repeated n
    times, upscaled with the prompts (default: the empty prompt)."""
    if not model.is_upscaler:
        raise ValueError("--upscale needs a super-resolution model (train configs/sr_shapes.py)")
    if _INIT_IMAGE.value or _MASK.value or _OUTPAINT.value:
        raise ValueError("--upscale takes its image itself: no --init_image, --mask, --outpaint")
    low = load_image(_UPSCALE.value, size // model.autoencoder.downsample_factor, 3)
    low = np.repeat(low[None], n, 0)
    prompts = ((prompts or [""]) * n)[:n]
    level = _NOISE_LEVEL.value
    if _PROJECTION.value is not None:
        options = options | {"project_low_res": _PROJECTION.value}
    print(f"upscaling {n} time(s) {low.shape[1]}x{low.shape[2]} -> {size}x{size} with {method} "
          f"x {_NUM_STEPS.value} steps, noise level {level} (the first call compiles)",
          flush=True)  # fmt: skip
    x = model.upscale(params, low, jax.random.key(_SEED.value), prompts,
                      negative_prompts=_NEGATIVE.value, guidance_scale=guidance,
                      noise_level=level, num_steps=_NUM_STEPS.value, method=method,
                      **options)  # fmt: skip
    x = np.asarray(x)
    bicubic = np.asarray(superres.upsample(low, x.shape[1:3]))
    stem = f"upscale_{method}{_NUM_STEPS.value}_noise{level}_cfg{guidance:g}_seed{_SEED.value}"
    save_results(out, stem, x, bicubic, inputs=images.to_uint8(low), prompts=np.asarray(prompts))


def repaint_text(model, params, prompts, n, guidance, options, size, out) -> None:
    """--mask / --outpaint with a text-conditional latent model not trained for inpainting:
    RePaint on its latents, one prompt per image."""
    check_repaint_flags()
    multiple = model.autoencoder.downsample_factor * model.unet.downsample_factor
    inputs, masks, canvas = image_task(size, 3, n, multiple)
    repaint = {k: v for k, v in options.items() if k in samplers.REPAINT_DEFAULTS}
    repaint |= repaint_options()
    if _PROJECTION.value is not None:
        repaint["project_known_pixels"] = _PROJECTION.value
    print(f"repainting {n} image(s) of {inputs.shape[1]}x{inputs.shape[2]} with RePaint, "
          f"{_NUM_STEPS.value} steps, guidance {guidance:g} (the first call compiles)",
          flush=True)  # fmt: skip
    x = model.inpaint(params, inputs, masks, prompts, jax.random.key(_SEED.value),
                      negative_prompts=_NEGATIVE.value, guidance_scale=guidance,
                      num_steps=_NUM_STEPS.value, **repaint)  # fmt: skip
    save_image_task(out, repaint_stem(repaint, guidance), x, inputs, masks, canvas,
                    prompts=np.asarray(prompts))  # fmt: skip


def sample_pretrained(path: pathlib.Path) -> None:
    """Generate from converted Stable Diffusion (txt2img, img2img, inpainting) or DDPM
    weights."""
    from jdiff import interop

    print(f"loading {path}", flush=True)
    p = interop.load_pretrained(
        path,
        prediction_type=_PREDICTION.value,
        image_size=_IMAGE_SIZE.value,
        allow_pickle=_ALLOW_PICKLE.value,
        dtype=jnp.dtype(_DTYPE.value),  # U-Net and text encoder; the VAE stays float32
    )
    out = pathlib.Path(_OUTPUT_DIR.value or "samples").absolute()
    method = _METHOD.value or p.scheduler.method
    if p.is_latent:
        model = pipelines.LatentDiffusion.from_pretrained(p)
        guidance = 7.5 if _GUIDANCE.value is None else _GUIDANCE.value
        prompts = _PROMPT.value or []
        n = _NUM_SAMPLES.value or len(prompts)
        return generate_text(model, p.params, prompts, n, method, guidance, {}, p.image_size, out)
    if p.unet.num_class_embeds is not None:
        raise ValueError("class-conditional pretrained U-Nets are not supported by sample.py")
    if _UPSCALE.value:
        raise ValueError(f"--upscale needs a super-resolution model; {path} is a pixel-space "
                         "U-Net")  # fmt: skip
    if _MASK.value or _OUTPAINT.value:
        return repaint_pixels(p.unet, p.scheduler.make_schedule(), p.params["unet"],
                              p.image_size, p.unet.in_channels, None, p.scheduler.options,
                              out)  # fmt: skip
    if _PROMPT.value or _INIT_IMAGE.value:
        raise ValueError(f"{path} is a pixel-space U-Net without a text encoder: it takes no "
                         "--prompt, and --init_image only with --mask or --outpaint")  # fmt: skip
    n, size = _NUM_SAMPLES.value or 64, p.image_size
    options = p.scheduler.options_for(method)
    if _ETA.value is not None:
        options["eta"] = _ETA.value
    channels = p.unet.in_channels
    generate = pipelines.make_generate(
        p.unet, p.scheduler.make_schedule(), shape=(n, size, size, channels), method=method,
        num_steps=_NUM_STEPS.value, learned_variance=p.unet.out_channels == 2 * channels,
        **options,
    )  # fmt: skip
    print(f"sampling {n} image(s) with {method} x {_NUM_STEPS.value} steps", flush=True)
    x = np.asarray(jax.jit(generate)(p.params["unet"], jax.random.key(_SEED.value)))
    stem = f"{method}{_NUM_STEPS.value}_seed{_SEED.value}"
    grid = images.save_grid(out / f"{stem}.png", x)
    npz = out / f"{stem}.npz"
    np.savez(npz, images=images.to_uint8(x))
    print(f"samples: {grid}\narrays: {npz}")


if __name__ == "__main__":
    app.run(main)
