"""Which sample.py options apply where (`jdiff.request`): every option set where the chosen model
or task would ignore it is refused by flag, and every combination a task takes passes."""

import dataclasses

import pytest

from jdiff.request import APPLIES, BY_SOURCE, InputError, Request, Target, refuse_inapplicable

PIXEL = Target("DIR holds a pixel-space unconditional model", "workdir")
CLASSES = dataclasses.replace(PIXEL, what="DIR holds a class model", classes=True)
TEXT = Target("DIR holds a latent text-to-image model", "workdir", latent=True, text=True)
INPAINTER = dataclasses.replace(TEXT, what="DIR holds an inpainter", inpainting=True)
UPSCALER = dataclasses.replace(TEXT, what="DIR holds an upscaler", upscaler=True)
SD = dataclasses.replace(TEXT, what="SD is", source="pretrained", method="pndm")
DDPM = Target("DDPM is a pixel U-Net", "pretrained", method="ddpm")

IMAGE = {"init_image": "x.png"}
MASK = {"init_image": "x.png", "mask": "m.png"}
OUTPAINT = {"init_image": "x.png", "outpaint": "left=8"}

REFUSED = [  # (request, target, the flag named)
    ({"prompts": ("a cat",)}, PIXEL, "--prompt"),
    ({"prompts": ("a cat",)}, DDPM, "--prompt"),
    ({"negative_prompt": "dog"}, CLASSES, "--negative_prompt"),
    ({"guidance_scale": 3.0}, PIXEL, "--guidance_scale"),
    ({"guidance_scale": 3.0}, DDPM, "--guidance_scale"),
    (IMAGE, PIXEL, "--init_image"),
    (IMAGE | {"upscale": "y.png"}, UPSCALER, None),  # Request.check refuses it first
    ({"strength": 0.5}, TEXT, "--strength"),
    (MASK | {"strength": 0.5}, TEXT, "--strength"),  # RePaint starts from noise
    (MASK | {"strength": 0.5}, PIXEL, "--strength"),
    ({"overlap": 2}, PIXEL, "--overlap"),
    (MASK | {"overlap": 2}, TEXT, "--overlap"),
    ({"upscale": "y.png"}, TEXT, "--upscale"),
    ({"upscale": "y.png"}, PIXEL, "--upscale"),
    ({"noise_level": 50}, TEXT, "--noise_level"),
    ({"noise_level": 50}, UPSCALER, "--noise_level"),
    ({"projection": 0.5}, TEXT, "--projection"),
    (MASK | {"projection": 0.5}, PIXEL, "--projection"),
    (MASK | {"projection": 0.5}, INPAINTER, "--projection"),
    ({"jump_length": 3}, TEXT, "--jump_length"),
    (MASK | {"jump_n_sample": 3}, INPAINTER, "--jump_n_sample"),
    (MASK | {"method": "euler"}, TEXT, "--method"),
    (OUTPAINT | {"method": "dpmpp_2m"}, CLASSES, "--method"),
    ({"eta": 0.5, "method": "euler"}, TEXT, "--eta"),
    ({"eta": 0.5, "prompts": ("a",)}, SD, "--eta"),  # SD's default sampler is PNDM
    ({"trajectory": True}, TEXT, "--trajectory"),
    ({"trajectory": True}, DDPM, "--trajectory"),
    (MASK | {"trajectory": True}, PIXEL, "--trajectory"),
    ({"step": 3}, DDPM, "--step"),
    ({"ema": False}, SD, "--ema"),
    ({"vae": "VAE"}, PIXEL, "--vae"),
    ({"vae": "VAE"}, SD, "--vae"),
    ({"dtype": "bfloat16"}, TEXT, "--dtype"),
    ({"output_dir": "out"}, PIXEL, "--output_dir"),
    ({"image_size": 64}, TEXT, "--image_size"),
    ({"prediction_type": "epsilon"}, CLASSES, "--prediction_type"),
    ({"allow_pickle": True}, TEXT, "--allow_pickle"),
    ({}, UPSCALER, "super-resolution model: pass --upscale"),
    (MASK, UPSCALER, "super-resolution model: pass --upscale"),
]

