"""Time training and sampling of a config on this machine's default device.

    python benchmarks/bench.py [--config configs/default.py[:variant]] [--batch 64]
                               [--num_samples 64] [--repeats 3]

Prints one JSON line: train steps/s (jitted step, state donated, batch already on device),
sampling images/s (DDIM 50 steps, U-Net and sampler in one jit), the compile time of the whole
sampler for 10 vs 100 steps (one lax.scan: should barely differ), and the scan driver's
overhead: the whole 50-step sampler vs 50 calls of the jitted U-Net. Timings are the median of
`repeats` runs after a warm-up, with `block_until_ready`. Record results in RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jdiff import models, pipelines, training  # noqa: E402


def load_config(spec: str):
    path, _, variant = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", ROOT / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant or None)


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() (which must block), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/default.py")
    parser.add_argument("--batch", type=int, default=None, help="default: the config's")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.config)
    batch = args.batch or config.data.batch_size
    size, channels = config.data.image_size, config.data.channels
    # a class-conditional config (the default) benchmarks as generated: 10 classes, sampled at
    # guidance 1 through the batched cond/uncond call
    num_classes = 10 if config.model.class_conditional else None
    model = models.make_model(config, num_classes)
    schedule = models.make_schedule(config.diffusion)
    optimizer = training.make_optimizer(config.optim)
    init = training.make_init(
        model, optimizer, jax.random.key(0), image_shape=(size, size, channels)
    )
    state = jax.jit(init)()
    step = training.make_train_step(model, schedule, optimizer, null_class=num_classes,
                                    class_dropout=0.1)  # fmt: skip
    step = jax.jit(step, donate_argnums=0)
    x = jax.random.normal(jax.random.key(1), (batch, size, size, channels))
    data = {"image": x, "label": jnp.zeros(batch, jnp.int32)}
    key = jax.random.key(2)
    holder = [state]

    def train_steps(n=10):
        for _ in range(n):
            holder[0], metrics = step(holder[0], data, key)
        jax.block_until_ready(metrics)

    train_s = timed(train_steps, args.repeats) / 10
    params = holder[0].params
    shape = (args.num_samples, size, size, channels)

    def sampler(num_steps):
        generate = pipelines.make_generate(model, schedule, shape=shape, method="ddim",
                                           num_steps=num_steps, null_class=num_classes)  # fmt: skip
        return jax.jit(generate)

    labels = None if num_classes is None else jnp.arange(args.num_samples) % num_classes

    compile_s = {}
    for n in (10, 100):
        start = time.perf_counter()
        sampler(n).lower(params, key, labels).compile()
        compile_s[n] = time.perf_counter() - start
    generate = sampler(50)
    sample_s = timed(lambda: jax.block_until_ready(generate(params, key, labels)), args.repeats)
    cond = {} if labels is None else {"class_labels": jnp.concatenate([labels, labels])}
    unet = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t, **cond))
    batch_2 = shape[0] * (1 if labels is None else 2)  # guidance calls the U-Net on 2N
    xs, ts = jnp.zeros((batch_2, *shape[1:])), jnp.full((batch_2,), 500.0)

    def bare_calls():
        out = xs
        for _ in range(50):
            out = unet(params, out, ts)
        jax.block_until_ready(out)

    bare_s = timed(bare_calls, args.repeats)
    print(json.dumps({
        "device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
        "config": args.config, "batch": batch, "image": [size, size, channels],
        "params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
        "train_steps_per_s": round(1 / train_s, 2),
        "sample_images_per_s_ddim50": round(args.num_samples / sample_s, 1),
        "sampler_compile_s": {f"{n}_steps": round(s, 2) for n, s in compile_s.items()},
        "ddim50_s": round(sample_s, 3), "bare_unet_50_calls_s": round(bare_s, 3),
        "scan_overhead": round(sample_s / bare_s - 1, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
