"""The CLIP text transformer (Radford et al. 2021) as Stable Diffusion uses it for `context`.

Token and learned position embeddings, pre-LayerNorm transformer layers with causal
self-attention (each token sees itself and the tokens before it) and an MLP, and a final
LayerNorm. Stable Diffusion 1.x conditions on the last layer of OpenAI's ViT-L/14 text tower
(quick-GELU); 2.x on the penultimate layer of OpenCLIP ViT-H/14's (GELU), which its diffusers
checkpoints store as a 23-layer model; `clip_skip` takes an earlier layer of any model. SDXL
conditions on the penultimate layer of two encoders as it is, with no final LayerNorm
(`hidden_layer`), and on OpenCLIP ViT-bigG/14's pooled output projected (`projection_dim`,
transformers' `CLIPTextModelWithProjection`).

Names mirror transformers' `CLIPTextModel` (`text_model/encoder/layers_3/self_attn/q_proj`,
`text_model/final_layer_norm`, ...), so its weights convert by `jdiff.convert`. At small sizes
the same module is the text encoder that from-scratch latent models train jointly (LDM).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from jdiff.nn.attention import attention

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # OpenCLIP
}


@flax.struct.dataclass
class TextEncoderOutput:
    """The text encoder's outputs: `last_hidden_state` [B, L, D], `pooler_output` [B, D]; with
    a projection `text_embeds` [B, P]; with a `hidden_layer` asked for, `hidden_state`."""

    last_hidden_state: Float[Array, "b l d"]  # after the final LayerNorm: SD's `context`
    pooler_output: Float[Array, "b d"]  # last_hidden_state at each sequence's end token
    text_embeds: Float[Array, "b p"] | None = None  # text_projection(pooler_output): SDXL's
    hidden_state: Float[Array, "b l d"] | None = None  # a layer's output as it is: SDXL's


class _Attention(nn.Module):
    heads: int
    dtype: Any
    implementation: str | None

    @nn.compact
    def __call__(self, x, mask):
        width = x.shape[-1]

        def project(name, a):
            a = nn.Dense(width, dtype=self.dtype, name=name)(a)
            return a.reshape(*a.shape[:2], self.heads, width // self.heads)

        q, k, v = (project(f"{n}_proj", x) for n in "qkv")
        out = attention(q, k, v, mask=mask, implementation=self.implementation)
        return nn.Dense(width, dtype=self.dtype, name="out_proj")(out.reshape(x.shape))


class _MLP(nn.Module):
    intermediate_size: int
    activation: str
    dtype: Any

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = ACTIVATIONS[self.activation](h)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class _EncoderLayer(nn.Module):
    heads: int
    intermediate_size: int
    activation: str
    eps: float
    dtype: Any
    implementation: str | None

    @nn.compact
    def __call__(self, x, mask):
        def norm(name, a):
            return nn.LayerNorm(self.eps, dtype=jnp.float32, name=name)(a).astype(self.dtype)

        x = x + _Attention(self.heads, self.dtype, self.implementation, name="self_attn")(
            norm("layer_norm1", x), mask
        )
        mlp = _MLP(self.intermediate_size, self.activation, self.dtype, name="mlp")
        return x + mlp(norm("layer_norm2", x))


class _Embeddings(nn.Module):
    vocab_size: int
    hidden_size: int
    max_positions: int

    @nn.compact
    def __call__(self, input_ids):
        tokens = nn.Embed(self.vocab_size, self.hidden_size, name="token_embedding")(input_ids)
        positions = nn.Embed(self.max_positions, self.hidden_size, name="position_embedding")
        return tokens + positions(jnp.arange(input_ids.shape[1]))[None]


@dataclasses.dataclass(frozen=True)
class _Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str
    layer_norm_eps: float
    eos_token_id: int
    dtype: Any
    attention_implementation: str | None


class _TextTransformer(nn.Module):
    config: _Config

    def setup(self):
        c = self.config
        self.embeddings = _Embeddings(c.vocab_size, c.hidden_size, c.max_position_embeddings)
        self.encoder = _Encoder(c)
        self.final_layer_norm = nn.LayerNorm(c.layer_norm_eps, dtype=jnp.float32)

    def __call__(self, input_ids, attention_mask, clip_skip, hidden_layer):
        c = self.config
        length = input_ids.shape[1]
        mask = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, Lq, Lk]
        if attention_mask is not None:  # padded keys are not attended to
            mask = mask & (attention_mask[:, None, None, :] > 0)
        h = self.embeddings(input_ids).astype(c.dtype)
        h, kept = self.encoder(h, mask, c.num_hidden_layers - clip_skip, hidden_layer)
        h = self.final_layer_norm(h.astype(jnp.float32))
        if c.eos_token_id == 2:  # transformers' legacy rule: the end token has the largest id
            end = jnp.argmax(input_ids, axis=-1)
        else:
            end = jnp.argmax(input_ids == c.eos_token_id, axis=-1)
        kept = None if kept is None else kept.astype(jnp.float32)
        return TextEncoderOutput(h, h[jnp.arange(h.shape[0]), end], hidden_state=kept)


class _Encoder(nn.Module):
    config: _Config

    def setup(self):
        c = self.config
        self.layers = [
            _EncoderLayer(c.num_attention_heads, c.intermediate_size, c.hidden_act,
                          c.layer_norm_eps, c.dtype, c.attention_implementation)
            for _ in range(c.num_hidden_layers)
        ]  # fmt: skip

    def __call__(self, h, mask, num_layers, keep):
        """(the output of `num_layers` layers, that of the first `keep` or None)."""
        kept = h if keep == 0 else None
        for i, layer in enumerate(self.layers[:num_layers]):
            h = layer(h, mask)
            kept = h if i + 1 == keep else kept
        return h, kept


class CLIPTextModel(nn.Module):
    """`model.apply(v, input_ids [B, L] int, attention_mask=None, clip_skip=0)` ->
    `TextEncoderOutput` (float32 whatever the compute dtype).

    Stable Diffusion passes no attention mask: padded positions attend causally like any other
    token, and reach the U-Net's cross-attention. `clip_skip = k` ends k layers early (then the
    final LayerNorm, as diffusers does). `hidden_layer = n` also returns the output of the
    first n layers as it is (`hidden_state`; transformers' `hidden_states[n]`, 0 the
    embeddings): SDXL's context is `hidden_layer = num_hidden_layers - 1` (- its clip skip).
    With `projection_dim` set it is transformers' `CLIPTextModelWithProjection`:
    `text_embeds` = `text_projection(pooler_output)`. The defaults are OpenAI's ViT-L/14 text
    tower (123,060,480 parameters), SD 1.x's text encoder.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2  # transformers' default config: 2 means "the largest id"
    projection_dim: int | None = None  # a `text_projection` of the pooled output (no bias)
    dtype: Any = jnp.float32  # compute dtype; parameters and LayerNorms stay float32
    attention_implementation: str | None = None

    @nn.compact
    def __call__(
        self,
        input_ids: Int[Array, "b l"],
        attention_mask: Int[Array, "b l"] | None = None,
        clip_skip: int = 0,
        hidden_layer: int | None = None,
    ) -> TextEncoderOutput:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}; expected one of {list(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if input_ids.ndim != 2 or input_ids.shape[1] > self.max_position_embeddings:
            raise ValueError(
                f"input_ids must be [batch, length <= {self.max_position_embeddings}]; got shape "
                f"{input_ids.shape}"
            )
        if not 0 <= clip_skip < self.num_hidden_layers:
            raise ValueError(f"clip_skip={clip_skip}; expected 0 .. {self.num_hidden_layers - 1}")
        depth = self.num_hidden_layers - clip_skip
        if hidden_layer is not None and not 0 <= hidden_layer <= depth:
            raise ValueError(f"hidden_layer={hidden_layer}; expected 0 .. {depth}")
        config = _Config(**{f.name: getattr(self, f.name) for f in dataclasses.fields(_Config)})
        text = _TextTransformer(config, name="text_model")
        out = text(input_ids, attention_mask, clip_skip, hidden_layer)
        if self.projection_dim is None:
            return out
        project = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                           name="text_projection")  # fmt: skip
        return out.replace(text_embeds=project(out.pooler_output).astype(jnp.float32))


VARIANTS: dict[str, dict[str, Any]] = {
    # OpenAI CLIP ViT-L/14 (Stable Diffusion 1.x): 123,060,480 parameters
    "clip_vit_l14": {},
    # OpenCLIP ViT-H/14 as SD 2.x's diffusers checkpoints store it (penultimate layer):
    # 340,387,840 parameters
    "openclip_vit_h14": {"hidden_size": 1024, "intermediate_size": 4096,
                         "num_hidden_layers": 23, "num_attention_heads": 16,
                         "hidden_act": "gelu", "eos_token_id": 49407},
    # OpenCLIP ViT-bigG/14 with its projection (SDXL's text_encoder_2): 694,659,840 parameters
    "openclip_vit_bigg14": {"hidden_size": 1280, "intermediate_size": 5120,
                            "num_hidden_layers": 32, "num_attention_heads": 20,
                            "hidden_act": "gelu", "projection_dim": 1280},
    # the tests' size
    "tiny": {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16},
}  # fmt: skip
