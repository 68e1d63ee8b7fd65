"""diffusers scheduler configs <-> jdiff sampler settings (`SchedulerSettings`)."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from jdiff import samplers, schedules

SCHEDULER_METHODS = {
    "DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "PNDMScheduler": "pndm",
    "DPMSolverMultistepScheduler": "dpmpp_2m", "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_ancestral", "HeunDiscreteScheduler": "heun",
}  # fmt: skip
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear",
                   "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid"}  # fmt: skip
_OPTION_NAMES = sorted({name for opts in samplers.DEFAULTS.values() for name in opts})
# scheduler settings jdiff's samplers lack, with the value (or values) that mean "off"
_SCHEDULER_UNSUPPORTED = {
    "thresholding": (False,), "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,),
    "use_flow_sigmas": (False,), "use_lu_lambdas": (False,), "euler_at_final": (False,),
    "timestep_type": ("discrete",), "interpolation_type": ("linear",),
    "algorithm_type": ("dpmsolver++",), "solver_order": (2,), "solver_type": ("midpoint",),
    "sigma_min": (None,), "sigma_max": (None,),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
}  # fmt: skip
_DPM_ONLY = ("algorithm_type", "solver_order", "solver_type")


@dataclasses.dataclass(frozen=True, eq=False)
class SchedulerSettings:
    """A diffusers scheduler config as jdiff sampler settings.

    Attributes:
      method: the sampler of the scheduler's class (`SCHEDULER_METHODS`).
      schedule: `schedules.get_schedule` arguments (or `trained_betas`), and
        `rescale_zero_terminal_snr`.
      options: the sampler options the config sets, named as in diffusers (`prediction_type`,
        `timestep_spacing`, `steps_offset`, `set_alpha_to_one`, ...).
      config: the config itself, written back by `save_pretrained`.
    """

    method: str
    schedule: dict
    options: dict
    config: dict

    def make_schedule(self) -> schedules.Schedule:
        kwargs = dict(self.schedule)
        rescale = kwargs.pop("rescale_zero_terminal_snr", False)
        if "trained_betas" in kwargs:
            schedule = schedules.from_betas(np.asarray(kwargs["trained_betas"], np.float64))
        else:
            schedule = schedules.get_schedule(**kwargs)
        return schedules.rescale_zero_terminal_snr(schedule) if rescale else schedule

    def options_for(self, method: str | None = None) -> dict:
        """The options that apply to `method` (default: the scheduler's own), as diffusers'
        `OtherScheduler.from_config(config)` would take them over."""
        method = method or self.method
        if method not in samplers.DEFAULTS:
            raise ValueError(f"unknown sampler method {method!r}; choose one of {samplers.METHODS}")
        return {k: v for k, v in self.options.items() if k in samplers.DEFAULTS[method]}


def scheduler_from_diffusers(config: Mapping[str, Any]) -> SchedulerSettings:
    """A diffusers `scheduler_config.json` as `SchedulerSettings`.

    A scheduler class jdiff lacks falls back to DDIM on the same noise schedule, and settings
    jdiff's samplers lack are dropped, each with a warning (the user can choose another method).

    Raises:
      ValueError: a beta schedule jdiff cannot build.
    """
    config = dict(config)
    cls = config.get("_class_name", "DDPMScheduler")
    method = SCHEDULER_METHODS.get(cls)
    if method is None:
        warnings.warn(f"scheduler {cls} has no jdiff sampler: using ddim on its noise schedule "
                      f"(choose one of {samplers.METHODS})", stacklevel=2)  # fmt: skip
        method = "ddim"
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") is not None:
        schedule = {"trained_betas": list(config["trained_betas"])}
    else:
        beta = config.get("beta_schedule", "linear")
        if beta not in _BETA_SCHEDULES:
            raise ValueError(f"beta_schedule {beta!r} is not supported; jdiff has "
                             f"{sorted(_BETA_SCHEDULES)}")  # fmt: skip
        schedule = {"name": _BETA_SCHEDULES[beta], "num_timesteps": T}
        if beta != "squaredcos_cap_v2":
            schedule |= {"beta_start": float(config.get("beta_start", 1e-4)),
                         "beta_end": float(config.get("beta_end", 0.02))}  # fmt: skip
    schedule["rescale_zero_terminal_snr"] = bool(config.get("rescale_betas_zero_snr", False))
    ignored = []
    for key, off in _SCHEDULER_UNSUPPORTED.items():
        if (method == "dpmpp_2m" or key not in _DPM_ONLY) and config.get(key, off[0]) not in off:
            warnings.warn(f"{cls} setting {key}={config[key]!r} is not supported by jdiff's "
                          f"{method} sampler; ignored", stacklevel=2)  # fmt: skip
            ignored.append(key)
    options = {k: config[k] for k in _OPTION_NAMES
               if k in config and config[k] is not None and k not in ignored}  # fmt: skip
    if method in ("ddpm", "ddim"):  # diffusers' default is True, jdiff's False
        options.setdefault("clip_sample", True)
    if method != "ddpm" or options.get("variance_type") not in samplers.DDPM_VARIANCES:
        options.pop("variance_type", None)
    return SchedulerSettings(method, schedule, options, config)


def scheduler_to_diffusers(settings: SchedulerSettings) -> dict[str, Any]:
    """The diffusers `scheduler_config.json` of `settings` (its own config when it was read
    from one)."""
    if settings.config:
        return dict(settings.config)
    classes = {v: k for k, v in SCHEDULER_METHODS.items()}
    schedule = dict(settings.schedule)
    rescale = schedule.pop("rescale_zero_terminal_snr", False)
    config = {"_class_name": classes[settings.method], "rescale_betas_zero_snr": rescale}
    if "trained_betas" in schedule:
        config |= {"trained_betas": schedule["trained_betas"],
                   "num_train_timesteps": len(schedule["trained_betas"])}  # fmt: skip
    else:
        names = {v: k for k, v in _BETA_SCHEDULES.items()}
        config |= {"beta_schedule": names[schedule["name"]],
                   "num_train_timesteps": schedule.get("num_timesteps", 1000)}  # fmt: skip
        config |= {k: schedule[k] for k in ("beta_start", "beta_end") if k in schedule}
    return config | samplers.resolve_options(settings.method, settings.options_for())
