"""Each task's pure train step, made from its config: the one recipe that train.py runs and
`jdiff.aot` compiles for a TPU topology; and, for `jdiff.aot`, each task's train step and
sampler as `Abstract` programs: the function and the shapes of its arguments, from the config
alone (no data, weights or caches).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jdiff import models, superres, training
from jdiff.validate import InputError

# model calls per sampler step where it is not one (a second-order step evaluates twice)
CALLS_PER_STEP = {"heun": 2}

# latent.pretrained architectures sized without their weights: the U-Net, text encoder and
# autoencoder variants (jdiff.nn's VARIANTS)
ARCHITECTURES = {
    "sd_v1": ("sd_v1", "clip_vit_l14", "sd"),
    "sd_v2_1": ("sd_v2_1", "openclip_vit_h14", "sd"),
    "sdxl_base": ("sdxl_base", ("clip_vit_l14", "openclip_vit_bigg14"), "sd"),  # two encoders
}


def step_options(config: Any) -> dict:
    """The options every task's step takes from the config (EMA, gradient accumulation)."""
    return {"ema_max_decay": config.train.ema_max_decay,
            "accumulate_steps": config.optim.accumulate_steps}  # fmt: skip


def diffusion_step(config: Any, model, schedule, optimizer, num_classes: int | None):
    """Pixel-space diffusion's step (`training.make_train_step`) for `model`."""
    return training.make_train_step(
        model, schedule, optimizer,
        loss=config.diffusion.loss, prediction_type=config.diffusion.prediction_type,
        snr_gamma=config.diffusion.snr_gamma or None, null_class=num_classes,
        class_dropout=config.train.class_dropout, **step_options(config),
    )  # fmt: skip


def autoencoder_step(config: Any, model, optimizer):
    """The autoencoder's step (`training.make_autoencoder_step`) for `model`."""
    ae = config.autoencoder
    return training.make_autoencoder_step(
        model, optimizer, reconstruction=ae.reconstruction, kl_weight=ae.kl_weight,
        trainable=ae.get("trainable", "all"), **step_options(config),
    )  # fmt: skip


