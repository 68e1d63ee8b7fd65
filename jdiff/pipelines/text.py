"""Prompts' token ids -> the `Conditioning` a latent U-Net reads: one CLIP text encoder (Stable
Diffusion 1.x/2.x: `context` is its last hidden state) or SDXL's two (`SDXLTextEncoders`).

    cond = encode_prompts(text_encoder, params, ids)           # Conditioning(context=...)
    cond = encode_prompts(SDXLTextEncoders(te, te2), params, (ids, ids_2))
    # Conditioning(context=[N, L, 768 + 1280], text_embeds=[N, 1280])
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jdiff.conditioning import Conditioning
from jdiff.nn.text_encoder import CLIPTextModel


@dataclasses.dataclass(frozen=True)
class SDXLTextEncoders:
    """SDXL's prompt encoders (Podell et al. 2023, §2.1): the context is the penultimate
    layer's hidden states of each encoder as they are (no final LayerNorm), concatenated on
    the feature axis; `text_embeds` is the second encoder's projected pooled output. The base
    model has both (CLIP ViT-L, then OpenCLIP ViT-bigG with its projection); the refiner only
    the second (`text_encoder` None). Parameters: params["text_encoder"], ["text_encoder_2"].
    `clip_skip` takes that many layers earlier, as diffusers' `clip_skip` (the pooled output
    stays the last layer's)."""

    text_encoder: CLIPTextModel | None
    text_encoder_2: CLIPTextModel
    clip_skip: int = 0

    def __post_init__(self):
        if self.text_encoder_2.projection_dim is None:
            raise ValueError("SDXL's text_encoder_2 needs its projection (projection_dim: "
                             "transformers' CLIPTextModelWithProjection)")  # fmt: skip

    @property
    def encoders(self) -> tuple[tuple[str, CLIPTextModel], ...]:
        """(params key, encoder) of the encoders present, in the context's order."""
        pairs = (("text_encoder", self.text_encoder), ("text_encoder_2", self.text_encoder_2))
        return tuple((name, m) for name, m in pairs if m is not None)

    @property
    def context_dim(self) -> int:
        return sum(m.hidden_size for _, m in self.encoders)

    def encode(self, params, ids) -> Conditioning:
        """ids: one [N, L] int array per encoder present (its own tokenizer's)."""
        ids = tuple(ids)
        if len(ids) != len(self.encoders):
            raise ValueError(f"{len(ids)} token arrays for {len(self.encoders)} text encoders")
        states, pooled = [], None
        for (name, model), tokens in zip(self.encoders, ids, strict=True):
            layer = model.num_hidden_layers - 1 - self.clip_skip
            out = model.apply({"params": params[name]}, tokens, hidden_layer=layer)
            states.append(out.hidden_state)
            pooled = out.text_embeds  # the last encoder's: the projected one
        return Conditioning(context=jnp.concatenate(states, axis=-1), text_embeds=pooled)


TextEncoders = CLIPTextModel | SDXLTextEncoders


def encode_prompts(text_encoder: TextEncoders, params, ids) -> Conditioning:
    """The text fields of the U-Net's conditioning for prompts' token ids (an [N, L] array for
    one encoder, a tuple of them for SDXL's); params holds "text_encoder" (and
    "text_encoder_2")."""
    if isinstance(text_encoder, SDXLTextEncoders):
        return text_encoder.encode(params, ids)
    out = text_encoder.apply({"params": params["text_encoder"]}, ids)
    return Conditioning(context=out.last_hidden_state)


def zeroed(cond: Conditioning) -> Conditioning:
    """`cond` with its text fields zeroed: SDXL's unconditional input for an absent negative
    prompt (`force_zeros_for_empty_prompt`)."""
    return cond.replace(context=jnp.zeros_like(cond.context),
                        text_embeds=jax.tree.map(jnp.zeros_like, cond.text_embeds))  # fmt: skip
