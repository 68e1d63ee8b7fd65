"""A latent 4x super-resolution model of the embedded shapes: 8x8 -> 32x32 (offline, CPU).

    python train.py --config configs/vae_shapes.py --workdir outputs/vae_shapes   # first
    python train.py --config configs/sr_shapes.py --workdir outputs/sr_shapes

`ldm_shapes` with SD x4 upscaler's design: the U-Net takes the noisy 8x8x4 latents of the
32x32 image and the 8x8 low-resolution image (box-downsampled, 3 more channels), noise-
augmented on a linear schedule to a random level 0..350 that is its class label (drawn as
351·u³, so 39% of them are <= 20, the level sampling uses; SD draws them uniformly); the
caption is dropped half of the time, so the model also super-resolves without one (the empty
prompt). Min-SNR-γ 5 weighting puts the loss on the noisy steps, where the low-resolution
input decides the image. 4,000 steps, ~40 minutes on 2 CPU cores. (2,000 steps with uniform
levels and no weighting barely used the input: consistency 21.5 dB; see the README.)
`python sample.py --workdir outputs/sr_shapes --upscale LOW_RES.png` upscales an image.
"""

from configs import ldm_shapes


def get_config(arg: str | None = None):
    c = ldm_shapes.get_config(arg)
    c.latent.conditioning = "upscale"
    c.train.caption_dropout = 0.5
    c.sample.guidance_scale = 1.0
    c.train.noise_level_power = 3.0  # 39% of levels <= 20 (uniform: 6%)
    c.diffusion.snr_gamma = 5.0  # weight the noisy steps, where the low-res input decides
    if arg != "tiny":
        c.train.num_steps = 4000
        c.optim.cosine_decay_steps = 4000
    return c
