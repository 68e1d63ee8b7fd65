"""The rules of train.py's config, one table for every section: checked at the door, before any
data is read, anything compiles or a file is written.

`check_config(config)` raises `InputError` naming the first key that breaks its rule, its value
and what would fit. A new config option gets its rule in `RULES` beside its section's others;
an option with no rule is accepted as it is (model overrides, data names and paths are checked
where they are used, by the code that knows them).
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import math
import os
import pathlib
from collections.abc import Callable
from typing import Any

OS_HINTS = {  # what would help when a file cannot be written, by errno
    errno.ENOSPC: "the disk is full: free space, or choose another --workdir",
    errno.EDQUOT: "the disk quota is used up: free space, or choose another --workdir",
    errno.EFBIG: "a file-size limit (ulimit -f) stops it: raise it",
    errno.EACCES: "choose a directory you may write to",
    errno.EROFS: "choose a directory you may write to",
}


class InputError(ValueError):
    """Bad input from a user: the message names the input, what is wrong and what would fit."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """One key's rule: `check(value)` is None when the value fits, else what would fit."""

    check: Callable[[Any], str | None]


def integer(low: int | None = None, high: int | None = None) -> Rule:
    """An int (not a bool) in [low, high]."""

    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            return "an integer"
        if (low is not None and v < low) or (high is not None and v > high):
            return _range("an integer", low, high)
        return None

    return Rule(check)


def number(low: float | None = None, high: float | None = None, *, open_low: bool = False) -> Rule:
    """A finite real number in [low, high] (or (low, high] with open_low)."""

    def check(v):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return _range("a finite number", low, high, open_low)
        if low is not None and (v < low or (open_low and v == low)):
            return _range("a finite number", low, high, open_low)
        if high is not None and v > high:
            return _range("a finite number", low, high, open_low)
        return None

    return Rule(check)


def choice(*options) -> Rule:
    """One of `options`."""
    return Rule(lambda v: None if v in options else f"one of {', '.join(map(repr, options))}")


def boolean() -> Rule:
    """True or False."""
    return Rule(lambda v: None if isinstance(v, bool) else "True or False")


def _range(kind, low, high, open_low=False) -> str:
    if low is not None and high is not None:
        return f"{kind} {'>' if open_low else '>='} {low} and <= {high}"
    if low is not None:
        return f"{kind} {'>' if open_low else '>='} {low}"
    return kind if high is None else f"{kind} <= {high}"


def _rules() -> dict[str, Rule]:
    from jdiff import diffusion, samplers, schedules, training
    from jdiff.models import CONDITIONINGS
    from jdiff.nn.attention import IMPLEMENTATIONS

    return {
        "seed": integer(0),
        "task": choice(*training.TASKS),
        # data
        "data.image_size": integer(1),
        "data.channels": integer(1, 4),
        "data.batch_size": integer(1),
        "data.random_flip": boolean(),
        # model
        "model.class_conditional": boolean(),
        "model.dtype": choice("float32", "bfloat16", "float16"),
        "model.remat": boolean(),
        "model.attention_implementation": choice("auto", *(i for i in IMPLEMENTATIONS if i)),
        # diffusion
        "diffusion.schedule": choice(*schedules.SCHEDULES),
        "diffusion.num_timesteps": integer(2),
        "diffusion.beta_start": number(0.0, 1.0, open_low=True),
        "diffusion.beta_end": number(0.0, 1.0, open_low=True),
        "diffusion.prediction_type": choice(*diffusion.PREDICTION_TYPES),
        "diffusion.loss": choice(*training.LOSSES),
        "diffusion.snr_gamma": number(0.0),
        # optim
        "optim.name": choice(*training.OPTIMIZERS),
        "optim.learning_rate": number(0.0, 10.0, open_low=True),
        "optim.warmup_steps": integer(0),
        "optim.b1": number(0.0, 1.0),
        "optim.b2": number(0.0, 1.0),
        "optim.eps": number(0.0, open_low=True),
        "optim.weight_decay": number(0.0),
        "optim.grad_clip": number(0.0),
        "optim.accumulate_steps": integer(1),
        "optim.cosine_decay_steps": integer(0),
        # train
        "train.num_steps": integer(1),
        "train.log_every": integer(1),
        "train.checkpoint_every": integer(1),
        "train.keep_checkpoints": integer(1),
        "train.sample_every": integer(0),
        "train.ema_max_decay": number(0.0, 1.0),
        "train.class_dropout": number(0.0, 1.0),
        "train.caption_dropout": number(0.0, 1.0),
        "train.noise_level_power": number(0.0, open_low=True),
        # mesh and processes
        "mesh.data": integer(-1),
        "mesh.fsdp": integer(1),
        "mesh.fsdp_min_size": integer(0),
        "distributed.auto": boolean(),
        "distributed.num_processes": integer(1),
        "distributed.process_id": integer(0),
        "distributed.timeout_s": integer(1),
        # the grids train.py writes
        "sample.method": choice(*samplers.METHODS),
        "sample.num_steps": integer(1),
        "sample.num_samples": integer(1),
        "sample.guidance_scale": number(0.0, 100.0),
        "sample.options.eta": number(0.0),
        # latent diffusion and its autoencoder
        "latent.conditioning": choice(None, *CONDITIONINGS),
        "latent.mask_variants": integer(1),
        "text.max_length": integer(2),
        "text.frozen": boolean(),
        "autoencoder.kl_weight": number(0.0),
        "autoencoder.reconstruction": choice(*training.RECONSTRUCTION_LOSSES),
        "autoencoder.eval_images": integer(1),
        "autoencoder.scaling_images": integer(1),
        "autoencoder.trainable": choice("all", "decoder"),
        # LoRA on pretrained weights
        "lora.rank": integer(0, 4096),
        "lora.alpha": number(0.0),
        "lora.text_encoder": boolean(),
        # ControlNets on pretrained weights
        "controlnet.conditioning": choice("", None, "silhouette", "outline"),
        "controlnet.prompt": choice("colour", "caption"),
    }


