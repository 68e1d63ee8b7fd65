"""`LatentDiffusion`: a text-conditional latent model put together for users (prompts as
strings, one compiled program per setting); `pipelines.trained.load_latent_diffusion` builds
one from a train.py workdir."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import inpainting, samplers
from jdiff.nn import UNet
from jdiff.nn.vae import AutoencoderKL
from jdiff.pipelines import control
from jdiff.pipelines.latent import (
    img2img_start_step,
    make_img2img,
    make_inpaint,
    make_latent_repaint,
    make_refine,
    make_txt2img,
    make_upscale,
)
from jdiff.pipelines.text import (
    SDXL_OPTIONS,
    SDXLTextEncoders,
    TextEncoders,
    prompt_lists,
    sdxl_time_ids,
    sdxl_tokens,
)
from jdiff.schedules import Schedule


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

    params: {"unet": ..., "text_encoder": ..., "autoencoder": ...} (SDXL: and "text_encoder_2").
    An SDXL model (`text_encoder` an `SDXLTextEncoders`) takes, as keyword options of
    txt2img, img2img and refine, a second prompt per tokenizer (`prompts_2`,
    `negative_prompts_2`: by default the first) and its size/crop ids (`original_size`,
    `crops_coords_top_left`, and the base's `target_size` or the refiner's `aesthetic_score`
    and `negative_aesthetic_score`; by default the image's size, no crop, 6 and 2.5), as
    diffusers' SDXL pipelines (`pipelines.text.SDXL_OPTIONS`).
    """

    unet: UNet
    text_encoder: TextEncoders
    autoencoder: AutoencoderKL
    schedule: Schedule
    tokenizer: Any  # jdiff.tokenizer.CLIPTokenizer
    scaling_factor: float
    image_size: int  # the default height and width
    # (name, value) pairs of sampler settings (prediction_type, steps_offset, ...); each sampler
    # gets those it takes, as diffusers' `OtherScheduler.from_config(config)` does
    sampler_options: tuple = ()
    method: str = "ddim"  # the default sampler
    tokenizer_2: Any = None  # SDXL's second tokenizer (pads with "!")
    force_zeros_for_empty_prompt: bool = False  # SDXL: no negative prompt -> zeros, not ""
    requires_aesthetics_score: bool = False  # SDXL's refiner: ids end in an aesthetic score
    _compiled: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_pretrained(cls, pretrained) -> LatentDiffusion:
        """From `jdiff.interop.load_pretrained(...)`'s result (a latent text-to-image model);
        its params are `pretrained.params`. The scheduler's sampler is the default method."""
        p = pretrained
        if not p.is_latent or (p.text_encoder is None and p.text_encoder_2 is None):
            raise ValueError(f"{p.source} is not a latent text-to-image model; use "
                             "pipelines.make_generate for a pixel-space U-Net")  # fmt: skip
        text, tokenizers = p.text_encoder, (p.tokenizer, None)
        if p.is_sdxl:  # the base model, or the refiner (the second encoder alone)
            text = SDXLTextEncoders(p.text_encoder, p.text_encoder_2)
            tokenizers = (p.tokenizer, p.tokenizer_2)
        s = p.scheduler
        return cls(p.unet, text, p.autoencoder, s.make_schedule(), tokenizers[0],
                   p.autoencoder.scaling_factor, image_size=p.image_size,
                   sampler_options=tuple(sorted(s.options.items())), method=s.method,
                   tokenizer_2=tokenizers[1],
                   force_zeros_for_empty_prompt=p.force_zeros_for_empty_prompt,
                   requires_aesthetics_score=p.requires_aesthetics_score)  # fmt: skip

    @property
    def is_sdxl(self) -> bool:
        return isinstance(self.text_encoder, SDXLTextEncoders)

    @property
    def is_refiner(self) -> bool:
        """SDXL's refiner: the second text encoder alone; it continues a base's latents."""
        return self.is_sdxl and self.text_encoder.text_encoder is None

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
        if self.is_sdxl:
            raise ValueError("an SDXL model: jdiff has no SDXL upscaler (SD's x4 upscaler is "
                             "a 1.x/2.x-era model)")  # fmt: skip
        prompts, negative_prompts = prompt_lists(prompts, negative_prompts)
        return jnp.asarray(self.tokenizer(prompts)), jnp.asarray(self.tokenizer(negative_prompts))

    def _text_inputs(self, prompts, negative_prompts, height, width, options):
        """(ids, uncond, latent shape, the generate function's SDXL arguments) of a call;
        SDXL's options (`SDXL_OPTIONS`) are taken out of `options` (the rest are the
        sampler's), refused for another model and where they do not apply (an aesthetic
        score to a base model, a target size to the refiner)."""
        sdxl = {k: options.pop(k) for k in list(options) if k in SDXL_OPTIONS}
        if not self.is_sdxl:
            if sdxl:
                raise ValueError(f"{sorted(sdxl)} apply to SDXL models only")
            ids, uncond = self._tokens(prompts, negative_prompts)
            return ids, uncond, self._latent_shape(len(ids), height, width), {}
        own = (
            ("aesthetic_score", "negative_aesthetic_score")
            if self.requires_aesthetics_score
            else ("target_size",)
        )
        other = (
            {"target_size"}
            if self.requires_aesthetics_score
            else {"aesthetic_score", "negative_aesthetic_score"}
        )
        if set(sdxl) & other:
            raise ValueError(f"{sorted(set(sdxl) & other)} do not apply to this SDXL model (its "
                             f"size ids end in {own})")  # fmt: skip
        sdxl = {k: v for k, v in SDXL_OPTIONS.items() if k not in other} | sdxl
        tokenizers = (None if self.is_refiner else self.tokenizer, self.tokenizer_2)
        text = [sdxl.pop(k) for k in ("prompts_2", "negative_prompts_2")]
        ids, uncond = sdxl_tokens(tokenizers, prompts, negative_prompts, *text,
                                  zeros=self.force_zeros_for_empty_prompt)  # fmt: skip
        shape = self._latent_shape(len(ids[0]), height, width)
        f = self.autoencoder.downsample_factor
        cond, null = sdxl_time_ids(len(ids[0]), (shape[1] * f, shape[2] * f),
                                   self.requires_aesthetics_score, **sdxl)  # fmt: skip
        return ids, uncond, shape, {"time_ids": cond, "negative_time_ids": null}

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
        num_steps=50, method=None, height=None, width=None, latents=None, denoising_end=None,
        controlnet=None, control_image=None, controlnet_conditioning_scale=1.0,
        guess_mode=False, control_guidance_start=0.0, control_guidance_end=1.0, **options,
    ) -> jax.Array:  # fmt: skip
        """Images [N, H, W, 3] in [-1, 1] for N prompts (`latents`: optional initial noise
        [N, h, w, c], as diffusers' `latents=`; `method` None: the model's default sampler;
        the SDXL options as the class says). `denoising_end` (a fraction of the schedule, as
        diffusers') stops there and returns the latents [N, h, w, c] for `refine`.

        With `controlnet` (an `interop.ControlNet`, or a list: their residuals add up), each
        reads its `control_image` ([N, H, W, 3] in [0, 1]; a list, one per ControlNet) at its
        `controlnet_conditioning_scale`, from `control_guidance_start` to `_end` (fractions
        of the steps), in `guess_mode` or not, as diffusers' ControlNet pipelines; new
        images, scales and ControlNet weights reuse the compiled program."""
        self._check_kind(False)
        sdxl = {}
        if self.is_refiner:
            raise ValueError("an SDXL refiner continues a base model's latents: call refine "
                             "with those of txt2img(..., denoising_end=...)")  # fmt: skip
        ids, uncond, shape, sdxl = self._text_inputs(prompts, negative_prompts, height, width,
                                                     options)  # fmt: skip
        method = method or self.method
        options = self._options(method, options)
        if latents is not None:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.shape != shape:
                raise ValueError(f"latents have shape {latents.shape}; expected {shape}")
        end = None
        if denoising_end is not None:
            end = samplers.split_step(self.schedule, denoising_end, method=method,
                                      num_steps=num_steps, **options)  # fmt: skip
        ctl = self._control(controlnet, control_image, controlnet_conditioning_scale,
                            guess_mode, control_guidance_start, control_guidance_end, shape,
                            method, num_steps, options)  # fmt: skip
        generate = self._jit(
            ("txt2img", shape, method, num_steps, end, tuple(sorted(options.items())), ctl.key),
            lambda: make_txt2img(self.unet, self.text_encoder, self.autoencoder, self.schedule,
                                 latent_shape=shape, scaling_factor=self.scaling_factor,
                                 method=method, num_steps=num_steps, end_step=end,
                                 **ctl.factory, **options),
            guidance_scale,
        )  # fmt: skip
        vae = params["autoencoder"]
        return generate(params, vae, ids, uncond, key, jnp.float32(guidance_scale), latents,
                        **sdxl, **ctl.arguments)  # fmt: skip

    def _control(self, controlnet, image, scale, guess_mode, start, end, shape, method,
                 num_steps, options, start_step=0) -> control.Prepared:  # fmt: skip
        """The ControlNet options of a call, checked (`pipelines.control.prepare`)."""
        return control.prepare(self.unet, controlnet, image, scale=scale, guess_mode=guess_mode,
                               start=start, end=end, latent_shape=shape, schedule=self.schedule,
                               method=method, num_steps=num_steps, options=options,
                               start_step=start_step)  # fmt: skip

    def refine(
        self, params, latents, prompts, key, *, denoising_start, negative_prompts=None,
        guidance_scale=5.0, num_steps=50, method=None, **options,
    ) -> jax.Array:  # fmt: skip
        """The second expert of an ensemble: the `latents` [N, h, w, c] a base model's
        `txt2img(..., denoising_end=f)` returned, denoised from `denoising_start=f` on with
        this model (SDXL's refiner, or the base itself) and decoded: images [N, H, W, 3].
        The same `num_steps` and sampler as the base's call; the refiner's ids end in
        `aesthetic_score` (`negative_aesthetic_score` for the unconditional half), as
        diffusers' `StableDiffusionXLImg2ImgPipeline(..., denoising_start=f)`."""
        self._check_kind(False)
        if not self.is_sdxl:
            raise ValueError("refine continues SDXL latents: this is not an SDXL model")
        latents = jnp.asarray(latents, jnp.float32)
        if latents.ndim != 4 or latents.shape[-1] != self.autoencoder.latent_channels:
            raise ValueError(f"latents have shape {latents.shape}; expected [N, h, w, "
                             f"{self.autoencoder.latent_channels}]")  # fmt: skip
        f = self.autoencoder.downsample_factor
        ids, uncond, shape, sdxl = self._text_inputs(
            prompts, negative_prompts, latents.shape[1] * f, latents.shape[2] * f, options
        )
        if latents.shape != shape:
            raise ValueError(f"{len(latents)} latents for {shape[0]} prompts")
        method = method or self.method
        options = self._options(method, options)
        start = samplers.split_step(self.schedule, denoising_start, method=method,
                                    num_steps=num_steps, **options)  # fmt: skip
        generate = self._jit(
            ("refine", shape, method, num_steps, start, tuple(sorted(options.items()))),
            lambda: make_refine(self.unet, self.text_encoder, self.autoencoder, self.schedule,
                                latent_shape=shape, scaling_factor=self.scaling_factor,
                                start_step=start, method=method, num_steps=num_steps,
                                **options),
            guidance_scale,
        )  # fmt: skip
        return generate(params, params["autoencoder"], latents, ids, uncond, key,
                        jnp.float32(guidance_scale), **sdxl)  # fmt: skip

    def img2img(
        self, params, init_images, prompts, key, *, strength=0.8, negative_prompts=None,
        guidance_scale=7.5, num_steps=50, method=None, noise=None, controlnet=None,
        control_image=None, controlnet_conditioning_scale=1.0, guess_mode=False,
        control_guidance_start=0.0, control_guidance_end=1.0, **options,
    ) -> jax.Array:  # fmt: skip
        """`init_images` [N, H, W, 3] in [-1, 1] re-imagined with N prompts (`noise`: the
        standard-normal noise [N, h, w, c] added to their latents, default drawn from key;
        SDXL's options as the class says; ControlNets as `txt2img` takes them, the start and
        end fractions of the steps img2img runs)."""
        self._check_kind(False)
        method = method or self.method
        init_images, ids, uncond, shape, sdxl = self._images(init_images, prompts,
                                                             negative_prompts, options)  # fmt: skip
        if noise is not None:
            noise = jnp.asarray(noise, jnp.float32)
            if noise.shape != shape:
                raise ValueError(f"noise has shape {noise.shape}; expected {shape}")
        start = img2img_start_step(num_steps, strength)  # validates strength
        options = self._options(method, options)
        ctl = self._control(controlnet, control_image, controlnet_conditioning_scale,
                            guess_mode, control_guidance_start, control_guidance_end, shape,
                            method, num_steps, options, start)  # fmt: skip
        generate = self._jit(
            ("img2img", shape, method, num_steps, start, tuple(sorted(options.items())),
             ctl.key),
            lambda: make_img2img(self.unet, self.text_encoder, self.autoencoder, self.schedule,
                                 latent_shape=shape, scaling_factor=self.scaling_factor,
                                 strength=strength, method=method, num_steps=num_steps,
                                 **ctl.factory, **options),
            guidance_scale,
        )  # fmt: skip
        return generate(params, params["autoencoder"], init_images, ids, uncond, key,
                        jnp.float32(guidance_scale), noise=noise, **sdxl,
                        **ctl.arguments)  # fmt: skip

    def _images(self, init_images, prompts, negative_prompts, options):
        """(images, ids, uncond, latent shape, SDXL's arguments) of an image-to-image call, one
        prompt per image (`_text_inputs`)."""
        init_images = jnp.asarray(init_images, jnp.float32)
        if init_images.ndim != 4 or init_images.shape[-1] != 3:
            raise ValueError(f"init images must be [N, H, W, 3]; got shape {init_images.shape}")
        ids, uncond, shape, sdxl = self._text_inputs(prompts, negative_prompts,
                                                     *init_images.shape[1:3], options)  # fmt: skip
        if shape[0] != len(init_images):
            raise ValueError(f"{len(init_images)} init images for {shape[0]} prompts")
        return init_images, ids, uncond, shape, sdxl

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
        init_images, ids, uncond, shape, sdxl = self._images(init_images, prompts,
                                                             negative_prompts, options)  # fmt: skip
        masks = jnp.asarray(inpainting.check_masks(masks, init_images))
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
                            jnp.float32(guidance_scale), **sdxl)  # fmt: skip
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
                     jnp.float32(guidance_scale), latents, **sdxl)  # fmt: skip
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
