"""Fine-tune pretrained Stable Diffusion weights on the embedded captioned shapes.

    python train.py --config configs/sd_finetune.py --workdir outputs/sd_finetune \
        --config.latent.pretrained=/path/to/stable-diffusion-v1-5

`latent.pretrained` is anything `jdiff.interop.load_pretrained` reads (a diffusers-format
directory, an original single-file .safetensors, a `python -m jdiff.interop` output). Only the
U-Net trains, in latent space: the autoencoder and the text encoder stay frozen, the shapes'
latents and caption encodings are computed once and cached in the workdir, and the noise
schedule, prediction type and sampler settings are the pretrained scheduler's. Images are
upscaled to 256x256 (32x32 latents for SD's f=8 autoencoder). Samples use the scheduler's
sampler settings (DDIM, 50 steps) at guidance 7.5.

With `--config.lora.rank=R` (> 0) it trains LoRA adapters instead (the whole model frozen):
`lora.alpha` (default R), the U-Net's `lora.targets` (its attention projections) and, with
`lora.text_encoder=True`, the text encoder's `lora.text_targets` (SD 1.x / 2.x); only the
adapters are differentiated, kept in optimizer state and checkpointed, and the trained one is
written in the diffusers format (`workdir/lora/pytorch_lora_weights.safetensors`).

With `--config.controlnet.conditioning=silhouette` (or `outline`) it trains a ControlNet on
the frozen model instead (its encoder copied from the U-Net, its zero convolutions at zero):
the control images are drawn from each training image, the prompts keep only the colour
(`controlnet.prompt`), and the ControlNet is written as a diffusers directory
(`workdir/controlnet`). `configs/controlnet_shapes.py` is that run on `ldm_shapes`.

Real SD sizes need an accelerator (bfloat16, rematerialised blocks); `:tiny` is the few-step
variant the tests run on a small random-weight directory.
"""

from configs import ldm_shapes


def get_config(arg: str | None = None):
    c = ldm_shapes.get_config()
    c.latent = {"pretrained": "", "autoencoder_workdir": ""}
    c.lora = {"rank": 0, "alpha": 0.0, "targets": "to_q,to_k,to_v,to_out_0",
              "text_encoder": False, "text_targets": "q_proj,k_proj,v_proj,out_proj"}  # fmt: skip
    # conditioning "silhouette" / "outline": train a ControlNet on the shapes' control images
    c.controlnet = {"conditioning": "", "embedding": "16,32,96,256", "prompt": "colour"}
    c.data.update(image_size=256, batch_size=8)
    c.model.update(dtype="bfloat16", remat=True)  # the U-Net's and text encoder's compute
    c.train.update(num_steps=2000, checkpoint_every=500, caption_dropout=0.1)
    c.optim.update(learning_rate=1e-5, warmup_steps=100, cosine_decay_steps=0, grad_clip=1.0)
    c.sample.update(method="ddim", num_steps=50, num_samples=8, guidance_scale=7.5, options={})
    if arg == "tiny":
        c.data.update(image_size=16, batch_size=4, split="train[:64]")
        c.model.update(dtype="float32", remat=False)
        c.train.update(num_steps=2, log_every=1, checkpoint_every=2)
        c.optim.update(learning_rate=1e-3, warmup_steps=1)
        c.sample.update(num_steps=2, num_samples=2)
    elif arg:
        raise ValueError(
            f"configs/sd_finetune.py: unknown variant {arg!r}; expected 'tiny' or none"
        )
    return c
