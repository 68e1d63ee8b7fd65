"""Masks and canvases for image-conditioned generation: inpainting masks (checked, random boxes
and strokes, taken to latent size), outpainting canvases with overlap blending, and the
statistics that judge them (known-region mismatch at the mask border, the seam).

Masks are float32 [N, H, W, 1] with 1 where to repaint and 0 where the image is known (white
= repaint, as Stable Diffusion's inpainting pipelines read them). Everything here is host-side
NumPy, run once per call outside the jitted samplers; the samplers are
`jdiff.samplers.repaint` (any model) and the pipelines of `jdiff.pipelines`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

SIDES = ("left", "right", "top", "bottom")


def check_masks(masks, images) -> np.ndarray:
    """Masks for images [N, H, W, C] as float32 [N, H, W, 1] in {0, 1} (>= 0.5: repaint).

    A mask may be [H, W], [H, W, 1] (one for every image), [N, H, W] or [N, H, W, 1]; values
    must lie in [0, 1] (a uint8 PNG divided by 255). Raises ValueError naming what is wrong.
    """
    images_shape = np.shape(images)
    if len(images_shape) != 4:
        raise ValueError(f"images must be [N, H, W, C]; got shape {images_shape}")
    n, h, w, _ = images_shape
    m = np.asarray(masks, np.float32)
    if m.ndim == 2:  # one mask for every image
        m = m[None, ..., None]
    elif m.ndim == 3 and m.shape == (h, w, 1):
        m = m[None]
    elif m.ndim == 3:
        m = m[..., None]
    if m.ndim != 4 or m.shape[1:] != (h, w, 1) or m.shape[0] not in (1, n):
        raise ValueError(
            f"masks of shape {np.shape(masks)} do not fit images of shape {images_shape}: "
            f"expected [{h}, {w}], [{n}, {h}, {w}] or [{n}, {h}, {w}, 1] (the images' size)"
        )
    if not np.isfinite(m).all() or m.min() < 0.0 or m.max() > 1.0:
        raise ValueError(
            f"mask values must lie in [0, 1] (1 = repaint); got [{np.nanmin(m):g}, "
            f"{np.nanmax(m):g}]" + (" with NaN" if np.isnan(m).any() else "")
        )
    return np.broadcast_to((m >= 0.5).astype(np.float32), (n, h, w, 1)).copy()


def latent_masks(masks: np.ndarray, f: int) -> np.ndarray:
    """Pixel masks [N, H, W, 1] at latent size [N, H/f, W/f, 1]: a latent cell is repainted
    when any of its f x f pixels is (so no repainted pixel is decoded from a kept latent)."""
    n, h, w, _ = masks.shape
    if h % f or w % f:
        raise ValueError(f"mask size {h}x{w} is not a multiple of the autoencoder's factor {f}")
    return masks.reshape(n, h // f, f, w // f, f, 1).max(axis=(2, 4))


def random_masks(rng: np.random.Generator, n: int, size: int, *, kind: str = "mixed",
                 min_cover: float = 0.1, max_cover: float = 0.5) -> np.ndarray:  # fmt: skip
    """n random masks [n, size, size, 1] for training and evaluating inpainting: "box" (one
    axis-aligned rectangle covering min_cover..max_cover of the image), "stroke" (a thick
    random polyline, as free-form masks in LaMa / DeepFill v2, drawn until it covers a random
    share in that range; its last segment may overshoot), or "mixed" (either, evenly)."""
    from PIL import Image, ImageDraw

    if kind not in ("box", "stroke", "mixed"):
        raise ValueError(f"unknown mask kind {kind!r}; choose 'box', 'stroke' or 'mixed'")
    out = np.zeros((n, size, size, 1), np.float32)
    for i in range(n):
        k = kind if kind != "mixed" else ("box", "stroke")[rng.integers(2)]
        if k == "box":
            area = rng.uniform(min_cover, max_cover) * size * size
            aspect = np.exp(rng.uniform(-0.7, 0.7))
            bh = int(np.clip(round(np.sqrt(area / aspect)), 1, size))
            bw = int(np.clip(round(area / bh), 1, size))
            y, x = rng.integers(0, size - bh + 1), rng.integers(0, size - bw + 1)
            out[i, y : y + bh, x : x + bw] = 1.0
            continue
        canvas = Image.new("L", (size, size))
        draw = ImageDraw.Draw(canvas)
        width = max(1, int(size * rng.uniform(0.1, 0.2)))
        target = rng.uniform(min_cover, max_cover)
        point = tuple(rng.uniform(0, size, 2))
        for _ in range(64):  # thick segments to random points until the cover is reached
            nxt = tuple(rng.uniform(0, size, 2))
            draw.line([point, nxt], fill=255, width=width, joint="curve")
            point = nxt
            out[i, ..., 0] = np.asarray(canvas) >= 128
            if out[i].mean() >= target:
                break
    return out


def training_masks(rng: np.random.Generator, n: int, size: int, *, full: float = 0.1,
                   min_cover: float = 0.1, max_cover: float = 0.6) -> np.ndarray:  # fmt: skip
    """Masks for training an inpainting model: `random_masks` of either kind, a `full` share
    all-ones (the model then generates from the prompt alone, as SD's inpainting model was
    also trained to)."""
    masks = random_masks(rng, n, size, kind="mixed", min_cover=min_cover, max_cover=max_cover)
    masks[rng.random(n) < full] = 1.0
    return masks


def border_band(masks: np.ndarray, width: int) -> np.ndarray:
    """The known pixels within `width` pixels (Chebyshev distance) of the repainted region,
    bool [N, H, W, 1]: where a model's fill must meet the kept image."""
    grown = masks[..., 0] >= 0.5
    repaint = grown.copy()
    for _ in range(width):
        padded = np.pad(grown, ((0, 0), (1, 1), (1, 1)))
        h, w = grown.shape[1:]
        grown = np.max([padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)],
                       axis=0)  # fmt: skip
    return (grown & ~repaint)[..., None]