def latent_step(config: Any, unet, text, schedule, optimizer, *, empty_ids, empty_context,
                scaling_factor: float, prediction_type: str, kind: str | None,
                empty_text_embeds=None, lora=None, controlnet=None):  # fmt: skip
    """Text-conditional latent diffusion's step (`training.make_latent_train_step`); `kind`
    is the image conditioning by concatenation (None, "inpaint" or "upscale": its input
    noise-augmented as SD's upscaler's); `lora` trains that adapter on frozen weights."""
    return training.make_latent_train_step(
        unet, text, schedule, optimizer, empty_ids=empty_ids, empty_context=empty_context,
        empty_text_embeds=empty_text_embeds, scaling_factor=scaling_factor,
        caption_dropout=config.train.caption_dropout,
        prediction_type=prediction_type, snr_gamma=config.diffusion.snr_gamma or None,
        noise_augmentation=superres.low_res_schedule() if kind == "upscale" else None,
        max_noise_level=superres.MAX_NOISE_LEVEL,
        noise_level_power=config.train.get("noise_level_power", 1.0), lora=lora,
        controlnet=controlnet,
        **step_options(config),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TrainParts:
    """A task's train step as the trainer builds it, and the shapes of one global batch."""

    init: Callable  # () -> the step-0 TrainState
    step: Callable  # (state, batch, key) -> (state, metrics)
    batch: dict[str, jax.ShapeDtypeStruct]


@dataclasses.dataclass(frozen=True)
class Abstract:
    """A program to compile without running it: `fn`, the shapes of its arguments and how
    each is laid over a mesh ("state": split over "fsdp" by the size rule; "batch": split
    along its first axis over every chip; "whole": replicated)."""

    name: str  # "train step", "sampler"
    fn: Callable
    args: tuple
    kinds: tuple[str, ...]
    out_kinds: Any  # a kind, or a tuple of kinds, for the outputs
    donate: tuple[int, ...]
    batch_size: int  # examples (or images) per call, over all chips
    shares: Callable[[tuple], dict]  # args (or their shardings) -> {name: subtree}
    # a sampler's loop: XLA's cost analysis counts a loop's body once, so the model call
    # (`call`, its own program) is counted apart, `uncounted` more times than XLA does
    call: Abstract | None = None
    uncounted: int = 0


def train_program(config) -> Abstract:
    """The config's train step, as train.py compiles it."""
    parts = train_parts(config)
    state = jax.eval_shape(parts.init)
    key = jax.eval_shape(lambda: jax.random.key(0))
    return Abstract(
        "train step", parts.step, (state, parts.batch, key), ("state", "batch", "whole"),
        ("state", "whole"), (0,), config.data.batch_size,
        lambda a: {"parameters": a[0].params, "EMA parameters": a[0].ema_params,
                   "optimizer state": a[0].opt_state},
    )  # fmt: skip


def sample_program(config) -> Abstract:
    """The config's sampler (config.sample: method, steps, options; `num_samples` images in
    one call, guidance included), as sample.py compiles it: latent text-to-image (prompts'
    ids in, images out: encoder, the whole denoising loop, decoder) or pixel-space
    generation."""
    from jdiff import pipelines

    kind, n = task(config), config.sample.num_samples
    options = dict(config.sample.get("options", {}))
    key = jax.eval_shape(lambda: jax.random.key(0))
    scale = _spec((), jnp.float32)
    params = jax.eval_shape(train_parts(config).init).params
    if kind == "autoencoder":
        raise InputError("--program=sample: an autoencoder (task='autoencoder') has no sampler")
    if kind == "diffusion":
        classes = _num_classes(config)
        model = models.make_model(config, classes)
        size, channels = config.data.image_size, config.data.channels
        generate = pipelines.make_generate(
            model, models.make_schedule(config.diffusion), shape=(n, size, size, channels),
            method=config.sample.method, num_steps=config.sample.num_steps, null_class=classes,
            learned_variance=config.diffusion.loss == "hybrid",
            prediction_type=config.diffusion.prediction_type, **options,
        )  # fmt: skip
        labels = _spec((n,), jnp.int32)
        m = 2 * n if classes is not None else n  # guided: the null class batched alongside
        x, t = _spec((m, size, size, channels)), _spec((m,))

        def call(params, x, t, labels):
            kwargs = {} if classes is None else {"class_labels": labels}
            return model.apply({"params": params}, x, t, **kwargs)

        step = Abstract("model call", call, (params, x, t, _spec((m,), jnp.int32)),
                        ("state", "batch", "batch", "batch"), "batch", (), m,
                        lambda a: {"parameters": a[0]})  # fmt: skip
        return Abstract("sampler", generate, (params, key, labels, scale),
                        ("state", "whole", "batch", "whole"), "batch", (), n,
                        lambda a: {"parameters": a[0]}, step, _uncounted(config))  # fmt: skip
    parts = latent_parts(config)
    if parts.kind:
        raise InputError(f"--program=sample sizes text-to-image; latent.conditioning="
                         f"{parts.kind!r} models are sized by their train step")  # fmt: skip
    if parts.unet.addition_embed_type:
        raise InputError("--program=sample sizes SD 1.x/2.x text-to-image; an SDXL model is "
                         "sized by its train step (--program=train) so far")  # fmt: skip
    h, ae = _latent_size(config, parts), parts.autoencoder
    generate = pipelines.make_txt2img(
        parts.unet, parts.text, ae, models.make_schedule(config.diffusion),
        latent_shape=(n, h, h, ae.latent_channels), scaling_factor=1.0,
        method=config.sample.method, num_steps=config.sample.num_steps,
        prediction_type=config.diffusion.prediction_type, **options,
    )  # fmt: skip
    image = jnp.zeros((1, 8 * ae.downsample_factor, 8 * ae.downsample_factor, ae.in_channels))
    ae_params = jax.eval_shape(lambda: ae.init(jax.random.key(0), image))["params"]
    length, unet = parts.text.max_position_embeddings, parts.unet
    ids = _spec((n, length), jnp.int32)
    x, t = _spec((2 * n, h, h, unet.in_channels)), _spec((2 * n,))  # guided: 2 x n
    context = _spec((2 * n, length, parts.text.hidden_size), parts.text.dtype)

    def call(unet_params, x, t, context):
        return unet.apply({"params": unet_params}, x, t, context=context)

    step = Abstract("model call", call, (params["unet"], x, t, context),
                    ("state", "batch", "batch", "batch"), "batch", (), 2 * n,
                    lambda a: {"parameters": a[0]})  # fmt: skip
    return Abstract("sampler", generate, (params, ae_params, ids, ids, key, scale),
                    ("state", "state", "batch", "batch", "whole", "whole"), "batch", (), n,
                    lambda a: {"parameters": a[0], "autoencoder": a[1]}, step,
                    _uncounted(config))  # fmt: skip


def _uncounted(config) -> int:
    """The model calls of a sampling that XLA's count of the loop's body (one step) misses."""
    return (config.sample.num_steps - 1) * CALLS_PER_STEP.get(config.sample.method, 1)


def train_parts(config) -> TrainParts:
    """The config's init and step (as `trainer.build` makes them) and its batch's shapes."""
    kind = task(config)
    key = jax.random.key(config.seed)
    b, size, channels = config.data.batch_size, config.data.image_size, config.data.channels
    if kind == "autoencoder":
        model = models.make_autoencoder(config)
        optimizer = training.make_autoencoder_optimizer(config)
        init = training.make_init(model, optimizer, key, image_shape=(size, size, channels))
        step = autoencoder_step(config, model, optimizer)
        return TrainParts(init, step, {"image": _spec((b, size, size, channels))})
    optimizer = training.make_optimizer(config.optim)
    if kind == "diffusion":
        classes = _num_classes(config)
        model = models.make_model(config, classes)
        init = training.make_init(model, optimizer, key, image_shape=(size, size, channels))
        schedule = models.make_schedule(config.diffusion)
        step = diffusion_step(config, model, schedule, optimizer, classes)
        batch = {"image": _spec((b, size, size, channels)), "label": _spec((b,), jnp.int32)}
        return TrainParts(init, step, batch)
    return _latent_program(config, optimizer, key)


def task(config) -> str:
    """The config's task ("diffusion" when it names none); InputError for an unknown one."""
    name = config.get("task", "diffusion")
    if name not in training.TASKS:
        raise InputError(f"task={name!r}; expected one of {training.TASKS}")
    return name


@dataclasses.dataclass(frozen=True)
class LatentParts:
    """A latent model's networks, as sized from its config (no weights)."""

    unet: Any
    text: Any
    autoencoder: Any
    frozen: bool  # the text encoder frozen: the captions' encodings come cached
    kind: str | None  # image conditioning by concatenation ("inpaint", "upscale") or None


def latent_parts(config) -> LatentParts:
    """The U-Net, text encoder and autoencoder of a latent config: of `latent.pretrained`
    (an `ARCHITECTURES` name or a diffusers directory's config files), or new ones (the
    autoencoder's architecture from the config its workdir stored)."""
    pretrained = config.latent.get("pretrained") or None
    kind = config.latent.get("conditioning") or None
    if pretrained:
        unet, text, ae = _pretrained_architecture(config, pretrained)
        return LatentParts(unet, text, ae, True, kind)
    text = models.make_text_encoder(config)
    ae = _stored_autoencoder(config)
    unet = models.make_latent_unet(config, ae.latent_channels, text.hidden_size)
    return LatentParts(unet, text, ae, config.text.get("frozen", False), kind)


def _sdxl_program(config, parts, optimizer, key) -> TrainParts:
    """SDXL's fine-tuning step as train.py builds it: the captions' contexts (both encoders),
    pooled embeddings and size ids cached, both encoders frozen in the state."""
    from jdiff.pipelines import SDXLTextEncoders

    unet, text = parts.unet, parts.text
    assert isinstance(text, SDXLTextEncoders)
    second = text.text_encoder_2
    h = _latent_size(config, parts)
    b, length, pooled = (
        config.data.batch_size,
        second.max_position_embeddings,
        second.projection_dim,
    )
    latent = (b, h, h, parts.autoencoder.latent_channels)
    batch = {"latent_mean": _spec(latent), "latent_std": _spec(latent),
             "ids": _spec((b, length), jnp.int32),
             "context": _spec((b, length, text.context_dim), second.dtype),
             "text_embeds": _spec((b, pooled)), "time_ids": _spec((b, 6))}  # fmt: skip
    optimizer = training.freeze_text_encoder(optimizer)

    def init():
        one = {k: jnp.zeros((1, *v.shape[1:]), v.dtype) for k, v in batch.items()}
        x = jnp.zeros((1, h, h, unet.in_channels))
        params = {"unet": unet.init(key, x, jnp.zeros(1), context=one["context"],
                                    text_embeds=one["text_embeds"],
                                    time_ids=one["time_ids"])["params"]}  # fmt: skip
        params |= {name: training.init_text_encoder(m, key) for name, m in text.encoders}
        return training.init_state(params, optimizer)

    step = latent_step(
        config, unet, text, models.make_schedule(config.diffusion), optimizer,
        empty_ids=jnp.zeros(length, jnp.int32), scaling_factor=1.0,
        empty_context=jnp.zeros((length, text.context_dim)),
        empty_text_embeds=jnp.zeros(pooled), prediction_type=config.diffusion.prediction_type,
        kind=None,
    )  # fmt: skip
    return TrainParts(init, step, batch)


def _latent_program(config, optimizer, key) -> TrainParts:
    if config.get("lora", {}).get("rank") or (config.get("controlnet") or {}).get("conditioning"):
        raise InputError("jdiff.aot sizes a model's own or a full fine-tune's train step; LoRA "
                         "(lora.rank) and ControlNet (controlnet.conditioning) runs are not "
                         "sized yet: leave them at 0 / '' to size the full fine-tune")  # fmt: skip
    parts = latent_parts(config)
    if parts.unet.addition_embed_type:
        return _sdxl_program(config, parts, optimizer, key)
    unet, text = parts.unet, parts.text
    channels, h = parts.autoencoder.latent_channels, _latent_size(config, parts)
    b, length = config.data.batch_size, text.max_position_embeddings
    latent = (b, h, h, channels)
    batch = {"latent_mean": _spec(latent), "latent_std": _spec(latent),
             "ids": _spec((b, length), jnp.int32)}  # fmt: skip
    empty_context = None
    if parts.frozen:  # trained as train.py does: the captions' encodings cached, the encoder
        optimizer = training.freeze_text_encoder(optimizer)  # still in the state (frozen)
        batch["context"] = _spec((b, length, text.hidden_size), text.dtype)
        empty_context = jnp.zeros((length, text.hidden_size))
    if parts.kind:
        batch["extra"] = _spec((b, h, h, unet.in_channels - channels))
    init = training.make_latent_init(unet, text, optimizer, key, latent_shape=latent[1:])
    step = latent_step(
        config, unet, text, models.make_schedule(config.diffusion), optimizer,
        empty_ids=jnp.zeros(length, jnp.int32), empty_context=empty_context,
        scaling_factor=1.0,  # a constant multiplier: it costs nothing
        prediction_type=config.diffusion.prediction_type, kind=parts.kind,
    )  # fmt: skip
    return TrainParts(init, step, batch)


def _latent_size(config, parts: LatentParts) -> int:
    factor = parts.autoencoder.downsample_factor
    if config.data.image_size % factor:
        raise InputError(f"data.image_size={config.data.image_size} is not a multiple of the "
                         f"autoencoder's factor {factor}")  # fmt: skip
    return config.data.image_size // factor


def _pretrained_architecture(config, pretrained: str):
    """(U-Net, text encoder, autoencoder) of `latent.pretrained` from config files alone."""
    from jdiff.interop import configs as foreign
    from jdiff.interop import files
    from jdiff.nn import UNet, text_encoder, unet, vae

    dtype = models._dtype(config.model.dtype)
    root = pathlib.Path(pretrained)

    def encoder(fields):
        return text_encoder.CLIPTextModel(**fields, dtype=dtype)

    if pretrained in ARCHITECTURES:
        unet_variant, text_variant, vae_variant = ARCHITECTURES[pretrained]
        net = UNet(**unet.VARIANTS[unet_variant])
        texts = text_variant if isinstance(text_variant, tuple) else (text_variant,)
        text = [encoder(text_encoder.VARIANTS[v]) for v in texts]
        ae = vae.AutoencoderKL(**vae.VARIANTS[vae_variant])
    elif all((root / part / "config.json").is_file() for part in ("unet", "vae", "text_encoder")):
        read = lambda part: files.read_json(root / part / "config.json")  # noqa: E731
        net = UNet(**foreign.unet_config_from_diffusers(read("unet")))
        ae = vae.AutoencoderKL(**foreign.vae_config_from_diffusers(read("vae")))
        text = [encoder(foreign.text_encoder_config_from_transformers(read(part)))
                for part in ("text_encoder", "text_encoder_2")
                if (root / part / "config.json").is_file()]  # fmt: skip
    else:
        raise InputError(f"latent.pretrained={pretrained!r}: to size it without its weights, "
                         f"name a diffusers-format directory (unet/, vae/, text_encoder/ "
                         f"config.json) or one of {sorted(ARCHITECTURES)}")  # fmt: skip
    if len(text) == 2:  # SDXL's two
        from jdiff.pipelines import SDXLTextEncoders

        return models.configured_unet(net, config), SDXLTextEncoders(*text), ae
    return models.configured_unet(net, config), text[0], ae


def _stored_autoencoder(config):
    """A new latent model's autoencoder, from the config its workdir stored
    (`latent.autoencoder_workdir`)."""
    from ml_collections import ConfigDict

    from jdiff import checkpoints

    workdir = pathlib.Path(config.latent.autoencoder_workdir)
    if not (workdir / checkpoints.RUN_INFO).exists():
        raise InputError(f"latent.autoencoder_workdir={str(workdir)!r} holds no trained "
                         "autoencoder: its stored config gives the latent shape (train it "
                         "first, or size a pretrained one with latent.pretrained)")  # fmt: skip
    return models.make_autoencoder(ConfigDict(checkpoints.read_run_info(workdir)["config"]))


def _num_classes(config) -> int | None:
    if not config.model.get("class_conditional", False):
        return None
    from jdiff import data

    source = data.load_source(config.data.name, split=config.data.split,
                              data_dir=config.data.data_dir or None)  # fmt: skip
    return data.num_classes(source)


def _spec(shape, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype)
