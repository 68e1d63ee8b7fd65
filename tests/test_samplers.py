import jax
import jax.numpy as jnp
import numpy as np
import oracle
import pytest
from reference import diffusers_trajectory, model_jax, model_jax_learned

from jdiff import guidance, samplers, schedules, timesteps

SHAPE = (4, 6)

# (method, schedule, num_steps, options). Settings span every option that shapes the grid and
# every prediction type, with the Stable Diffusion settings (scaled_linear, steps_offset=1,
# set_alpha_to_one=False) among them. The cosine schedule's last ᾱ is 2e-9 (σ = 2e4): a first
# step from there amplifies float32 rounding ~10^3-fold in any implementation, so cosine cases
# start from "leading" grids (t ≤ 900) where the problem is well conditioned; so does the
# Euler zero-terminal-SNR case (σ = 4096 there: 2e-5 apart). VP samplers start at t = 999.
CASES = [
    ("ddpm", "linear", 10, {}),
    ("ddpm", "cosine", 25, {"variance_type": "fixed_large", "timestep_spacing": "leading"}),
    ("ddpm", "sigmoid", 10, {"variance_type": "learned_range", "timestep_spacing": "linspace"}),
    (
        "ddpm",
        "scaled_linear",
        12,
        {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "clip_sample": True},
    ),
    ("ddim", "linear", 10, {}),
    ("ddim", "scaled_linear", 20, {"steps_offset": 1, "set_alpha_to_one": False}),
    (
        "ddim",
        "scaled_linear",
        10,
        {
            "rescale": True,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
            "eta": 0.7,
        },
    ),
    ("ddim", "cosine", 10, {"prediction_type": "sample", "clip_sample": True}),
    ("ddim", "linear", 16, {"timestep_spacing": "linspace", "eta": 1.0}),
    ("pndm", "linear", 10, {}),
    ("pndm", "scaled_linear", 50, {"skip_prk_steps": True, "steps_offset": 1}),
    (
        "pndm",
        "scaled_linear",
        25,
        {"skip_prk_steps": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    ),
    ("pndm", "cosine", 10, {"prediction_type": "v_prediction", "set_alpha_to_one": True}),
    ("dpmpp_2m", "linear", 10, {}),
    ("dpmpp_2m", "scaled_linear", 20, {"use_karras_sigmas": True, "steps_offset": 1}),
    (
        "dpmpp_2m",
        "scaled_linear",
        20,
        {"final_sigmas_type": "sigma_min", "lower_order_final": False},
    ),
    (
        "dpmpp_2m",
        "scaled_linear",
        20,
        {"rescale": True, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    ),
    (
        "dpmpp_2m",
        "linear",
        10,
        {"timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "sample"},
    ),
    ("euler", "linear", 10, {}),
    ("euler", "scaled_linear", 15, {"use_karras_sigmas": True}),
    (
        "euler",
        "scaled_linear",
        10,
        {"timestep_spacing": "leading", "steps_offset": 1, "final_sigmas_type": "sigma_min"},
    ),
    (
        "euler",
        "scaled_linear",
        10,
        {"rescale": True, "prediction_type": "v_prediction", "timestep_spacing": "leading"},
    ),
    ("euler_ancestral", "linear", 10, {}),
    (
        "euler_ancestral",
        "scaled_linear",
        10,
        {"timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "v_prediction"},
    ),
    ("heun", "linear", 10, {}),
    ("heun", "scaled_linear", 10, {"use_karras_sigmas": True}),
    ("heun", "cosine", 8, {"timestep_spacing": "leading", "prediction_type": "v_prediction"}),
    ("heun", "linear", 7, {"prediction_type": "sample", "clip_sample": True}),
]


def _ids(case):
    method, name, n, opts = case
    return "-".join([method, name, str(n), *(f"{k}={v}" for k, v in opts.items())])


def _schedule(name, rescale=False):
    s = schedules.get_schedule(name)
    return schedules.rescale_zero_terminal_snr(s) if rescale else s


def _compare(method, name, num_steps, opts, *, start_step=0):
    opts = dict(opts)
    rescale = opts.pop("rescale", False)
    sched = _schedule(name, rescale)
    key = jax.random.key(0)
    x_T = jax.random.normal(jax.random.key(1), SHAPE)
    if start_step:
        x0 = jax.random.normal(jax.random.key(2), SHAPE)
        x_T = samplers.add_noise(
            sched, x0, x_T, method=method, num_steps=num_steps, start_step=start_step, **opts
        )
    learned = opts.get("variance_type") == "learned_range"
    fn = model_jax_learned if learned else model_jax
    _, traj = samplers.sample(
        fn,
        sched,
        key,
        SHAPE,
        method=method,
        num_steps=num_steps,
        x_T=x_T,
        start_step=start_step,
        return_trajectory=True,
        **opts,
    )
    ref = diffusers_trajectory(
        method,
        name,
        x_T,
        num_steps,
        jax.random.split(key)[1],
        rescale=rescale,
        start_step=start_step,
        learned=learned,
        alphas_cumprod=sched.alphas_cumprod,
        **opts,
    )
    traj = np.asarray(traj)
    assert traj.shape == ref.shape
    assert np.abs(traj - ref).max() / np.abs(ref).max() <= 1e-5
    return traj


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_trajectory_matches_diffusers(case):
    _compare(*case)


@pytest.mark.parametrize(
    "case",
    [
        ("ddim", "scaled_linear", 10, {"steps_offset": 1, "set_alpha_to_one": False}),
        ("pndm", "scaled_linear", 10, {"skip_prk_steps": True, "steps_offset": 1}),
        ("dpmpp_2m", "scaled_linear", 10, {}),
        ("euler", "scaled_linear", 10, {}),
        ("euler_ancestral", "linear", 10, {}),
        ("heun", "scaled_linear", 10, {}),
        ("ddpm", "linear", 10, {}),
    ],
    ids=_ids,
)
def test_img2img_start_step_matches_diffusers(case):
    traj = _compare(*case, start_step=4)
    n = len(
        samplers.make_grid(_schedule(case[1]), method=case[0], num_steps=case[2], **case[3])[0]["t"]
    )
    assert len(traj) == n - 4


def test_add_noise_matches_diffusers():
    import torch
    from reference import make_scheduler

    sched = schedules.get_schedule("scaled_linear")
    x0 = jax.random.normal(jax.random.key(0), SHAPE)
    noise = jax.random.normal(jax.random.key(1), SHAPE)
    for method in ("ddim", "euler", "dpmpp_2m"):
        ref = make_scheduler(method, "scaled_linear", alphas_cumprod=sched.alphas_cumprod)
        ref.set_timesteps(20)
        if hasattr(ref, "set_begin_index"):
            ref.set_begin_index(5)
        t = ref.timesteps[5:6].repeat(SHAPE[0])
        want = ref.add_noise(torch.from_numpy(np.array(x0)), torch.from_numpy(np.array(noise)), t)
        got = samplers.add_noise(sched, x0, noise, method=method, num_steps=20, start_step=5)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-6)


def test_timesteps_are_those_of_diffusers():
    # DDIM leading with offset, trailing, linspace; Euler's fractional linspace
    ts = timesteps.discrete_timesteps(1000, 10, timestep_spacing="leading", steps_offset=1)
    np.testing.assert_array_equal(ts, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1])
    ts = timesteps.discrete_timesteps(1000, 3, timestep_spacing="trailing")
    np.testing.assert_array_equal(ts, [999, 666, 332])
    ts = timesteps.discrete_timesteps(1000, 4, timestep_spacing="linspace", rounded=False)
    np.testing.assert_allclose(ts, [999, 666, 333, 0])
    grid, scale = samplers.make_grid(schedules.get_schedule("linear"), method="euler", num_steps=3)
    np.testing.assert_allclose(grid["t"], [999, 499.5, 0])
    assert scale == grid["sigma"][0]


METHODS_AND_OPTIONS = [
    ("ddpm", {}),
    ("ddim", {}),
    ("pndm", {"skip_prk_steps": True}),
    ("pndm", {}),
    ("dpmpp_2m", {}),
    ("euler", {}),
    ("euler_ancestral", {}),
    ("heun", {}),
    ("dpmpp_2m", {"use_karras_sigmas": True}),
    ("ddim", {"eta": 1.0}),
]


@pytest.mark.parametrize("method, opts", METHODS_AND_OPTIONS, ids=lambda v: str(v))
def test_lands_on_the_gaussian_data_distribution(method, opts):
    """With the exact denoiser of N(μ, s²) data, every sampler's output has that law. Ancestral
    samplers shrink the variance at coarse grids (0.347 for 0.4 at 50 steps), so they get 200."""
    sched = schedules.get_schedule("linear")
    stochastic = method in ("ddpm", "euler_ancestral") or opts.get("eta")
    x = samplers.sample(
        oracle.eps_model(sched),
        sched,
        jax.random.key(3),
        (4096, 1),
        method=method,
        num_steps=200 if stochastic else 50,
        **opts,
    )
    assert abs(float(jnp.mean(x)) - oracle.MU) < 0.03
    assert abs(float(jnp.std(x)) - oracle.S) < 0.03


def test_ddim_is_the_closed_form_affine_map():
    """DDIM (η = 0) with the exact Gaussian denoiser is an affine map x_T -> a x_T + b whose
    coefficients follow from composing the per-step closed forms (float64 on the host)."""
    sched = schedules.get_schedule("cosine")
    n = 40
    x_T = jax.random.normal(jax.random.key(0), (16, 3))
    x = samplers.sample(
        oracle.eps_model(sched),
        sched,
        jax.random.key(1),
        x_T.shape,
        method="ddim",
        num_steps=n,
        x_T=x_T,
        timestep_spacing="leading",
    )
    abar = np.asarray(sched.alphas_cumprod, np.float64)
    a, b = 1.0, 0.0  # x = a x_T + b
    ts = timesteps.discrete_timesteps(1000, n, timestep_spacing="leading").astype(int)
    for t in ts:
        at, ap = abar[t], (abar[t - 1000 // n] if t - 1000 // n >= 0 else 1.0)
        v = at * oracle.S**2 + 1 - at
        # ε̂ = k (x - √ᾱ μ), x̂0 = (x - √(1-ᾱ) ε̂)/√ᾱ, x' = √ᾱ' x̂0 + √(1-ᾱ') ε̂
        k = np.sqrt(1 - at) / v
        eps_a, eps_b = k, -k * np.sqrt(at) * oracle.MU
        x0_a, x0_b = (
            (1 - np.sqrt(1 - at) * eps_a) / np.sqrt(at),
            -np.sqrt(1 - at) * eps_b / np.sqrt(at),
        )
        step_a = np.sqrt(ap) * x0_a + np.sqrt(1 - ap) * eps_a
        step_b = np.sqrt(ap) * x0_b + np.sqrt(1 - ap) * eps_b
        a, b = step_a * a, step_a * b + step_b
    np.testing.assert_allclose(x, a * np.asarray(x_T) + b, rtol=1e-5, atol=1e-5)
    # and it nearly transports x_T's law onto N(μ, s²), as the exact ODE flow would: 40 steps
    # of DDIM give a = 0.383 for the flow's 0.400.
    assert abs(a - oracle.S / np.sqrt(abar[ts[0]] * oracle.S**2 + 1 - abar[ts[0]])) < 0.06 * a


@pytest.mark.parametrize("method", ["ddim", "euler_ancestral", "heun", "pndm"])
def test_compiles_once_for_new_keys_noise_and_scales(method):
    sched = schedules.get_schedule("scaled_linear")
    traces = []

    def run(schedule, key, x_T, scale, context):
        traces.append(None)
        model = guidance.classifier_free(
            lambda x, t, context: model_jax(x, t) + context,
            context,
            jnp.zeros_like(context),
            scale,
        )
        return samplers.sample(model, schedule, key, SHAPE, method=method, num_steps=6, x_T=x_T)

    jitted = jax.jit(run)
    outs = []
    for i in range(3):
        x_T = jax.random.normal(jax.random.key(10 + i), SHAPE)
        outs.append(jitted(sched, jax.random.key(i), x_T, 1.0 + i, jnp.full(SHAPE, 0.1 * i)))
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1])


def test_bfloat16_model_keeps_float32_state():
    sched = schedules.get_schedule("scaled_linear")

    def bf16_model(x, t):
        return model_jax(x.astype(jnp.bfloat16), t).astype(jnp.bfloat16)

    for method in ("euler", "dpmpp_2m", "ddim"):
        x = samplers.sample(
            bf16_model, sched, jax.random.key(0), SHAPE, method=method, num_steps=20
        )
        ref = samplers.sample(
            model_jax, sched, jax.random.key(0), SHAPE, method=method, num_steps=20
        )
        assert x.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(x)))
        assert float(jnp.abs(x - ref).max()) < 0.1


