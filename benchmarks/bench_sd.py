"""Stable Diffusion 1.5-size txt2img: jdiff vs diffusers (PyTorch) vs diffusers' Flax pipeline,
on the same random weights of the real configuration.

    # once: a diffusers-format directory of random SD 1.5-config weights (4.3 GB, float32)
    python benchmarks/bench_sd.py make-weights /tmp/sd15-random
    # each framework in its own process (the Flax one in an environment with diffusers 0.39.0
    # and transformers 4.57.6, the last releases with Flax classes)
    python benchmarks/bench_sd.py run jdiff /tmp/sd15-random --size 256 --batch 1
    python benchmarks/bench_sd.py run diffusers /tmp/sd15-random --size 256 --batch 1
    /path/to/flax-env/bin/python benchmarks/bench_sd.py run flax /tmp/sd15-random --size 256

`run` times whole txt2img calls (text encoding, DDIM with classifier-free guidance: U-Net
batches of 2 x batch, VAE decode) at two step counts, each once cold and `--repeats` times warm
(median). Seconds per denoising step = (t(steps2) - t(steps1)) / (steps2 - steps1), which
leaves out text encoding and decoding; compile time = cold call - warm call (jdiff and Flax
compile once per step count). Images/s is batch / t(steps2). Prints one JSON line; record it in
RESULTS.md with the machine named. Model FLOPs utilisation, where a peak is given
(`--peak_tflops`), counts 0.80 TFLOP per image per U-Net call at 512x512, scaled by area.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import bench_unet  # the benchmarks' folder is the script's: its `cpu_name`

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPT = "a photograph of an astronaut riding a horse"
UNET_TFLOP_512 = 0.80  # one SD 1.5 U-Net call on one 512x512 image (64x64x4 latents)


def make_weights(directory: str) -> None:
    """Random weights of SD 1.5's configuration, saved as diffusers saves a directory."""
    sys.path.insert(0, str(ROOT))
    import transformers
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    from jdiff import interop
    from jdiff.interop import single_file
    from jdiff.nn import VARIANTS, UNet
    from jdiff.nn import vae as jvae
    from jdiff.nn.text_encoder import CLIPTextModel
    from jdiff.tokenizer import CLIPTokenizer

    unet = UNet2DConditionModel.from_config(
        interop.unet_config_to_diffusers(UNet(**VARIANTS["sd_v1"]), 64)
    )
    vae = AutoencoderKL.from_config(interop.vae_config_to_diffusers(jvae.AutoencoderKL(), 512))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **interop.text_encoder_config_to_transformers(CLIPTextModel())))  # fmt: skip
    path = pathlib.Path(directory)
    CLIPTokenizer.default().save_pretrained(path / "tokenizer_files")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(path / "tokenizer_files")
    scheduler = DDIMScheduler.from_config(single_file.SCHEDULERS["sd1"])
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    # diffusers 0.39's Flax loader converts only pickled PyTorch files, and transformers 4.57's
    # tokenizer wants vocab.json + merges.txt: write those beside the safetensors
    import torch

    pipe.unet.save_pretrained(path / "unet", safe_serialization=False)
    pipe.vae.save_pretrained(path / "vae", safe_serialization=False)
    state = {(k if k.startswith("text_model.") else f"text_model.{k}"): v
             for k, v in pipe.text_encoder.state_dict().items()}  # fmt: skip
    torch.save(state, path / "text_encoder" / "pytorch_model.bin")
    CLIPTokenizer.default().save_pretrained(path / "tokenizer")
    print(f"random SD 1.5-config weights: {path}")


def _jdiff(directory, size, batch, dtype):
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp

    from jdiff import interop, pipelines, sharding

    sharding.reuse_host_memory()  # as sample.py does
    p = interop.load_pretrained(directory, dtype=jnp.dtype(dtype))  # the VAE stays float32
    model = pipelines.LatentDiffusion.from_pretrained(p)

    def run(steps):
        out = model.txt2img(
            p.params,
            [PROMPT] * batch,
            jax.random.key(0),
            num_steps=steps,
            method="ddim",
            height=size,
            width=size,
            guidance_scale=7.5,
        )
        return out.block_until_ready()

    return run, jax.devices()[0].device_kind