def _get(config, dotted: str):
    for part in dotted.split("."):
        if not hasattr(config, "keys") or part not in config.keys():
            return _MISSING
        config = config[part]
    return config


_MISSING = object()


def check_config(config) -> None:
    """Raise `InputError` for the first key of `config` (a ConfigDict) that breaks its rule,
    or for settings that contradict each other; None when all fit."""
    for key, rule in _rules().items():
        value = _get(config, key)
        if value is _MISSING:
            continue
        fits = rule.check(value)
        if fits is not None:
            raise InputError(f"config.{key}={value!r}: expected {fits}")
    _check_together(config)


def _check_together(config) -> None:
    def get(key, default=None):
        return _value(config, key, default)

    if get("diffusion.schedule") in ("linear", "scaled_linear", "sigmoid"):
        if get("diffusion.beta_start", 0.0) >= get("diffusion.beta_end", 1.0):
            raise InputError(f"config.diffusion.beta_start={get('diffusion.beta_start')!r} must "
                             f"be below beta_end={get('diffusion.beta_end')!r}")  # fmt: skip
    if get("lora.rank", 0) and not get("latent.pretrained"):
        raise InputError("config.lora.rank trains LoRA adapters on pretrained weights: set "
                         "config.latent.pretrained too (or lora.rank=0)")  # fmt: skip
    processes, process_id = get("distributed.num_processes", 1), get("distributed.process_id", 0)
    if process_id >= processes:
        raise InputError(f"config.distributed.process_id={process_id}: expected 0 .. "
                         f"num_processes - 1 = {processes - 1}")  # fmt: skip
    if get("task", "diffusion") == "diffusion" and get("data.image_size") is not None:
        from jdiff.nn import VARIANTS

        overrides = get("model.overrides", {}) or {}
        fields = {**VARIANTS.get(get("model.variant"), {}), **dict(overrides)}
        levels = len(fields.get("block_out_channels", ()))
        size = get("data.image_size")
        if levels > 1 and size % 2 ** (levels - 1):
            multiple = 2 ** (levels - 1)
            raise InputError(f"config.data.image_size={size}: the U-Net's {levels} levels halve "
                             f"it {levels - 1} times; use a multiple of {multiple}")  # fmt: skip


KERNEL_PLATFORMS = {"pallas": "tpu", "cudnn": "gpu"}  # attention kernels one platform runs


def platform_misfit(implementation: str, platform: str) -> str | None:
    """The platform `implementation` needs when `platform` is not it, else None."""
    needs = KERNEL_PLATFORMS.get(implementation)
    return needs if needs is not None and needs != platform else None


