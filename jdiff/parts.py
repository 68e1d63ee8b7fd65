"""What each task of `train.py` contributes to a run (`Parts`): its model, initial state, pure
train step, batches and sample function, built from a config (`diffusion_parts`,
`autoencoder_parts`, `latent_parts`); `jdiff.trainer` jits, shards, loops and checkpoints them.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from jdiff import (
    adapters,
    autoencoder,
    caches,
    data,
    inpainting,
    models,
    pipelines,
    programs,
    superres,
    tokenizer,
    training,
)
from jdiff.caches import captions, conditioning_cache, latent_cache, latent_cache_key
from jdiff.data import shapes
from jdiff.nn.controlnet import ControlNetModel, init_from_unet


@dataclasses.dataclass(frozen=True)
class Parts:
    """What a task contributes to a run (`diffusion_parts`, `autoencoder_parts`,
    `latent_parts`)."""

    init: Callable[..., training.TrainState]  # (*init_args) -> the initial state
    step: Callable  # train_step(state, batch, key, *frozen) -> (state, metrics), pure
    model: Any  # the network trained
    batches: Any  # batches(step) -> dict of host arrays; .iterate(start)
    sample: Callable | None = None  # (EMA params, *frozen) -> sample images, or None
    init_args: tuple = ()
    prompts: tuple = ()  # a text model's sample-grid prompts
    # weights the step and sampler read but never change (a LoRA run's base model): sharded
    # once and passed to both after their own arguments, kept out of the train state
    frozen: tuple = ()


def image_batches(config: ConfigDict, source) -> data.Batches:
    """The run's image batches of `source` (this process's share on a multi-host run)."""
    return data.Batches(source, batch_size=config.data.batch_size,
                        image_size=config.data.image_size, seed=config.seed,
                        random_flip=config.data.random_flip, process_index=jax.process_index(),
                        process_count=jax.process_count())  # fmt: skip


def diffusion_parts(config, workdir, source, num_classes, optimizer, k_init, k_sample):
    """Pixel-space diffusion: the U-Net, its step, and sample(params) -> a grid's images."""
    model = models.make_model(config, num_classes)
    schedule = models.make_schedule(config.diffusion)
    size, channels = config.data.image_size, config.data.channels
    init = training.make_init(model, optimizer, k_init, image_shape=(size, size, channels))
    step = programs.diffusion_step(config, model, schedule, optimizer, num_classes)
    generate = pipelines.make_generate(
        model, schedule, shape=(config.sample.num_samples, size, size, channels),
        method=config.sample.method, num_steps=config.sample.num_steps, null_class=num_classes,
        learned_variance=config.diffusion.loss == "hybrid",
        prediction_type=config.diffusion.prediction_type, **config.sample.get("options", {}),
    )  # fmt: skip
    labels = None
    if num_classes is not None:
        labels = jax.numpy.arange(config.sample.num_samples) % num_classes
    guidance = config.sample.guidance_scale

    def sample(params):
        return generate(params, k_sample, labels, guidance)

    return Parts(init, step, model, image_batches(config, source), sample)


def autoencoder_parts(config, workdir, source, num_classes, optimizer, k_init, k_sample):
    """The autoencoder and its step; its "samples" are reconstructions (write_samples). With
    `autoencoder.init_from` (a trained autoencoder's workdir) it starts from that run's EMA
    weights; with `autoencoder.trainable = "decoder"` only the decoder side trains."""
    ae = config.autoencoder
    model = models.make_autoencoder(config)
    optimizer = training.make_autoencoder_optimizer(config)
    size, channels = config.data.image_size, config.data.channels
    init = training.make_init(model, optimizer, k_init, image_shape=(size, size, channels))
    init_args = ()
    if ae.get("trainable", "all") == "decoder" and not ae.get("init_from"):
        raise ValueError("autoencoder.trainable='decoder' fine-tunes the decoder of a trained "
                         "autoencoder: set autoencoder.init_from to its workdir")  # fmt: skip
    if ae.get("init_from"):
        params = load_autoencoder_weights(ae.init_from, jax.eval_shape(init).params)
        init, init_args = (lambda p: training.init_state(p, optimizer)), (params,)
    step = programs.autoencoder_step(config, model, optimizer)
    return Parts(init, step, model, image_batches(config, source), None, init_args)