def _diffusers(directory, size, batch, dtype):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionPipeline.from_pretrained(
        directory, torch_dtype=torch_dtype, safety_checker=None
    ).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def run(steps):
        with torch.no_grad():
            out = pipe(
                [PROMPT] * batch,
                num_inference_steps=steps,
                height=size,
                width=size,
                guidance_scale=7.5,
                output_type="np",
                generator=torch.Generator(device).manual_seed(0),
            ).images
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    name = torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}"
    return run, name


def _flax(directory, size, batch, dtype):
    import jax
    import jax.numpy as jnp
    from diffusers import FlaxDDIMScheduler, FlaxStableDiffusionPipeline
    from flax.jax_utils import replicate
    from flax.training.common_utils import shard

    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(
        directory, from_pt=True, dtype=jdtype, safety_checker=None, feature_extractor=None
    )
    scheduler, state = FlaxDDIMScheduler.from_pretrained(directory, subfolder="scheduler")
    pipe.scheduler = scheduler
    params["scheduler"] = state
    params = replicate(params)
    n = jax.local_device_count()
    ids = shard(pipe.prepare_inputs([PROMPT] * batch * n))
    rng = jax.random.split(jax.random.PRNGKey(0), n)

    def run(steps):
        out = pipe(
            ids,
            params,
            rng,
            num_inference_steps=steps,
            height=size,
            width=size,
            guidance_scale=7.5,
            jit=True,
        ).images
        return jax.block_until_ready(out)

    return run, jax.devices()[0].device_kind


def run(framework, directory, size, batch, dtype, steps, repeats, peak_tflops):
    start = time.perf_counter()
    fn, device = {"jdiff": _jdiff, "diffusers": _diffusers, "flax": _flax}[framework](
        directory, size, batch, dtype
    )
    load = time.perf_counter() - start
    cold, warm = {}, {}
    for n in steps:
        t0 = time.perf_counter()
        fn(n)
        cold[n] = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(n)
            times.append(time.perf_counter() - t0)
        warm[n] = statistics.median(times)
    lo, hi = steps
    per_step = (warm[hi] - warm[lo]) / (hi - lo)
    result = {
        "framework": framework, "device": device, "size": size, "batch": batch, "dtype": dtype,
        "load_s": round(load, 1), "s_per_step": round(per_step, 3),
        "compile_s": {n: round(cold[n] - warm[n], 1) for n in steps},
        "call_s": {n: round(warm[n], 2) for n in steps},
        "images_per_s": round(batch / warm[hi], 4), "cpu": bench_unet.cpu_name(),
    }  # fmt: skip
    if peak_tflops:
        tflop = UNET_TFLOP_512 * (size / 512) ** 2 * 2 * batch  # CFG: two U-Net images each
        result["mfu"] = round(tflop / per_step / peak_tflops, 3)
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-weights")
    make.add_argument("directory")
    timing = sub.add_parser("run")
    timing.add_argument("framework", choices=("jdiff", "diffusers", "flax"))
    timing.add_argument("directory")
    timing.add_argument("--size", type=int, default=512)
    timing.add_argument("--batch", type=int, default=1)
    timing.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    timing.add_argument("--steps", type=int, nargs=2, default=(5, 10))
    timing.add_argument("--repeats", type=int, default=1)
    timing.add_argument(
        "--peak_tflops",
        type=float,
        default=0.0,
        help="the device's dense peak for the dtype, for MFU (H100 SXM bf16: 989)",
    )
    args = parser.parse_args()
    if args.command == "make-weights":
        return make_weights(args.directory)
    run(
        args.framework,
        args.directory,
        args.size,
        args.batch,
        args.dtype,
        args.steps,
        args.repeats,
        args.peak_tflops,
    )


if __name__ == "__main__":
    main()
