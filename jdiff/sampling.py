"""What `sample.py` does, as library calls: a `Request` (its flags, typed) and the tasks.

    request = sampling.Request(num_samples=16, prompts=("a red circle at the top left",))
    sampling.sample_workdir(pathlib.Path("outputs/ldm_shapes"), request)
    sampling.sample_pretrained(pathlib.Path("stable-diffusion-v1-5"), request)

A diffusion workdir samples (class labels cycling 0..K-1, guided at `guidance_scale`), or
repaints `init_image` under `mask` / `outpaint` with RePaint; a text-conditional latent run (or
pretrained Stable Diffusion) does txt2img, img2img, inpainting / outpainting (its own sampler
when trained for it, RePaint on latents otherwise) and, a super-resolution run, `upscale`.
Every task writes a grid PNG and an .npz (image tasks also a side-by-side comparison) and prints
their paths. Expected failures (a file that is not there, an option that does not apply) are
ValueError / FileNotFoundError naming the option as sample.py spells it.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import (
    data,
    diffusion,
    images,
    inpainting,
    models,
    pipelines,
    runs,
    samplers,
    superres,
)
from jdiff.request import BY_SOURCE, Request, Target, lora_spec, refuse_inapplicable
from jdiff.validate import InputError

__all__ = ["Request", "sample_pretrained", "sample_workdir"]


def load_run(workdir: pathlib.Path, step: int | None = None):
    """(config, num_classes, model, schedule, run) of a diffusion train.py workdir."""
    config, task, _ = runs.read_config(workdir)
    if task == "autoencoder":
        raise ValueError(
            f"{workdir} holds an autoencoder (task={config.task!r}), not a diffusion model: its "
            "reconstructions are in samples/ and its PSNR and scaling factor in autoencoder.json"
        )
    run = runs.restore(workdir, step)
    model = models.make_model(config, run.num_classes)
    return config, run.num_classes, model, models.make_schedule(config.diffusion), run


def trajectory_strip(config, model, schedule, params, key, frames: int = 10,
                     num_classes: int | None = None) -> np.ndarray:  # fmt: skip
    """Two rows of `frames` images (uint8 [2H+pad, frames*(W+pad)+pad, C]): a data image noised
    at evenly spaced t (q_sample), and a sample's states at evenly spaced steps of a DDPM run
    (T steps would be slow: 100)."""
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


def sample_workdir(workdir: pathlib.Path, r: Request) -> None:
    """Sample (or repaint) with any diffusion train.py workdir; outputs to workdir/samples/."""
    r.check()
    _, task, _ = runs.read_config(workdir)
    refuse_inapplicable(r, Target(f"{workdir} holds a {task} run", "workdir",
                                  latent=task == "latent_diffusion"), BY_SOURCE)  # fmt: skip
    if task == "latent_diffusion":
        return sample_text(workdir, r)
    config, num_classes, model, schedule, state = load_run(workdir, r.step)
    kind = "unconditional" if num_classes is None else "class-conditional"
    refuse_inapplicable(r, Target(f"{workdir} holds a pixel-space {kind} model", "workdir",
                                  classes=num_classes is not None))  # fmt: skip
    params = state.ema_params if r.use_ema else state.params
    out = workdir / "samples"
    if r.repaints:
        return repaint_pixels(model, schedule, params, config.data.image_size,
                              config.data.channels, num_classes,
                              {"prediction_type": config.diffusion.prediction_type}, out, r,
                              f"_step{int(state.step)}")  # fmt: skip
    size, channels, n = config.data.image_size, config.data.channels, r.num_samples or 64
    method = r.method or "ddim"
    generate = pipelines.make_generate(
        model, schedule, shape=(n, size, size, channels), method=method,
        num_steps=r.num_steps, null_class=num_classes,
        learned_variance=config.diffusion.loss == "hybrid",
        prediction_type=config.diffusion.prediction_type,
        **({} if r.eta is None else {"eta": r.eta}),
    )  # fmt: skip
    labels = None if num_classes is None else jnp.arange(n) % num_classes
    key = jax.random.key(r.seed)
    scale = 1.0 if r.guidance_scale is None else r.guidance_scale
    # the scale compiled in: at 1 (the default) the conditional model alone, one U-Net call
    x = np.asarray(jax.jit(functools.partial(generate, guidance_scale=scale))(params, key, labels))
    eta = "" if r.eta is None else f"_eta{r.eta:g}"
    guided = "" if num_classes is None or scale == 1 else f"_cfg{scale:g}"
    stem = f"{method}{r.num_steps}{eta}{guided}_seed{r.seed}_step{int(state.step)}"
    save_samples(out, stem, x, labels=np.asarray(labels if labels is not None else []))
    if r.trajectory:
        strip = trajectory_strip(config, model, schedule, params, key, num_classes=num_classes)
        path = images.save_png(out / f"trajectory_seed{r.seed}.png", strip,
                               scale=max(1, 64 // config.data.image_size))  # fmt: skip
        print(f"trajectory: {path}")


def save_samples(out: pathlib.Path, stem: str, x, **arrays) -> None:
    """Samples x ([N, H, W, C] in [-1, 1]) as out/stem.png (a grid) and out/stem.npz (uint8
    `images` and `arrays`); prints both paths."""
    x = np.asarray(x)
    grid = images.save_grid(out / f"{stem}.png", x)
    npz = out / f"{stem}.npz"
    np.savez(npz, images=images.to_uint8(x), **arrays)
    print(f"samples: {grid}\narrays: {npz}")


def load_image(
    path: str, size: int, channels: int = 3, *, flag: str = "--init_image"
) -> np.ndarray:
    """An image file as float32 [size, size, channels] in [-1, 1] (centre-cropped, resized;
    one channel: greyscale). A file that cannot be read is a FileNotFoundError naming `flag`."""
    from PIL import Image

    try:
        image = np.asarray(Image.open(path).convert("RGB" if channels == 3 else "L"))
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"{flag} {path}: {e}") from None
    return data.preprocess(image.reshape(*image.shape[:2], -1), image_size=size)


def load_mask(path: str, size: int, *, flag: str = "--mask") -> np.ndarray:
    """A mask image as float32 [size, size, 1] in [0, 1] (white = 1 = repaint), centre-cropped
    as `load_image` crops the image, resized with nearest neighbours."""
    from PIL import Image

    try:
        mask = Image.open(path).convert("L")
    except (FileNotFoundError, OSError) as e:
        raise FileNotFoundError(f"{flag} {path}: {e}") from None
    w, h = mask.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    mask = mask.crop(box).resize((size, size), Image.Resampling.NEAREST)
    return (np.asarray(mask, np.float32) / 255.0)[..., None]


def image_task(r: Request, size: int, channels: int, n: int, multiple: int):
    """The inputs of `mask` / `outpaint`: (images [n, H, W, C], masks [n, H, W, 1], canvas or
    None), the image repeated n times; outpainting grows the canvas (to `multiple`)."""
    init = np.repeat(load_image(r.init_image, size, channels)[None], n, 0)
    if r.mask:
        images.check_same_size(("--mask", r.mask), ("--init_image", r.init_image))
        return init, inpainting.check_masks(load_mask(r.mask, size), init), None
    overlap = 4 if r.overlap is None else r.overlap
    canvas = inpainting.outpaint_canvas(init, **inpainting.parse_sides(r.outpaint),
                                        overlap=overlap, multiple=multiple)  # fmt: skip
    return canvas.image, canvas.masks, canvas


def repaint_options(r: Request) -> dict:
    """The RePaint settings given in the request."""
    given = {"eta": r.eta, "jump_length": r.jump_length, "jump_n_sample": r.jump_n_sample}
    return {k: v for k, v in given.items() if v is not None}


def repaint_stem(r: Request, options: dict, guidance: float | None) -> str:
    """The file stem of a RePaint result: mode, steps x jump length x jumps, η, scale, seed."""
    o = samplers.REPAINT_DEFAULTS | options
    mode = "outpaint" if r.outpaint else "repaint"
    cfg = "" if guidance is None else f"_cfg{guidance:g}"
    return (f"{mode}_{r.num_steps}x{o['jump_length']}x{o['jump_n_sample']}_eta{o['eta']:g}"
            f"{cfg}_seed{r.seed}")  # fmt: skip


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


def repaint_pixels(model, schedule, params, size, channels, num_classes, settings, out, r,
                   suffix="") -> None:  # fmt: skip
    """`mask` / `outpaint` with a pixel-space model: RePaint, classifier-free guided for a
    class-conditional model (labels cycling 0..K-1); `settings`: the model's sampler settings
    (prediction_type, ...) that RePaint takes."""
    n = r.num_samples or 8
    inputs, masks, canvas = image_task(r, size, channels, n, model.downsample_factor)
    settings = {k: v for k, v in settings.items() if k in samplers.REPAINT_DEFAULTS}
    options = settings | repaint_options(r)
    inpaint = pipelines.make_repaint(model, schedule, shape=inputs.shape,
                                     num_steps=r.num_steps, null_class=num_classes,
                                     **options)  # fmt: skip
    labels = None if num_classes is None else jnp.arange(n) % num_classes
    scale = 1.0 if r.guidance_scale is None else r.guidance_scale
    print(f"repainting {n} image(s) of {inputs.shape[1]}x{inputs.shape[2]} with RePaint, "
          f"{r.num_steps} steps (the first call compiles)", flush=True)  # fmt: skip
    x = jax.jit(inpaint)(params, inputs, masks, jax.random.key(r.seed), labels, scale)
    stem = repaint_stem(r, options, scale if num_classes is not None else None) + suffix
    save_image_task(out, stem, x, inputs, masks, canvas,
                    labels=np.asarray(labels if labels is not None else []))  # fmt: skip


def latent_target(model, what: str, source: str, method: str) -> Target:
    """The `Target` of a latent model: `what` is "DIR holds" or "PATH is"."""
    kind = ("a latent super-resolution model" if model.is_upscaler
            else "a latent inpainting model" if model.is_inpainting
            else "an SDXL text-to-image model" if model.is_sdxl
            else "a latent text-to-image model")  # fmt: skip
    return Target(
        f"{what} {kind}",
        source,
        latent=True,
        text=True,
        inpainting=model.is_inpainting,
        upscaler=model.is_upscaler,
        method=method,
    )


def sample_text(workdir: pathlib.Path, r: Request) -> None:
    """txt2img (or img2img, inpainting, upscaling) from a latent text-conditional run."""
    model, params, config = pipelines.load_latent_diffusion(
        workdir, r.step, ema=r.use_ema, autoencoder_workdir=r.vae
    )
    refuse_inapplicable(r, latent_target(model, f"{workdir} holds", "workdir", "ddim"))
    out = workdir / "samples"
    if r.vae:
        out = out / f"with_{pathlib.Path(r.vae).absolute().name}"
    prompts = list(r.prompts) or list(config.sample.get("prompts", ()))
    method = r.method or "ddim"
    guidance = config.sample.guidance_scale if r.guidance_scale is None else r.guidance_scale
    # the sampler options of the config (η = 1 for DDIM) when its sampler is the one asked for
    options = dict(config.sample.get("options", {})) if method == config.sample.method else {}
    generate_text(model, params, prompts, r.num_samples or 64, method, guidance, options,
                  config.data.image_size, out, r)  # fmt: skip


def generate_text(model, params, prompts, n, method, guidance, options, size, out, r,
                  control=None) -> None:  # fmt: skip
    """txt2img, img2img (`init_image`), inpainting / outpainting (`mask` / `outpaint`) or
    super-resolution (`upscale`) for `prompts` cycled to n images; writes a grid (and for the
    image tasks a comparison) and an .npz to `out`."""
    if r.eta is not None:
        options["eta"] = r.eta
    if r.upscale:
        return upscale_text(model, params, list(r.prompts), n, method, guidance, options, size,
                            out, r)  # fmt: skip
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable)")
    prompts = (prompts * n)[:n]
    if r.repaints and not model.is_inpainting:
        return repaint_text(model, params, prompts, n, guidance, options, size, out, r)
    common = {"negative_prompts": r.negative_prompt, "guidance_scale": guidance,
              "num_steps": r.num_steps, "method": method, **options}  # fmt: skip
    key = jax.random.key(r.seed)
    print(f"sampling {n} image(s) with {method} x {r.num_steps} steps, guidance "
          f"{guidance:g} (the first call compiles)", flush=True)  # fmt: skip
    eta = f"_eta{options['eta']:g}" if "eta" in options else ""
    suffix = f"_{method}{r.num_steps}{eta}_cfg{guidance:g}_seed{r.seed}"
    if r.repaints:  # a model trained for inpainting
        multiple = model.autoencoder.downsample_factor * model.unet.downsample_factor
        inputs, masks, canvas = image_task(r, size, 3, n, multiple)
        strength = 1.0 if r.strength is None else r.strength
        x = model.inpaint(params, inputs, masks, prompts, key, strength=strength, paste=True,
                          **common)  # fmt: skip
        stem = f"{'outpaint' if canvas else 'inpaint'}_s{strength:g}{suffix}"
        return save_image_task(out, stem, x, inputs, masks, canvas, prompts=np.asarray(prompts))
    if r.init_image:
        init = load_image(r.init_image, size)
        strength = 0.8 if r.strength is None else r.strength
        x = model.img2img(params, np.repeat(init[None], n, 0), prompts, key,
                          strength=strength, **common, **(control or {}))  # fmt: skip
        stem = f"img2img_s{strength:g}"
    else:
        x = model.txt2img(params, prompts, key, **common, **(control or {}))
        stem = "txt2img"
    stem += "_controlnet" if control else ""
    save_samples(out, f"{stem}{suffix}", x, prompts=np.asarray(prompts))


def upscale_text(model, params, prompts, n, method, guidance, options, size, out, r) -> None:
    """`upscale` with a super-resolution latent model: the image, centre-cropped and resized
    to the model's low resolution (its image size / the autoencoder's factor), repeated n
    times, upscaled with the prompts (default: the empty prompt)."""
    low = load_image(r.upscale, size // model.autoencoder.downsample_factor, 3,
                            flag="--upscale")  # fmt: skip
    low = np.repeat(low[None], n, 0)
    prompts = ((prompts or [""]) * n)[:n]
    level = 20 if r.noise_level is None else r.noise_level
    if r.projection is not None:
        options = options | {"project_low_res": r.projection}
    print(f"upscaling {n} time(s) {low.shape[1]}x{low.shape[2]} -> {size}x{size} with {method} "
          f"x {r.num_steps} steps, noise level {level} (the first call compiles)",
          flush=True)  # fmt: skip
    x = model.upscale(params, low, jax.random.key(r.seed), prompts,
                      negative_prompts=r.negative_prompt, guidance_scale=guidance,
                      noise_level=level, num_steps=r.num_steps, method=method,
                      **options)  # fmt: skip
    x = np.asarray(x)
    bicubic = np.asarray(superres.upsample(low, x.shape[1:3]))
    stem = f"upscale_{method}{r.num_steps}_noise{level}_cfg{guidance:g}_seed{r.seed}"
    save_results(out, stem, x, bicubic, inputs=images.to_uint8(low), prompts=np.asarray(prompts))


def repaint_text(model, params, prompts, n, guidance, options, size, out, r) -> None:
    """`mask` / `outpaint` with a text-conditional latent model not trained for inpainting:
    RePaint on its latents, one prompt per image."""
    multiple = model.autoencoder.downsample_factor * model.unet.downsample_factor
    inputs, masks, canvas = image_task(r, size, 3, n, multiple)
    repaint = {k: v for k, v in options.items() if k in samplers.REPAINT_DEFAULTS}
    repaint |= repaint_options(r)
    if r.projection is not None:
        repaint["project_known_pixels"] = r.projection
    print(f"repainting {n} image(s) of {inputs.shape[1]}x{inputs.shape[2]} with RePaint, "
          f"{r.num_steps} steps, guidance {guidance:g} (the first call compiles)",
          flush=True)  # fmt: skip
    x = model.inpaint(params, inputs, masks, prompts, jax.random.key(r.seed),
                      negative_prompts=r.negative_prompt, guidance_scale=guidance,
                      num_steps=r.num_steps, **repaint)  # fmt: skip
    save_image_task(out, repaint_stem(r, repaint, guidance), x, inputs, masks, canvas,
                    prompts=np.asarray(prompts))  # fmt: skip


def with_loras(p, specs: tuple[str, ...]) -> dict:
    """`p.params` with each --lora FILE[:SCALE] merged at its scale (files read, and refused
    with every key that places nowhere named, before anything compiles)."""
    from jdiff import adapters, interop

    if not specs:
        return p.params
    loras, scales = [], []
    for spec in specs:
        path, scale = lora_spec(spec)
        lora = interop.read_lora(path, p.unet, p.params)
        print(
            f"LoRA {path} at scale {scale:g}: {len(lora.layers)} layers of "
            f"{', '.join(lora.components())}, {lora.size():,} weights",
            flush=True,
        )
        loras.append(lora)
        scales.append(scale)
    return adapters.merge_jit(p.params, loras, scales)


def control_options(p, r: Request) -> dict:
    """txt2img / img2img's ControlNet keyword arguments from --controlnet (each loaded; a
    single file takes the U-Net's shape) or the pipeline directory's own, and --control_image
    (read in [0, 1] at the image size); {} without a control image."""
    from jdiff import interop

    if not r.control_images:  # (--controlnet without one is refused by Request.check)
        return {}
    if r.controlnets:
        nets = [interop.load_controlnet(path, unet=p.unet, allow_pickle=r.allow_pickle)
                for path in r.controlnets]  # fmt: skip
    elif p.controlnet is not None:
        nets = [p.controlnet]
    else:
        raise InputError("--control_image needs a ControlNet: pass --controlnet DIR_OR_FILE "
                         "(or a ControlNet pipeline directory as --pretrained)")  # fmt: skip
    if len(r.control_images) != len(nets):
        raise InputError(f"--control_image: {len(r.control_images)} given for {len(nets)} "
                         "ControlNet(s)")  # fmt: skip
    images = [(load_image(path, p.image_size, flag="--control_image") + 1.0) / 2.0
              for path in r.control_images]  # fmt: skip
    scale = r.controlnet_conditioning_scale or (1.0,)
    print(f"ControlNet(s): {', '.join(n.source for n in nets)}", flush=True)
    end = 1.0 if r.control_guidance_end is None else r.control_guidance_end
    return {"controlnet": nets, "control_image": images,
            "controlnet_conditioning_scale": list(scale) if len(scale) > 1 else scale[0],
            "guess_mode": r.guess_mode, "control_guidance_start": r.control_guidance_start or 0.0,
            "control_guidance_end": end}  # fmt: skip


def sample_pretrained(path: pathlib.Path, r: Request) -> None:
    """Generate from converted Stable Diffusion (txt2img, img2img, inpainting) or DDPM
    weights; outputs to `output_dir` (./samples)."""
    from jdiff import interop

    r.check()
    refuse_inapplicable(r, Target(f"{path} holds pretrained weights", "pretrained"), BY_SOURCE)
    print(f"loading {path}", flush=True)
    if pipelines.trained.is_workdir(path):  # a latent model trained by train.py
        p = pipelines.trained.pretrained_from_workdir(path)
    else:
        p = interop.load_pretrained(
            path,
            prediction_type=r.prediction_type,
            image_size=r.image_size,
            allow_pickle=r.allow_pickle,
            dtype=jnp.dtype(r.dtype or "float32"),  # U-Net and text encoder; VAE float32
        )
    out = pathlib.Path(r.output_dir or "samples").absolute()
    method = r.method or p.scheduler.method
    if p.is_latent:
        model = pipelines.LatentDiffusion.from_pretrained(p)
        refuse_inapplicable(r, latent_target(model, f"{path} is", "pretrained", method))
        guidance = 7.5 if r.guidance_scale is None else r.guidance_scale
        prompts = list(r.prompts)
        n = r.num_samples or len(prompts)
        params = with_loras(p, r.loras)
        control = control_options(p, r)
        return generate_text(model, params, prompts, n, method, guidance, {}, p.image_size,
                             out, r, control)  # fmt: skip
    if p.unet.num_class_embeds is not None:
        raise ValueError("class-conditional pretrained U-Nets are not supported by sample.py")
    refuse_inapplicable(r, Target(f"{path} is a pixel-space unconditional U-Net", "pretrained",
                                  method=method))  # fmt: skip
    if r.repaints:
        return repaint_pixels(p.unet, p.scheduler.make_schedule(), p.params["unet"],
                              p.image_size, p.unet.in_channels, None, p.scheduler.options,
                              out, r)  # fmt: skip
    n, size = r.num_samples or 64, p.image_size
    options = p.scheduler.options_for(method)
    if r.eta is not None:
        options["eta"] = r.eta
    channels = p.unet.in_channels
    generate = pipelines.make_generate(
        p.unet, p.scheduler.make_schedule(), shape=(n, size, size, channels), method=method,
        num_steps=r.num_steps, learned_variance=p.unet.out_channels == 2 * channels,
        **options,
    )  # fmt: skip
    print(f"sampling {n} image(s) with {method} x {r.num_steps} steps", flush=True)
    x = np.asarray(jax.jit(generate)(p.params["unet"], jax.random.key(r.seed)))
    save_samples(out, f"{method}{r.num_steps}_seed{r.seed}", x)