def border_mismatch(unpasted, images, masks, *, width: int = 2) -> float:
    """Mean absolute difference, in [-1, 1] units, between a sampler's output before the known
    region is pasted back and the original, over the known pixels within `width` of the mask:
    0 when the fill meets the kept image seamlessly; a final paste cannot hide it."""
    band = np.broadcast_to(border_band(np.asarray(masks), width), np.shape(images))
    diff = np.abs(np.asarray(unpasted, np.float64) - np.asarray(images, np.float64))
    return float(diff[band].mean()) if band.any() else 0.0


# ----------------------------------------------------------------------------- outpainting


@dataclasses.dataclass(frozen=True)
class Canvas:
    """An outpainting canvas: the image placed at (top, left) of a larger one.

    image [N, H', W', C] (the original where known, 0 elsewhere), masks [N, H', W', 1] (1 where
    to generate: the new area and the overlap band), weights [N, H', W', 1] (how much of the
    generated image the final blend takes: 1 in the new area, ramping to 0 across the overlap
    band, 0 inside), and the crop (height, width) the caller asked for, the canvas being
    possibly padded further to a multiple the network needs.
    """

    image: np.ndarray
    masks: np.ndarray
    weights: np.ndarray
    top: int
    left: int
    height: int
    width: int

    def finish(self, generated) -> np.ndarray:
        """Blend generated [N, H', W', C] with the original over the overlap band (linear
        ramp) and crop to the asked size: the original exactly where the weight is 0."""
        generated = np.asarray(generated, np.float32)
        out = self.weights * generated + (1.0 - self.weights) * self.image
        return out[:, : self.height, : self.width]


def parse_sides(spec: str) -> dict[str, int]:
    """'left=8,right=8' (any of left, right, top, bottom, width, height) as a dict of ints."""
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in (*SIDES, "width", "height") or not value.strip().lstrip("-").isdigit():
            raise ValueError(
                f"--outpaint {spec!r}: expected comma-separated key=pixels, keys left, right, "
                "top, bottom (or width, height: a target size)"
            )
        out[name] = int(value)
    return out


