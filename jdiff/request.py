"""What `sample.py` is asked (a `Request`: its flags, typed) and which of it applies to the
model it is put to (a `Target`): the one place that refuses, by flag, a value no task takes and
an option the chosen model or task would ignore.

    r = Request(prompts=("a cat",), strength=0.5)
    r.check()                                         # values alone, before anything loads
    refuse_inapplicable(r, Target("pixel DIR", "workdir", classes=True))
    # InputError: --prompt: pixel DIR has no text encoder (prompts need a latent text model)

`APPLIES` holds the rules, one per option: when it counts as given, where it applies, and
what would fit; a new sample.py option gets its rule there.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

from jdiff.validate import InputError, integer, number


@dataclasses.dataclass(frozen=True)
class Request:
    """What to sample, as sample.py's flags name it; None: the model's or the task's default.

    Workdir runs: `step` (latest), `ema` (True), `vae` (another autoencoder for a latent run).
    Sampler: `method` (ddim; pretrained: its scheduler's), `num_steps`, `seed`, `num_samples`
    (64; pretrained text models: one per prompt), `guidance_scale` (1 for class models, the
    config's for text models, 7.5 pretrained), `eta`. Text: `prompts`, `negative_prompt`.
    Image tasks: `init_image` (+ `strength`: img2img 0.8, inpainting 1), `mask` or `outpaint`
    (+ `overlap`, 4), `upscale` (+ `noise_level`, 20), `projection`, RePaint's `jump_length`
    and `jump_n_sample`. Pretrained weights: `prediction_type`, `image_size`, `allow_pickle`,
    `dtype` (float32), `output_dir` (./samples), `loras` ("FILE" or "FILE:SCALE", each a LoRA
    merged at its scale, 1 by default), ControlNets (`controlnets`: directories or single
    files, one `control_images` file each; a ControlNet pipeline directory brings its own)
    with diffusers' options (`controlnet_conditioning_scale`: one for all or one each,
    `guess_mode`, `control_guidance_start` / `_end`).
    """

    step: int | None = None
    ema: bool | None = None
    vae: str | None = None
    method: str | None = None
    num_steps: int = 50
    seed: int = 0
    num_samples: int | None = None
    guidance_scale: float | None = None
    eta: float | None = None
    trajectory: bool = False
    prompts: tuple[str, ...] = ()
    negative_prompt: str | None = None
    init_image: str | None = None
    strength: float | None = None
    mask: str | None = None
    outpaint: str | None = None
    overlap: int | None = None
    upscale: str | None = None
    noise_level: int | None = None
    projection: float | None = None
    jump_length: int | None = None
    jump_n_sample: int | None = None
    prediction_type: str | None = None
    image_size: int | None = None
    allow_pickle: bool = False
    dtype: str | None = None
    output_dir: str | None = None
    loras: tuple[str, ...] = ()
    controlnets: tuple[str, ...] = ()
    control_images: tuple[str, ...] = ()
    controlnet_conditioning_scale: tuple[float, ...] = ()
    guess_mode: bool = False
    control_guidance_start: float | None = None
    control_guidance_end: float | None = None

    def check(self) -> None:
        """Refuse what no model takes (`InputError` naming the flag): non-finite or
        out-of-range numbers, empty counts, unreadable prompts, image options without their
        image, and image tasks that exclude each other."""
        rules = {
            "num_steps": integer(1, 10_000), "seed": integer(0), "num_samples": integer(1, 100_000),
            "guidance_scale": number(0.0, 100.0), "eta": number(0.0, 10.0),
            "strength": number(0.0, 1.0), "overlap": integer(0), "noise_level": integer(0, 350),
            "projection": number(0.0, 1.0), "jump_length": integer(1), "jump_n_sample": integer(1),
            "image_size": integer(8, 4096), "step": integer(0),
        }  # fmt: skip
        for name, rule in rules.items():
            value = getattr(self, name)
            if value is not None and (fits := rule.check(value)) is not None:
                raise InputError(f"--{name}={value!r}: expected {fits}")
        for text in (*self.prompts, self.negative_prompt or ""):
            if any("\udc80" <= c <= "\udcff" for c in text):  # undecodable argv bytes
                raise InputError(f"--prompt {text!r}: not valid UTF-8 text")
        for spec in self.loras:
            path, scale = lora_spec(spec)
            if not pathlib.Path(path).is_file():
                raise InputError(f"--lora {spec}: no file {path} (give FILE or FILE:SCALE)")
            if (fits := number(-10.0, 10.0).check(scale)) is not None:
                raise InputError(f"--lora {spec}: the scale {scale} must be {fits}")
        self._check_control()
        if self.mask and self.outpaint:
            raise InputError("--mask and --outpaint: pass one (inpainting or outpainting)")
        if self.repaints and not self.init_image:
            flag = "--mask" if self.mask else "--outpaint"
            raise InputError(f"{flag} needs --init_image (the image to repaint or extend)")
        if self.upscale and (self.init_image or self.repaints):
            raise InputError("--upscale takes its image itself: no --init_image, --mask or "
                             "--outpaint with it")  # fmt: skip

    def _check_control(self) -> None:
        for path in self.controlnets:
            if not pathlib.Path(path).exists():
                raise InputError(f"--controlnet {path}: no such directory or file")
        n = len(self.controlnets)
        if n and len(self.control_images) != n:
            raise InputError(f"--control_image: {len(self.control_images)} given for {n} "
                             "--controlnet (give one image each, in order)")  # fmt: skip
        if len(self.controlnet_conditioning_scale) not in (0, 1, max(n, 1)):
            raise InputError(f"--controlnet_conditioning_scale: "
                             f"{len(self.controlnet_conditioning_scale)} values for {n} "
                             "ControlNets (one for all, or one each)")  # fmt: skip
        for value in self.controlnet_conditioning_scale:
            if (fits := number(-10.0, 10.0).check(value)) is not None:
                raise InputError(f"--controlnet_conditioning_scale={value}: expected {fits}")
        start, end = self.control_guidance_start, self.control_guidance_end
        for flag, value in (("control_guidance_start", start), ("control_guidance_end", end)):
            if value is not None and (fits := number(0.0, 1.0).check(value)) is not None:
                raise InputError(f"--{flag}={value}: expected {fits}")
        if (start or 0.0) >= (1.0 if end is None else end):
            raise InputError(f"--control_guidance_start={start} must be below "
                             f"--control_guidance_end={end}")  # fmt: skip

    @property
    def repaints(self) -> bool:
        """Whether an image is to be repainted (`mask`) or extended (`outpaint`)."""
        return bool(self.mask or self.outpaint)

    @property
    def use_ema(self) -> bool:
        """Sample with the EMA weights (the default) or, `ema=False`, the raw ones."""
        return self.ema is not False


@dataclasses.dataclass(frozen=True)
class Target:
    """The model a request is put to. `what` names it for messages ("outputs/default holds a
    pixel-space model"); `source` is "workdir" or "pretrained"; `method` the sampler it uses
    when none is asked for."""

    what: str
    source: str
    latent: bool = False
    text: bool = False
    classes: bool = False
    inpainting: bool = False
    upscaler: bool = False
    method: str = "ddim"


def lora_spec(spec: str) -> tuple[str, float]:
    """--lora's "FILE" or "FILE:SCALE" -> (FILE, SCALE); the scale 1 when none is given (a
    path may hold colons: only a number after the last one is a scale)."""
    path, sep, tail = spec.rpartition(":")
    try:
        scale = float(tail)
    except ValueError:
        return spec, 1.0
    return (path, scale) if sep and path else (spec, 1.0)


def task(r: Request, t: Target) -> str:
    """What `r` asks of `t`: "upscale", "inpaint" (a model trained for it), "repaint"
    (RePaint, any other model), "img2img" or "generate"."""
    if r.upscale:
        return "upscale"
    if r.repaints:
        return "inpaint" if t.inpainting else "repaint"
    return "img2img" if r.init_image else "generate"


@dataclasses.dataclass(frozen=True)
class Applies:
    """One option's rule: `given(r)` whether the request sets it, `where(r, t, task)` whether
    it applies there, `fits` what would (the message's end)."""

    flag: str
    given: Callable[[Request], bool]
    where: Callable[[Request, Target, str], bool]
    fits: str


def _set(name: str) -> Callable[[Request], bool]:
    return lambda r: getattr(r, name) not in (None, False, (), "")


def _workdir(r, t, k):
    return t.source == "workdir"


def _pretrained(r, t, k):
    return t.source == "pretrained"


# sample.py's ControlNet flags and the Request fields they set
CONTROL_FLAGS = (("controlnet", "controlnets"), ("control_image", "control_images"),
                 ("controlnet_conditioning_scale", "controlnet_conditioning_scale"),
                 ("guess_mode", "guess_mode"),
                 ("control_guidance_start", "control_guidance_start"),
                 ("control_guidance_end", "control_guidance_end"))  # fmt: skip
PRETRAINED_ONLY = ("prediction_type", "image_size", "allow_pickle", "dtype", "output_dir")

BY_SOURCE = (  # what only a --workdir run or only --pretrained weights take
    Applies("step", _set("step"), _workdir, "it picks a checkpoint of a --workdir run"),
    Applies(
        "ema",
        lambda r: r.ema is not None,
        _workdir,
        "--ema / --noema choose the weights of a --workdir run",
    ),
    Applies(
        "vae",
        _set("vae"),
        lambda r, t, k: t.source == "workdir" and t.latent,
        "it swaps the autoencoder of a latent --workdir run (pretrained weights bring their own)",
    ),
    *(
        Applies(
            name,
            _set(name),
            _pretrained,
            "it applies to --pretrained weights (a --workdir "
            "run keeps what it was trained with, and writes to its samples/)",
        )
        for name in PRETRAINED_ONLY
    ),
    Applies(
        "lora",
        _set("loras"),
        _pretrained,
        "LoRA files adapt --pretrained weights (a --workdir run samples as it was trained)",
    ),
    *(Applies(flag, _set(name), _pretrained, "ControlNets steer --pretrained weights")
      for flag, name in CONTROL_FLAGS),
)  # fmt: skip
APPLIES = (
    *BY_SOURCE,
    Applies("trajectory", _set("trajectory"),
            lambda r, t, k: t.source == "workdir" and not t.latent and k == "generate",
            "it draws the forward / reverse strip of a pixel-space --workdir run's samples"),
    Applies("prompt", _set("prompts"), lambda r, t, k: t.text,
            "prompts need a text-conditional latent model"),
    Applies("lora", _set("loras"), lambda r, t, k: t.text,
            "LoRA files adapt a latent text-to-image model (its U-Net and text encoders)"),
    *(Applies(flag, _set(name), lambda r, t, k: t.text and k in ("generate", "img2img"),
              "ControlNets steer a latent text model's txt2img and img2img (not inpainting, "
              "RePaint or upscaling)") for flag, name in CONTROL_FLAGS),
    Applies("negative_prompt", _set("negative_prompt"), lambda r, t, k: t.text,
            "prompts need a text-conditional latent model"),
    Applies("guidance_scale", lambda r: r.guidance_scale not in (None, 1.0),
            lambda r, t, k: t.text or t.classes,
            "classifier-free guidance needs a class- or text-conditional model"),
    Applies("init_image", _set("init_image"),
            lambda r, t, k: k in ("inpaint", "repaint") or (k == "img2img" and t.text),
            "it repaints with --mask / --outpaint (any model) or, alone, re-imagines the image "
            "with a latent text model (img2img)"),
    Applies("strength", lambda r: r.strength is not None,
            lambda r, t, k: k == "inpaint" or (k == "img2img" and t.text),
            "it applies to img2img (--init_image with a latent text model) and to models "
            "trained for inpainting; RePaint starts from noise"),
    Applies("overlap", lambda r: r.overlap is not None, lambda r, t, k: bool(r.outpaint),
            "it applies to --outpaint"),
    Applies("upscale", _set("upscale"), lambda r, t, k: t.upscaler,
            "it needs a super-resolution model (configs/sr_shapes.py)"),
    Applies("noise_level", lambda r: r.noise_level is not None,
            lambda r, t, k: k == "upscale", "it applies to --upscale"),
    Applies("projection", lambda r: r.projection is not None,
            lambda r, t, k: t.latent and k in ("repaint", "upscale"),
            "it applies to latent models repainting with RePaint (--mask / --outpaint) or "
            "upscaling (a pixel model keeps the known region exactly)"),
    Applies("jump_length", lambda r: r.jump_length is not None, lambda r, t, k: k == "repaint",
            "it is RePaint's: --mask / --outpaint with a model not trained for inpainting"),
    Applies("jump_n_sample", lambda r: r.jump_n_sample is not None,
            lambda r, t, k: k == "repaint",
            "it is RePaint's: --mask / --outpaint with a model not trained for inpainting"),
    Applies("method", lambda r: r.method not in (None, "ddim"), lambda r, t, k: k != "repaint",
            "RePaint (--mask / --outpaint with a model not trained for inpainting) takes DDIM "
            "steps; use --eta, --jump_length, --jump_n_sample"),
    Applies("eta", lambda r: r.eta is not None,
            lambda r, t, k: k == "repaint" or (r.method or t.method) == "ddim",
            "it is DDIM's η: pass --method ddim with it"),
)  # fmt: skip


def refuse_inapplicable(r: Request, t: Target, rules: tuple[Applies, ...] = APPLIES) -> None:
    """Refuse, by flag, the first option `r` sets that `t` (or the task asked of it) would
    ignore, of `rules` (`BY_SOURCE`: those that need only `t.source`, and `t.latent` for a
    workdir, to check before the weights load); and a super-resolution model asked for
    anything but `upscale`."""
    kind = task(r, t)
    for rule in rules:
        if rule.given(r) and not rule.where(r, t, kind):
            doing = {"generate": "", "img2img": " (asked for img2img)",
                     "repaint": " (asked to repaint with RePaint)",
                     "inpaint": " (asked to inpaint)"}.get(kind, f" (asked to {kind})")  # fmt: skip
            if rule.flag == "eta" and kind != "repaint":
                doing = f" (sampling with {r.method or t.method})"
            raise InputError(f"--{rule.flag} does not apply: {t.what}{doing}; {rule.fits}")
    if rules is APPLIES and t.upscaler and kind != "upscale":
        raise InputError(f"{t.what}, a super-resolution model: pass --upscale LOW_RES.png")
