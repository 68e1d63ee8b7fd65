"""ControlNet options of the latent pipelines, as diffusers' ControlNet pipelines name them
(`controlnet`, `control_image`, `controlnet_conditioning_scale`, `guess_mode`,
`control_guidance_start`, `control_guidance_end`), checked on the host before anything
compiles and turned into the factories' settings and the `control` argument of their
functions (`latent.control_inputs`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from jdiff import samplers
from jdiff.nn import UNet
from jdiff.pipelines.latent import control_inputs

# the fields a ControlNet must share with the U-Net it steers
_MATCH = ("block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim",
          "addition_embed_type", "projection_class_embeddings_input_dim")  # fmt: skip
# samplers whose every step calls the model once, at its grid timestep
_ONE_CALL = ("ddim", "ddpm", "euler", "euler_ancestral", "dpmpp_2m")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """What a pipeline call with ControlNets compiles (`key`, `factory` settings) and passes
    (`control`)."""

    key: tuple
    factory: dict
    control: dict | None

    @property
    def arguments(self) -> dict:
        """The generate function's keyword arguments: `control`, when there are ControlNets."""
        return {} if self.control is None else {"control": self.control}


def _per_net(value: Any, n: int, name: str) -> list:
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    if values is None:
        return [value] * n
    if len(values) != n:
        raise ValueError(f"{name}: {len(values)} values for {n} ControlNets (give one each)")
    return values


def prepare(
    unet: UNet,
    controlnet: Any,
    control_image: Any = None,
    *,
    scale: Any = 1.0,
    guess_mode: bool = False,
    start: Any = 0.0,
    end: Any = 1.0,
    latent_shape: tuple[int, int, int, int],
    schedule: Any,
    method: str,
    num_steps: int,
    options: dict,
    start_step: int = 0,
) -> Prepared:
    """Check and prepare a call's ControlNet options: `controlnet` None (no ControlNet: then
    no other ControlNet option may be set), one `interop.ControlNet` or a list of them; one
    control image [N, H, W, k] or [H, W, k] in [0, 1] each, at the images' size; one scale,
    start and end for all or one each.

    Raises:
      ValueError: naming the option, what is wrong and what would fit.
    """
    if controlnet is None:  # the ControlNet options alone are a mistake
        given = {"control_image": control_image is not None, "guess_mode": bool(guess_mode),
                 "controlnet_conditioning_scale": scale != 1.0,
                 "control_guidance_start": start != 0.0,
                 "control_guidance_end": end != 1.0}  # fmt: skip
        if any(given.values()):
            raise ValueError(f"{[k for k, v in given.items() if v]} apply with a controlnet=: "
                             "none was given")  # fmt: skip
        return Prepared((), {}, None)
    nets = list(controlnet) if isinstance(controlnet, Sequence) else [controlnet]
    n = len(nets)
    if n == 0:
        raise ValueError("controlnet=[]: give one ControlNet or a list of them")
    images = control_image if isinstance(control_image, list | tuple) else [control_image] * n
    if control_image is None or len(images) != n:
        raise ValueError(f"control_image: give one image array per ControlNet ({n}), each "
                         "[N, H, W, 3] in [0, 1]")  # fmt: skip
    for i, net in enumerate(nets):
        model = getattr(net, "model", None)
        if model is None or not hasattr(net, "params"):
            raise ValueError(f"controlnet[{i}] is a {type(net).__name__}: give what "
                             "interop.load_controlnet returns")  # fmt: skip
        for field in _MATCH:
            if getattr(model, field) != getattr(unet, field):
                raise ValueError(f"controlnet[{i}] ({net.source or 'given'}) does not fit this "
                                 f"U-Net: its {field} is {getattr(model, field)!r}, the "
                                 f"U-Net's {getattr(unet, field)!r}")  # fmt: skip
    batch, h, w, _ = latent_shape
    checked = []
    for i, (net, image) in enumerate(zip(nets, images, strict=True)):
        g = 2 ** (len(net.model.conditioning_embedding_out_channels) - 1)
        want = (h * g, w * g, net.model.conditioning_channels)
        image = np.asarray(image, np.float32)
        if image.ndim == 3:
            image = np.broadcast_to(image, (batch, *image.shape))
        if image.ndim != 4 or image.shape[1:] != want or image.shape[0] not in (1, batch):
            raise ValueError(f"control_image[{i}] has shape {image.shape}: this ControlNet "
                             f"takes [{batch}, {want[0]}, {want[1]}, {want[2]}] (one per "
                             "prompt, at the images' size) in [0, 1]")  # fmt: skip
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ValueError(f"control_image[{i}]: values must be finite and in [0, 1] "
                             f"(got {image.min():g} .. {image.max():g})")  # fmt: skip
        checked.append(jnp.asarray(np.broadcast_to(image, (batch, *want))))
    scales = [float(s) for s in _per_net(scale, n, "controlnet_conditioning_scale")]
    if not all(math.isfinite(s) for s in scales):
        raise ValueError(f"controlnet_conditioning_scale={scale!r}: must be finite")
    starts = [float(s) for s in _per_net(start, n, "control_guidance_start")]
    ends = [float(e) for e in _per_net(end, n, "control_guidance_end")]
    for s, e in zip(starts, ends, strict=True):
        if not 0.0 <= s < e <= 1.0:
            raise ValueError(f"control_guidance_start={s}, control_guidance_end={e}: need "
                             "0 <= start < end <= 1")  # fmt: skip
    keep = None
    if any(s > 0 for s in starts) or any(e < 1 for e in ends):
        if method not in _ONE_CALL:
            raise ValueError(f"control_guidance_start / _end with {method}: it calls the model "
                             f"more than once per step; use one of {_ONE_CALL}")  # fmt: skip
        grid, _ = samplers.make_grid(schedule, method=method, num_steps=num_steps,
                                     start_step=start_step, **options)  # fmt: skip
        steps = len(np.asarray(grid["t"]))
        table = [[1.0 - float(i / steps < s or (i + 1) / steps > e)
                  for s, e in zip(starts, ends, strict=True)] for i in range(steps)]  # fmt: skip
        keep = (jnp.asarray(grid["t"], jnp.float32), jnp.asarray(table, jnp.float32))
    guess_mode = bool(guess_mode) or any(net.model.global_pool_conditions for net in nets)
    models = tuple(net.model for net in nets)
    return Prepared(
        key=(models, guess_mode, keep is None),
        factory={"controlnets": models, "guess_mode": guess_mode},
        control=control_inputs(nets, checked, scales, keep),
    )
