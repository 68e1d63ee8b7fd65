"""Attention alone: jdiff's implementations against torch's `scaled_dot_product_attention`,
on the shapes of Stable Diffusion's self- and cross-attention.

    python benchmarks/bench_attention.py [--repeats 10] [--threads N]

Each row is one attention, [batch x tokens x heads x head width], float32: the median of
`--repeats` warm calls after one compiling call, and the compiled program's temporaries.
Prints one JSON line per row; record them in RESULTS.md with the machine named.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

SHAPES = [  # (name, batch, query tokens, key tokens, heads, head width)
    ("issue-17 self 4x1024x8x16", 4, 1024, 1024, 8, 16),
    ("SD1.5 256px self 32x32", 2, 1024, 1024, 8, 40),
    ("SD1.5 256px cross 32x32 x 77", 2, 1024, 77, 8, 40),
    ("SD1.5 512px self 64x64", 2, 4096, 4096, 8, 40),
    ("SD1.5 512px cross 64x64 x 77", 2, 4096, 77, 8, 40),
]


def run(compiled, *args) -> None:
    compiled(*args).block_until_ready()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import jax
    import numpy as np
    import torch
    from bench import timed  # benchmarks/bench.py: the median of warm calls

    from jdiff.nn import attention

    if args.threads:
        torch.set_num_threads(args.threads)
    for name, b, lq, lk, h, d in SHAPES:
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((b, n, h, d), np.float32) for n in (lq, lk, lk))
        row = {"shape": name, "device": jax.devices()[0].device_kind}
        for impl in ("xla", "chunked"):
            f = functools.partial(attention.attention, implementation=impl)
            compiled = jax.jit(f).lower(q, k, v).compile()
            row[f"{impl}_s"] = timed(functools.partial(run, compiled, q, k, v), args.repeats)
            temp = compiled.memory_analysis().temp_size_in_bytes
            row[f"{impl}_temp_MiB"] = round(temp / 2**20, 1)
        tq, tk, tv = (torch.from_numpy(a).transpose(1, 2).contiguous() for a in (q, k, v))
        sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, tq, tk, tv)
        with torch.no_grad():
            row["torch_sdpa_s"] = timed(sdpa, args.repeats)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