def load_autoencoder_weights(source_workdir: str, expected) -> dict:
    """The EMA weights of the autoencoder trained in `source_workdir`, which must have the
    parameter shapes `expected` (this config's model)."""
    _, params, _ = autoencoder.load(source_workdir)
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)  # noqa: E731
    if shapes(params) != shapes(expected):
        raise ValueError(
            f"autoencoder.init_from={source_workdir!r} holds an autoencoder of another "
            "architecture than this config's model; use the same model settings as its run"
        )
    return params


def latent_parts(config, workdir, source, num_classes, optimizer, k_init, k_sample):
    """Text-conditional latent diffusion on a frozen autoencoder trained by this program:
    cached latents and token ids, the U-Net and text encoder, and a txt2img sample function."""
    if "caption" not in source[0]:
        raise ValueError(
            f"task='latent_diffusion' trains on captions; data set {config.data.name!r} has "
            "none (the embedded 'shapes' has)"
        )
    path = config.latent.get("pretrained") or None
    if path:  # fine-tune converted weights: U-Net trained, autoencoder and text encoder frozen
        p = models.load_pretrained_parts(config, pipelines.trained.load_any)
        vae_model, vae_params, tok, text, unet = (p.autoencoder, p.params["autoencoder"],
                                                  p.tokenizer, p.text_encoder, p.unet)  # fmt: skip
        scaling, cache_key = p.autoencoder.scaling_factor, f"pretrained:{path}"
        schedule, frozen = p.scheduler.make_schedule(), True
        sampler = p.scheduler.options_for(config.sample.method)
        if p.is_sdxl:  # both encoders, frozen: captions, pooled embeddings and ids cached
            text = pipelines.SDXLTextEncoders(p.text_encoder, p.text_encoder_2)
    else:
        vae_workdir = pathlib.Path(config.latent.autoencoder_workdir).absolute()
        vae_model, vae_params, info = autoencoder.load(vae_workdir)
        scaling = info["scaling_factor"]
        cache_key = f"{config.latent.autoencoder_workdir}@{info['step']}"
        tok = tokenizer.CLIPTokenizer.default(max_length=config.text.max_length)
        text = models.make_text_encoder(config)
        schedule, frozen = (
            models.make_schedule(config.diffusion),
            config.text.get("frozen", False),
        )
        sampler = {"prediction_type": config.diffusion.prediction_type}
    cache_key = latent_cache_key(config, cache_key)
    cache = latent_cache(workdir, source, vae_model, vae_params, cache_key, tok,
                         config.data.image_size)  # fmt: skip
    latent_shape = cache["latent_mean"].shape[1:]
    kind = config.latent.get("conditioning") or None
    if kind and path:
        raise ValueError("latent.conditioning trains a new U-Net; it cannot fine-tune "
                         "latent.pretrained weights yet")  # fmt: skip
    if kind:
        cache = conditioning_cache(workdir, kind, source, cache, vae_model, vae_params, scaling,
                                   cache_key, config)  # fmt: skip
    lora, base, net, model = None, (), None, None
    control = (config.get("controlnet") or {}).get("conditioning") or None
    if control:  # a ControlNet on the frozen pretrained model: its control images cached
        if not path:
            raise ValueError(
                "controlnet.conditioning trains a ControlNet for pretrained "
                "weights: set latent.pretrained (a model or a train.py workdir)"
            )
        cache = cache | control_cache(config, source, control, tok)
        base = ({k: v for k, v in p.params.items() if k != "autoencoder"},)
        net = make_controlnet(config, unet, vae_model)
        model = net

        def init(unet_params):
            args, kwargs = net.example_inputs()
            params = net.init(k_init, *args, **kwargs)["params"]
            return training.init_state(init_from_unet(params, unet_params), optimizer)

        init_args = (p.params["unet"],)
    elif path and config.get("lora", {}).get("rank"):  # adapters on the frozen pretrained model
        base = ({k: v for k, v in p.params.items() if k != "autoencoder"},)
        lora = models.make_lora(config, base[0], k_init)
        frozen = "text_encoder" not in lora.components()  # an adapted encoder runs each step
        init, init_args = lambda f: training.init_state(f, optimizer), (adapters.as_tree(lora),)
    elif path:
        optimizer = training.freeze_text_encoder(optimizer)
        weights = {k: v for k, v in p.params.items() if k != "autoencoder"}
        init, init_args = lambda params: training.init_state(params, optimizer), (weights,)
    else:
        optimizer = training.freeze_text_encoder(optimizer) if frozen else optimizer
        unet = models.make_latent_unet(config, latent_shape[-1], text.hidden_size)
        init = training.make_latent_init(unet, text, optimizer, k_init, latent_shape=latent_shape)
        init_args = ()
    empty_ids, empty_context, empty_embeds = tok([""])[0], None, None
    sdxl = isinstance(text, pipelines.SDXLTextEncoders)
    if sdxl:
        added, empty_context, empty_embeds = caches.sdxl_text_cache(
            source, cache["ids"], empty_ids, text, p.params, p.tokenizer_2,
            config.data.image_size)  # fmt: skip
        cache = cache | added
    elif frozen:  # encode every caption once with the (unchanging) initial text encoder
        text_params = (p.params["text_encoder"] if path else
                       jax.jit(lambda k: training.init_text_encoder(text, k))(k_init))  # fmt: skip
        encode = jax.jit(lambda ids: text.apply({"params": text_params}, ids).last_hidden_state)
        cache = cache | {"context": autoencoder.in_chunks(encode, cache["ids"], 512)}
        empty_context = encode(empty_ids[None])[0]
    step = programs.latent_step(
        config, unet, text, schedule, optimizer, empty_ids=empty_ids,
        empty_context=empty_context, empty_text_embeds=empty_embeds, scaling_factor=scaling,
        kind=kind, prediction_type=sampler.get("prediction_type", "epsilon"), lora=lora,
        controlnet=net,
    )  # fmt: skip
    prompts = list(config.sample.get("prompts", ())) or sorted(set(captions(source)))
    prompts = (prompts * config.sample.num_samples)[: config.sample.num_samples]
    grid_control = None
    if control:  # the test split's control images, with their colour-only prompts
        shown = eval_images(config, config.sample.get("split", "test"), len(prompts), seed=0)
        uint8 = images_uint8(shown)
        prompts = [s.colour_caption for s in shapes.describe(uint8)]
        grid_control = shapes.CONTROL_SIGNALS[control](uint8)
    make = {None: pipelines.make_txt2img, "inpaint": pipelines.make_inpaint,
            "upscale": pipelines.make_upscale}[kind]  # fmt: skip
    generate = make(
        unet, text, vae_model, schedule, latent_shape=(len(prompts), *latent_shape),
        scaling_factor=scaling, method=config.sample.method, num_steps=config.sample.num_steps,
        **({"controlnets": (net,)} if net is not None else {}),
        **(sampler | dict(config.sample.get("options", {}))),
    )  # fmt: skip
    ids, uncond, added = tok(prompts), tok([""] * len(prompts)), {}
    if sdxl:  # the second tokenizer's ids too, and the training size's ids, no crop
        ids, uncond = (ids, p.tokenizer_2(prompts)), (uncond, p.tokenizer_2([""] * len(prompts)))
        size = (config.data.image_size,) * 2
        added = {"time_ids": pipelines.text.sdxl_time_ids(len(prompts), size, False)[0]}
    guidance = config.sample.guidance_scale
    inputs = sample_inputs(kind, config, len(prompts), vae_model.downsample_factor)

    def sample(params, *frozen):
        if lora is not None:  # the EMA factors merged into the base
            params = adapters.merge(frozen[0], [adapters.from_tree(params, lora.alpha)], [1.0])
        if net is not None:  # the EMA ControlNet on the frozen model
            controls = {"params": (params,), "images": (grid_control,), "keep": None,
                        "scales": jax.numpy.ones(1)}  # fmt: skip
            return generate(frozen[0], vae_params, ids, uncond, k_sample, guidance,
                            control=controls)  # fmt: skip
        if kind == "inpaint":  # the grid's own images, boxes repainted
            return generate(params, vae_params, *inputs, ids, uncond, k_sample, guidance)
        if kind == "upscale":  # the grid's images, downsampled, upscaled
            return generate(params, vae_params, inputs, ids, uncond, k_sample, guidance)
        return generate(params, vae_params, ids, uncond, k_sample, guidance, **added)

    batches = data.ArrayBatches(cache, batch_size=config.data.batch_size, seed=config.seed,
                                process_index=jax.process_index(),
                                process_count=jax.process_count())  # fmt: skip
    return Parts(init, step, model or unet, batches, sample, init_args, tuple(prompts), base)


