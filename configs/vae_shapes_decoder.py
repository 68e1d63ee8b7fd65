"""The decoder of `vae_shapes` fine-tuned, its encoder frozen, offline, on a CPU.

    python train.py --config configs/vae_shapes.py --workdir outputs/vae_shapes          # first
    python train.py --config configs/vae_shapes_decoder.py --workdir outputs/vae_shapes_decoder

Stability's ft-EMA / ft-MSE autoencoders in small: the run starts from the EMA weights in
`autoencoder.init_from` and trains only the decoder side (post_quant_conv and the decoder), so
the encoder, the latents and their scaling factor stay exactly as they were and every latent
model trained on `vae_shapes` decodes with this one as it is (`sample.py --vae`). Why: the
first run's reconstructions round off the corners of squares and triangles, which is what the
shapes' checker misses most in text-to-image and inpainting. Same loss (L1 + 1e-6 KL, the KL
term constant here), a fresh AdamW at 1e-3 with a cosine decay, batch 32, 2,500 steps.

Measured on 2 CPU cores (with a CI run sharing them): 36 minutes, ~1.5 steps/s. Held-out PSNR
36.3 dB (vae_shapes: 30.1), and 99.4% of the reconstructions read as their originals by
`shapes.describe` (81.4%); the scaling factor measured again is vae_shapes' to the last bit.
With it, RePaint inpainting with ldm_shapes went from 93.1% to 98.5% correct (README,
"Inpainting, outpainting and super-resolution"). `:tiny` is the few-step variant the tests
run (its `init_from` is set by them).
"""

from configs import vae_shapes


def get_config(arg: str | None = None):
    c = vae_shapes.get_config("tiny" if arg == "tiny" else None)
    c.autoencoder.update(init_from="outputs/vae_shapes", trainable="decoder")
    if arg == "tiny":
        return c
    if arg:
        raise ValueError(
            f"configs/vae_shapes_decoder.py: unknown variant {arg!r}; expected 'tiny' or none"
        )
    c.data.batch_size = 32
    c.optim.update(learning_rate=1e-3, warmup_steps=100, cosine_decay_steps=2500)
    c.train.update(num_steps=2500, log_every=100, checkpoint_every=500, ema_max_decay=0.999)
    return c
