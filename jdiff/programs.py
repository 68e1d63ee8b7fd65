"""Each task's pure train step, made from its config: the one recipe that train.py runs and
`jdiff.aot` compiles for a TPU topology."""

from __future__ import annotations

from typing import Any

from jdiff import superres, training


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
                scaling_factor: float, prediction_type: str, kind: str | None):  # fmt: skip
    """Text-conditional latent diffusion's step (`training.make_latent_train_step`); `kind`
    is the image conditioning by concatenation (None, "inpaint" or "upscale": its input
    noise-augmented as SD's upscaler's)."""
    return training.make_latent_train_step(
        unet, text, schedule, optimizer, empty_ids=empty_ids, empty_context=empty_context,
        scaling_factor=scaling_factor, caption_dropout=config.train.caption_dropout,
        prediction_type=prediction_type, snr_gamma=config.diffusion.snr_gamma or None,
        noise_augmentation=superres.low_res_schedule() if kind == "upscale" else None,
        max_noise_level=superres.MAX_NOISE_LEVEL,
        noise_level_power=config.train.get("noise_level_power", 1.0), **step_options(config),
    )  # fmt: skip
