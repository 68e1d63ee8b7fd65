"""Latent pipelines (text-to-image, image-to-image, inpainting with an inpainting model or
RePaint with any model, super-resolution): pure `make_*` factories of functions to jit. Each
is encode -> noise -> guided model -> sample -> decode with the autoencoder, written once in
`_Skeleton`; a factory says only what it encodes, concatenates and starts from."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jdiff import conditioning, guidance, inpainting, samplers
from jdiff.conditioning import Conditioning, Control
from jdiff.nn import UNet
from jdiff.nn.text_encoder import CLIPTextModel
from jdiff.nn.vae import AutoencoderKL
from jdiff.pipelines.pixel import check_repaint
from jdiff.pipelines.text import TextEncoders, encode_prompts, zeroed
from jdiff.schedules import Schedule


def encode_latents(autoencoder: AutoencoderKL, vae_params, images, scaling_factor: float,
                   key: jax.Array | None = None) -> jax.Array:  # fmt: skip
    """The U-Net's latents of `images` [N, H, W, 3] in [-1, 1]: scaling_factor · z, z drawn
    from the autoencoder's posterior with `key`, or its mode without one. [N, H/f, W/f, c]."""
    posterior = autoencoder.apply({"params": vae_params}, images, method="encode")
    return scaling_factor * (posterior.mode() if key is None else posterior.sample(key))