def check_platform(config, platform: str) -> None:
    """Refuse (`InputError`) an attention kernel that `platform` (where this run computes)
    cannot run: "pallas" is the TPU's, "cudnn" NVIDIA GPUs'."""
    name = _value(config, "model.attention_implementation", "auto")
    needs = platform_misfit(name, platform)
    if needs:
        raise InputError(f"config.model.attention_implementation={name!r} runs on a "
                         f"{needs.upper()} only, and this run is on the {platform}: use 'auto' "
                         "(the best kernel for it), 'xla' or 'chunked'")  # fmt: skip


def _value(config, key, default=None):
    value = _get(config, key)
    return default if value is _MISSING else value


def _class_model(c) -> bool:
    return _value(c, "task", "diffusion") == "diffusion" and bool(
        _value(c, "model.class_conditional")
    )


# key: (whether it applies to the config, what it applies to). Checked for the keys a
# command line sets (`--config.KEY=`): a config's own defaults may hold values its model
# does not use (the default's class_dropout with class_conditional=False).
APPLIES = {
    "train.class_dropout": (_class_model, "a class-conditional model (model.class_conditional)"),
    "sample.guidance_scale": (
        lambda c: _class_model(c) or _value(c, "task") == "latent_diffusion",
        "a class-conditional or text-conditional model",
    ),
    "sample.options.eta": (lambda c: _value(c, "sample.method") == "ddim",
                           "sample.method='ddim'"),
    "diffusion.beta_start": (lambda c: _value(c, "diffusion.schedule") != "cosine",
                             "the linear, scaled_linear and sigmoid schedules (not cosine)"),
    "diffusion.beta_end": (lambda c: _value(c, "diffusion.schedule") != "cosine",
                           "the linear, scaled_linear and sigmoid schedules (not cosine)"),
    "diffusion.snr_gamma": (lambda c: _value(c, "diffusion.loss", "simple") == "simple",
                            "diffusion.loss='simple' (the hybrid loss has its own weighting)"),
    **{f"lora.{k}": (lambda c: bool(_value(c, "lora.rank", 0)), "LoRA runs (lora.rank > 0)")
       for k in ("alpha", "targets", "text_encoder", "text_targets")},
    "latent.mask_variants": (lambda c: _value(c, "latent.conditioning") == "inpaint",
                             "latent.conditioning='inpaint'"),
    "train.noise_level_power": (lambda c: _value(c, "latent.conditioning") == "upscale",
                                "latent.conditioning='upscale'"),
}  # fmt: skip


def check_applies(config, keys) -> None:
    """Refuse (`InputError`) the first of `keys` (dotted, as `--config.KEY=` sets them) that
    `config` would not use, naming what it applies to."""
    for key in keys:
        if key in APPLIES and not APPLIES[key][0](config):
            value = _value(config, key)
            raise InputError(f"config.{key}={value!r} does not apply to this config; it "
                             f"applies to {APPLIES[key][1]}")  # fmt: skip


def flat_keys(config, prefix: str = "") -> list[str]:
    """Every dotted key of a ConfigDict (sections and leaves)."""
    keys = []
    for k in config.keys():
        keys.append(prefix + k)
        if hasattr(config[k], "keys"):
            keys += flat_keys(config[k], prefix + k + ".")
    return keys


def unknown_key(config, dotted: str) -> str | None:
    """Why `dotted` names no key of `config`, with the nearest names, or None if it does (or
    goes below a leaf, which the override's own parser reports)."""
    node, path = config, []
    for part in dotted.split("."):
        if not hasattr(node, "keys"):
            return None
        if part not in node.keys():
            where = "config" + "".join("." + p for p in path)
            near = difflib.get_close_matches(part, list(node.keys()), n=3, cutoff=0.5)
            fits = (f"did you mean {' or '.join(f'{where}.{n}' for n in near)}?" if near
                    else f"{where} has {', '.join(sorted(node.keys()))}")  # fmt: skip
            return f"config.{dotted}: {where} has no key {part!r}; {fits}"
        node, path = node[part], [*path, part]
    return None


def check_workdir(workdir: pathlib.Path) -> None:
    """Refuse a --workdir that is a file or that this process may not write to."""
    for parent in (workdir, *workdir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"--workdir {workdir}: {parent} is a file, not a "
                                          "directory; choose another --workdir")  # fmt: skip
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "Permission denied", str(parent))
            return
