"""CLIP (Radford et al. 2021), both towers, for the CLIP score of generated images.

The image tower is a ViT: a patch convolution without bias, a class token and learned position
embeddings, a LayerNorm before the transformer (transformers' `pre_layrnorm`), the same
pre-LayerNorm layers as the text tower but without a mask, and a LayerNorm on the class token.
Each tower's pooled output is projected without bias to the joint space. Parameter names are
transformers' `CLIPModel` ones, so `jdiff.evaluation.load_clip` reads its checkpoints.

CLIP score (Hessel et al. 2021, as torchmetrics computes it): 100 · cos(image, text) per
image, floored at 0, averaged.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jdiff.nn.text_encoder import _Config, _Encoder, _TextTransformer

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class _Parameter(nn.Module):
    """A bare parameter tensor (transformers' `class_embedding`, `logit_scale`), held as
    `weight` so that its state-dict key is the module's name + ".weight"."""

    shape: tuple[int, ...]

    @nn.compact
    def __call__(self):
        return self.param("weight", nn.initializers.normal(0.02), self.shape)


class _VisionEmbeddings(nn.Module):
    hidden_size: int
    patch_size: int
    image_size: int

    @nn.compact
    def __call__(self, pixels):
        p = self.patch_size
        x = nn.Conv(self.hidden_size, (p, p), (p, p), padding="VALID", use_bias=False,
                    name="patch_embedding")(pixels)  # fmt: skip
        x = x.reshape(x.shape[0], -1, self.hidden_size)  # row-major patches, as torch flattens
        cls = _Parameter((self.hidden_size,), name="class_embedding")()
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.hidden_size)), x], 1)
        positions = (self.image_size // p) ** 2 + 1
        table = nn.Embed(positions, self.hidden_size, name="position_embedding")
        return x + table(jnp.arange(positions))[None]


class _VisionTransformer(nn.Module):
    config: _Config
    patch_size: int
    image_size: int

    @nn.compact
    def __call__(self, pixels):
        c = self.config
        x = _VisionEmbeddings(c.hidden_size, self.patch_size, self.image_size,
                              name="embeddings")(pixels)  # fmt: skip
        x = nn.LayerNorm(c.layer_norm_eps, name="pre_layrnorm")(x)
        x, _ = _Encoder(c, name="encoder")(x, None, c.num_hidden_layers, None)
        return nn.LayerNorm(c.layer_norm_eps, name="post_layernorm")(x[:, 0])


def _config(fields: dict[str, Any]) -> _Config:
    defaults = {"vocab_size": 0, "max_position_embeddings": 0, "eos_token_id": 2,
                "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu", "dtype": jnp.float32,
                "attention_implementation": None}  # fmt: skip
    names = {f.name for f in dataclasses.fields(_Config)}
    return _Config(**(defaults | {k: v for k, v in fields.items() if k in names}))


class CLIPModel(nn.Module):
    """Both CLIP towers and their projections. `text` and `vision` hold the transformers
    config fields of each (hidden_size, intermediate_size, num_hidden_layers,
    num_attention_heads, hidden_act, layer_norm_eps; text: vocab_size,
    max_position_embeddings, eos_token_id; vision: image_size, patch_size).

    `apply(v, ids, pixels)` -> (text_embeds [B, P], image_embeds [N, P]), unnormalised;
    `method="encode_text"` / `"encode_image"` for one tower. Pixels are [N, S, S, 3],
    normalised by `preprocess`.
    """

    text: dict
    vision: dict
    projection_dim: int = 512

    def setup(self):
        self.text_model = _TextTransformer(_config(self.text))
        self.vision_model = _VisionTransformer(_config(self.vision), self.vision["patch_size"],
                                               self.vision["image_size"])  # fmt: skip
        self.text_projection = nn.Dense(self.projection_dim, use_bias=False)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False)
        self.logit_scale = _Parameter(())

    def encode_text(self, ids):
        return self.text_projection(self.text_model(ids, None, 0, None).pooler_output)

    def encode_image(self, pixels):
        return self.visual_projection(self.vision_model(pixels))

    def __call__(self, ids, pixels):
        self.logit_scale()  # created with the rest, unused by the score
        return self.encode_text(ids), self.encode_image(pixels)


@dataclasses.dataclass(frozen=True)
class ImageProcessing:
    """transformers' `CLIPImageProcessor`: resize the shorter side (PIL bicubic), centre
    crop, scale to [0, 1], normalise by the mean and std."""

    shortest_edge: int = 224
    crop_size: int = 224
    image_mean: tuple[float, ...] = OPENAI_MEAN
    image_std: tuple[float, ...] = OPENAI_STD

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] -> float32 [N, crop, crop, 3]."""
        from PIL import Image

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, H, W, 3]; got {images.dtype} "
                             f"{images.shape}")  # fmt: skip
        h, w = images.shape[1:3]
        s = self.shortest_edge
        size = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)  # (height, width)
        c = self.crop_size
        top, left = (size[0] - c) // 2, (size[1] - c) // 2
        out = []
        for image in images:
            resized = Image.fromarray(image).resize(size[::-1], Image.Resampling.BICUBIC)
            out.append(np.asarray(resized)[top : top + c, left : left + c])
        x = np.stack(out).astype(np.float32) / 255.0
        return (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std,
                                                                            np.float32)  # fmt: skip


def clip_score(text_embeds, image_embeds) -> np.ndarray:
    """Per-pair CLIP score: max(100 · cos(text, image), 0), rows paired. [N]."""
    t = np.asarray(text_embeds, np.float64)
    i = np.asarray(image_embeds, np.float64)
    cos = (t * i).sum(-1) / (np.linalg.norm(t, axis=-1) * np.linalg.norm(i, axis=-1))
    return np.maximum(100.0 * cos, 0.0)
