"""Flax Linen networks; parameters are plain pytrees, names mirror diffusers' trees."""

from jdiff.nn.unet import VARIANTS, UNet

__all__ = ["VARIANTS", "UNet"]