def outpaint_canvas(images, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0,
                    width: int | None = None, height: int | None = None, overlap: int = 2,
                    multiple: int = 1) -> Canvas:  # fmt: skip
    """Place images [N, H, W, C] on a larger canvas for outpainting.

    Adds the given pixels on each side; or, with a target `width`/`height`, splits the growth
    not given per side evenly between the two sides (the odd pixel to the right/bottom). The
    `overlap` pixels of the original next to every new side are repainted too and blended back
    with a linear ramp, so no hard seam is left. The canvas grows further right and bottom to a
    multiple of `multiple` (the U-Net's, and autoencoder's, downsampling) and `Canvas.finish`
    crops that off.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C]; got shape {images.shape}")
    n, h, w, c = images.shape
    pad = {"left": left, "right": right, "top": top, "bottom": bottom}
    for target, (a, b), size in ((width, ("left", "right"), w), (height, ("top", "bottom"), h)):
        if target is None:
            continue
        extra = target - size - pad[a] - pad[b]
        if extra < 0:
            raise ValueError(f"target size {target} is smaller than the image ({size}) plus "
                             f"{a}={pad[a]}, {b}={pad[b]}")  # fmt: skip
        pad[a], pad[b] = pad[a] + extra // 2, pad[b] + extra - extra // 2
    if any(v < 0 for v in pad.values()):
        raise ValueError(f"outpainting adds pixels; got negative sides {pad}")
    if not any(pad.values()):
        raise ValueError("nothing to outpaint: give at least one of left, right, top, bottom "
                         "(or a width/height larger than the image)")  # fmt: skip
    if overlap < 0 or overlap * 2 > min(h, w):
        raise ValueError(f"overlap={overlap} must lie in [0, {min(h, w) // 2}] for a {h}x{w} "
                         "image")  # fmt: skip
    out_h, out_w = h + pad["top"] + pad["bottom"], w + pad["left"] + pad["right"]
    full_h, full_w = -(-out_h // multiple) * multiple, -(-out_w // multiple) * multiple
    canvas = np.zeros((n, full_h, full_w, c), np.float32)
    canvas[:, pad["top"] : pad["top"] + h, pad["left"] : pad["left"] + w] = images
    # distance (in pixels, >= 1 inside) from each original pixel to each grown side
    ys, xs = np.arange(h)[:, None], np.arange(w)[None, :]
    inside = np.full((h, w), np.inf)
    for side, dist in (("left", xs + 1), ("right", w - xs), ("top", ys + 1), ("bottom", h - ys)):
        if pad[side]:
            inside = np.minimum(inside, np.broadcast_to(dist, (h, w)))
    ramp = np.clip((overlap + 1 - inside) / (overlap + 1), 0.0, 1.0)  # 0 deep inside
    weights = np.ones((full_h, full_w), np.float32)
    weights[pad["top"] : pad["top"] + h, pad["left"] : pad["left"] + w] = ramp
    masks = (weights > 0).astype(np.float32)
    return Canvas(canvas, np.broadcast_to(masks[None, ..., None], (n, full_h, full_w, 1)).copy(),
                  np.broadcast_to(weights[None, ..., None], (n, full_h, full_w, 1)).copy(),
                  pad["top"], pad["left"], out_h, out_w)  # fmt: skip


def seam_statistic(images, column: int) -> dict[str, float]:
    """How visible a vertical seam between columns `column - 1` and `column` of images
    [N, H, W, C] is: the mean absolute difference across it beside the mean across every other
    pair of neighbouring columns (the same images' own texture). Equal figures: no seam."""
    x = np.asarray(images, np.float64)
    steps = np.abs(np.diff(x, axis=2)).mean(axis=(0, 1, 3))  # [W - 1]
    others = np.delete(steps, column - 1)
    return {"across_seam": float(steps[column - 1]), "elsewhere": float(others.mean())}
