"""A small convolutional classifier: the judge of generated samples on small embedded data."""

from __future__ import annotations

import flax.linen as nn
from jaxtyping import Array, Float


class SmallClassifier(nn.Module):
    """Two 3x3 convs (32, 64 channels, the second with stride 2), a `features`-wide hidden
    layer and the logits. Returns (logits [B, num_classes], features [B, features]); the
    features are the space of the Fréchet distance."""

    num_classes: int = 10
    features: int = 64

    @nn.compact
    def __call__(self, x: Float[Array, "b h w c"]):
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))
        h = nn.relu(nn.Dense(self.features)(x.reshape(x.shape[0], -1)))
        return nn.Dense(self.num_classes)(h), h
