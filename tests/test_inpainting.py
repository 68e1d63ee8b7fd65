"""Inpainting with any model (RePaint), masks, outpainting canvases and their statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import inpainting, pipelines, samplers, schedules
from jdiff.nn import UNet
from jdiff.samplers import inpaint


@pytest.mark.parametrize("n, jump, resample", [(250, 10, 10), (50, 10, 1), (20, 5, 3), (7, 10, 4)])
def test_repaint_timesteps_are_diffusers(n, jump, resample):
    from diffusers import RePaintScheduler

    reference = RePaintScheduler()
    reference.set_timesteps(n, jump_length=jump, jump_n_sample=resample)
    ours = samplers.repaint_timesteps(1000, n, jump_length=jump, jump_n_sample=resample)
    np.testing.assert_array_equal(ours, reference.timesteps.numpy())


def _toy_eps(x, t):
    """A deterministic stand-in for a network, nonlinear in x and dependent on t."""
    return jnp.tanh(0.7 * x) * (1.0 + t[:, None, None, None] / 1000.0) - 0.1 * x


@pytest.mark.parametrize("eta", [0.0, 0.6])
def test_repaint_equals_diffusers_repaint_scheduler(eta, monkeypatch):
    """diffusers' RePaintScheduler.step on its own time sequence, with the jumps in closed form
    (ᾱ_{t+s} / ᾱ_t: what its undo_step approximates with β one level early) and the same noise:
    the same inpainted images."""
    import torch
    from diffusers import RePaintScheduler
    from diffusers.schedulers import scheduling_repaint

    n, jump, resample = 20, 5, 3
    shape = (2, 8, 8, 3)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, shape).astype(np.float32)
    masks = np.zeros((2, 8, 8, 1), np.float32)
    masks[:, 2:6, 3:8] = 1.0
    x_T = rng.standard_normal(shape).astype(np.float32)
    seq = samplers.repaint_timesteps(1000, n, jump_length=jump, jump_n_sample=resample)
    table = rng.standard_normal((len(seq), *shape)).astype(np.float32)

    # jdiff, with the table as its per-entry noise
    monkeypatch.setattr(inpaint, "step_noise", lambda key, i, s: jnp.asarray(table)[i])
    schedule = schedules.get_schedule("linear", 1000)
    ours, unpasted = samplers.repaint(
        _toy_eps, schedule, jax.random.key(0), jnp.asarray(images), jnp.asarray(masks),
        num_steps=n, jump_length=jump, jump_n_sample=resample, eta=eta,
        x_T=jnp.asarray(x_T), return_unpasted=True,
    )  # fmt: skip

    # diffusers, channels-first, its keep-mask (1 = known), the same table
    scheduler = RePaintScheduler(eta=eta, clip_sample=False)
    scheduler.set_timesteps(n, jump_length=jump, jump_n_sample=resample)
    entry = {"i": 0}
    monkeypatch.setattr(scheduling_repaint, "randn_tensor",
                        lambda *a, **k: torch.from_numpy(table[entry["i"]]))  # fmt: skip
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    x, original, keep = to_t(x_T), to_t(images), to_t(1.0 - masks)
    abar = scheduler.alphas_cumprod.double()
    level = lambda t: abar[t] if t >= 0 else torch.tensor(1.0, dtype=torch.float64)  # noqa: E731
    s, last = 1000 // n, seq[0] + 1000 // n
    for i, t in enumerate(seq):
        entry["i"] = i
        if t < last:
            t_in = jnp.full((2,), t, jnp.float32)
            eps = torch.from_numpy(np.array(_toy_eps(jnp.asarray(x.numpy()), t_in)))
            x = scheduler.step(eps, int(t), x, original, keep).prev_sample
        else:  # one level up, from last - s to t - s
            ratio = (level(t - s) / level(last - s)).float()
            x = ratio.sqrt() * x + (1 - ratio).sqrt() * to_t(table[i])
        last = t
    np.testing.assert_allclose(ours, x.numpy(), atol=2e-5, rtol=1e-4)
    # the known region is the original exactly; the last prediction there is not
    known = masks[..., 0] == 0
    np.testing.assert_array_equal(np.asarray(ours)[known], images[known])
    assert np.abs(np.asarray(unpasted) - images)[known].mean() > 1e-3


def test_repaint_rejects_bad_settings():
    schedule = schedules.get_schedule("linear", 1000)
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match="jump_length must be a positive integer"):
        samplers.repaint(_toy_eps, schedule, jax.random.key(0), x, x[..., :1], num_steps=10,
                         jump_length=0)  # fmt: skip
    with pytest.raises(ValueError, match=r"no option\(s\) \['method'\]"):
        samplers.repaint(_toy_eps, schedule, jax.random.key(0), x, x[..., :1], num_steps=10,
                         method="ddim")  # fmt: skip
    with pytest.raises(ValueError, match="num_steps must be"):
        samplers.repaint_timesteps(1000, 0)


@pytest.fixture(scope="module")
def class_model():
    """A tiny class-conditional pixel U-Net with random weights (3 classes + the null one)."""
    model = UNet(in_channels=3, out_channels=3, num_class_embeds=4, block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                 norm_num_groups=8)  # fmt: skip
    x = jnp.zeros((1, 16, 16, 3))
    init = jax.jit(lambda k: model.init(k, x, jnp.zeros(1), class_labels=jnp.zeros(1, int)))
    params = init(jax.random.key(0))
    return model, params["params"]


def test_pixel_repaint_keeps_the_known_region_and_compiles_once(class_model):
    model, params = class_model
    schedule = schedules.get_schedule("cosine", 1000)
    shape = (2, 16, 16, 3)
    inpaint = jax.jit(pipelines.make_repaint(model, schedule, shape=shape, num_steps=10,
                                             null_class=3, jump_length=3, jump_n_sample=2,
                                             eta=1.0, return_unpasted=True))  # fmt: skip
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, shape).astype(np.float32)
    masks = inpainting.random_masks(rng, 2, 16, kind="box", min_cover=0.3, max_cover=0.5)
    labels = jnp.asarray([0, 2])
    x, unpasted = inpaint(params, images, masks, jax.random.key(0), labels, 2.0)
    known = masks[..., 0] == 0
    np.testing.assert_array_equal(np.asarray(x)[known], images[known])  # exactly
    assert not np.allclose(np.asarray(x)[~known], images[~known], atol=0.05)
    # before the last paste the known region is the last state's x̂_0 from t = 0: RePaint keeps
    # it at every step, so even random weights leave only a small mismatch at the border
    assert 0 < inpainting.border_mismatch(unpasted, images, masks) < 0.05

    other = rng.uniform(-1, 1, shape).astype(np.float32)
    masks2 = inpainting.random_masks(rng, 2, 16, kind="stroke")
    y, _ = inpaint(params, other, masks2, jax.random.key(1), labels[::-1], 3.0)
    known2 = masks2[..., 0] == 0
    np.testing.assert_array_equal(np.asarray(y)[known2], other[known2])
    assert inpaint._cache_size() == 1  # new seed, images, masks, labels, scale: no retrace

    with pytest.raises(ValueError, match="jump_n_sample must be a positive integer"):
        pipelines.make_repaint(model, schedule, shape=shape, num_steps=10, jump_n_sample=0)
    with pytest.raises(ValueError, match="no option"):
        pipelines.make_repaint(model, schedule, shape=shape, num_steps=10, use_karras_sigmas=True)


def test_check_masks_shapes_values_and_errors():
    images = np.zeros((3, 8, 8, 3), np.float32)
    one = np.zeros((8, 8), np.float32)
    one[2:4] = 0.7
    out = inpainting.check_masks(one, images)
    assert out.shape == (3, 8, 8, 1) and set(np.unique(out)) == {0.0, 1.0}
    assert out[:, 2:4].all() and not out[:, 4:].any()
    for m in (one[..., None], np.stack([one] * 3), np.stack([one] * 3)[..., None]):
        np.testing.assert_array_equal(inpainting.check_masks(m, images), out)
    with pytest.raises(ValueError, match=r"do not fit images of shape \(3, 8, 8, 3\)"):
        inpainting.check_masks(np.zeros((8, 6)), images)
    with pytest.raises(ValueError, match="do not fit"):
        inpainting.check_masks(np.zeros((2, 8, 8, 1)), images)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\].*got \[0, 255\]"):
        inpainting.check_masks(one * 0 + 255 * (one > 0), images)
    with pytest.raises(ValueError, match="with NaN"):
        inpainting.check_masks(np.full((8, 8), np.nan), images)
    with pytest.raises(ValueError, match=r"images must be \[N, H, W, C\]"):
        inpainting.check_masks(one, images[0])


def test_latent_masks_repaint_a_cell_when_any_pixel_is():
    m = np.zeros((1, 8, 8, 1), np.float32)
    m[0, 3, 5] = 1.0  # one pixel, in cell (1, 2) at f = 2 and (0, 1) at f = 4
    assert np.argwhere(inpainting.latent_masks(m, 2)[0, ..., 0]).tolist() == [[1, 2]]
    assert np.argwhere(inpainting.latent_masks(m, 4)[0, ..., 0]).tolist() == [[0, 1]]
    with pytest.raises(ValueError, match="not a multiple of the autoencoder's factor 3"):
        inpainting.latent_masks(m, 3)


def test_random_masks_cover_what_they_say():
    rng = np.random.default_rng(0)
    boxes = inpainting.random_masks(rng, 200, 32, kind="box", min_cover=0.2, max_cover=0.4)
    cover = boxes.mean(axis=(1, 2, 3))
    assert boxes.shape == (200, 32, 32, 1) and set(np.unique(boxes)) == {0.0, 1.0}
    assert 0.15 < cover.min() and cover.max() < 0.45  # rounding to whole pixels
    for m in boxes[:20, ..., 0]:  # one rectangle each
        rows, cols = np.nonzero(m)
        assert m[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
    strokes = inpainting.random_masks(rng, 50, 32, kind="stroke", min_cover=0.2, max_cover=0.4)
    cover = strokes.mean(axis=(1, 2, 3))
    assert 0.2 <= cover.min() and cover.max() < 0.7 and cover.std() > 0.03
    again = inpainting.random_masks(np.random.default_rng(0), 200, 32, kind="box",
                                    min_cover=0.2, max_cover=0.4)  # fmt: skip
    np.testing.assert_array_equal(again, boxes)  # a pure function of the generator
    with pytest.raises(ValueError, match="unknown mask kind"):
        inpainting.random_masks(rng, 1, 8, kind="circle")


def test_border_band_and_mismatch():
    m = np.zeros((1, 7, 7, 1), np.float32)
    m[0, 3, 3] = 1.0
    band = inpainting.border_band(m, 1)[0, ..., 0]
    assert band.sum() == 8 and not band[3, 3] and band[2:5, 2:5].sum() == 8
    assert inpainting.border_band(m, 2)[0, ..., 0].sum() == 24
    images = np.zeros((1, 7, 7, 3), np.float32)
    off = images.copy()
    off[0, 2, 2] = 0.8  # one band pixel wrong by 0.8 in all channels: 0.8 / 8
    assert inpainting.border_mismatch(off, images, m, width=1) == pytest.approx(0.1)
    off[0, 3, 3] = 5.0  # the repainted pixel does not count
    assert inpainting.border_mismatch(off, images, m, width=1) == pytest.approx(0.1)


def test_outpaint_canvas_geometry_and_blend():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    c = inpainting.outpaint_canvas(images, left=3, bottom=2, overlap=2, multiple=4)
    assert (c.height, c.width, c.top, c.left) == (10, 11, 0, 3)
    assert c.image.shape == (2, 12, 12, 3) == (*c.weights.shape[:3], 3)
    np.testing.assert_array_equal(c.image[:, 0:8, 3:11], images)
    w = c.weights[0, ..., 0]
    assert (w[:, :3] == 1).all() and (w[8:] == 1).all() and (w[:, 11:] == 1).all()
    # a linear ramp over the 2 overlap columns, next to the new left side only
    np.testing.assert_allclose(w[0, 3:6], [2 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(w[0:6, 10], 0.0)  # the right side did not grow
    np.testing.assert_allclose(w[6:8, 8], [1 / 3, 2 / 3])  # the bottom did
    np.testing.assert_array_equal(c.masks[..., 0] == 1, c.weights[..., 0] > 0)

    generated = rng.uniform(-1, 1, c.image.shape).astype(np.float32)
    out = c.finish(generated)
    assert out.shape == (2, 10, 11, 3)
    np.testing.assert_array_equal(out[:, :6, 5:11], images[:, :6, 2:8])  # weight 0: original
    np.testing.assert_array_equal(out[:, :, :3], generated[:, :10, :3])  # new: generated
    mid = out[:, 0, 4]  # weight 1/3
    np.testing.assert_allclose(mid, generated[:, 0, 4] / 3 + images[:, 0, 1] * 2 / 3, rtol=1e-6)

    sized = inpainting.outpaint_canvas(images, width=13, height=8, overlap=0)
    assert (sized.left, sized.width, sized.height) == (2, 13, 8)  # 5 more: 2 left, 3 right
    np.testing.assert_array_equal(sized.masks[0, :, 2:10, 0], 0)
    assert inpainting.parse_sides("left=8, top=4,width=40") == {"left": 8, "top": 4, "width": 40}
    for bad, match in (
        ({}, "nothing to outpaint"),
        ({"left": -1, "right": 2}, "negative"),
        ({"width": 5}, "smaller than the image"),
        ({"left": 4, "overlap": 5}, r"overlap=5 must lie in \[0, 4\]"),
    ):
        with pytest.raises(ValueError, match=match):
            inpainting.outpaint_canvas(images, **bad)
    with pytest.raises(ValueError, match="keys left, right, top, bottom"):
        inpainting.parse_sides("up=3")


def test_seam_statistic_sees_a_seam():
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.normal(0, 0.05, (4, 8, 16, 3)), axis=2)
    flat = inpainting.seam_statistic(smooth, 8)
    assert flat["across_seam"] == pytest.approx(flat["elsewhere"], rel=0.5)
    seamed = smooth.copy()
    seamed[:, :, 8:] += 0.5
    stat = inpainting.seam_statistic(seamed, 8)
    assert stat["across_seam"] > 5 * stat["elsewhere"]