def test_after_step_hook_sees_variance_preserving_state():
    """The hook receives the VP state at t_prev; pinning it to a known clean x0 noised at that
    level makes every sampler end exactly at x0."""
    sched = schedules.get_schedule("linear")
    x0 = jnp.linspace(-0.5, 0.5, 24).reshape(SHAPE)
    noise = jax.random.normal(jax.random.key(5), SHAPE)
    seen = []

    def pin(x, t_prev):
        seen.append(t_prev)
        abar = schedules.alpha_bar_at(sched, t_prev)[:, None]
        return jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise

    for method in ("ddim", "euler", "heun", "dpmpp_2m"):
        x = samplers.sample(
            model_jax, sched, jax.random.key(0), SHAPE, method=method, num_steps=8, after_step=pin
        )
        np.testing.assert_allclose(x, x0, atol=1e-5)
    assert seen[0].shape == (SHAPE[0],)


def test_trajectory_shape_and_end():
    sched = schedules.get_schedule("linear")
    x, traj = samplers.sample(
        model_jax,
        sched,
        jax.random.key(0),
        SHAPE,
        method="pndm",
        num_steps=10,
        skip_prk_steps=True,
        return_trajectory=True,
    )
    assert traj.shape == (11, *SHAPE)  # PLMS evaluates the model N + 1 times
    np.testing.assert_array_equal(traj[-1], x)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="plms"), "choose one of"),
        (dict(method="ddim", eta_typo=1.0), "takes no option"),
        (dict(method="euler", eta=0.5), "takes no option"),
        (dict(method="ddim", timestep_spacing="uniform"), "timestep_spacing"),
        (dict(method="ddim", prediction_type="score"), "prediction_type"),
        (dict(method="ddpm", variance_type="learned"), "variance_type"),
        (dict(method="euler", final_sigmas_type="one"), "final_sigmas_type"),
        (dict(method="ddim", num_steps=0), "num_steps"),
        (dict(method="ddim", num_steps=2000), "num_steps"),
        (dict(method="ddim", num_steps=1000, steps_offset=1), "outside"),
        (dict(method="ddim", start_step=10), "start_step"),
        (dict(method="pndm", start_step=2), "skip_prk_steps=True"),
        (dict(method="ddim", x_T=jnp.zeros((2, 2))), "x_T has shape"),
    ],
)
def test_bad_options_raise(kwargs, match):
    kwargs = {"num_steps": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        samplers.sample(
            model_jax, schedules.get_schedule("linear"), jax.random.key(0), SHAPE, **kwargs
        )


def test_model_sees_float32_batch_timesteps():
    seen = {}

    def model(x, t):
        seen["t"] = t
        return jnp.zeros_like(x)

    samplers.sample(
        model,
        schedules.get_schedule("linear"),
        jax.random.key(0),
        SHAPE,
        method="euler",
        num_steps=3,
    )
    assert seen["t"].shape == (SHAPE[0],) and seen["t"].dtype == jnp.float32
