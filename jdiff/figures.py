"""Figures of the forward process.

    python -m jdiff.figures --out outputs/schedules.png

draws the comparison of the linear and cosine schedules (Nichol & Dhariwal 2021, Figs. 3 and 5):
ᾱ_t against t/T, and one image noised in closed form at evenly spaced t under each schedule.
The image is matplotlib's bundled photograph of Grace Hopper (no download).
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from PIL import Image

from jdiff import diffusion, schedules

matplotlib.use("Agg")
from matplotlib import cbook
from matplotlib import pyplot as plt


def sample_image(size: int = 128) -> np.ndarray:
    """A square photograph shipped with matplotlib, float32 [size, size, 3] in [-1, 1]."""
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        image = Image.open(f).convert("RGB")
    side = min(image.size)
    image = image.crop((0, 0, side, side)).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, np.float32) / 127.5 - 1.0


def noising_rows(names, image: np.ndarray, num_columns: int, key: jax.Array) -> np.ndarray:
    """x_t of one image at `num_columns` evenly spaced t for each schedule, [S, C, H, W, 3]."""
    rows = []
    noise = jax.random.normal(key, (num_columns, *image.shape))
    x0 = jnp.broadcast_to(jnp.asarray(image), noise.shape)
    for name in names:
        sched = schedules.get_schedule(name)
        t = jnp.linspace(0, sched.num_timesteps - 1, num_columns).round().astype(jnp.int32)
        rows.append(np.asarray(diffusion.q_sample(sched, x0, t, noise)))
    return np.stack(rows)


def schedule_figure(path: pathlib.Path, *, num_columns: int = 8, seed: int = 0) -> pathlib.Path:
    """Write the schedule comparison as a PNG at `path` and return the path."""
    names = ("linear", "cosine")
    rows = noising_rows(names, sample_image(), num_columns, jax.random.key(seed))
    fig = plt.figure(figsize=(2 * num_columns, 7), dpi=100)
    grid = fig.add_gridspec(3, num_columns, height_ratios=[1.6, 1, 1])
    ax = fig.add_subplot(grid[0, :])
    for name in names:
        abar = np.asarray(schedules.get_schedule(name).alphas_cumprod)
        ax.plot(np.arange(abar.size) / abar.size, abar, label=name)
    ax.set_xlabel("diffusion step (t/T)")
    ax.set_ylabel("ᾱ_t")
    ax.legend()
    ts = np.linspace(0, 999, num_columns).round().astype(int)
    for r, name in enumerate(names):
        for c in range(num_columns):
            cell = fig.add_subplot(grid[r + 1, c])
            cell.imshow(np.clip((rows[r, c] + 1) / 2, 0, 1))
            cell.set_xticks([])
            cell.set_yticks([])
            if c == 0:
                cell.set_ylabel(name)
            if r == 1:
                cell.set_xlabel(f"t = {ts[c]}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    """`python -m jdiff.figures`: write the linear-vs-cosine schedule figure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/schedules.png", help="where to write the PNG")
    parser.add_argument("--columns", type=int, default=8, help="noised images per schedule")
    args = parser.parse_args(argv)
    if args.columns < 2:
        parser.error("--columns must be at least 2")
    path = schedule_figure(pathlib.Path(args.out), num_columns=args.columns)
    print(f"wrote {path.resolve()}")


if __name__ == "__main__":
    main()
