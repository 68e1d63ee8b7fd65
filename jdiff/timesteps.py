"""Timestep and noise-level grids of the samplers, as diffusers' `set_timesteps` builds them.

Integer grids are built on the host from static options (numpy); σ grids from the traced
schedule (jnp), so they can be built under `jit`. Pure functions; no sampler state.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jdiff.schedules import sigmas as schedule_sigmas

SPACINGS = ("leading", "trailing", "linspace")


def discrete_timesteps(
    num_timesteps: int,
    num_steps: int,
    *,
    timestep_spacing: str,
    steps_offset: int = 0,
    rounded: bool = True,
) -> np.ndarray:
    """The descending timesteps of an N-step grid over T training steps, float64 [N] (host).

    "linspace": N points from T-1 to 0 (rounded unless `rounded=False`, as the Euler family
    leaves them); "leading": k·(T//N) + steps_offset; "trailing": round(T - k·T/N) - 1.
    """
    if timestep_spacing not in SPACINGS:
        raise ValueError(f"unknown timestep_spacing {timestep_spacing!r}; choose one of {SPACINGS}")
    if timestep_spacing == "linspace":
        ts = np.linspace(
            0, num_timesteps - 1, num_steps, dtype=np.float64 if rounded else np.float32
        )
        return (ts.round() if rounded else ts)[::-1].astype(np.float64)
    if timestep_spacing == "leading":
        ts = (np.arange(num_steps) * (num_timesteps // num_steps))[::-1] + float(steps_offset)
        if ts[0] > num_timesteps - 1 or ts[-1] < 0:
            raise ValueError(
                f"steps_offset={steps_offset} moves the {num_steps}-step 'leading' grid outside "
                f"[0, {num_timesteps - 1}]; lower steps_offset or num_steps"
            )
        return ts
    return np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)) - 1.0


def karras_sigmas(sigma_max: jax.Array, sigma_min: jax.Array, n: int, rho: float = 7.0):
    """σ_i = (σ_max^(1/ρ) + i/(n-1) (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, [n] (EDM eq. 5)."""
    ramp = jnp.linspace(0.0, 1.0, n)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: jax.Array, log_sigmas: jax.Array) -> jax.Array:
    """The fractional timestep of noise level σ, by linear interpolation in log σ (diffusers)."""
    log_sigma = jnp.log(jnp.maximum(sigma, 1e-10))
    low = jnp.clip(
        jnp.sum(log_sigmas[:, None] <= log_sigma[None], axis=0) - 1, 0, len(log_sigmas) - 2
    )
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = jnp.clip((lo - log_sigma) / (lo - hi), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


def sigma_grid(schedule, num_steps, opts, *, final_sigma, karras_range="grid"):
    """(timesteps [N], σ [N+1] with the final σ appended) of the Euler family and DPM-Solver++,
    as diffusers' `set_timesteps` builds them."""
    T = schedule.num_timesteps
    all_sigmas = schedule_sigmas(schedule)
    log_sigmas = jnp.log(all_sigmas)
    if karras_range == "full":  # DPM-Solver: N+1 points, the last (t = 0) dropped
        spacing = opts["timestep_spacing"]
        if spacing == "trailing":
            ts = discrete_timesteps(T, num_steps, timestep_spacing=spacing)
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps + 1).round()[::-1][:-1]
        else:
            ts = (np.arange(num_steps + 1) * (T // (num_steps + 1)))[::-1][:-1] + opts[
                "steps_offset"
            ]
    else:
        ts = discrete_timesteps(
            T,
            num_steps,
            timestep_spacing=opts["timestep_spacing"],
            steps_offset=opts["steps_offset"],
            rounded=False,
        )
    ts = jnp.asarray(ts.astype(np.float32))
    sig = jnp.interp(ts, jnp.arange(T, dtype=jnp.float32), all_sigmas)
    if opts["use_karras_sigmas"]:
        hi, lo = (all_sigmas[-1], all_sigmas[0]) if karras_range == "full" else (sig[0], sig[-1])
        sig = karras_sigmas(hi, lo, num_steps)
        ts = sigma_to_t(sig, log_sigmas)
        if karras_range == "full":
            ts = jnp.round(ts)
    last = all_sigmas[0] if final_sigma == "sigma_min" else 0.0
    return ts, jnp.append(sig, last)


def init_noise_sigma(sig_with_last, spacing):
    """diffusers' `init_noise_sigma` of the Euler family: σ_max, or √(σ_max²+1) for "leading"."""
    top = jnp.max(sig_with_last)
    return top if spacing in ("linspace", "trailing") else jnp.sqrt(top**2 + 1.0)


def pndm_table(ts: np.ndarray, ratio: int, skip_prk: bool, start: int):
    """The bookkeeping of diffusers' PNDMScheduler, unrolled into per-step weights (host).

    Each step evaluates the model once (e) and moves the state by the transfer function φ from
    t_from to t_to with the effective output  w_new e + Σ_k w_hist[k] h_k + w_acc acc, where h is
    the stack of the last three stored outputs and acc the Runge-Kutta accumulator.
    """
    n_prk = 0 if skip_prk else 12
    rows, n_hist = [], 0
    for counter, t in enumerate(ts[start:]):
        r = {
            "t_from": t,
            "t_to": t - ratio,
            "w_new": 1.0,
            "w_hist": [0.0, 0.0, 0.0],
            "w_acc": 0.0,
            "acc_keep": 1.0,
            "acc_add": 0.0,
            "push": 0.0,
            "save": 0.0,
            "use_saved": 0.0,
        }
        if counter < n_prk:  # pseudo Runge-Kutta (Liu et al. 2022, eq. 13), four model calls
            phase = counter % 4
            r["t_from"] = ts[counter // 4 * 4]
            r["t_to"] = t - (0 if counter % 2 else ratio // 2)
            r["use_saved"] = 1.0
            if phase == 0:
                r.update(acc_keep=0.0, acc_add=1 / 6, push=1.0, save=1.0)
            elif phase in (1, 2):
                r.update(acc_add=1 / 3)
            else:
                r.update(w_new=1 / 6, w_acc=1.0, acc_keep=0.0)
        elif counter == 1 and skip_prk:  # re-take the first step with the averaged slope
            r.update(t_from=t + ratio, t_to=t, w_new=0.5, use_saved=1.0)
            r["w_hist"][0] = 0.5
        else:  # linear multistep (Adams-Bashforth of order up to 4)
            r["push"] = 1.0
            order = min(n_hist + 1, 4)
            coeffs = {1: [1.0], 2: [3, -1], 3: [23, -16, 5], 4: [55, -59, 37, -9]}[order]
            denom = {1: 1.0, 2: 2.0, 3: 12.0, 4: 24.0}[order]
            r["w_new"] = coeffs[0] / denom
            r["w_hist"] = [c / denom for c in coeffs[1:]] + [0.0] * (4 - order)
            r["save"] = 1.0 if counter == 0 else 0.0
        n_hist += int(r["push"])
        rows.append(r)
    return {k: np.array([row[k] for row in rows], np.float32) for k in rows[0]}


def pndm_timesteps(T, num_steps, opts):
    """PNDM's timesteps, descending (diffusers' `PNDMScheduler.set_timesteps`): the PLMS grid
    with its first step repeated (`skip_prk_steps`), or the Runge-Kutta warm-up's half-steps
    and then PLMS."""
    ascending = discrete_timesteps(
        T, num_steps, timestep_spacing=opts["timestep_spacing"], steps_offset=opts["steps_offset"]
    )[::-1]
    if opts["skip_prk_steps"]:
        return np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
    half = T // num_steps // 2
    prk = np.repeat(ascending[-4:], 2) + np.tile([0, half], 4)
    prk = np.repeat(prk[:-1], 2)[1:-1][::-1]
    return np.concatenate([prk, ascending[:-3][::-1]])
