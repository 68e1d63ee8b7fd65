"""The samplers' step functions: each sampler is a grid (timesteps, noise levels, orders built
from static options and the traced schedule), an extra state and one update, a `Method` in
`STEPS`; `DEFAULTS` holds their options under diffusers' names and defaults."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion, timesteps
from jdiff.schedules import Schedule

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
