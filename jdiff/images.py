"""Images on the host: [-1, 1] <-> uint8, sample grids, PNG files (Pillow)."""

from __future__ import annotations

import math
import pathlib

import numpy as np
from PIL import Image


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats (any shape) -> uint8 0..255, rounded, clipped."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, *, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile uint8 [N, H, W, C] into one [rows·(H+pad)+pad, cols·(W+pad)+pad, C] image."""
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, ncols)
        top, left = pad + r * (h + pad), pad + k * (w + pad)
        grid[top : top + h, left : left + w] = image
    return grid


def save_png(path: str | pathlib.Path, image: np.ndarray, *, scale: int = 1) -> pathlib.Path:
    """Write uint8 [H, W, C] (C = 1 or 3) as a PNG, enlarged `scale` x by nearest neighbour."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    return path


def save_grid(path: str | pathlib.Path, x: np.ndarray, *, ncols: int | None = None) -> pathlib.Path:
    """Save [-1, 1] samples [N, H, W, C] as one PNG grid, a small grid enlarged to >= 512 px."""
    grid = make_grid(to_uint8(x), ncols=ncols)
    return save_png(path, grid, scale=max(1, 512 // grid.shape[0]))


def check_same_size(mask: tuple[str, str], image: tuple[str, str]) -> None:
    """Refuse a mask file (flag, path) whose pixel size is not its image's (flag, path): both
    are cropped and resized alike, so any other size would move the mask. ValueError naming
    both; FileNotFoundError naming the flag of a file that cannot be read."""
    sizes = []
    for flag, path in (mask, image):
        try:
            with Image.open(path) as im:
                sizes.append(im.size)
        except OSError as e:
            raise FileNotFoundError(f"{flag} {path}: {e}") from None
    if sizes[0] != sizes[1]:
        (w, h), (iw, ih) = sizes
        raise ValueError(f"{mask[0]} {mask[1]} is {w}x{h} pixels, {image[0]} {image[1]} "
                         f"{iw}x{ih}: give a mask of the image's size")  # fmt: skip
