"""A latent inpainting model of the embedded 32x32 shapes, trained for it (offline, CPU).

    python train.py --config configs/vae_shapes.py --workdir outputs/vae_shapes   # first
    python train.py --config configs/inpaint_shapes.py --workdir outputs/inpaint_shapes

`ldm_shapes` with Stable Diffusion's inpainting layout: the U-Net takes the noisy latents, the
mask at latent size and the latents of the masked image (4 + 1 + 4 channels), and the caption.
Each training image comes with `latent.mask_variants` random masks (boxes and strokes covering
10-60% of the image, 10% of them everything), drawn once with the seed and encoded with the
frozen autoencoder into the workdir's cache. The final grid repaints boxes of test images.
`python sample.py --workdir outputs/inpaint_shapes --init_image I.png --mask M.png` inpaints.
"""

from configs import ldm_shapes


def get_config(arg: str | None = None):
    c = ldm_shapes.get_config(arg)
    c.latent.conditioning = "inpaint"
    c.latent.mask_variants = 4
    return c