def make_controlnet(config: ConfigDict, unet, vae_model) -> ControlNetModel:
    """`config.controlnet`'s ControlNet of the U-Net's shape: its conditioning embedding's
    widths (`embedding`, e.g. "16,32,64") take the control image down to the latents' grid."""
    widths = tuple(int(w) for w in str(config.controlnet.get("embedding", "16,32,96,256"))
                   .split(",") if w.strip())  # fmt: skip
    f = vae_model.downsample_factor
    if 2 ** (len(widths) - 1) != f:
        raise ValueError(f"controlnet.embedding={config.controlnet.embedding!r}: "
                         f"{len(widths)} widths take the control image down "
                         f"{2 ** (len(widths) - 1)}x, the autoencoder {f}x; give "
                         f"{int(np.log2(f)) + 1} widths")  # fmt: skip
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths)


def images_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] as uint8."""
    return np.round((np.asarray(x) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def control_cache(config: ConfigDict, source, kind: str, tok) -> dict:
    """A ControlNet run's additions to the batches: "control" (uint8 control images of every
    training image, `shapes.CONTROL_SIGNALS[kind]`) and, with `controlnet.prompt` "colour",
    "ids" of the colour-only captions ("a red shape": shape and position withheld)."""
    if kind not in shapes.CONTROL_SIGNALS:
        raise ValueError(f"controlnet.conditioning={kind!r}; expected one of "
                         f"{sorted(shapes.CONTROL_SIGNALS)}")  # fmt: skip
    if config.data.name != "shapes":
        raise ValueError("controlnet.conditioning draws the control images from the embedded "
                         f"shapes; data.name is {config.data.name!r}")  # fmt: skip
    size = config.data.image_size
    images = images_uint8(np.stack([data.preprocess(source[i]["image"], image_size=size)
                                    for i in range(len(source))]))  # fmt: skip
    out = {"control": np.round(shapes.CONTROL_SIGNALS[kind](images) * 255).astype(np.uint8)}
    if config.controlnet.get("prompt", "colour") == "colour":
        out["ids"] = np.asarray(tok([shapes.parse(c).colour_caption for c in captions(source)]))
    return out


def sample_inputs(kind, config: ConfigDict, n: int, f: int):
    """The images a sample grid of an image-conditioned model starts from: n images of the
    test split (boxes masked, or downsampled by the autoencoder's factor f to the latent
    grid)."""
    if kind is None:
        return None
    x = eval_images(config, config.sample.get("split", "test"), n, seed=0)
    if kind == "upscale":
        return superres.downsample(x, f)
    masks = inpainting.random_masks(np.random.default_rng(0), len(x), x.shape[1], kind="box",
                                    min_cover=0.3, max_cover=0.5)  # fmt: skip
    return x, masks


def eval_images(config: ConfigDict, split: str, count: int, seed: int) -> np.ndarray:
    """`count` images of `split` (all if fewer), drawn without replacement, in [-1, 1]."""
    source = data.load_source(config.data.name, split=split,
                              data_dir=config.data.data_dir or None)  # fmt: skip
    rng = np.random.default_rng(seed)
    index = np.sort(rng.permutation(len(source))[:count])
    size = config.data.image_size
    return np.stack([data.preprocess(source[int(i)]["image"], image_size=size) for i in index])
