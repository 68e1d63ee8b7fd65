"""A `train.py` workdir's latent text-to-image model as a `LatentDiffusion` (its config
rebuilds the networks; the checkpoint gives the weights)."""

from __future__ import annotations

from typing import Any

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
    import pathlib

    from jdiff import adapters, models, runs
    from jdiff import autoencoder as autoencoders
    from jdiff.tokenizer import CLIPTokenizer

    workdir = pathlib.Path(workdir)
    run = runs.restore(workdir, step, task="latent_diffusion")
    config, tuned = run.config, run.weights(ema)
    if config.latent.get("pretrained"):  # fine-tuned converted weights: only the U-Net trained
        if autoencoder_workdir:
            raise ValueError(f"{workdir} fine-tunes converted weights, which bring their own "
                             "autoencoder: autoencoder_workdir applies to models trained on a "
                             "train.py autoencoder")  # fmt: skip
        p = models.load_pretrained_parts(config)
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
