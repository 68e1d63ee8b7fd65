"""Generation pipelines: a network, a schedule and a sampler composed into one function to jit.

`make_generate(...)` returns `generate(params, key, labels=None) -> images` (pixel space,
unconditional or class-conditional); `make_txt2img(...)` the latent, text-conditional one.
Under `jax.jit` the networks and the whole sampling loop compile together once, and new
parameters, keys, labels, prompts or guidance scales do not retrace.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import conditioning, guidance, inpainting, samplers
from jdiff.conditioning import Conditioning
from jdiff.nn import UNet
from jdiff.nn.text_encoder import CLIPTextModel
from jdiff.nn.vae import AutoencoderKL
from jdiff.schedules import Schedule


def make_generate(
    model: UNet,
    schedule: Schedule,
    *,
    shape: tuple[int, ...],
    method: str = "ddim",
    num_steps: int = 50,
    null_class: int | None = None,
    learned_variance: bool = False,
    return_trajectory: bool = False,
    **options,
) -> Callable[..., jax.Array]:
    """Unconditional or class-conditional pixel-space generation.

    Args:
      model: the U-Net; its first `shape[-1]` output channels are the prediction, the rest (a
        learned variance) are used by `method="ddpm"` (variance_type "learned_range").
      shape: [N, H, W, C] of the samples.
      null_class: the class-conditional model's "no class" label; with it, `generate` takes
        `labels` [N] and a `guidance_scale` (classifier-free guidance; 1 is plain conditional).
      return_trajectory: also return the states after every step [S, N, H, W, C].
      options: sampler options (`prediction_type`, `eta`, `timestep_spacing`, ...).

    Returns:
      generate(params, key, labels=None, guidance_scale=1.0) -> [N, H, W, C] in [-1, 1]
      (and the trajectory with `return_trajectory`).
    """
    if learned_variance and method == "ddpm":
        options = {"variance_type": "learned_range", **options}

    def generate(params, key, labels=None, guidance_scale=1.0):
        keep_variance = learned_variance and method == "ddpm"
        fn = _pixel_model(model, params, shape[-1], null_class, labels, guidance_scale,
                          keep_variance)  # fmt: skip
        out = samplers.sample(fn, schedule, key, shape, method=method, num_steps=num_steps,
                              return_trajectory=return_trajectory, **options)  # fmt: skip
        if return_trajectory:
            return jnp.clip(out[0], -1.0, 1.0), out[1]
        return jnp.clip(out, -1.0, 1.0)

    return generate


def _pixel_model(model, params, channels, null_class, labels, guidance_scale,
                 keep_variance=False):  # fmt: skip
    """The pixel-space model function: the prediction's `channels` (all of them with
    `keep_variance`), classifier-free guided on `labels` for a class-conditional model."""
    fn = conditioning.make_model_fn(model, params, out_channels=None if keep_variance else channels)
    if null_class is None:
        return conditioning.bind(fn, Conditioning())
    if labels is None:
        raise ValueError("a class-conditional model needs labels [N]")
    cond = Conditioning(class_labels=labels)
    null = cond.replace(class_labels=jnp.full_like(labels, null_class))
    return guidance.classifier_free(fn, cond, null, guidance_scale)


def make_repaint(
    model: UNet,
    schedule: Schedule,
    *,
    shape: tuple[int, ...],
    num_steps: int = 50,
    null_class: int | None = None,
    return_unpasted: bool = False,
    **options,
) -> Callable[..., jax.Array]:
    """Inpainting with any pixel-space model, unconditional or class-conditional: RePaint
    (`samplers.repaint`) in one `lax.scan`.

    Args:
      shape: [N, H, W, C] of the images (a multiple of `model.downsample_factor` in H and W).
      options: `samplers.REPAINT_DEFAULTS` (eta, jump_length, jump_n_sample, prediction_type,
        clip_sample).

    Returns:
      inpaint(params, images [N, H, W, C] in [-1, 1], masks [N, H, W, 1] in {0, 1} (1 =
      repaint; see `inpainting.check_masks`), key, labels=None, guidance_scale=1.0) -> images
      in [-1, 1], the original exactly where the mask is 0 (and, with return_unpasted, the
      last step's prediction everywhere, before the known region is put back).
    """
    _check_repaint(schedule, num_steps, options)

    def inpaint(params, images, masks, key, labels=None, guidance_scale=1.0):
        fn = _pixel_model(model, params, shape[-1], null_class, labels, guidance_scale)
        out = samplers.repaint(fn, schedule, key, images, masks, num_steps=num_steps,
                               return_unpasted=True, **options)  # fmt: skip
        x, unpasted = (jnp.clip(o, -1.0, 1.0) for o in out)
        return (x, unpasted) if return_unpasted else x

    return inpaint


def make_upscale(
    unet: UNet,
    text_encoder: CLIPTextModel,
    autoencoder: AutoencoderKL,
    schedule: Schedule,
    *,
    latent_shape: tuple[int, int, int, int],
    scaling_factor: float,
    method: str = "ddim",
    num_steps: int = 50,
    guidance_rescale: float = 0.0,
    project_low_res: float = 0.9,
    **options,
) -> Callable[..., jax.Array]:
    """Super-resolution with a latent model conditioned on the low-resolution image (its U-Net
    takes c + 3 input channels and noise-level class labels; SD's x4 upscaler's design): the
    low-resolution image, resized (bicubic) to the latent grid, is noise-augmented to
    `noise_level` on `superres.low_res_schedule()` and concatenated to the latents at every
    step; classifier-free guided on the prompts; decoded.

    Over the noisiest `project_low_res` share of the schedule (0: never) every prediction x̂_0
    is decoded, projected onto the images whose box-downsampled version is the low-resolution
    input (`superres.project_consistent`) and re-encoded (`guidance.project_prediction`, as
    ILVR guides a model with a reference's low frequencies); the last steps (10% by default)
    are the model's alone.

    Returns:
      upscale(params, vae_params, low_res [N, h', w', 3] in [-1, 1], ids, uncond_ids, key,
      guidance_scale=1.0, noise_level=20) -> images [N, H, W, 3] in [-1, 1], H = h · f.
    """
    from jdiff import diffusion, superres

    if unet.in_channels != latent_shape[-1] + 3 or unet.num_class_embeds is None:
        raise ValueError(
            f"this U-Net takes {unet.in_channels} input channels and "
            f"{unet.num_class_embeds} class embeddings; a super-resolution model takes "
            f"{latent_shape[-1] + 3} (latents and the low-resolution image) and noise levels"
        )
    guidance.check_share(project_low_res, "project_low_res")  # at build time
    low_schedule = superres.low_res_schedule()
    f = autoencoder.downsample_factor

    def upscale(params, vae_params, low_res, ids, uncond_ids, key, guidance_scale=1.0,
                noise_level=superres.DEFAULT_NOISE_LEVEL):  # fmt: skip
        k_aug, k_sample = jax.random.split(key)
        n, h, w, _ = latent_shape
        vae = {"params": vae_params}
        low = jnp.asarray(low_res, jnp.float32)
        if low.shape[1:3] != (h, w):
            low = superres.upsample(low, (h, w))
        level = jnp.full((n,), noise_level, jnp.int32)
        noisy = diffusion.q_sample(low_schedule, low, level, jax.random.normal(k_aug, low.shape))
        fn = _guided_model(unet, text_encoder, params, ids, uncond_ids, guidance_scale,
                           guidance_rescale, extra=noisy, class_labels=level)  # fmt: skip

        def consistent(z):
            x = jnp.clip(autoencoder.apply(vae, z / scaling_factor, method="decode"), -1, 1)
            x = superres.project_consistent(x, low, f)
            return scaling_factor * autoencoder.apply(vae, x, method="encode").mode()

        if project_low_res > 0:
            fn = guidance.project_prediction(fn, schedule, consistent, share=project_low_res,
                                             prediction_type=options.get("prediction_type",
                                                                         "epsilon"))  # fmt: skip
        z = samplers.sample(fn, schedule, k_sample, latent_shape, method=method,
                            num_steps=num_steps, **options)  # fmt: skip
        images = autoencoder.apply(vae, z / scaling_factor, method="decode")
        return jnp.clip(images, -1.0, 1.0)

    return upscale


def _check_repaint(schedule, num_steps, options):
    """Raise ValueError at build time for bad RePaint settings (not at the first call)."""
    samplers.resolve_repaint_options(schedule.num_timesteps, num_steps, options)


def make_txt2img(
    unet: UNet,
    text_encoder: CLIPTextModel,
    autoencoder: AutoencoderKL,
    schedule: Schedule,
    *,
    latent_shape: tuple[int, int, int, int],
    scaling_factor: float,
    method: str = "ddim",
    num_steps: int = 50,
    guidance_rescale: float = 0.0,
    **options,
) -> Callable[..., jax.Array]:
    """Text-to-image latent diffusion: encode the prompts' token ids, sample latents with
    classifier-free guidance (the conditional and unconditional passes batched into one U-Net
    call), decode them with the autoencoder in its own dtype (float32 by default: reduced-
    precision decodes overflow into black or NaN images).

    Args:
      latent_shape: [N, h, w, c] of the latents (N prompts).
      scaling_factor: the autoencoder's (the U-Net sees scaling_factor · z).

    Returns:
      generate(params, vae_params, ids, uncond_ids, key, guidance_scale=7.5, latents=None) ->
      images [N, H, W, 3] in [-1, 1]; params = {"unet", "text_encoder"}; ids and uncond_ids
      int [N, L] (the prompts' and the negative prompts' or empty prompt's); latents: the
      standard-normal initial latents (default: drawn from key), as diffusers' `latents=`.
      Under `jax.jit` everything compiles once: new prompts, keys and guidance scales do not
      retrace.
    """

    def generate(params, vae_params, ids, uncond_ids, key, guidance_scale=7.5, latents=None):
        fn = _guided_model(unet, text_encoder, params, ids, uncond_ids, guidance_scale,
                           guidance_rescale)  # fmt: skip
        z = samplers.sample(fn, schedule, key, latent_shape, method=method, num_steps=num_steps,
                            x_T=latents, **options)  # fmt: skip
        images = autoencoder.apply({"params": vae_params}, z / scaling_factor, method="decode")
        return jnp.clip(images, -1.0, 1.0)

    return generate


def img2img_start_step(num_steps: int, strength: float) -> int:
    """The grid step img2img starts from: the last round(strength · num_steps) steps run
    (diffusers' rule: int(num_steps · strength) steps; strength 1 is txt2img from the image's
    noised latents, 0 returns the image through the autoencoder)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength}; expected 0 <= strength <= 1")
    return num_steps - min(int(num_steps * strength), num_steps)


def make_img2img(
    unet: UNet,
    text_encoder: CLIPTextModel,
    autoencoder: AutoencoderKL,
    schedule: Schedule,
    *,
    latent_shape: tuple[int, int, int, int],
    scaling_factor: float,
    strength: float = 0.8,
    method: str = "ddim",
    num_steps: int = 50,
    guidance_rescale: float = 0.0,
    **options,
) -> Callable[..., jax.Array]:
    """Image-to-image (SDEdit, Meng et al. 2022): encode the images, noise their latents to the
    grid step `img2img_start_step(num_steps, strength)` and denoise from there with the
    prompts, classifier-free guided; decode.

    Returns:
      generate(params, vae_params, images [N, H, W, 3] in [-1, 1], ids, uncond_ids, key,
      guidance_scale=7.5) -> images [N, H, W, 3]. `strength` and `num_steps` are compiled in.
    """
    start = img2img_start_step(num_steps, strength)

    def generate(params, vae_params, init_images, ids, uncond_ids, key, guidance_scale=7.5):
        k_encode, k_noise, k_sample = jax.random.split(key, 3)
        vae = {"params": vae_params}
        posterior = autoencoder.apply(vae, init_images, method="encode")
        z = scaling_factor * posterior.sample(k_encode)
        if start < num_steps:
            noise = jax.random.normal(k_noise, z.shape)
            z = samplers.add_noise(schedule, z, noise, method=method, num_steps=num_steps,
                                   start_step=start, **options)  # fmt: skip
            fn = _guided_model(unet, text_encoder, params, ids, uncond_ids, guidance_scale,
                               guidance_rescale)  # fmt: skip
            z = samplers.sample(fn, schedule, k_sample, latent_shape, method=method, x_T=z,
                                num_steps=num_steps, start_step=start, **options)  # fmt: skip
        images = autoencoder.apply(vae, z / scaling_factor, method="decode")
        return jnp.clip(images, -1.0, 1.0)

    return generate


def inpaint_extra(autoencoder, vae_params, images, masks, scaling_factor):
    """The conditioning channels of an inpainting U-Net (SD's layout): the mask at latent size
    and the scaled latents (posterior mode) of the masked image, [N, h, w, 1 + c]. Training
    caches (`train.py`) and sampling (`make_inpaint`) both form them here."""
    mask, masked = inpainting_inputs(masks, images, autoencoder.downsample_factor)
    latents = autoencoder.apply({"params": vae_params}, masked, method="encode").mode()
    return jnp.concatenate([mask, scaling_factor * latents], axis=-1)


def inpainting_inputs(masks, images, f: int):
    """(mask at latent size [N, H/f, W/f, 1], masked image [N, H, W, 3]) as Stable Diffusion's
    inpainting pipeline forms them: the mask binarized at 0.5 (1 = repaint), the image zeroed
    where it is repainted, the mask taken at every f-th pixel (torch's `interpolate`, nearest)."""
    masks = (masks >= 0.5).astype(jnp.float32)
    return masks[:, ::f, ::f], images * (1.0 - masks)


def make_inpaint(
    unet: UNet,
    text_encoder: CLIPTextModel,
    autoencoder: AutoencoderKL,
    schedule: Schedule,
    *,
    latent_shape: tuple[int, int, int, int],
    scaling_factor: float,
    strength: float = 1.0,
    method: str = "ddim",
    num_steps: int = 50,
    guidance_rescale: float = 0.0,
    **options,
) -> Callable[..., jax.Array]:
    """Inpainting with a model trained for it (Stable Diffusion's inpainting U-Net: latents,
    mask and masked-image latents concatenated, 2c + 1 input channels), classifier-free guided.

    The masked image's latents are the autoencoder posterior's mode (diffusers samples it).
    With strength 1 the latents start from noise; below 1, from the image's latents noised to
    `img2img_start_step(num_steps, strength)`. The result is the decoded sample, unpasted.

    Returns:
      generate(params, vae_params, images [N, H, W, 3] in [-1, 1], masks [N, H, W, 1] in
      [0, 1] (1 = repaint), ids, uncond_ids, key, guidance_scale=7.5, latents=None) ->
      images [N, H, W, 3] in [-1, 1].
    """
    if unet.in_channels != 2 * latent_shape[-1] + 1:
        raise ValueError(
            f"this U-Net takes {unet.in_channels} input channels; inpainting models take "
            f"{2 * latent_shape[-1] + 1} (latents, mask, masked-image latents)"
        )
    start = img2img_start_step(num_steps, strength)
    if start == num_steps:
        raise ValueError("strength=0 leaves nothing to inpaint; use 0 < strength <= 1")

    def generate(params, vae_params, init_images, masks, ids, uncond_ids, key,
                 guidance_scale=7.5, latents=None):  # fmt: skip
        k_encode, k_noise, k_sample = jax.random.split(key, 3)
        vae = {"params": vae_params}
        extra = inpaint_extra(autoencoder, vae_params, init_images, masks, scaling_factor)
        noise = jax.random.normal(k_noise, latent_shape) if latents is None else latents
        x_T = noise
        if start > 0:
            posterior = autoencoder.apply(vae, init_images, method="encode")
            z = scaling_factor * posterior.sample(k_encode)
            x_T = samplers.add_noise(schedule, z, noise, method=method, num_steps=num_steps,
                                     start_step=start, **options)  # fmt: skip
        fn = _guided_model(unet, text_encoder, params, ids, uncond_ids, guidance_scale,
                           guidance_rescale, extra=extra)  # fmt: skip
        z = samplers.sample(fn, schedule, k_sample, latent_shape, method=method, x_T=x_T,
                            num_steps=num_steps, start_step=start, **options)  # fmt: skip
        images = autoencoder.apply(vae, z / scaling_factor, method="decode")
        return jnp.clip(images, -1.0, 1.0)

    return generate


def make_latent_repaint(
    unet: UNet,
    text_encoder: CLIPTextModel,
    autoencoder: AutoencoderKL,
    schedule: Schedule,
    *,
    latent_shape: tuple[int, int, int, int],
    scaling_factor: float,
    num_steps: int = 50,
    guidance_rescale: float = 0.0,
    return_unpasted: bool = False,
    project_known_pixels: float = 0.6,
    **options,
) -> Callable[..., jax.Array]:
    """Inpainting with any text-conditional latent model (one not trained for it): RePaint on
    the latents, classifier-free guided.

    The known latents are the autoencoder posterior's mode of the whole image; a latent cell
    is repainted where any of its pixels is (`inpainting.latent_masks`), so a cell the mask
    only partly covers loses its known pixels. Over the noisiest `project_known_pixels` share
    of the schedule (t >= (1 - share) T; 0: never) every prediction x̂_0 is therefore decoded,
    its known pixels set to the original's and re-encoded (`guidance.project_prediction`; a
    decode and an encode per step), so the model completes what it sees at the mask's edge
    instead of drawing beside it; the later steps, which draw the details, go without it
    (every encode-decode round blurs). The decoded sample is pasted
    into the original with the pixel mask, so the known pixels are the original exactly;
    before that paste (return_unpasted: the last step's prediction of the whole image) they are
    its reconstruction of them, within the autoencoder's error.

    Returns:
      inpaint(params, vae_params, images [N, H, W, 3] in [-1, 1], masks [N, H, W, 1] in
      {0, 1} (1 = repaint), ids, uncond_ids, key, guidance_scale=7.5) -> images [N, H, W, 3]
      (with return_unpasted, also the decoded last-step prediction of the whole image).
    """
    _check_repaint(schedule, num_steps, options)
    guidance.check_share(project_known_pixels, "project_known_pixels")  # at build time
    prediction_type = options.get("prediction_type", samplers.REPAINT_DEFAULTS["prediction_type"])
    f = autoencoder.downsample_factor

    def inpaint(params, vae_params, images, masks, ids, uncond_ids, key, guidance_scale=7.5):
        vae = {"params": vae_params}
        z0 = scaling_factor * autoencoder.apply(vae, images, method="encode").mode()
        fn = _guided_model(unet, text_encoder, params, ids, uncond_ids, guidance_scale,
                           guidance_rescale)  # fmt: skip

        def decode(z):
            x = autoencoder.apply(vae, z / scaling_factor, method="decode")
            return jnp.clip(x, -1.0, 1.0)

        def known_pixels(z):
            x = masks * decode(z) + (1.0 - masks) * images
            return scaling_factor * autoencoder.apply(vae, x, method="encode").mode()

        if project_known_pixels > 0:
            fn = guidance.project_prediction(fn, schedule, known_pixels,
                                             share=project_known_pixels,
                                             prediction_type=prediction_type)  # fmt: skip
        z, z_unpasted = samplers.repaint(fn, schedule, key, z0, inpainting.latent_masks(masks, f),
                                         num_steps=num_steps, return_unpasted=True,
                                         **options)  # fmt: skip

        x = masks * decode(z) + (1.0 - masks) * images
        return (x, decode(z_unpasted)) if return_unpasted else x

    return inpaint


def _guided_model(unet, text_encoder, params, ids, uncond_ids, guidance_scale, rescale,
                  extra=None, class_labels=None):  # fmt: skip
    """The classifier-free guided model function of a text-conditional latent model: the
    prompts' and the negative (or empty) prompts' encodings as `context`; `extra` [N, h, w, k]
    concatenated to the U-Net's input channels and `class_labels` [N] passed to it, the same
    in both halves."""

    def encode(tokens):
        return text_encoder.apply({"params": params["text_encoder"]}, tokens).last_hidden_state

    cond = Conditioning(context=encode(ids), class_labels=class_labels, concat=extra)
    null = cond.replace(context=encode(uncond_ids))
    fn = conditioning.make_model_fn(unet, params["unet"])
    return guidance.classifier_free(fn, cond, null, guidance_scale, guidance_rescale=rescale)


def _guidance_one(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`fn` with its `guidance_scale` argument replaced by the constant 1, whatever is passed,
    so that `guidance.classifier_free` builds the conditional model alone."""
    import inspect

    signature = inspect.signature(fn)

    def unguided(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["guidance_scale"] = 1.0
        return fn(*bound.args, **bound.kwargs)

    return unguided


@dataclasses.dataclass(frozen=True, eq=False)
class LatentDiffusion:
    """A text-conditional latent diffusion model put together for generation, with host-side
    tokenization: `txt2img` and `img2img` take prompts as strings. Each distinct (batch size,
    image size, sampler, steps, strength) compiles once; new prompts, negative prompts, seeds,
    guidance scales or parameters reuse it.

    params: {"unet": ..., "text_encoder": ..., "autoencoder": ...}.
    """

    unet: UNet
    text_encoder: CLIPTextModel
    autoencoder: AutoencoderKL
    schedule: Schedule
    tokenizer: Any  # jdiff.tokenizer.CLIPTokenizer
    scaling_factor: float
    image_size: int  # the default height and width
    # (name, value) pairs of sampler settings (prediction_type, steps_offset, ...); each sampler
    # gets those it takes, as diffusers' `OtherScheduler.from_config(config)` does
    sampler_options: tuple = ()
    method: str = "ddim"  # the default sampler
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_pretrained(cls, pretrained) -> LatentDiffusion:
        """From `jdiff.interop.load_pretrained(...)`'s result (a latent text-to-image model);
        its params are `pretrained.params`. The scheduler's sampler is the default method."""
        if not pretrained.is_latent or pretrained.text_encoder is None:
            raise ValueError(f"{pretrained.source} is not a latent text-to-image model; use "
                             "pipelines.make_generate for a pixel-space U-Net")  # fmt: skip
        s = pretrained.scheduler
        return cls(pretrained.unet, pretrained.text_encoder, pretrained.autoencoder,
                   s.make_schedule(), pretrained.tokenizer,
                   pretrained.autoencoder.scaling_factor, image_size=pretrained.image_size,
                   sampler_options=tuple(sorted(s.options.items())), method=s.method)  # fmt: skip

    @property
    def is_inpainting(self) -> bool:
        """Whether the U-Net takes mask and masked-image latents beside the latents."""
        return self.unet.in_channels == 2 * self.autoencoder.latent_channels + 1

    @property
    def is_upscaler(self) -> bool:
        """Whether the U-Net takes a low-resolution image (and its noise level) beside the
        latents: a super-resolution model (`upscale`)."""
        c = self.autoencoder.latent_channels
        return self.unet.in_channels == c + 3 and self.unet.num_class_embeds is not None

    def _check_kind(self, inpainting: bool):
        if self.is_upscaler:
            raise ValueError("this is a super-resolution model (low-resolution image in): use "
                             "upscale")  # fmt: skip
        if self.is_inpainting != inpainting:
            raise ValueError(
                "this is an inpainting model (latents, mask and masked image in): use inpaint"
                if self.is_inpainting
                else f"this U-Net takes {self.unet.in_channels} input channels, not an "
                "inpainting model's 2c + 1: inpaint needs a model trained for it"
            )

    def _options(self, method, options):
        if method not in samplers.DEFAULTS:
            raise ValueError(f"unknown sampler method {method!r}; choose one of {samplers.METHODS}")
        own = {k: v for k, v in self.sampler_options if k in samplers.DEFAULTS[method]}
        return own | options

    def _tokens(self, prompts, negative_prompts):
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts: pass a list of at least one string")
        if negative_prompts is None:
            negative_prompts = [""] * len(prompts)
        elif isinstance(negative_prompts, str):
            negative_prompts = [negative_prompts] * len(prompts)
        if len(negative_prompts) != len(prompts):
            raise ValueError(
                f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts; pass one "
                "per prompt, a single string, or None"
            )
        return jnp.asarray(self.tokenizer(prompts)), jnp.asarray(self.tokenizer(negative_prompts))

    def _latent_shape(self, n, height, width):
        f = self.autoencoder.downsample_factor
        height, width = height or self.image_size, width or self.image_size
        if height % f or width % f or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {f}; got "
                             f"{height}x{width}")  # fmt: skip
        return (n, height // f, width // f, self.autoencoder.latent_channels)

    def _jit(self, key, build, guidance_scale):
        """The compiled function of `key`: one program for a guidance scale of exactly 1 (the
        conditional model alone, half the U-Net work) and one for every other scale (traced:
        a new scale does not retrace)."""
        unguided = bool(np.all(np.asarray(guidance_scale) == 1))
        key = (*key, unguided)
        if key not in self._compiled:
            fn = build()
            self._compiled[key] = jax.jit(_guidance_one(fn) if unguided else fn)
        return self._compiled[key]

    def txt2img(
        self, params, prompts, key, *, negative_prompts=None, guidance_scale=7.5,
        num_steps=50, method=None, height=None, width=None, latents=None, **options,
    ) -> jax.Array:  # fmt: skip
        """Images [N, H, W, 3] in [-1, 1] for N prompts (`latents`: optional initial noise
        [N, h, w, c], as diffusers' `latents=`; `method` None: the model's default sampler)."""
        self._check_kind(False)
        ids, uncond = self._tokens(prompts, negative_prompts)
        shape = self._latent_shape(len(ids), height, width)
        method = method or self.method
        options = self._options(method, options)
        if latents is not None:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.shape != shape:
                raise ValueError(f"latents have shape {latents.shape}; expected {shape}")
        generate = self._jit(
            ("txt2img", shape, method, num_steps, tuple(sorted(options.items()))),
            lambda: make_txt2img(self.unet, self.text_encoder, self.autoencoder, self.schedule,
                                 latent_shape=shape, scaling_factor=self.scaling_factor,
                                 method=method, num_steps=num_steps, **options),
            guidance_scale,
        )  # fmt: skip
        vae = params["autoencoder"]
        return generate(params, vae, ids, uncond, key, jnp.float32(guidance_scale), latents)

    def img2img(
        self, params, init_images, prompts, key, *, strength=0.8, negative_prompts=None,
        guidance_scale=7.5, num_steps=50, method=None, **options,
    ) -> jax.Array:  # fmt: skip
        """`init_images` [N, H, W, 3] in [-1, 1] re-imagined with N prompts."""
        self._check_kind(False)
        method = method or self.method
        init_images, ids, uncond = self._images(init_images, prompts, negative_prompts)
        shape = self._latent_shape(len(ids), *init_images.shape[1:3])
        start = img2img_start_step(num_steps, strength)  # validates strength
        options = self._options(method, options)
        generate = self._jit(
            ("img2img", shape, method, num_steps, start, tuple(sorted(options.items()))),
            lambda: make_img2img(self.unet, self.text_encoder, self.autoencoder, self.schedule,
                                 latent_shape=shape, scaling_factor=self.scaling_factor,
                                 strength=strength, method=method, num_steps=num_steps,
                                 **options),
            guidance_scale,
        )  # fmt: skip
        return generate(params, params["autoencoder"], init_images, ids, uncond, key,
                        jnp.float32(guidance_scale))  # fmt: skip

    def _images(self, init_images, prompts, negative_prompts):
        init_images = jnp.asarray(init_images, jnp.float32)
        if init_images.ndim != 4 or init_images.shape[-1] != 3:
            raise ValueError(f"init images must be [N, H, W, 3]; got shape {init_images.shape}")
        ids, uncond = self._tokens(prompts, negative_prompts)
        if len(ids) != len(init_images):
            raise ValueError(f"{len(init_images)} init images for {len(ids)} prompts")
        return init_images, ids, uncond

    def inpaint(
        self, params, init_images, masks, prompts, key, *, strength=1.0, negative_prompts=None,
        guidance_scale=7.5, num_steps=50, method=None, latents=None, return_unpasted=False,
        paste=False, **options,
    ) -> jax.Array:  # fmt: skip
        """Repaint `init_images` [N, H, W, 3] in [-1, 1] where `masks` (see
        `inpainting.check_masks`: [N, H, W, 1], [H, W], ...; values in [0, 1]) are >= 0.5,
        following N prompts.

        An inpainting model (latents, mask and masked image in) samples with `method`, from
        `strength` and `latents`, and returns the decoded sample as diffusers' pipeline does
        (`paste=True`: with the known pixels put back). Any other model repaints with RePaint
        (`make_latent_repaint`; options eta, jump_length, jump_n_sample, as diffusers'
        `RePaintPipeline`; `project_known_pixels`, default 0.6, see `make_latent_repaint`),
        which starts from noise, steps as DDIM does and returns the original exactly where the
        mask is 0 (`return_unpasted`: also the decoded prediction before that paste).
        """
        init_images, ids, uncond = self._images(init_images, prompts, negative_prompts)
        masks = jnp.asarray(inpainting.check_masks(masks, init_images))
        shape = self._latent_shape(len(ids), *init_images.shape[1:3])
        if not self.is_inpainting:
            if method not in (None, "ddim") or strength != 1.0 or latents is not None:
                raise ValueError(
                    "this model was not trained for inpainting: it repaints with RePaint, "
                    "which runs DDIM steps from noise (no method, strength or latents; "
                    "options eta, jump_length, jump_n_sample)"
                )
            own = {k: v for k, v in self.sampler_options if k in samplers.REPAINT_DEFAULTS}
            options = own | options
            generate = self._jit(
                ("repaint", shape, num_steps, return_unpasted, tuple(sorted(options.items()))),
                lambda: make_latent_repaint(
                    self.unet, self.text_encoder, self.autoencoder, self.schedule,
                    latent_shape=shape, scaling_factor=self.scaling_factor,
                    num_steps=num_steps, return_unpasted=return_unpasted, **options),
                guidance_scale,
            )  # fmt: skip
            return generate(params, params["autoencoder"], init_images, masks, ids, uncond, key,
                            jnp.float32(guidance_scale))  # fmt: skip
        if return_unpasted:
            raise ValueError("return_unpasted is RePaint's; an inpainting model's result is "
                             "not pasted")  # fmt: skip
        method = method or self.method
        options = self._options(method, options)
        generate = self._jit(
            ("inpaint", shape, method, num_steps, strength, tuple(sorted(options.items()))),
            lambda: make_inpaint(self.unet, self.text_encoder, self.autoencoder, self.schedule,
                                 latent_shape=shape, scaling_factor=self.scaling_factor,
                                 strength=strength, method=method, num_steps=num_steps,
                                 **options),
            guidance_scale,
        )  # fmt: skip
        if latents is not None:
            latents = jnp.asarray(latents, jnp.float32)
        x = generate(params, params["autoencoder"], init_images, masks, ids, uncond, key,
                     jnp.float32(guidance_scale), latents)  # fmt: skip
        return masks * x + (1.0 - masks) * init_images if paste else x

    def upscale(
        self, params, low_res, key, prompts=None, *, negative_prompts=None, guidance_scale=1.0,
        noise_level=None, num_steps=50, method=None, **options,
    ) -> jax.Array:  # fmt: skip
        """Super-resolve `low_res` [N, h, w, 3] in [-1, 1] (a super-resolution model's):
        [N, h·f, w·f, 3] for the autoencoder's factor f. `prompts` default to the empty prompt
        (unconditional); `noise_level` (0..350, default 20) is the augmentation the low-
        resolution input is given, as SD's x4 upscaler's pipeline takes it."""
        from jdiff import superres

        if not self.is_upscaler:
            raise ValueError(f"this U-Net takes {self.unet.in_channels} input channels and no "
                             "noise level: upscale needs a super-resolution model")  # fmt: skip
        low_res = jnp.asarray(low_res, jnp.float32)
        if low_res.ndim != 4 or low_res.shape[-1] != 3:
            raise ValueError(f"low_res must be [N, h, w, 3]; got shape {low_res.shape}")
        n, h, w, _ = low_res.shape
        prompts = [""] * n if prompts is None else prompts
        ids, uncond = self._tokens(prompts, negative_prompts)
        if len(ids) != n:
            raise ValueError(f"{n} low-resolution images for {len(ids)} prompts")
        f = self.autoencoder.downsample_factor
        shape = self._latent_shape(n, h * f, w * f)
        noise_level = superres.DEFAULT_NOISE_LEVEL if noise_level is None else noise_level
        if not 0 <= noise_level < self.unet.num_class_embeds:
            raise ValueError(f"noise_level={noise_level}; expected 0 .. "
                             f"{self.unet.num_class_embeds - 1}")  # fmt: skip
        method = method or self.method
        options = self._options(method, options)
        generate = self._jit(
            ("upscale", shape, method, num_steps, tuple(sorted(options.items()))),
            lambda: make_upscale(self.unet, self.text_encoder, self.autoencoder, self.schedule,
                                 latent_shape=shape, scaling_factor=self.scaling_factor,
                                 method=method, num_steps=num_steps, **options),
            guidance_scale,
        )  # fmt: skip
        return generate(params, params["autoencoder"], low_res, ids, uncond, key,
                        jnp.float32(guidance_scale), jnp.int32(noise_level))  # fmt: skip

    def outpaint(self, params, init_images, prompts, key, *, left=0, right=0, top=0, bottom=0,
                 width=None, height=None, overlap=4, **kwargs) -> np.ndarray:  # fmt: skip
        """Extend `init_images` [N, H, W, 3] by the given pixels per side (or to a target width
        / height), generating the new area with `inpaint` (kwargs: its options) and blending
        `overlap` pixels of the original back with a linear ramp (`inpainting.Canvas`).
        Returns [N, H', W', 3] in [-1, 1]: the original exactly where the overlap band ends."""
        canvas = inpainting.outpaint_canvas(
            init_images, left=left, right=right, top=top, bottom=bottom, width=width,
            height=height, overlap=overlap,
            multiple=self.autoencoder.downsample_factor * self.unet.downsample_factor,
        )  # fmt: skip
        x = self.inpaint(params, canvas.image, canvas.masks, prompts, key, **kwargs)
        return canvas.finish(x)


def load_latent_diffusion(
    workdir, step: int | None = None, *, ema: bool = True, autoencoder_workdir=None
) -> tuple[LatentDiffusion, dict, Any]:
    """(LatentDiffusion, params, config) of a `task = "latent_diffusion"` train.py workdir,
    rebuilt from it alone (its config names the autoencoder's workdir).

    `autoencoder_workdir` swaps in another autoencoder, typically one whose decoder was
    fine-tuned with the encoder frozen (`configs/vae_shapes_decoder.py`, diffusers' `vae=`):
    its encoder must equal the one the model was trained on (checked when that one is still
    there) and its latent shape and scaling factor are the model's."""
    import pathlib

    from jdiff import autoencoder as autoencoders
    from jdiff import runs, training
    from jdiff.tokenizer import CLIPTokenizer

    workdir = pathlib.Path(workdir)
    run = runs.restore(workdir, step, task="latent_diffusion")
    config, tuned = run.config, run.weights(ema)
    if config.latent.get("pretrained"):  # fine-tuned converted weights: only the U-Net trained
        if autoencoder_workdir:
            raise ValueError(f"{workdir} fine-tunes converted weights, which bring their own "
                             "autoencoder: autoencoder_workdir applies to models trained on a "
                             "train.py autoencoder")  # fmt: skip
        p = training.load_pretrained_parts(config)
        model = LatentDiffusion.from_pretrained(p)
        return model, {**tuned, "autoencoder": p.params["autoencoder"]}, config
    vae_model, vae_params, info = autoencoders.load(
        autoencoder_workdir or config.latent.autoencoder_workdir
    )
    if autoencoder_workdir and pathlib.Path(config.latent.autoencoder_workdir).exists():
        _, own_params, own = autoencoders.load(config.latent.autoencoder_workdir)
        autoencoders.check_same_encoder(vae_params, own_params, name=str(autoencoder_workdir))
        info = info | {"scaling_factor": own["scaling_factor"]}  # the one the model learnt on
    text = training.make_text_encoder(config)
    unet = training.make_latent_unet(config, info["latent_shape"][-1], text.hidden_size)
    model = LatentDiffusion(
        unet, text, vae_model, training.make_schedule(config.diffusion),
        CLIPTokenizer.default(max_length=config.text.max_length), info["scaling_factor"],
        image_size=config.data.image_size,
        sampler_options=(("prediction_type", config.diffusion.prediction_type),),
    )  # fmt: skip
    return model, {**tuned, "autoencoder": vae_params}, config