def decode_latents(autoencoder: AutoencoderKL, vae_params, z, scaling_factor: float) -> jax.Array:
    """Images [N, H, W, 3] in [-1, 1] of the U-Net's latents z [N, h, w, c] (unscaled, decoded
    in the autoencoder's own dtype, clipped)."""
    images = autoencoder.apply({"params": vae_params}, z / scaling_factor, method="decode")
    return jnp.clip(images, -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class _Skeleton:
    """What every latent factory shares, written once: encode -> noise -> guided model ->
    sample -> decode. Each `make_*` builds one and its function to jit only says what it
    encodes, what it concatenates to the latents and where it starts."""

    unet: UNet
    text_encoder: TextEncoders
    autoencoder: AutoencoderKL
    schedule: Schedule
    latent_shape: tuple[int, int, int, int]
    scaling_factor: float
    method: str
    num_steps: int
    guidance_rescale: float
    options: dict
    controlnets: tuple = ()  # `nn.controlnet.ControlNetModel`s the `control` argument feeds
    guess_mode: bool = False

    def encode(self, vae_params, images, key=None):
        """`encode_latents` with this autoencoder: [N, H, W, 3] -> [N, h, w, c]."""
        return encode_latents(self.autoencoder, vae_params, images, self.scaling_factor, key)

    def decode(self, vae_params, z):
        """`decode_latents` with this autoencoder: [N, h, w, c] -> [N, H, W, 3]."""
        return decode_latents(self.autoencoder, vae_params, z, self.scaling_factor)

    def guided(self, params, ids, uncond_ids, guidance_scale, extra=None, class_labels=None,
               time_ids=None, negative_time_ids=None, control=None):  # fmt: skip
        """The classifier-free guided model function: the prompts' and the negative (or
        empty) prompts' encodings (`pipelines.text`; uncond_ids None: zeros, SDXL's
        `force_zeros_for_empty_prompt`); `extra` [N, h, w, k] concatenated to the U-Net's
        input and `class_labels` [N] passed to it, the same in both halves; SDXL's
        `time_ids` [N, K] (the unconditional half `negative_time_ids`, by default the same);
        `control` the ControlNets' inputs (`control_inputs`)."""
        text = encode_prompts(self.text_encoder, params, ids)
        cond = text.replace(class_labels=class_labels, concat=extra, time_ids=time_ids)
        null = zeroed(cond) if uncond_ids is None else cond.replace(
            **_text_fields(encode_prompts(self.text_encoder, params, uncond_ids))
        )  # fmt: skip
        if negative_time_ids is not None:
            null = null.replace(time_ids=negative_time_ids)
        fn = conditioning.make_model_fn(self.unet, params["unet"])
        if control is not None:
            cond, null, fn = self._controlled(params, cond, null, control)
        return guidance.classifier_free(fn, cond, null, guidance_scale,
                                        guidance_rescale=self.guidance_rescale)  # fmt: skip

    def _controlled(self, params, cond, null, control):
        """(cond, null, model_fn) with the ControlNets: both halves read the control images;
        in guess mode the unconditional half's scales are 0 (diffusers' zero residuals there);
        `control["keep"]` (the sampler's timesteps [S] and each ControlNet's factor there
        [S, n]) switches them off outside `control_guidance_start` / `_end`."""
        n = cond.context.shape[0]
        scales = jnp.broadcast_to(jnp.asarray(control["scales"], jnp.float32),
                                  (n, len(self.controlnets)))  # fmt: skip
        inputs = Control(tuple(control["images"]), scales)
        off = inputs.replace(scales=jnp.zeros_like(scales))
        keep = None
        if control.get("keep") is not None:
            grid_t, table = control["keep"]

            def keep(t):  # the factor of the grid step whose timestep t is
                return table[jnp.argmin(jnp.abs(grid_t[None, :] - t[:, None]), axis=1)]

        fn = conditioning.make_controlled_model_fn(
            self.unet, params["unet"], self.controlnets, control["params"],
            guess_mode=self.guess_mode, keep=keep,
        )  # fmt: skip
        return (cond.replace(control=inputs),
                null.replace(control=off if self.guess_mode else inputs), fn)  # fmt: skip

    def denoise(self, fn, key, *, z0=None, noise=None, start_step=0, end_step=None):
        """Sampled latents [N, h, w, c]: from `noise` (x_T; drawn from `key` when None; with
        start_step > 0 the sampler's state there), or, given clean latents z0, from z0 noised
        with `noise` to grid step `start_step`; to the end or to `end_step`'s state."""
        x_T = noise
        if z0 is not None:
            x_T = samplers.add_noise(self.schedule, z0, noise, method=self.method,
                                     num_steps=self.num_steps, start_step=start_step,
                                     **self.options)  # fmt: skip
        return samplers.sample(fn, self.schedule, key, self.latent_shape, method=self.method,
                               num_steps=self.num_steps, x_T=x_T, start_step=start_step,
                               end_step=end_step, **self.options)  # fmt: skip


def _text_fields(cond: Conditioning) -> dict:
    return {"context": cond.context, "text_embeds": cond.text_embeds}


def make_txt2img(
    unet: UNet,
    text_encoder: TextEncoders,
    autoencoder: AutoencoderKL,
    schedule: Schedule,
    *,
    latent_shape: tuple[int, int, int, int],
    scaling_factor: float,
    method: str = "ddim",
    num_steps: int = 50,
    guidance_rescale: float = 0.0,
    end_step: int | None = None,
    controlnets: tuple = (),
    guess_mode: bool = False,
    **options,
) -> Callable[..., jax.Array]:
    """Text-to-image latent diffusion: encode the prompts' token ids, sample latents with
    classifier-free guidance (the conditional and unconditional passes batched into one U-Net
    call), decode them with the autoencoder in its own dtype (float32 by default: reduced-
    precision decodes overflow into black or NaN images).

    Args:
      latent_shape: [N, h, w, c] of the latents (N prompts).
      scaling_factor: the autoencoder's (the U-Net sees scaling_factor · z).
      end_step: stop at this grid step and return the sampler's state there, undecoded: the
        first expert of an ensemble (SDXL's base before its refiner, `make_refine`).
      controlnets: ControlNets (`nn.controlnet`) of the U-Net's shape, fed by `control`;
        `guess_mode` their guess mode (diffusers').

    Returns:
      generate(params, vae_params, ids, uncond_ids, key, guidance_scale=7.5, latents=None,
      time_ids=None, negative_time_ids=None, control=None) -> images [N, H, W, 3] in [-1, 1];
      params = {"unet", "text_encoder"} (SDXL: and "text_encoder_2"); ids and uncond_ids
      int [N, L] (the prompts' and the negative prompts' or empty prompt's; SDXL: a pair, one
      per tokenizer; uncond_ids None: zeroed); latents: the standard-normal initial latents
      (default: drawn from key), as diffusers' `latents=`; time_ids: SDXL's [N, K]
      size/crop ids; control: the ControlNets' parameters, images and scales
      (`control_inputs`). Under `jax.jit` everything compiles once: new prompts, keys,
      guidance scales, ids, control images and scales do not retrace.
    """

    sk = _Skeleton(unet, text_encoder, autoencoder, schedule, latent_shape, scaling_factor,
                   method, num_steps, guidance_rescale, options, tuple(controlnets),
                   guess_mode)  # fmt: skip

    def generate(params, vae_params, ids, uncond_ids, key, guidance_scale=7.5, latents=None,
                 time_ids=None, negative_time_ids=None, control=None):  # fmt: skip
        fn = sk.guided(params, ids, uncond_ids, guidance_scale, time_ids=time_ids,
                       negative_time_ids=negative_time_ids, control=control)  # fmt: skip
        z = sk.denoise(fn, key, noise=latents, end_step=end_step)
        return z if end_step is not None else sk.decode(vae_params, z)

    return generate


def make_refine(
    unet: UNet,
    text_encoder: TextEncoders,
    autoencoder: AutoencoderKL,
    schedule: Schedule,
    *,
    latent_shape: tuple[int, int, int, int],
    scaling_factor: float,
    start_step: int,
    method: str = "euler",
    num_steps: int = 50,
    guidance_rescale: float = 0.0,
    **options,
) -> Callable[..., jax.Array]:
    """The second expert of an ensemble (Balaji et al. 2022; SDXL's refiner after its base,
    diffusers' img2img with `denoising_start`): latents another model left at grid step
    `start_step` (the sampler's state there, as `make_txt2img(..., end_step=start_step)`
    returns it) denoised to the end with this model, classifier-free guided, and decoded.

    Returns:
      generate(params, vae_params, latents, ids, uncond_ids, key, guidance_scale=7.5,
      time_ids=None, negative_time_ids=None) -> images [N, H, W, 3] in [-1, 1] (the
      arguments as `make_txt2img`'s).
    """
    sk = _Skeleton(unet, text_encoder, autoencoder, schedule, latent_shape, scaling_factor,
                   method, num_steps, guidance_rescale, options)  # fmt: skip

    def generate(params, vae_params, latents, ids, uncond_ids, key, guidance_scale=7.5,
                 time_ids=None, negative_time_ids=None):  # fmt: skip
        fn = sk.guided(params, ids, uncond_ids, guidance_scale, time_ids=time_ids,
                       negative_time_ids=negative_time_ids)  # fmt: skip
        return sk.decode(vae_params, sk.denoise(fn, key, noise=latents, start_step=start_step))

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
    text_encoder: TextEncoders,
    autoencoder: AutoencoderKL,
    schedule: Schedule,
    *,
    latent_shape: tuple[int, int, int, int],
    scaling_factor: float,
    strength: float = 0.8,
    method: str = "ddim",
    num_steps: int = 50,
    guidance_rescale: float = 0.0,
    controlnets: tuple = (),
    guess_mode: bool = False,
    **options,
) -> Callable[..., jax.Array]:
    """Image-to-image (SDEdit, Meng et al. 2022): encode the images, noise their latents to the
    grid step `img2img_start_step(num_steps, strength)` and denoise from there with the
    prompts, classifier-free guided (with `controlnets`, as `make_txt2img`); decode.

    Returns:
      generate(params, vae_params, images [N, H, W, 3] in [-1, 1], ids, uncond_ids, key,
      guidance_scale=7.5, noise=None, time_ids=None, negative_time_ids=None, control=None)
      -> images
      [N, H, W, 3] (`noise`: the standard-normal noise added to the latents, default drawn
      from key; the rest as `make_txt2img`'s). `strength` and `num_steps` are compiled in.
    """
    start = img2img_start_step(num_steps, strength)
    sk = _Skeleton(unet, text_encoder, autoencoder, schedule, latent_shape, scaling_factor,
                   method, num_steps, guidance_rescale, options, tuple(controlnets),
                   guess_mode)  # fmt: skip

    def generate(params, vae_params, init_images, ids, uncond_ids, key, guidance_scale=7.5,
                 noise=None, time_ids=None, negative_time_ids=None, control=None):  # fmt: skip
        k_encode, k_noise, k_sample = jax.random.split(key, 3)
        z = sk.encode(vae_params, init_images, k_encode)
        if start < num_steps:
            fn = sk.guided(params, ids, uncond_ids, guidance_scale, time_ids=time_ids,
                           negative_time_ids=negative_time_ids, control=control)  # fmt: skip
            noise = jax.random.normal(k_noise, z.shape) if noise is None else noise
            z = sk.denoise(fn, k_sample, z0=z, noise=noise, start_step=start)
        return sk.decode(vae_params, z)

    return generate


