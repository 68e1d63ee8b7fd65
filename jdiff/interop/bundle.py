"""`Pretrained`: a pretrained model as jdiff modules, their parameters and sampler settings."""

from __future__ import annotations

import dataclasses
from typing import Any

from jdiff.interop.schedulers import SchedulerSettings
from jdiff.nn import UNet
from jdiff.nn.text_encoder import CLIPTextModel
from jdiff.nn.vae import AutoencoderKL
from jdiff.tokenizer import CLIPTokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class Pretrained:
    """A pretrained model as jdiff modules and parameters: a latent text-to-image model (Stable
    Diffusion: U-Net, autoencoder, text encoder, tokenizer) or a pixel-space U-Net (DDPM).

    `params` is {"unet": ...} plus "autoencoder" and "text_encoder" (SDXL: "text_encoder_2")
    where present: the layout `pipelines.LatentDiffusion` takes. `sample_size` is the U-Net's
    default height and width (in latents for a latent model). SDXL's negative prompts are
    zeros where none is given when `force_zeros_for_empty_prompt` (its pipeline's setting).
    """

    unet: UNet
    params: dict
    scheduler: SchedulerSettings
    sample_size: int
    text_encoder: CLIPTextModel | None = None
    autoencoder: AutoencoderKL | None = None
    tokenizer: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModel | None = None  # SDXL's second (the refiner's only) encoder
    tokenizer_2: CLIPTokenizer | None = None
    force_zeros_for_empty_prompt: bool = False
    requires_aesthetics_score: bool = False  # SDXL's refiner: its ids end in a score
    pipeline_class: str = ""
    source: str = ""
    controlnet: Any = None  # a ControlNet pipeline's (`interop.ControlNet`), or None

    @property
    def is_sdxl(self) -> bool:
        """Whether the U-Net takes SDXL's pooled text embedding and size ids."""
        return self.unet.addition_embed_type == "text_time"

    @property
    def is_latent(self) -> bool:
        return self.autoencoder is not None

    @property
    def image_size(self) -> int:
        """The default image height and width in pixels."""
        return self.sample_size * (self.autoencoder.downsample_factor if self.is_latent else 1)
