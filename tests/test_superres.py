"""Super-resolution pieces: degradation, bicubic baseline, SSIM, training noise levels."""

import jax
import numpy as np
import pytest

from jdiff import superres


def test_ssim_is_scikit_images():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    y = rng.uniform(-1, 1, (3, 16, 20, 3))
    x = np.clip(y + rng.normal(0, 0.3, y.shape), -1, 1)
    ours = superres.ssim(x, y)
    for i in range(3):
        theirs = structural_similarity(x[i], y[i], gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=2.0,
                                       channel_axis=-1)  # fmt: skip
        np.testing.assert_allclose(ours[i], theirs, rtol=1e-6)
    np.testing.assert_allclose(superres.ssim(y, y), 1.0)
    with pytest.raises(ValueError, match="at least 11x11"):
        superres.ssim(y[:, :8, :8], y[:, :8, :8])


def test_downsample_is_the_block_mean_and_upsample_keeps_constants():
    x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3) / 400.0 - 0.5
    low = superres.downsample(x, 4)
    assert low.shape == (2, 2, 2, 3)
    np.testing.assert_allclose(low[1, 0, 1], x[1, :4, 4:].mean(axis=(0, 1)), rtol=1e-6)
    with pytest.raises(ValueError, match="not a multiple"):
        superres.downsample(x[:, :7], 4)
    flat = np.full((1, 4, 4, 3), 0.3, np.float32)
    np.testing.assert_allclose(superres.upsample(flat, (16, 16)), 0.3, atol=1e-6)
    assert float(np.abs(superres.upsample(np.sign(x), (32, 32))).max()) <= 1.0  # clipped


def test_training_noise_levels_follow_their_power():
    key = jax.random.key(0)
    uniform = np.asarray(superres.draw_noise_levels(key, 200_000))
    low = np.asarray(superres.draw_noise_levels(key, 200_000, power=3.0))
    assert uniform.min() == 0 and uniform.max() == 350 == low.max()
    # P(level <= 20) = (21 / 351)^(1 / power)
    np.testing.assert_allclose((uniform <= 20).mean(), 21 / 351, atol=0.003)
    np.testing.assert_allclose((low <= 20).mean(), (21 / 351) ** (1 / 3), atol=0.005)
    with pytest.raises(ValueError, match="noise_level_power=0"):
        superres.draw_noise_levels(key, 4, power=0.0)


def test_projection_onto_the_low_resolution_input_is_orthogonal():
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    low = rng.uniform(-1, 1, (2, 2, 2, 3)).astype(np.float32)
    y = np.asarray(superres.project_consistent(x, low, 4))
    np.testing.assert_allclose(superres.downsample(y, 4), low, atol=1e-6)
    np.testing.assert_allclose(superres.project_consistent(y, low, 4), y, atol=1e-6)  # idempotent
    # any other consistent image (y plus a zero-mean change inside a block) is farther from x
    other = y.copy()
    other[:, 0, 0] += 0.1
    other[:, 0, 1] -= 0.1
    np.testing.assert_allclose(superres.downsample(other, 4), low, atol=1e-6)
    assert np.sum((other - x) ** 2) > np.sum((y - x) ** 2)
