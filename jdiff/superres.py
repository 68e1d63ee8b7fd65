"""Super-resolution pieces: the degradation (box downsampling), the bicubic baseline, the
low-resolution input's noise augmentation (SD's x4 upscaler: a linear DDPM schedule, levels
0..350, the level the U-Net's class label) and SSIM.

A super-resolution model here is a latent diffusion model whose U-Net takes the
low-resolution image, resized to the latent grid, concatenated to its input (SR3, Saharia et
al. 2021, in latent space as LDM / SD's x4 upscaler do it); `jdiff.pipelines.make_upscale`
samples it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import schedules

MAX_NOISE_LEVEL = 350  # SD x4 upscaler's `max_noise_level`
DEFAULT_NOISE_LEVEL = 20  # its pipeline's default `noise_level`


def low_res_schedule() -> schedules.Schedule:
    """The noise-augmentation schedule of the low-resolution input (SD x4's
    `low_res_scheduler`: DDPM, linear β 1e-4 .. 0.02 over 1000 steps)."""
    return schedules.get_schedule("linear", 1000)


def draw_noise_levels(key: jax.Array, n: int, max_noise_level: int = MAX_NOISE_LEVEL,
                      power: float = 1.0) -> jax.Array:  # fmt: skip
    """n training noise levels ⌊(max_noise_level + 1) · u^power⌋, u ~ U[0, 1): int32 in
    0..max_noise_level, uniform for power 1 (SD's), more of the low levels sampling uses for
    power > 1 (P(level <= k) = ((k + 1) / (max + 1))^(1 / power))."""
    if power <= 0:
        raise ValueError(f"noise_level_power={power}; expected > 0")
    u = jax.random.uniform(key, (n,))
    level = jnp.floor((max_noise_level + 1) * u**power).astype(jnp.int32)
    return jnp.minimum(level, max_noise_level)


def downsample(x, factor: int):
    """Box (area) downsampling of [N, H, W, C] by an integer factor: each output pixel the mean
    of its factor x factor block. The degradation the models learn to invert and the one
    the consistency check applies to their outputs. NumPy or JAX arrays."""
    n, h, w, c = x.shape
    if h % factor or w % factor:
        raise ValueError(f"image size {h}x{w} is not a multiple of the factor {factor}")
    return x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def project_consistent(x, low_res, factor: int):
    """The image nearest x (in L2) whose `downsample` by `factor` is low_res: each factor x
    factor block shifted by its mean's difference from the low-resolution pixel (the
    orthogonal projection; nearest-neighbour upsampling is box downsampling's pseudo-inverse).
    [N, H, W, C], [N, H/factor, W/factor, C]."""
    residual = low_res - downsample(x, factor)
    return x + jnp.repeat(jnp.repeat(residual, factor, axis=1), factor, axis=2)


def upsample(x, size: tuple[int, int], method: str = "bicubic") -> jax.Array:
    """[N, h, w, C] -> [N, size, C] (the bicubic baseline; half-pixel centres, Keys a = -0.5),
    clipped to [-1, 1]."""
    x = jnp.asarray(x, jnp.float32)
    out = jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method)
    return jnp.clip(out, -1.0, 1.0)


def ssim(x: np.ndarray, reference: np.ndarray, *, data_range: float = 2.0) -> np.ndarray:
    """Structural similarity (Wang et al. 2004) of each image [N, H, W, C] against `reference`,
    as scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=2)` computes it: an 11x11 Gaussian window (σ 1.5),
    K1 = 0.01, K2 = 0.03, per channel, averaged over the valid (unpadded) region and channels."""
    x, y = np.asarray(x, np.float64), np.asarray(reference, np.float64)
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two [N, H, W, C] arrays of one shape; got {x.shape}, "
                         f"{y.shape}")  # fmt: skip
    radius = 5  # truncate 3.5 σ, as scikit-image's Gaussian window
    if min(x.shape[1:3]) < 2 * radius + 1:
        raise ValueError(f"ssim's 11x11 window needs images of at least 11x11; got {x.shape}")
    t = np.arange(-radius, radius + 1)
    g = np.exp(-(t**2) / (2 * 1.5**2))
    g /= g.sum()

    def blur(a):  # separable, valid region only
        a = np.apply_along_axis(lambda r: np.convolve(r, g, "valid"), 1, a)
        return np.apply_along_axis(lambda r: np.convolve(r, g, "valid"), 2, a)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2, 3))
