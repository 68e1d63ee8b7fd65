"""RePaint (Lugmayr et al. 2022): inpainting with any model trained without masks, DDIM steps
with the known region re-noised after each and jumps back up the grid, one `lax.scan`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion
from jdiff.samplers.driver import step_noise
from jdiff.samplers.steps import _CLIP, ModelFn, _ac, _check_steps, _ddim_step
from jdiff.schedules import Schedule

REPAINT_DEFAULTS = {  # diffusers' RePaintScheduler / RePaintPipeline, but clip_sample=False
    "prediction_type": "epsilon",
    "eta": 0.0,
    "jump_length": 10,
    "jump_n_sample": 10,
    **_CLIP,
}


def repaint_timesteps(num_train_timesteps: int, num_steps: int, *, jump_length: int = 10,
                      jump_n_sample: int = 10) -> np.ndarray:  # fmt: skip
    """RePaint's time sequence with resampling (Lugmayr et al. 2022, §4.2, Fig. 9).

    The N grid levels are walked down one at a time; from every `jump_length`-th level (below
    N - jump_length) the walk jumps back up `jump_length` levels and redescends, `jump_n_sample`
    - 1 times in all. Level k is training timestep k · (T // N), as diffusers'
    `RePaintScheduler.set_timesteps` numbers them. A value below its predecessor is a denoising
    step from that timestep; a value above it, a jump (forward noising) of one level.
    """
    _check_steps(num_train_timesteps, num_steps)
    for name, v in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    resamples = {k: jump_n_sample - 1 for k in range(0, num_steps - jump_length, jump_length)}
    levels, k = [], num_steps
    while k > 0:
        k -= 1
        levels.append(k)
        if resamples.get(k, 0):
            resamples[k] -= 1
            levels.extend(range(k + 1, k + jump_length + 1))
            k += jump_length
    return np.asarray(levels, np.int64) * (num_train_timesteps // num_steps)


def resolve_repaint_options(num_train_timesteps: int, num_steps: int, options: dict):
    """(`REPAINT_DEFAULTS` updated with options, the time sequence); ValueError naming an
    unknown option, a bad prediction type, step count or jump setting."""
    unknown = set(options) - set(REPAINT_DEFAULTS)
    if unknown:
        raise ValueError(f"repaint takes no option(s) {sorted(unknown)}; its options are "
                         f"{sorted(REPAINT_DEFAULTS)}")  # fmt: skip
    opts = {**REPAINT_DEFAULTS, **options}
    diffusion.check_prediction_type(opts["prediction_type"])
    seq = repaint_timesteps(num_train_timesteps, num_steps, jump_length=opts["jump_length"],
                            jump_n_sample=opts["jump_n_sample"])  # fmt: skip
    return opts, seq


def repaint(
    model_fn: ModelFn,
    schedule: Schedule,
    key: jax.Array,
    images: jax.Array,
    masks: jax.Array,
    *,
    num_steps: int,
    x_T: jax.Array | None = None,
    return_unpasted: bool = False,
    **options,
):
    """Inpaint with any model trained without masks: RePaint (Lugmayr et al. 2022, Alg. 1).

    Every denoising step is a DDIM step (η: 0 deterministic, 1 DDPM-like) for the whole state,
    after which the known region is replaced by the original forward-noised to the step's new
    timestep, √ᾱ x_0 + √(1-ᾱ) z; a jump noises the whole state up one grid level in closed form,
    x_{t+s} = √(ᾱ_{t+s}/ᾱ_t) x_t + √(1 - ᾱ_{t+s}/ᾱ_t) z, so the model harmonises the two
    regions again on the way down. The last step's known region is the original exactly.

    diffusers' `RePaintScheduler` differs in one place: its `undo_step` noises with β at
    the level being jumped from (β_t instead of β_{t+1}, as the paper's pseudocode writes it).
    The denoising steps and the time sequence are the same (tested).

    Args:
      images: x_0 [B, ...] in the model's space (pixels in [-1, 1], or scaled latents).
      masks: [B, ..., 1] (or images' shape), 1 where to repaint, 0 where images are known.
      num_steps: N grid levels (T // N training steps each); static.
      x_T: the initial standard-normal state (default: drawn from key).
      return_unpasted: also return the last step's prediction for the whole image, before the
        known region is put back (how well the model matched it).
      options: `REPAINT_DEFAULTS` (diffusers' names): prediction_type, eta, jump_length,
        jump_n_sample, clip_sample, clip_sample_range.

    Returns:
      x_0 [B, ...] float32 (and the unpasted prediction with return_unpasted). One `lax.scan`
      over the whole sequence (model calls only on its denoising steps).
    """
    opts, seq = resolve_repaint_options(schedule.num_timesteps, num_steps, options)
    T = schedule.num_timesteps
    s = T // num_steps
    before = np.concatenate([[seq[0] + s], seq[:-1]])  # the state is at level before - s
    grid = {
        "jump": jnp.asarray(seq > before),
        "t": jnp.asarray(before - s, jnp.float32),  # the state's timestep (-s: clean)
        "t_prev": jnp.asarray(seq - s, jnp.float32),  # its timestep after this entry
        "index": jnp.arange(len(seq), dtype=jnp.int32),
    }
    images = images.astype(jnp.float32)
    masks = jnp.broadcast_to(masks.astype(jnp.float32), images.shape)
    init_key, step_key = jax.random.split(key)
    x = jax.random.normal(init_key, images.shape) if x_T is None else x_T.astype(jnp.float32)

    def denoise(x, g, noise):
        g = {**g, "final": jnp.float32(1.0)}
        unpasted, _ = _ddim_step(model_fn, schedule, x, (), g, noise, opts)
        abar = _ac(schedule, g["t_prev"], 1.0)
        known = jnp.sqrt(abar) * images + jnp.sqrt(1.0 - abar) * noise
        return masks * unpasted + (1.0 - masks) * known, unpasted

    def jump(x, g, noise):
        ratio = _ac(schedule, g["t_prev"], 1.0) / _ac(schedule, g["t"], 1.0)
        return jnp.sqrt(ratio) * x + jnp.sqrt(1.0 - ratio) * noise

    def body(carry, g):
        x, unpasted = carry
        noise = step_noise(step_key, g["index"], x.shape)
        carry = jax.lax.cond(
            g["jump"],
            lambda x, u: (jump(x, g, noise), u),
            lambda x, u: denoise(x, g, noise),
            x,
            unpasted,
        )
        return carry, None

    (x, unpasted), _ = jax.lax.scan(body, (x, x), grid)
    return (x, unpasted) if return_unpasted else x
