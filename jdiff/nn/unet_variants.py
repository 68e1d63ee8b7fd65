"""The U-Net's sizes: Stable Diffusion 1.x / 2.x / XL, DDPM's CIFAR-10 network and the tiny
ones the tests build, as `UNet` field dicts (`UNet(**VARIANTS["sd_v1"])`)."""

from __future__ import annotations

from typing import Any

SD_V1 = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "downsample_padding": 1,
    "norm_eps": 1e-5,
    "flip_sin_to_cos": True,
    "freq_shift": 0.0,
    "num_attention_heads": 8,
    "cross_attention_dim": 768,
    "dropout": 0.0,
}

SDXL = {
    **SD_V1,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2,
    "up_block_types": ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
    "num_attention_heads": (5, 10, 20),
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

VARIANTS: dict[str, dict[str, Any]] = {
    # Ho et al. 2020, CIFAR-10 32x32: 35,746,307 parameters
    "ddpm_cifar10": {},
    # Stable Diffusion 1.x (CompVis/stable-diffusion-v1-*): 859,520,964
    "sd_v1": SD_V1,
    # Stable Diffusion 2.1 (768-v): 865,910,724; 64-channel heads, linear projections
    "sd_v2_1": {
        **SD_V1,
        "num_attention_heads": (5, 10, 20, 20),
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    # Stable Diffusion XL base 1.0: 2,567,463,684; a 2048-wide context from two text encoders,
    # the pooled embedding (1280) and six size/crop ids added to the time embedding
    "sdxl_base": SDXL,
    # its refiner: four levels, a 1280-wide context (the second encoder alone), five ids
    # (sizes, crop, aesthetic score); 2,259,526,660
    "sdxl_refiner": {
        **SDXL,
        "block_out_channels": (384, 768, 1536, 1536),
        "down_block_types": ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",),
        "num_attention_heads": (6, 12, 24, 24),
        "transformer_layers_per_block": 4,
        "cross_attention_dim": 1280,
        "projection_class_embeddings_input_dim": 2560,
    },
    # tests: a DDPM-shaped net and a text-conditioned one, a few hundred thousand parameters
    "tiny": {
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "layers_per_block": 1,
        "norm_num_groups": 8,
    },
    "tiny_cond": {
        **SD_V1,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "num_attention_heads": 2,
        "cross_attention_dim": 24,
    },
}
