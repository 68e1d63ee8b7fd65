"""Reverse-process samplers: one small step function each, one `lax.scan` driver.

Every sampler sees only `model_fn(x_t, t) -> prediction`, with x_t the variance-preserving input
[B, ...] and t float32 [B] on the training scale [0, T-1]. With the same settings, model function
and x_T, each deterministic sampler reproduces the trajectory of the diffusers scheduler of the
same name; option names and defaults are diffusers' (except `clip_sample=False`).

The grid of a sampler (its timesteps, noise levels and step orders) is built from static options
and the traced schedule; the whole loop is one `lax.scan`, so `jax.jit(partial(sample, model_fn,
method=..., num_steps=..., shape=...))` compiles once and a new key, x_T or parameter set does not
retrace. The state and its coefficients are float32 whatever dtype the model computes in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion, timesteps
from jdiff.schedules import Schedule
from jdiff.timesteps import SPACINGS

FINAL_SIGMAS = ("zero", "sigma_min")
DDPM_VARIANCES = ("fixed_small", "fixed_large", "learned_range")

_COMMON = {"prediction_type": "epsilon", "steps_offset": 0}
_SIGMA = {**_COMMON, "timestep_spacing": "linspace", "use_karras_sigmas": False}
_CLIP = {"clip_sample": False, "clip_sample_range": 1.0}
DEFAULTS = {  # the defaults of the diffusers class of the same name, but clip_sample=False
    "ddpm": {**_COMMON, **_CLIP, "timestep_spacing": "leading", "variance_type": "fixed_small"},
    "ddim": {
        **_COMMON,
        **_CLIP,
        "timestep_spacing": "leading",
        "set_alpha_to_one": True,
        "eta": 0.0,
    },
    "pndm": {
        **_COMMON,
        "timestep_spacing": "leading",
        "set_alpha_to_one": False,
        "skip_prk_steps": False,
    },
    "dpmpp_2m": {**_SIGMA, "final_sigmas_type": "zero", "lower_order_final": True},
    "euler": {**_SIGMA, "final_sigmas_type": "zero"},
    "euler_ancestral": dict(_SIGMA),
    "heun": {**_SIGMA, **_CLIP},
}
METHODS = tuple(DEFAULTS)

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _ac(schedule: Schedule, t, final):
    """ᾱ at integer timesteps t, with `final` where t < 0 (the step past the clean end)."""
    t = jnp.asarray(t, jnp.int32)
    return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], final)


def _final_alpha(schedule: Schedule, set_alpha_to_one):
    return jnp.where(set_alpha_to_one, 1.0, schedule.alphas_cumprod[0])


def _vp_noise(schedule: Schedule, t):
    """The (x_0, ε) coefficients of q(x_t | x_0) at integer timesteps t."""
    abar = schedule.alphas_cumprod[jnp.asarray(t, jnp.int32)]
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


# ----------------------------------------------------------------------------- the steps


class Method(NamedTuple):
    """A sampler: `grid` makes the per-step arrays, `init` the extra state, `step` one update.

    grid(schedule, num_steps, opts, start_step) -> (per-step dict of arrays [S, ...], init scale)
      with at least "t" (model timestep), "t_prev" (timestep after the step; -1 = clean),
      "c_x0", "c_noise" (x_S = c_x0 x_0 + c_noise ε in the sampler's state space) and
      "sigma_prev" (σ of the state after the step: 0 for variance-preserving states).
    step(model_fn, schedule, x, state, g, noise, opts) -> (x, state)
    """

    grid: Callable
    init: Callable
    step: Callable


def _no_state(x):
    return ()


def _model(model_fn, x, t):
    out = model_fn(x, jnp.full((x.shape[0],), t, jnp.float32))
    return out.astype(jnp.float32)


def _clip(x0, opts):
    if opts.get("clip_sample"):
        r = opts["clip_sample_range"]
        return jnp.clip(x0, -r, r)
    return x0


def _check_steps(T, num_steps):
    if not isinstance(num_steps, int) or not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be an integer in [1, {T}], got {num_steps!r}")


def _vp_grid(schedule, ts, t_prev, final):
    c_x0, c_noise = _vp_noise(schedule, ts)
    return {
        "t": jnp.asarray(ts, jnp.float32),
        "t_prev": jnp.asarray(t_prev, jnp.float32),
        "c_x0": c_x0,
        "c_noise": c_noise,
        "final": jnp.broadcast_to(final, ts.shape),
        "sigma_prev": jnp.zeros(ts.shape),
    }


def _ddpm_grid(schedule, num_steps, opts, start_step=0):
    ts = timesteps.discrete_timesteps(
        schedule.num_timesteps,
        num_steps,
        timestep_spacing=opts["timestep_spacing"],
        steps_offset=opts["steps_offset"],
    )
    return _vp_grid(schedule, ts, np.append(ts[1:], -1.0), 1.0), 1.0


def _ddpm_step(model_fn, schedule, x, state, g, noise, opts):
    """DDPM ancestral step from t to the previous grid point s (Ho et al. 2020, eqs. 6-7, 11)."""
    out = _model(model_fn, x, g["t"])
    if opts["variance_type"] == "learned_range":
        out, v = jnp.split(out, 2, axis=-1)
    abar_t, abar_s = _ac(schedule, g["t"], 1.0), _ac(schedule, g["t_prev"], 1.0)
    x0, _ = diffusion.split_prediction(out, x, abar_t, opts["prediction_type"])
    c0, ct, var, beta = diffusion.posterior_coefficients(abar_t, abar_s)
    mean = c0 * _clip(x0, opts) + ct * x
    var = jnp.maximum(var, 1e-20)
    if opts["variance_type"] == "fixed_small":
        std = jnp.sqrt(var)
    elif opts["variance_type"] == "fixed_large":
        std = jnp.sqrt(beta)
    else:  # IDDPM eq. 15: log Σ = u log β + (1 - u) log β̃, u = (v + 1) / 2
        u = (v + 1.0) / 2.0
        std = jnp.exp(0.5 * (u * jnp.log(beta) + (1.0 - u) * jnp.log(var)))
    return mean + jnp.where(g["t"] > 0, std, 0.0) * noise, state


def _ddim_grid(schedule, num_steps, opts, start_step=0):
    T = schedule.num_timesteps
    ts = timesteps.discrete_timesteps(
        T, num_steps, timestep_spacing=opts["timestep_spacing"], steps_offset=opts["steps_offset"]
    )
    final = _final_alpha(schedule, opts["set_alpha_to_one"])
    return _vp_grid(schedule, ts, ts - T // num_steps, final), 1.0


def _ddim_step(model_fn, schedule, x, state, g, noise, opts):
    """DDIM (Song et al. 2021, eq. 12): x_s = √ᾱ_s x̂_0 + √(1 - ᾱ_s - σ²) ε̂ + σ z."""
    out = _model(model_fn, x, g["t"])
    abar_t, abar_s = _ac(schedule, g["t"], 1.0), _ac(schedule, g["t_prev"], g["final"])
    x0, eps = diffusion.split_prediction(out, x, abar_t, opts["prediction_type"])
    x0 = _clip(x0, opts)
    # eq. 16: σ_t(η) = η √((1 - ᾱ_s) / (1 - ᾱ_t)) √(1 - ᾱ_t / ᾱ_s)
    sigma = opts["eta"] * jnp.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
    x = jnp.sqrt(abar_s) * x0 + jnp.sqrt(1 - abar_s - sigma**2) * eps + sigma * noise
    return x, state


def _pndm_grid(schedule, num_steps, opts, start_step=0):
    T = schedule.num_timesteps
    if not opts["skip_prk_steps"] and (num_steps < 4 or start_step > 0):
        raise ValueError(
            "pndm's Runge-Kutta warm-up needs num_steps >= 4 and start_step = 0; pass "
            "skip_prk_steps=True (PLMS, as Stable Diffusion does) to start part-way"
        )
    ts = timesteps.pndm_timesteps(T, num_steps, opts)
    table = timesteps.pndm_table(ts, T // num_steps, opts["skip_prk_steps"], start_step)
    # The table starts at start_step; zero rows stand for the steps that make_grid slices off.
    table = {
        k: np.concatenate([np.zeros((start_step, *v.shape[1:]), v.dtype), v])
        for k, v in table.items()
    }
    final = _final_alpha(schedule, opts["set_alpha_to_one"])
    g = _vp_grid(schedule, ts, table["t_to"], final)
    return {**g, **{k: jnp.asarray(v) for k, v in table.items()}}, 1.0


def _pndm_init(x):
    return {"hist": jnp.zeros((3, *x.shape)), "acc": jnp.zeros_like(x), "saved": x}


def _pndm_step(model_fn, schedule, x, state, g, noise, opts):
    """PNDM/PLMS (Liu et al. 2022): a multistep combination of outputs through the transfer φ."""
    e = _model(model_fn, x, g["t"])
    eff = (
        g["w_new"] * e
        + jnp.tensordot(g["w_hist"], state["hist"], axes=1)
        + g["w_acc"] * state["acc"]
    )
    saved = jnp.where(g["save"] > 0, x, state["saved"])
    src = jnp.where(g["use_saved"] > 0, saved, x)
    abar_t, abar_s = _ac(schedule, g["t_from"], 1.0), _ac(schedule, g["t_to"], g["final"])
    if opts["prediction_type"] == "v_prediction":
        eff = diffusion.v_to_eps(src, eff, abar_t)
    # eq. 11: φ(x, ε, t, s) = √(ᾱ_s/ᾱ_t) x - (ᾱ_s - ᾱ_t) ε / (ᾱ_t √(1-ᾱ_s) + √(ᾱ_t (1-ᾱ_t) ᾱ_s))
    denom = abar_t * jnp.sqrt(1 - abar_s) + jnp.sqrt(abar_t * (1 - abar_t) * abar_s)
    x = jnp.sqrt(abar_s / abar_t) * src - (abar_s - abar_t) * eff / denom
    hist = jnp.where(g["push"] > 0, jnp.concatenate([e[None], state["hist"][:2]]), state["hist"])
    acc = g["acc_keep"] * state["acc"] + g["acc_add"] * e
    return x, {"hist": hist, "acc": acc, "saved": saved}


def _sigma_vp_grid(ts, sig, t_prev):
    """Per-step arrays of a σ-parameterised grid whose state is the variance-preserving x."""
    alpha = 1.0 / jnp.sqrt(sig[:-1] ** 2 + 1.0)
    return {
        "t": ts,
        "t_prev": t_prev,
        "sigma": sig[:-1],
        "sigma_next": sig[1:],
        "c_x0": alpha,
        "c_noise": sig[:-1] * alpha,
        "sigma_prev": jnp.zeros_like(ts),
    }


def _dpm_grid(schedule, num_steps, opts, start_step=0):
    ts, sig = timesteps.sigma_grid(
        schedule, num_steps, opts, final_sigma=_check_final(opts), karras_range="full"
    )
    n = len(ts)
    lower_final = (opts["lower_order_final"] and n < 15) or opts["final_sigmas_type"] == "zero"
    order = np.array(
        [1 if (i == start_step or (i == n - 1 and lower_final)) else 2 for i in range(n)],
        np.float32,
    )
    g = _sigma_vp_grid(ts, sig, jnp.append(ts[1:], -1.0))
    return {**g, "sigma_before": jnp.append(sig[:1], sig[:-2]), "order": jnp.asarray(order)}, 1.0


def _dpm_init(x):
    return {"x0_prev": jnp.zeros_like(x)}


def _dpm_step(model_fn, schedule, x, state, g, noise, opts):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in half-log-SNR λ = log(α/σ), data prediction."""
    out = _model(model_fn, x, g["t"])

    def alpha_sigma(s):
        a = 1.0 / jnp.sqrt(s**2 + 1.0)
        return a, s * a

    a_s0, s_s0 = alpha_sigma(g["sigma"])
    a_t, s_t = alpha_sigma(g["sigma_next"])
    a_s1, s_s1 = alpha_sigma(g["sigma_before"])
    x0, _ = diffusion.split_prediction(out, x, a_s0**2, opts["prediction_type"])
    lam_t, lam_s0, lam_s1 = (
        jnp.log(a) - jnp.log(s) for a, s in ((a_t, s_t), (a_s0, s_s0), (a_s1, s_s1))
    )
    h = lam_t - lam_s0
    second = g["order"] > 1
    r0 = jnp.where(second, (lam_s0 - lam_s1) / h, 1.0)
    d1 = jnp.where(second, (x0 - state["x0_prev"]) / r0, 0.0)
    phi = jnp.expm1(-h)  # e^{-h} - 1
    x = (s_t / s_s0) * x - a_t * phi * x0 - 0.5 * a_t * phi * d1
    return x, {"x0_prev": x0}


def _euler_family_grid(schedule, num_steps, opts, start_step=0):
    final = _check_final(opts) if "final_sigmas_type" in opts else "zero"
    ts, sig = timesteps.sigma_grid(schedule, num_steps, opts, final_sigma=final)
    t_prev = jnp.append(ts[1:], -1.0)
    g = {
        "t": ts,
        "t_prev": t_prev,
        "sigma": sig[:-1],
        "sigma_next": sig[1:],
        "c_x0": jnp.ones_like(ts),
        "c_noise": sig[:-1],
        "sigma_prev": sig[1:],
    }
    return g, timesteps.init_noise_sigma(sig, opts["timestep_spacing"])


def _sigma_x0(model_fn, x, t, sigma, opts):
    out = _model(model_fn, x / jnp.sqrt(sigma**2 + 1.0), t)
    return _clip(diffusion.split_prediction_sigma(out, x, sigma, opts["prediction_type"]), opts)


def _euler_step(model_fn, schedule, x, state, g, noise, opts):
    """Euler step of the probability-flow ODE dx/dσ = (x - x̂_0)/σ (Karras et al. 2022, Alg. 1)."""
    d = (x - _sigma_x0(model_fn, x, g["t"], g["sigma"], opts)) / g["sigma"]
    return x + d * (g["sigma_next"] - g["sigma"]), state


def _euler_ancestral_step(model_fn, schedule, x, state, g, noise, opts):
    """Euler step down to σ_down, then fresh noise of scale σ_up (k-diffusion's ancestral step)."""
    s, s_next = g["sigma"], g["sigma_next"]
    d = (x - _sigma_x0(model_fn, x, g["t"], s, opts)) / s
    sigma_up = jnp.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
    sigma_down = jnp.sqrt(s_next**2 - sigma_up**2)
    return x + d * (sigma_down - s) + sigma_up * noise, state


def _heun_step(model_fn, schedule, x, state, g, noise, opts):
    """Heun's second-order step (Karras et al. 2022, Alg. 1); Euler on the last step to σ = 0."""
    s, s_next = g["sigma"], g["sigma_next"]
    d = (x - _sigma_x0(model_fn, x, g["t"], s, opts)) / s
    x_euler = x + d * (s_next - s)

    def correct():
        d2 = (x_euler - _sigma_x0(model_fn, x_euler, g["t_prev"], s_next, opts)) / s_next
        return x + 0.5 * (d + d2) * (s_next - s)

    return jax.lax.cond(s_next > 0, correct, lambda: x_euler), state


def _check_final(opts):
    if opts["final_sigmas_type"] not in FINAL_SIGMAS:
        raise ValueError(
            f"unknown final_sigmas_type {opts['final_sigmas_type']!r}; choose one of {FINAL_SIGMAS}"
        )
    return opts["final_sigmas_type"]


STEPS = {
    "ddpm": Method(_ddpm_grid, _no_state, _ddpm_step),
    "ddim": Method(_ddim_grid, _no_state, _ddim_step),
    "pndm": Method(_pndm_grid, _pndm_init, _pndm_step),
    "dpmpp_2m": Method(_dpm_grid, _dpm_init, _dpm_step),
    "euler": Method(_euler_family_grid, _no_state, _euler_step),
    "euler_ancestral": Method(_euler_family_grid, _no_state, _euler_ancestral_step),
    "heun": Method(_euler_family_grid, _no_state, _heun_step),
}


# ----------------------------------------------------------------------------- the driver


def resolve_options(method: str, options: dict) -> dict:
    """The method's diffusers defaults updated with `options`; unknown names raise ValueError."""
    if method not in STEPS:
        raise ValueError(f"unknown sampler method {method!r}; choose one of {METHODS}")
    unknown = set(options) - set(DEFAULTS[method])
    if unknown:
        raise ValueError(
            f"sampler {method!r} takes no option(s) {sorted(unknown)}; "
            f"its options are {sorted(DEFAULTS[method])}"
        )
    opts = {**DEFAULTS[method], **options}
    diffusion.check_prediction_type(opts["prediction_type"])
    if opts["timestep_spacing"] not in SPACINGS:
        raise ValueError(
            f"unknown timestep_spacing {opts['timestep_spacing']!r}; choose one of {SPACINGS}"
        )
    if method == "ddpm" and opts["variance_type"] not in DDPM_VARIANCES:
        raise ValueError(
            f"unknown variance_type {opts['variance_type']!r} for ddpm; "
            f"choose one of {DDPM_VARIANCES}"
        )
    if method in ("pndm",) and opts["prediction_type"] == "sample":
        raise ValueError("pndm supports prediction_type 'epsilon' or 'v_prediction', not 'sample'")
    return opts


def _prepare(schedule, method, num_steps, start_step, options):
    opts = resolve_options(method, options)
    _check_steps(schedule.num_timesteps, num_steps)
    grid, scale = STEPS[method].grid(schedule, num_steps, opts, start_step)
    n = len(grid["t"])
    if not isinstance(start_step, int) or not 0 <= start_step < n:
        raise ValueError(f"start_step must be an integer in [0, {n - 1}], got {start_step!r}")
    grid = {k: v[start_step:] for k, v in grid.items()}
    grid["index"] = jnp.arange(start_step, n, dtype=jnp.int32)
    return grid, jnp.asarray(scale, jnp.float32), opts


def make_grid(schedule: Schedule, *, method: str, num_steps: int, start_step: int = 0, **options):
    """The per-step arrays of a sampler's grid from `start_step` on, and its x_T scale.

    Returns:
        (grid, init_scale): grid is a dict of arrays with leading axis S (the scan length), among
        them "t" (the model's timestep per step) and "t_prev"; init_scale is diffusers'
        `init_noise_sigma` (1 for variance-preserving samplers).
    """
    grid, scale, _ = _prepare(schedule, method, num_steps, start_step, options)
    return grid, scale


def step_noise(key: jax.Array, index: jax.Array, shape) -> jax.Array:
    """The standard-normal noise a stochastic sampler draws at grid step `index`."""
    return jax.random.normal(jax.random.fold_in(key, index), shape, jnp.float32)


def add_noise(
    schedule: Schedule,
    x0: jax.Array,
    noise: jax.Array,
    *,
    method: str,
    num_steps: int,
    start_step: int,
    **options,
) -> jax.Array:
    """Noise clean x0 [B, ...] to the state a sampler has at grid step `start_step` (img2img).

    Variance-preserving samplers return √ᾱ x0 + √(1-ᾱ) ε; the Euler family's state is
    x0 + σ ε (diffusers' `add_noise` of the same scheduler). Pass the result as `x_T` to
    `sample(..., start_step=start_step)` with the same options.
    """
    grid, _ = make_grid(
        schedule, method=method, num_steps=num_steps, start_step=start_step, **options
    )
    return grid["c_x0"][0] * x0.astype(jnp.float32) + grid["c_noise"][0] * noise


def sample(
    model_fn: ModelFn,
    schedule: Schedule,
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    method: str,
    num_steps: int,
    x_T: jax.Array | None = None,
    start_step: int = 0,
    after_step: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    return_trajectory: bool = False,
    **options,
):
    """Run the reverse process from noise to data with one `lax.scan`.

    Args:
        model_fn: (x_t [B, ...] variance-preserving, t float32 [B]) -> prediction [B, ...] of
            `prediction_type` (for ddpm's "learned_range", 2x the channels, last axis).
        schedule: the training schedule.
        key: PRNG key; x_T (when not given) and per-step noise derive from it.
        shape: [B, ...], the shape of a sample.
        method: one of `METHODS`.
        num_steps: N, the number of grid steps (static).
        x_T: standard-normal initial noise [B, ...]; sigma-space samplers scale it by diffusers'
            `init_noise_sigma`. With start_step > 0, x_T is instead the state at that step, as
            `add_noise` returns it, and is used as is.
        start_step: begin at this index of the grid (img2img); static.
        after_step: optional hook (x [B, ...], t_prev float32 [B]) -> x applied after every step
            to the variance-preserving state at timestep t_prev (-1 past the clean end; fractional
            on sigma grids). Inpainting replaces the known region this way.
        return_trajectory: also return the state after every step.
        **options: the method's options (see `DEFAULTS`), named as in diffusers.

    Returns:
        x_0 [B, ...] float32, or (x_0, trajectory [S, B, ...]) with return_trajectory.
    """
    grid, scale, opts = _prepare(schedule, method, num_steps, start_step, options)
    method_def = STEPS[method]
    init_key, step_key = jax.random.split(key)
    if x_T is None:
        x = jax.random.normal(init_key, shape, jnp.float32) * scale
    else:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {x_T.shape}, expected {tuple(shape)}")
        x = x_T.astype(jnp.float32) * (scale if start_step == 0 else 1.0)

    def body(carry, g):
        x, state = carry
        noise = step_noise(step_key, g["index"], x.shape)
        x, state = method_def.step(model_fn, schedule, x, state, g, noise, opts)
        if after_step is not None:
            c = jnp.sqrt(g["sigma_prev"] ** 2 + 1.0)
            x = after_step(x / c, jnp.full((x.shape[0],), g["t_prev"], jnp.float32)) * c
        return (x, state), (x if return_trajectory else None)

    (x, _), traj = jax.lax.scan(body, (x, method_def.init(x)), grid)
    return (x, traj) if return_trajectory else x


# ----------------------------------------------------------------------------- RePaint

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
