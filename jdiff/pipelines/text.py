"""Prompts -> the `Conditioning` a latent U-Net reads. On the host: prompt lists, token ids
(`sdxl_tokens`: SDXL's two tokenizers) and SDXL's size/crop ids (`sdxl_time_ids`); compiled:
token ids -> one CLIP text encoder's states (Stable Diffusion 1.x/2.x: `context` is its last
hidden state) or SDXL's two (`SDXLTextEncoders`).

    cond = encode_prompts(text_encoder, params, ids)           # Conditioning(context=...)
    cond = encode_prompts(SDXLTextEncoders(te, te2), params, (ids, ids_2))
    # Conditioning(context=[N, L, 768 + 1280], text_embeds=[N, 1280])
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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


def prompt_lists(prompts, negative_prompts, which: str = "") -> tuple[list, list]:
    """(prompts, negative prompts) as lists of one string per prompt ("" where none)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError(f"no {which}prompts: pass a list of at least one string")
    if negative_prompts is None:
        negative_prompts = [""] * len(prompts)
    elif isinstance(negative_prompts, str):
        negative_prompts = [negative_prompts] * len(prompts)
    if len(negative_prompts) != len(prompts):
        raise ValueError(
            f"{len(negative_prompts)} {which}negative prompts for {len(prompts)} prompts; pass "
            "one per prompt, a single string, or None"
        )
    return list(prompts), list(negative_prompts)


# SDXL's call options (diffusers' names, with prompt -> prompts) and their defaults
SDXL_OPTIONS = {"prompts_2": None, "negative_prompts_2": None, "original_size": None,
                "crops_coords_top_left": (0, 0), "target_size": None, "aesthetic_score": 6.0,
                "negative_aesthetic_score": 2.5}  # fmt: skip


def sdxl_time_ids(n, size, aesthetic: bool, *, original_size=None, crops_coords_top_left=(0, 0),
                  target_size=None, aesthetic_score=6.0, negative_aesthetic_score=2.5):  # fmt: skip
    """SDXL's micro-conditioning ids [n, K] of both halves (conditional, unconditional or None
    for the same): original (height, width) and crop (top, left) in pixels, then the target
    (height, width) (base) or an aesthetic score (refiner: `aesthetic`); the sizes default to
    `size`."""
    values = []
    for name, pair in (("original_size", original_size or size),
                       ("crops_coords_top_left", crops_coords_top_left),
                       ("target_size", target_size or size)):  # fmt: skip
        pair = tuple(pair)
        if len(pair) != 2 or not all(np.isfinite(v) and v >= 0 for v in pair):
            raise ValueError(f"{name}={pair}: expected two non-negative numbers (height, width"
                             "; top, left for the crop)")  # fmt: skip
        values.append([float(v) for v in pair])
    for name, score in (("aesthetic_score", aesthetic_score),
                        ("negative_aesthetic_score", negative_aesthetic_score)):  # fmt: skip
        if not np.isfinite(score):
            raise ValueError(f"{name}={score}: expected a finite number (diffusers: 6 and 2.5)")

    def tile(ids):
        return jnp.tile(jnp.asarray(ids, jnp.float32), (n, 1))

    if not aesthetic:
        return tile(values[0] + values[1] + values[2]), None
    return (tile(values[0] + values[1] + [aesthetic_score]),
            tile(values[0] + values[1] + [negative_aesthetic_score]))  # fmt: skip


def sdxl_tokens(tokenizers, prompts, negative_prompts, prompts_2, negative_prompts_2, *,
                zeros: bool):  # fmt: skip
    """(ids, uncond) of SDXL's prompts, one [N, L] array per tokenizer (`tokenizers`: the
    first None for the refiner, whose one encoder reads the first prompts, as diffusers'
    does), as diffusers' SDXL pipelines form them: the second prompts default to the first,
    the negative prompts to "" or, when none is given and `zeros`
    (`force_zeros_for_empty_prompt`), uncond is None: zeroed encodings."""
    first, negative = prompt_lists(prompts, negative_prompts)
    second = [prompts_2] if isinstance(prompts_2, str) else prompts_2
    if second is not None and len(second) != len(first):
        raise ValueError(f"{len(second)} second prompts (prompts_2) for {len(first)} prompts; "
                         "pass one per prompt, a single string, or None")  # fmt: skip
    second, negative_2 = prompt_lists(
        first if second is None else second,
        negative if negative_prompts_2 is None else negative_prompts_2, "second ")  # fmt: skip
    tokenizer, tokenizer_2 = tokenizers
    if tokenizer is None:  # the refiner
        second, negative_2 = first, negative
    ids = (jnp.asarray(tokenizer_2(second)),)
    uncond = (jnp.asarray(tokenizer_2(negative_2)),)
    if tokenizer is not None:
        ids = (jnp.asarray(tokenizer(first)), *ids)
        uncond = (jnp.asarray(tokenizer(negative)), *uncond)
    if zeros and negative_prompts is None and negative_prompts_2 is None:
        return ids, None
    return ids, uncond