TAKEN = [  # what each task takes
    ({"guidance_scale": 3.0, "eta": 0.5, "num_samples": 8, "trajectory": True}, CLASSES),
    ({"guidance_scale": 1.0, "step": 3, "ema": False}, PIXEL),
    (MASK | {"eta": 0.3, "jump_length": 5, "jump_n_sample": 2, "method": "ddim"}, PIXEL),
    (OUTPAINT | {"overlap": 2, "guidance_scale": 2.0}, CLASSES),
    ({"prompts": ("a",), "negative_prompt": "b", "guidance_scale": 5.0, "vae": "V"}, TEXT),
    (IMAGE | {"prompts": ("a",), "strength": 0.5, "method": "euler"}, TEXT),
    (MASK | {"prompts": ("a",), "projection": 0.3, "jump_length": 2}, TEXT),
    (OUTPAINT | {"prompts": ("a",), "strength": 0.9, "overlap": 0, "method": "euler"}, INPAINTER),
    ({"upscale": "y.png", "noise_level": 50, "projection": 0.5, "prompts": ("a",)}, UPSCALER),
    ({"prompts": ("a",), "method": "ddim", "eta": 1.0, "dtype": "bfloat16"}, SD),
    ({"prompts": ("a",), "image_size": 64, "prediction_type": "v_prediction"}, SD),
    ({"output_dir": "out", "allow_pickle": True, "num_steps": 10}, DDPM),
]


@pytest.mark.parametrize(("given", "target", "flag"), REFUSED)
def test_an_option_that_does_not_apply_is_refused_by_name(given, target, flag):
    r = Request(**given)
    with pytest.raises(InputError) as e:
        r.check()
        refuse_inapplicable(r, target)
    message = str(e.value)
    assert "\n" not in message
    if flag is not None:
        assert message.startswith(flag) or flag in message, message
        assert target.what in message or flag not in {rule.flag for rule in APPLIES}


@pytest.mark.parametrize(("given", "target"), TAKEN)
def test_what_a_task_takes_passes(given, target):
    r = Request(**given)
    r.check()
    refuse_inapplicable(r, target)


def test_the_source_rules_need_no_model():
    """BY_SOURCE refuses before any weights load: pretrained-only flags on a workdir and the
    workdir's own on pretrained weights, and nothing a model's kind decides."""
    early = Target("SD holds pretrained weights", "pretrained")
    with pytest.raises(InputError, match="--step does not apply: SD holds pretrained weights"):
        refuse_inapplicable(Request(step=3), early, BY_SOURCE)
    refuse_inapplicable(Request(prompts=("a",), strength=0.5, upscale="y"), early, BY_SOURCE)
    with pytest.raises(InputError, match="--vae"):
        refuse_inapplicable(Request(vae="V"), Target("DIR", "workdir"), BY_SOURCE)
    refuse_inapplicable(Request(vae="V"), Target("DIR", "workdir", latent=True), BY_SOURCE)


@pytest.mark.parametrize(
    ("given", "fragment"),
    [
        ({"mask": "m.png"}, "--mask needs --init_image"),
        ({"outpaint": "left=2"}, "--outpaint needs --init_image"),
        (MASK | {"outpaint": "left=2"}, "--mask and --outpaint: pass one"),
        ({"upscale": "y.png", "init_image": "x.png"}, "--upscale takes its image itself"),
        ({"overlap": -1}, "--overlap=-1"),
        ({"noise_level": 351}, "--noise_level=351"),
    ],
)
def test_image_options_are_checked_before_any_model(given, fragment):
    with pytest.raises(InputError, match=fragment):
        Request(**given).check()
