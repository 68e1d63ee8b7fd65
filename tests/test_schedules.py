import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from reference import BETAS, DIFFUSERS_SCHEDULE, make_scheduler

from jdiff import schedules

NAMES = schedules.SCHEDULES


@pytest.mark.parametrize("name", NAMES)
def test_properties(name):
    s = schedules.get_schedule(name)
    abar = np.asarray(s.alphas_cumprod)
    assert s.num_timesteps == 1000 and abar.shape == (1000,) and abar.dtype == np.float32
    assert np.all((abar > 0) & (abar < 1))
    assert np.all(np.diff(abar) < 0), "ᾱ_t must decrease"
    np.testing.assert_allclose(np.asarray(s.alphas), 1 - np.asarray(s.betas), atol=1e-7)
    np.testing.assert_allclose(np.cumprod(np.asarray(s.alphas, np.float64)), abar, rtol=2e-5)
    np.testing.assert_allclose(s.alphas_cumprod_prev[1:], abar[:-1])
    assert s.alphas_cumprod_prev[0] == 1.0 and s.posterior_variance[0] == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_matches_diffusers(name):
    ref = make_scheduler("ddpm", name)
    s = schedules.get_schedule(name)
    for ours, theirs in ((s.betas, ref.betas), (s.alphas_cumprod, ref.alphas_cumprod)):
        theirs = theirs.numpy()
        assert np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max() <= 1e-5


def test_known_values():
    lin = schedules.get_schedule("linear")
    assert np.isclose(lin.betas[0], 1e-4) and np.isclose(lin.betas[-1], 0.02)
    sd = schedules.get_schedule("scaled_linear")
    assert np.isclose(sd.betas[0], 0.00085) and np.isclose(sd.betas[-1], 0.012)
    cos = schedules.get_schedule("cosine")
    assert np.isclose(cos.betas[-1], 0.999)  # the clip
    s = np.arange(1001) / 1000
    abar = schedules.cosine_alpha_bar(s) / schedules.cosine_alpha_bar(0.0)
    np.testing.assert_allclose(cos.alphas_cumprod[:900], abar[1:901], rtol=1e-5)


def test_rescale_zero_terminal_snr_matches_diffusers():
    s = schedules.rescale_zero_terminal_snr(schedules.get_schedule("scaled_linear"))
    ref = make_scheduler("ddpm", "scaled_linear", rescale=True)
    assert s.alphas_cumprod[-1] == 0.0 and s.betas[-1] == 1.0
    first = schedules.get_schedule("scaled_linear").alphas_cumprod[0]
    np.testing.assert_allclose(s.alphas_cumprod[0], first, rtol=1e-6)
    # diffusers rescales in float32, whose β carry ~1e-7 of rounding; ᾱ agree to 1e-6 absolute
    np.testing.assert_allclose(s.alphas_cumprod, ref.alphas_cumprod.numpy(), atol=1e-6)
    # sigma samplers clamp the zero ᾱ to 2^-24 as diffusers does
    assert np.isclose(schedules.sigmas(s)[-1], np.sqrt((1 - 2.0**-24) / 2.0**-24))


def test_snr_helpers():
    s = schedules.get_schedule("cosine")
    t = jnp.array([0, 500, 999])
    abar = s.alphas_cumprod[t]
    np.testing.assert_allclose(schedules.snr(s, t), abar / (1 - abar), rtol=1e-6)
    np.testing.assert_allclose(schedules.log_snr(s, t), np.log(abar / (1 - abar)), rtol=1e-5)
    assert np.all(np.diff(np.asarray(schedules.snr(s, jnp.arange(1000)))) < 0)
    np.testing.assert_allclose(schedules.alpha_bar_at(s, t.astype(jnp.float32)), abar, rtol=1e-5)
    assert schedules.alpha_bar_at(s, jnp.array(-1.0)) == 1.0
    half = schedules.alpha_bar_at(s, jnp.array(10.5))
    assert s.alphas_cumprod[11] < half < s.alphas_cumprod[10]


def test_schedule_is_a_pytree_with_static_length():
    s = schedules.get_schedule("linear", 50)
    leaves = jax.tree.leaves(s)
    assert len(leaves) == 6 and all(leaf.shape == (50,) for leaf in leaves)

    @jax.jit
    def grid(sched):  # num_timesteps stays a Python int under jit
        return jnp.arange(sched.num_timesteps) * sched.betas

    assert grid(s).shape == (50,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="quadratic"), "choose one of"),
        (dict(name="linear", num_timesteps=1), "num_timesteps"),
        (dict(name="linear", beta_start=-0.1), r"\(0, 1\)"),
        (dict(name="linear", beta_end=1.5), r"\(0, 1\)"),
        (dict(name="cosine", beta_start=0.1), "takes no beta_start"),
        (dict(name="cosine", max_beta=0.0), "max_beta"),
    ],
)
def test_bad_input_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.get_schedule(**kwargs)


def test_from_betas_rejects_invalid():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        schedules.from_betas(np.array([0.1, 0.0, 0.2]))
    with pytest.raises(ValueError, match="1-D"):
        schedules.from_betas(np.ones((2, 2)) * 0.1)


def test_diffusers_names_cover_all():
    assert set(DIFFUSERS_SCHEDULE) == set(NAMES) == set(BETAS)
    assert torch.__version__.startswith("2.13.0")
