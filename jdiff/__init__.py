"""jdiff: diffusion models and Stable Diffusion as pure JAX functions and Flax modules."""

from jdiff import diffusion, guidance, losses, samplers, schedules

__all__ = ["diffusion", "guidance", "losses", "samplers", "schedules"]
__version__ = "0.1.0"
