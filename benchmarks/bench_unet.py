"""One U-Net call, jdiff vs diffusers' PyTorch `UNet2DConditionModel`, same configuration and
shapes (random weights: the work does not depend on their values).

    python benchmarks/bench_unet.py jdiff --model sd_v1 --latent 32 --batch 2
    python benchmarks/bench_unet.py diffusers --model sd_v1 --latent 32 --batch 2
    python benchmarks/bench_unet.py jdiff --model small --latent 32 --batch 4
    python benchmarks/bench_unet.py jdiff --model sdxl --latent 64 --batch 2 --steps 1

`sd_v1` is SD 1.5's network (32x32 latents = 256 px; a guided step's batch is 2 x images);
`small` an SD-shaped one with 32/64/128 channels (8 heads, as SD); `sdxl` SDXL base's
(2,567,463,684 parameters, float32: 10.3 GB; 64x64 latents = 512 px), with its pooled text
embedding and six size ids. Prints one JSON line: the
median of `--repeats` warm calls (after one compiling / warming call); `--steps` calls run in one
compiled loop (`lax.scan`) as a sampler runs them. Run each framework in its own process on an
otherwise idle machine.

`--profile` (jdiff) then traces one more loop with XLA's CPU profiler and prints where the time
went: each compiled op's wall time summed by kind, matrix products and convolutions by shape.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = {
    "block_out_channels": (32, 64, 128, 128),
    "num_attention_heads": 8,
    "norm_num_groups": 32,
}


def cpu_name() -> str:
    """The host CPU's model and core count (runs differ by machine: record which)."""
    try:
        lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else 'unknown CPU'} x {os.cpu_count()}"


def _unet(model):
    sys.path.insert(0, str(ROOT))
    from jdiff.nn import VARIANTS, UNet

    kwargs = dict(VARIANTS["sdxl_base" if model == "sdxl" else "sd_v1"])
    if model == "small":
        kwargs.update(SMALL)
        kwargs.pop("attention_head_dim", None)
    return UNet(**kwargs)


def _added(unet, batch, module):
    """SDXL's added inputs (pooled text embedding [B, 1280], six size ids) of `module` (jnp or
    torch), {} for another U-Net."""
    if not unet.addition_embed_type:
        return {}
    pooled = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
    ids = [[512.0, 512.0, 0.0, 0.0, 512.0, 512.0]] * batch
    if module.__name__ == "torch":
        return {"added_cond_kwargs": {"text_embeds": module.zeros(batch, pooled),
                                      "time_ids": module.tensor(ids)}}  # fmt: skip
    return {"text_embeds": module.zeros((batch, pooled)), "time_ids": module.asarray(ids)}


def _jdiff(unet, latent, batch, steps):
    import jax
    import jax.numpy as jnp

    from jdiff import sharding

    sharding.reuse_host_memory()  # as sample.py does
    shapes = jax.eval_shape(
        lambda: unet.init(
            jax.random.key(0),
            jnp.zeros((1, latent, latent, 4)),
            jnp.zeros((1,)),
            context=jnp.zeros((1, 77, unet.cross_attention_dim)),
            **_added(unet, 1, jnp),
        )
    )
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        tree,
        [0.02 * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves, strict=True)],
    )
    x = jax.random.normal(jax.random.key(2), (batch, latent, latent, 4))
    ctx = jax.random.normal(jax.random.key(3), (batch, 77, unet.cross_attention_dim))
    added = _added(unet, batch, jnp)

    @jax.jit
    def loop(params, x, ctx):
        def body(x, t):
            return x - 0.01 * unet.apply(params, x, t, context=ctx, **added), None

        return jax.lax.scan(body, x, jnp.linspace(999.0, 1.0, steps))[0]

    def run():
        return loop(params, x, ctx).block_until_ready()

    run.hlo = lambda: loop.lower(params, x, ctx).compile().as_text()
    return run


def _diffusers(unet, latent, batch, steps):
    import torch
    from diffusers import UNet2DConditionModel

    from jdiff import interop

    torch.manual_seed(0)
    net = UNet2DConditionModel.from_config(interop.unet_config_to_diffusers(unet, latent)).eval()
    x = torch.randn(batch, 4, latent, latent)
    ctx = torch.randn(batch, 77, unet.cross_attention_dim)
    ts = torch.linspace(999.0, 1.0, steps)
    added = _added(unet, batch, torch)

    def run():
        with torch.no_grad():
            y = x
            for t in ts:
                y = y - 0.01 * net(y, t, encoder_hidden_states=ctx, **added).sample
        return y

    return run


def _what(name: str, hlo: str) -> str:
    """The op kind of compiled op `name`, with its product's or convolution's shapes."""
    kind = re.sub(r"[.\d]+$", "", name)
    head = re.search(rf"\n\s*%?{re.escape(name)} = (\S+) [^\n]*?calls=%?([\w.\-]+)", hlo)
    if head is None:
        return kind
    body = re.search(rf"\n%?{re.escape(head[2])} [^\n]*\{{\n(.*?)\n\}}", hlo, re.S)
    body = body[1] if body else ""
    for op in ("convolution", "dot"):
        if f" {op}(" in body:
            params = re.findall(r"= (\S+?)\{[^}]*\} parameter", body)
            window = re.search(r"window=\{size=([\dx]+)", body)
            size = f" {window[1]}" if window else ""
            return f"{op}{size} {' x '.join(params)} -> {head[1].split('{')[0]}"
    return kind


def profile(fn) -> None:
    """Trace one call of the compiled loop and print its ops' wall time by kind and shape."""
    import jax
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            fn()
        (path,) = pathlib.Path(directory).rglob("*.xplane.pb")
        data = ProfileData.from_file(str(path))
    hlo, spent, count = fn.hlo(), collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "Eigen" not in line.name:  # XLA's CPU worker threads run the compiled ops
                continue
            for event in line.events:
                if event.name.startswith(("ThunkExecutor", "SlinkyThreadPool", "end:")):
                    continue
                key = _what(event.name, hlo)
                spent[key] += event.duration_ns / 1e6
                count[key] += 1
    total = sum(v for k, v in spent.items() if not k.startswith("while"))
    print(f"profile: {total:.1f} ms in compiled ops (a `while` line is its whole loop, whose ops"
          " are also listed)")  # fmt: skip
    for key, ms in spent.most_common(30):
        print(f"{ms:9.2f} ms  x{count[key]:<4d} {key}")


def main() -> None:
    """Time one framework's U-Net and print a JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("framework", choices=("jdiff", "diffusers"))
    parser.add_argument("--model", choices=("sd_v1", "small", "sdxl"), default="sd_v1")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="U-Net calls per timed loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="jdiff: where the time went")
    args = parser.parse_args()
    if args.profile:  # XLA's CPU runtime names each op in the trace only when asked
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
        )
    unet = _unet(args.model)
    fn = {"jdiff": _jdiff, "diffusers": _diffusers}[args.framework](
        unet, args.latent, args.batch, args.steps
    )
    t0 = time.perf_counter()
    fn()
    cold = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    warm = statistics.median(times)
    print(json.dumps({
        "framework": args.framework, "model": args.model, "latent": args.latent,
        "batch": args.batch, "s_per_call": round(warm / args.steps, 4),
        "first_call_s": round(cold, 1), "cpu": cpu_name(),
    }))  # fmt: skip
    if args.profile and args.framework == "jdiff":
        profile(fn)


if __name__ == "__main__":
    main()