def inpaint_extra(autoencoder, vae_params, images, masks, scaling_factor):
    """The conditioning channels of an inpainting U-Net (SD's layout): the mask at latent size
    and the scaled latents (posterior mode) of the masked image, [N, h, w, 1 + c]. Training
    caches (`train.py`) and sampling (`make_inpaint`) both form them here."""
    mask, masked = inpainting_inputs(masks, images, autoencoder.downsample_factor)
    latents = encode_latents(autoencoder, vae_params, masked, scaling_factor)
    return jnp.concatenate([mask, latents], axis=-1)


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

    sk = _Skeleton(unet, text_encoder, autoencoder, schedule, latent_shape, scaling_factor,
                   method, num_steps, guidance_rescale, options)  # fmt: skip

    def generate(params, vae_params, init_images, masks, ids, uncond_ids, key,
                 guidance_scale=7.5, latents=None, time_ids=None,
                 negative_time_ids=None):  # fmt: skip
        k_encode, k_noise, k_sample = jax.random.split(key, 3)
        extra = inpaint_extra(autoencoder, vae_params, init_images, masks, scaling_factor)
        noise = jax.random.normal(k_noise, latent_shape) if latents is None else latents
        z0 = sk.encode(vae_params, init_images, k_encode) if start > 0 else None
        fn = sk.guided(params, ids, uncond_ids, guidance_scale, extra=extra, time_ids=time_ids,
                       negative_time_ids=negative_time_ids)  # fmt: skip
        return sk.decode(vae_params, sk.denoise(fn, k_sample, z0=z0, noise=noise, start_step=start))

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
    check_repaint(schedule, num_steps, options)
    guidance.check_share(project_known_pixels, "project_known_pixels")  # at build time
    prediction_type = options.get("prediction_type", samplers.REPAINT_DEFAULTS["prediction_type"])
    f = autoencoder.downsample_factor
    sk = _Skeleton(unet, text_encoder, autoencoder, schedule, latent_shape, scaling_factor,
                   "repaint", num_steps, guidance_rescale, options)  # fmt: skip

    def inpaint(params, vae_params, images, masks, ids, uncond_ids, key, guidance_scale=7.5,
                time_ids=None, negative_time_ids=None):  # fmt: skip
        z0 = sk.encode(vae_params, images)
        fn = sk.guided(params, ids, uncond_ids, guidance_scale, time_ids=time_ids,
                       negative_time_ids=negative_time_ids)  # fmt: skip

        def decode(z):
            return sk.decode(vae_params, z)

        def known_pixels(z):
            return sk.encode(vae_params, masks * decode(z) + (1.0 - masks) * images)

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
    sk = _Skeleton(unet, text_encoder, autoencoder, schedule, latent_shape, scaling_factor,
                   method, num_steps, guidance_rescale, options)  # fmt: skip

    def upscale(params, vae_params, low_res, ids, uncond_ids, key, guidance_scale=1.0,
                noise_level=superres.DEFAULT_NOISE_LEVEL):  # fmt: skip
        k_aug, k_sample = jax.random.split(key)
        n, h, w, _ = latent_shape
        low = jnp.asarray(low_res, jnp.float32)
        if low.shape[1:3] != (h, w):
            low = superres.upsample(low, (h, w))
        level = jnp.full((n,), noise_level, jnp.int32)
        noisy = diffusion.q_sample(low_schedule, low, level, jax.random.normal(k_aug, low.shape))
        fn = sk.guided(params, ids, uncond_ids, guidance_scale, extra=noisy, class_labels=level)

        def consistent(z):
            return sk.encode(vae_params, superres.project_consistent(sk.decode(vae_params, z),
                                                                     low, f))  # fmt: skip

        if project_low_res > 0:
            fn = guidance.project_prediction(fn, schedule, consistent, share=project_low_res,
                                             prediction_type=options.get("prediction_type",
                                                                         "epsilon"))  # fmt: skip
        return sk.decode(vae_params, sk.denoise(fn, k_sample))

    return upscale


def control_inputs(controlnets, images, scales, keep=None) -> dict:
    """The `control` argument of `make_txt2img` / `make_img2img`'s functions: the ControlNets'
    parameters, their control images (one [N, H, W, k] in [0, 1] each) and scales [n];
    `keep`: None, or (the sampler's model-call timesteps [S], each ControlNet's factor at
    them [S, n]) for `control_guidance_start` / `_end`."""
    return {"params": tuple(c.params for c in controlnets), "images": tuple(images),
            "scales": jnp.asarray(scales, jnp.float32), "keep": keep}  # fmt: skip
