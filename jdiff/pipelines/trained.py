"""A `train.py` workdir's latent text-to-image model as a `LatentDiffusion` (its config
rebuilds the networks; the checkpoint gives the weights)."""

from __future__ import annotations

import pathlib
from typing import Any

from jdiff import interop
from jdiff.pipelines.latent_diffusion import LatentDiffusion


def load_latent_diffusion(
    workdir, step: int | None = None, *, ema: bool = True, autoencoder_workdir=None
) -> tuple[LatentDiffusion, dict, Any]:
    """(LatentDiffusion, params, config) of a `task = "latent_diffusion"` train.py workdir,
    rebuilt from it alone (its config names the autoencoder's workdir).

    `autoencoder_workdir` swaps in another autoencoder, typically one whose decoder was
    fine-tuned with the encoder frozen (`configs/vae_shapes_decoder.py`, diffusers' `vae=`):
    its encoder must equal the one the model was trained on (checked when that one is still
    there) and its latent shape and scaling factor are the model's."""
    from jdiff import adapters, models, runs
    from jdiff import autoencoder as autoencoders
    from jdiff.tokenizer import CLIPTokenizer

    workdir = pathlib.Path(workdir)
    run = runs.restore(workdir, step, task="latent_diffusion")
    config, tuned = run.config, run.weights(ema)
    if (config.get("controlnet") or {}).get("conditioning"):
        raise ValueError(f"{workdir} trained a ControlNet (in {workdir / 'controlnet'}): sample "
                         f"with sample.py --pretrained {config.latent.pretrained} --controlnet "
                         f"{workdir / 'controlnet'} --control_image IMAGE")  # fmt: skip
    if config.latent.get("pretrained"):  # fine-tuned converted weights: only the U-Net trained
        if autoencoder_workdir:
            raise ValueError(f"{workdir} fine-tunes converted weights, which bring their own "
                             "autoencoder: autoencoder_workdir applies to models trained on a "
                             "train.py autoencoder")  # fmt: skip
        p = models.load_pretrained_parts(config, load_any)
        model = LatentDiffusion.from_pretrained(p)
        if config.get("lora", {}).get("rank"):  # a LoRA run: its adapter on the frozen base
            lora = adapters.from_tree(tuned, models.lora_alpha(config))
            return model, adapters.merge(p.params, [lora], [1.0]), config
        return model, {**tuned, "autoencoder": p.params["autoencoder"]}, config
    vae_model, vae_params, info = autoencoders.load(
        autoencoder_workdir or config.latent.autoencoder_workdir
    )
    if autoencoder_workdir and pathlib.Path(config.latent.autoencoder_workdir).exists():
        _, own_params, own = autoencoders.load(config.latent.autoencoder_workdir)
        autoencoders.check_same_encoder(vae_params, own_params, name=str(autoencoder_workdir))
        info = info | {"scaling_factor": own["scaling_factor"]}  # the one the model learnt on
    text = models.make_text_encoder(config)
    unet = models.make_latent_unet(config, info["latent_shape"][-1], text.hidden_size)
    model = LatentDiffusion(
        unet, text, vae_model, models.make_schedule(config.diffusion),
        CLIPTokenizer.default(max_length=config.text.max_length), info["scaling_factor"],
        image_size=config.data.image_size,
        sampler_options=(("prediction_type", config.diffusion.prediction_type),),
    )  # fmt: skip
    return model, {**tuned, "autoencoder": vae_params}, config


def is_workdir(path) -> bool:
    """Whether `path` is a train.py workdir (its config.json and checkpoints/)."""
    path = pathlib.Path(path)
    return (path / "config.json").is_file() and (path / "checkpoints").is_dir()


def pretrained_from_workdir(workdir, step: int | None = None, *, ema: bool = True):
    """A train.py latent text-to-image workdir as `interop.Pretrained` (its networks, weights,
    tokenizer and a DDIM scheduler on its noise schedule): what `latent.pretrained` and
    `sample.py --pretrained` take, so a model trained here is fine-tuned, given LoRAs or
    ControlNets like a downloaded one."""
    model, params, config = load_latent_diffusion(workdir, step, ema=ema)
    d = config.diffusion
    beta = {"cosine": "squaredcos_cap_v2"}.get(d.schedule, d.schedule)
    scheduler = {"_class_name": "DDIMScheduler", "num_train_timesteps": d.num_timesteps,
                 "beta_schedule": beta, "prediction_type": d.prediction_type,
                 "clip_sample": False, "set_alpha_to_one": True, "steps_offset": 0,
                 "timestep_spacing": "leading"}  # fmt: skip
    if d.schedule != "cosine":
        scheduler |= {"beta_start": d.beta_start, "beta_end": d.beta_end}
    f = model.autoencoder.downsample_factor
    return interop.Pretrained(
        model.unet, params, interop.scheduler_from_diffusers(scheduler),
        config.data.image_size // f, text_encoder=model.text_encoder,
        autoencoder=model.autoencoder, tokenizer=model.tokenizer,
        source=str(pathlib.Path(workdir)),
    )  # fmt: skip


def load_any(path):
    """`interop.load_pretrained(path)`, or a train.py workdir's model
    (`pretrained_from_workdir`)."""
    return pretrained_from_workdir(path) if is_workdir(path) else interop.load_pretrained(path)
