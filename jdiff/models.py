"""Networks and schedules from a config: the U-Net, the latent U-Net with its image
conditioning, the text encoder, the autoencoder, the noise schedule, and pretrained parts for
fine-tuning. The one place that turns `config.model` / `config.text` / `config.diffusion` into
modules (`train.py`, `jdiff.runs` and the pipelines all build through it)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jdiff import schedules, superres
from jdiff.nn import VARIANTS, UNet, text_encoder, vae
from jdiff.nn.text_encoder import CLIPTextModel
from jdiff.nn.vae import AutoencoderKL
from jdiff.schedules import Schedule


def make_schedule(diffusion: Any) -> Schedule:
    """The noise schedule of `config.diffusion` (its beta_start/beta_end unused by "cosine")."""
    betas = {}
    if diffusion.schedule != "cosine":
        betas = {"beta_start": diffusion.get("beta_start"), "beta_end": diffusion.get("beta_end")}
    return schedules.get_schedule(diffusion.schedule, diffusion.num_timesteps, **betas)


def make_model(
    config: Any,
    num_classes: int | None = None,
    *,
    channels: int | None = None,
    context_dim: int | None = None,
    extra_channels: int = 0,
    class_embeds: int | None = None,
) -> UNet:
    """The U-Net of `config.model` (a `VARIANTS` name plus field overrides) for the data's
    channels (or `channels`, e.g. an autoencoder's latent channels): 2 x channels out for a
    learned variance, a null class added to `num_classes`, cross-attention on a `context` of
    width `context_dim` (a text encoder's), `extra_channels` more input channels (image
    conditioning by concatenation: masks, masked-image latents, low-resolution images) and
    `class_embeds` class embeddings (a super-resolution model's noise levels)."""
    model = config.model
    if model.variant not in VARIANTS:
        raise ValueError(f"model.variant={model.variant!r}; expected one of {sorted(VARIANTS)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in model.overrides.items()}
    fields = {**VARIANTS[model.variant], **overrides}
    channels = channels or config.data.channels
    learned = config.diffusion.loss == "hybrid"
    fields.update(in_channels=channels + extra_channels,
                  out_channels=channels * (2 if learned else 1))  # fmt: skip
    if context_dim is not None:
        fields["cross_attention_dim"] = context_dim
    if model.get("class_conditional", False):
        if num_classes is None:
            raise ValueError("model.class_conditional needs a data set with class labels")
        fields["num_class_embeds"] = num_classes + 1  # the last is the null class
    if class_embeds is not None:
        fields["num_class_embeds"] = class_embeds
    return UNet(
        **fields,
        dtype=_dtype(model.dtype),
        remat=model.remat,
        attention_implementation=attention_implementation(config),
    )


def configured_unet(net: UNet, config: Any) -> UNet:
    """A stored architecture's U-Net with the config's compute dtype, `remat` and attention."""
    return net.clone(dtype=_dtype(config.model.dtype), remat=config.model.remat,
                     attention_implementation=attention_implementation(config))  # fmt: skip


def attention_implementation(config: Any) -> str | None:
    """`config.model.attention_implementation` as `nn.attention` takes it ("auto" -> None)."""
    name = config.model.get("attention_implementation", "auto")
    return None if name == "auto" else name


CONDITIONINGS = ("inpaint", "upscale")


def make_latent_unet(config: Any, channels: int, context_dim: int) -> UNet:
    """The U-Net of a latent text-conditional config, with the input channels and class
    embeddings its `latent.conditioning` needs: "inpaint" (mask + masked-image latents, SD's
    9-channel layout at c = 4), "upscale" (the low-resolution RGB image + 351 noise levels,
    SD x4's design), or none."""
    kind = config.latent.get("conditioning") or None
    if kind is not None and kind not in CONDITIONINGS:
        raise ValueError(f"latent.conditioning={kind!r}; expected one of {CONDITIONINGS} or None")
    extra = {"inpaint": channels + 1, "upscale": 3}.get(kind, 0)
    levels = superres.MAX_NOISE_LEVEL + 1 if kind == "upscale" else None
    return make_model(config, channels=channels, context_dim=context_dim, extra_channels=extra,
                      class_embeds=levels)  # fmt: skip


def make_text_encoder(config: Any) -> CLIPTextModel:
    """The text encoder of `config.text` (a `jdiff.nn.text_encoder.VARIANTS` name plus field
    overrides; positions = the tokenizer's `max_length`), in `config.model.dtype`."""
    text = config.text
    if text.variant not in text_encoder.VARIANTS:
        raise ValueError(
            f"text.variant={text.variant!r}; expected one of {sorted(text_encoder.VARIANTS)}"
        )
    fields = {**text_encoder.VARIANTS[text.variant], **dict(text.overrides.items())}
    fields["max_position_embeddings"] = text.max_length
    return CLIPTextModel(**fields, dtype=_dtype(config.model.dtype))


def load_pretrained_parts(config: Any, load: Any = None):
    """`load(config.latent.pretrained)` (default `jdiff.interop.load_pretrained`; a train.py
    workdir: `pipelines.trained.load_any`) for fine-tuning: the U-Net in `config.model.dtype`
    (and `remat`), the text encoders in it too, the autoencoder float32. An SDXL refiner (its
    text encoder the second alone) is refused: fine-tune the base."""
    import dataclasses

    from jdiff import interop

    p = (load or interop.load_pretrained)(config.latent.pretrained)
    if not p.is_latent or p.text_encoder is None:
        what = ("an SDXL refiner: jdiff fine-tunes SDXL's base" if p.text_encoder_2 is not None
                else "not a latent text-to-image model (Stable Diffusion)")  # fmt: skip
        raise ValueError(f"latent.pretrained={config.latent.pretrained!r} is {what}")
    dtype = _dtype(config.model.dtype)
    second = p.text_encoder_2 and p.text_encoder_2.clone(dtype=dtype)
    return dataclasses.replace(p, unet=configured_unet(p.unet, config),
                               text_encoder=p.text_encoder.clone(dtype=dtype),
                               text_encoder_2=second)  # fmt: skip


def _names(value) -> tuple[str, ...]:
    """A list of module names, or one comma-separated string of them."""
    items = value.split(",") if isinstance(value, str) else value
    return tuple(n.strip() for n in items if n.strip())


def make_lora(config: Any, params: Any, key: Any) -> Any:
    """`config.lora`'s adapter for the pretrained `params` ({"unet", "text_encoder"(, ...)}):
    rank `lora.rank`, `lora.alpha` (0: the rank), on the U-Net's `lora.targets` and, with
    `lora.text_encoder`, the text encoder's `lora.text_targets` (module names, as the
    parameters spell them: "to_q", "to_out_0"). Freshly initialised (`adapters.init`); a
    run restores its trained factors over it."""
    from jdiff import adapters

    lora = config.lora
    components = {"unet": _names(lora.get("targets", adapters.UNET_TARGETS))}
    if lora.get("text_encoder"):
        if "text_encoder_2" in params:
            raise ValueError(
                "lora.text_encoder=True: LoRA training on SDXL's text encoders "
                "is not supported yet; train the U-Net's (lora.text_encoder=False)"
            )
        components["text_encoder"] = _names(lora.get("text_targets", adapters.TEXT_TARGETS))
    return adapters.init(key, params, rank=lora.rank, alpha=lora.get("alpha") or None,
                         components=components)  # fmt: skip


def lora_alpha(config: Any) -> float:
    """The alpha of a LoRA run's every layer (`lora.alpha`, or its rank)."""
    return float(config.lora.get("alpha") or config.lora.rank)


def make_autoencoder(config: Any) -> AutoencoderKL:
    """The autoencoder of `config.model` (a `jdiff.nn.vae.VARIANTS` name plus field overrides)
    for the data's channels."""
    model = config.model
    if model.variant not in vae.VARIANTS:
        raise ValueError(f"model.variant={model.variant!r}; expected one of {sorted(vae.VARIANTS)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in model.overrides.items()}
    fields = {**vae.VARIANTS[model.variant], **overrides}
    channels = config.data.channels
    fields.update(in_channels=channels, out_channels=channels)
    return AutoencoderKL(**fields, dtype=_dtype(model.dtype))


def _dtype(name: str):
    dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if name not in dtypes:
        raise ValueError(f"model.dtype={name!r}; expected one of {sorted(dtypes)}")
    return dtypes[name]
