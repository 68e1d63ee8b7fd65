"""The autoencoder of latent diffusion on the embedded 32x32 shapes, offline, on a CPU.

    python train.py --config configs/vae_shapes.py --workdir outputs/vae_shapes

An AutoencoderKL with f = 4 (channels 16/32/64, one residual block per encoder level, attention
in the middle): 32x32x3 images <-> 8x8x4 latents. Loss: L1 reconstruction + 1e-6 KL (LDM's
weight, per element); AdamW 3e-3, cosine decay, batch 16, 1,500 steps (5.5 steps/s). It ends by
writing held-out images over their reconstructions to outputs/vae_shapes/samples/ and by
measuring, with the EMA weights, the reconstruction PSNR on the 720 test images and the latent
scaling factor (1/std of z on 2,048 training images), both stored in
outputs/vae_shapes/autoencoder.json for the latent diffusion model. Measured on 2 CPU cores: 5
minutes in all, held-out PSNR 29.9 dB (target >= 29 dB), scaling factor 0.256; see the README
("Latent diffusion"). `:tiny` is the few-step variant the tests run.
"""

from configs import default


def get_config(arg: str | None = None):
    c = default.get_config()
    c.task = "autoencoder"
    del c.diffusion, c.sample  # diffusion settings have no meaning here
    c.data.update(name="shapes", image_size=32, channels=3, random_flip=False, batch_size=16)
    c.model.variant = "tiny"  # a jdiff.nn.vae.VARIANTS entry, then field overrides
    c.model.overrides = {
        "block_out_channels": (16, 32, 64),  # f = 4
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": 4,
    }
    del c.model.class_conditional, c.model.attention_implementation  # the U-Net's
    c.autoencoder = {
        "reconstruction": "l1",  # or "l2"
        "kl_weight": 1e-6,  # on KL / (H W C), the reconstruction error's scale
        "eval_split": "test",  # held-out PSNR is measured here
        "eval_images": 720,
        "scaling_images": 2048,  # training images whose latents give 1/std(z)
    }
    c.optim.update(learning_rate=3e-3, warmup_steps=100, cosine_decay_steps=1500)
    c.train.update(num_steps=1500, log_every=100, checkpoint_every=500, ema_max_decay=0.999)
    if arg == "tiny":
        c.data.batch_size = 4
        c.model.overrides = {"block_out_channels": (8, 8), "norm_num_groups": 4}
        c.autoencoder.update(eval_images=10, scaling_images=10)
        c.optim.update(warmup_steps=1, cosine_decay_steps=0)
        c.train.update(num_steps=3, log_every=1, checkpoint_every=2)
    elif arg:
        raise ValueError(f"configs/vae_shapes.py: unknown variant {arg!r}; expected 'tiny' or none")
    return c
