"""A LoRA that teaches the `ldm_shapes` model the combinations it never saw, on a CPU.

    python train.py --config configs/lora_shapes.py --workdir outputs/lora_shapes
    python sample.py --workdir outputs/lora_shapes --num_samples 528 --guidance_scale 3
    python -m jdiff.evaluation outputs/lora_shapes/samples/txt2img_ddim50_eta1_cfg3_seed0.npz

`ldm_shapes` (`latent.pretrained` is its workdir) is trained on 36 of the 48 colour / shape /
position combinations; this run trains rank-16 adapters on its U-Net's attention projections
and its text encoder's, on the 12 held-out combinations' renders (the `held_out` split) with
the whole training split beside them, the model itself frozen. The adapter is written in the
diffusers format (`outputs/lora_shapes/lora/`); `sample.py --workdir` merges it, and
`sample.py --pretrained outputs/ldm_shapes --lora FILE` reads the file. The README's
"ControlNet and LoRA on the shapes" has its adherence beside the model's own.
"""

from configs import ldm_shapes


def get_config(arg: str | None = None):
    c = ldm_shapes.get_config()
    c.latent = {"pretrained": "outputs/ldm_shapes", "autoencoder_workdir": ""}
    c.data.split = "held_out+train"
    c.lora = {"rank": 16, "alpha": 16.0, "targets": "to_q,to_k,to_v,to_out_0",
              "text_encoder": True, "text_targets": "q_proj,k_proj,v_proj,out_proj"}  # fmt: skip
    c.train.update(num_steps=4000, checkpoint_every=500)
    c.optim.update(learning_rate=1e-3, warmup_steps=100, cosine_decay_steps=4000)
    if arg == "tiny":
        c.data.batch_size = 8
        c.train.update(num_steps=2, log_every=1, checkpoint_every=2)
        c.optim.update(warmup_steps=1, cosine_decay_steps=0)
        c.sample.update(num_steps=2, num_samples=4)
    elif arg:
        raise ValueError(f"configs/lora_shapes.py: unknown variant {arg!r}")
    return c
