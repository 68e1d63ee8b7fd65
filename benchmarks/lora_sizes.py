"""What a LoRA run keeps against a full fine-tune: trained weights, optimizer state and the
train state a checkpoint holds, for SD 1.5 and SDXL at their real sizes (shapes only:
`jax.eval_shape` of the very init functions train.py runs; nothing is allocated).

    python benchmarks/lora_sizes.py

Full fine-tuning (train.py with `latent.pretrained`): the U-Net trains; the train state holds
the parameters of the U-Net and the frozen text encoder(s), their EMA, and AdamW's two
moments of the U-Net. LoRA (`lora.rank`): the state holds the adapter's factors, their EMA
and moments; the base model is passed to the step, never copied into the state.
"""

from __future__ import annotations

import jax
import optax

from jdiff import adapters, training
from jdiff.interop import templates
from jdiff.nn import VARIANTS, UNet
from jdiff.nn.text_encoder import VARIANTS as TEXT_VARIANTS
from jdiff.nn.text_encoder import CLIPTextModel

MODELS = {
    "SD 1.5": ("sd_v1", {"text_encoder": "clip_vit_l14"}),
    "SDXL base": ("sdxl_base", {"text_encoder": "clip_vit_l14",
                                "text_encoder_2": "openclip_vit_bigg14"}),
}  # fmt: skip


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def main() -> None:
    optimizer = optax.adamw(1e-4)
    print("| model | run | trained weights | optimizer state | train state (checkpoint) |")
    print("|---|---|---|---|---|")
    for name, (unet_variant, encoders) in MODELS.items():
        params = {"unet": templates.unet_shapes(UNet(**VARIANTS[unet_variant]))}
        for part, variant in encoders.items():
            text = CLIPTextModel(**TEXT_VARIANTS[variant])
            params[part] = templates.text_encoder_shapes(text)
        frozen = training.freeze_text_encoder(optimizer)
        full = jax.eval_shape(lambda p: training.init_state(p, frozen), params)  # noqa: B023
        rows = [("full fine-tune (U-Net)", _count(params["unet"]), full)]
        for rank in (4, 32):
            lora = jax.eval_shape(lambda p, r=rank: adapters.as_tree(
                adapters.init(jax.random.key(0), p, rank=r)), params)  # fmt: skip
            state = jax.eval_shape(lambda f: training.init_state(f, optimizer), lora)
            rows.append((f"LoRA rank {rank} (U-Net attention)", _count(lora), state))
        for run, trained, state in rows:
            print(
                f"| {name} | {run} | {trained:,} | {_bytes(state.opt_state) / 2**30:.3f} GiB "
                f"| {_bytes(state) / 2**30:.3f} GiB |"
            )


if __name__ == "__main__":
    main()
