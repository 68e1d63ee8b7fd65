"""A ControlNet for the `ldm_shapes` model, on the embedded shapes, on a CPU.

    python train.py --config configs/controlnet_shapes.py --workdir outputs/controlnet_shapes
    python benchmarks/eval_adapters.py controlnet --base outputs/ldm_shapes \
        --controlnet outputs/controlnet_shapes/controlnet

The text-to-image model `ldm_shapes` trained (`latent.pretrained` is its workdir) stays frozen
(U-Net, text encoder, autoencoder); a ControlNet of its U-Net's shape (the encoder copied, the
zero convolutions at zero; Zhang et al. 2023) learns to read each training image's silhouette,
white on black, while the prompt keeps only the colour ("a red shape"): the shape and the
position must come from the control image. The README's "ControlNet and LoRA on the shapes"
has the adherence it reaches. `:tiny` is the few-step variant.
"""

from configs import ldm_shapes


def get_config(arg: str | None = None):
    c = ldm_shapes.get_config()
    c.latent = {"pretrained": "outputs/ldm_shapes", "autoencoder_workdir": ""}
    # 32x32 images, 8x8 latents: three widths take the control image down 4x
    c.controlnet = {"conditioning": "silhouette", "embedding": "16,32,64", "prompt": "colour"}
    c.train.update(num_steps=2000, checkpoint_every=500, caption_dropout=0.1)
    c.optim.update(learning_rate=5e-4, warmup_steps=100, cosine_decay_steps=2000)
    c.sample.update(num_samples=48, guidance_scale=3.0)
    c.sample.prompts = ()  # the grid: the test split's silhouettes and colours
    if arg == "tiny":
        c.data.batch_size = 8
        c.train.update(num_steps=2, log_every=1, checkpoint_every=2)
        c.optim.update(warmup_steps=1, cosine_decay_steps=0)
        c.sample.update(num_steps=2, num_samples=4)
    elif arg:
        raise ValueError(f"configs/controlnet_shapes.py: unknown variant {arg!r}")
    return c
