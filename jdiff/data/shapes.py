"""Procedural captioned scenes: one coloured shape on a plain background, 32x32 RGB.

The grammar is "a {colour} {shape} at the {position}" over 4 colours x 3 shapes x 4 positions
(48 combinations). Twelve combinations, those with (colour + shape + position) % 4 == 0, never
appear in training; every colour-shape, colour-position and shape-position pair still does, so a
model that generates them has composed attributes it only saw apart. `describe` reads the
attributes back from an image by rule, which makes this data set its own checker.

Rendering is a pure function of a seed: Pillow draws at 4x and box-filters down (anti-aliased
edges), with the size, the position within the quadrant, the colour and the background grey
jittered per image.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
PALETTE = np.array([(215, 40, 40), (40, 175, 60), (45, 80, 225), (225, 205, 40)], np.float32)
SIZE = 32
_SCALE = 4  # drawn at 4x, then box-filtered down


@dataclasses.dataclass(frozen=True)
class Scene:
    """One combination of the grammar: indices into COLOURS, SHAPES and POSITIONS."""

    colour: int
    shape: int
    position: int

    @property
    def label(self) -> int:
        """The combination's index, 0..47 (colour-major)."""
        return (self.colour * len(SHAPES) + self.shape) * len(POSITIONS) + self.position

    @classmethod
    def from_label(cls, label: int) -> Scene:
        rest, position = divmod(int(label), len(POSITIONS))
        colour, shape = divmod(rest, len(SHAPES))
        if not 0 <= colour < len(COLOURS):
            raise ValueError(f"scene label {label} is outside 0..{num_combinations() - 1}")
        return cls(colour, shape, position)

    @property
    def caption(self) -> str:
        return f"a {COLOURS[self.colour]} {SHAPES[self.shape]} at the {POSITIONS[self.position]}"

    @property
    def colour_caption(self) -> str:
        """The caption with the shape and position withheld ("a red shape"): what a
        ControlNet's control image then has to tell."""
        return f"a {COLOURS[self.colour]} shape"

    @property
    def held_out(self) -> bool:
        """Whether this combination is kept out of training (12 of the 48)."""
        return (self.colour + self.shape + self.position) % 4 == 0


def num_combinations() -> int:
    """The number of (colour, shape, position) combinations: 48."""
    return len(COLOURS) * len(SHAPES) * len(POSITIONS)


def all_scenes() -> list[Scene]:
    """Every combination, in label order (0..47)."""
    return [Scene.from_label(i) for i in range(num_combinations())]


def parse(caption: str) -> Scene:
    """The scene a caption of the grammar describes; ValueError names what did not parse."""
    words = caption.strip().lower()
    for scene in all_scenes():
        if scene.caption == words:
            return scene
    raise ValueError(
        f"caption {caption!r} is not of the form 'a <colour> <shape> at the <position>' with "
        f"colour in {COLOURS}, shape in {SHAPES}, position in {POSITIONS}"
    )


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """uint8 [32, 32, 3]: the scene with jittered size, placement, colour and background."""
    s = SIZE * _SCALE
    grey = int(rng.integers(15, 60))
    colour = np.clip(PALETTE[scene.colour] + rng.uniform(-15, 15, 3), 0, 255).astype(int)
    half = rng.uniform(5.0, 7.0) * _SCALE  # half the shape's width: 10-14 px at 32x32
    row, col = divmod(scene.position, 2)
    cx = (col + 0.5) * s / 2 + rng.uniform(-1.5, 1.5) * _SCALE
    cy = (row + 0.5) * s / 2 + rng.uniform(-1.5, 1.5) * _SCALE
    image = Image.new("RGB", (s, s), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = tuple(int(v) for v in colour)
    if SHAPES[scene.shape] == "circle":
        draw.ellipse(box, fill=fill)
    elif SHAPES[scene.shape] == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return np.asarray(image.resize((SIZE, SIZE), Image.BOX))


def examples(split: str, count: int, seed: int) -> list[tuple[Scene, np.ndarray]]:
    """`count` renders per combination of a split: "train"/"test" the 36 seen combinations,
    "held_out" the 12 unseen ones; one rng per split, so splits never share a render."""
    held_out = split == "held_out"
    rng = np.random.default_rng([seed, ("train", "test", "held_out").index(split)])
    scenes = [sc for sc in all_scenes() if sc.held_out == held_out]
    return [(sc, render(sc, rng)) for _ in range(count) for sc in scenes]


def _coverage(image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(how much of each pixel of one float [H, W, 3] image the shape covers (0..1), the
    shape's colour), by the rule `describe` reads; None where no shape stands out from the
    background."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(image - background, axis=-1)
    peak = np.percentile(distance, 99)
    if peak < 40:
        return None
    colour = image[distance > 0.8 * peak].mean(0)
    direction = colour - background
    return np.clip((image - background) @ direction / (direction @ direction), 0, 1), colour


def silhouettes(images: np.ndarray) -> np.ndarray:
    """ControlNet control images of uint8 [N, H, W, 3] scenes: the shape's silhouette, white
    on black (the pixels `describe` counts as covered), float32 [N, H, W, 3] in [0, 1]. The
    shape and position are in it; the colour is not."""
    out = np.zeros(np.shape(images), np.float32)
    for i, image in enumerate(np.asarray(images, np.float32)):
        found = _coverage(image)
        if found is not None:
            out[i] = (found[0] > 0.5)[..., None]
    return out


def outlines(images: np.ndarray) -> np.ndarray:
    """The silhouettes' one-pixel outlines (a silhouette pixel with a background neighbour),
    float32 [N, H, W, 3] in [0, 1]: an edge map, as canny ControlNets read."""
    mask = silhouettes(images)[..., 0] > 0
    inner = mask.copy()
    inner[:, 1:-1, 1:-1] &= (mask[:, :-2, 1:-1] & mask[:, 2:, 1:-1] & mask[:, 1:-1, :-2]
                             & mask[:, 1:-1, 2:])  # fmt: skip
    inner[:, [0, -1], :] = False
    inner[:, :, [0, -1]] = False
    return np.repeat((mask & ~inner)[..., None], 3, axis=-1).astype(np.float32)


CONTROL_SIGNALS = {"silhouette": silhouettes, "outline": outlines}


def describe(images: np.ndarray) -> list[Scene | None]:
    """The scene each uint8 [N, 32, 32, 3] image shows, read by rule; None where no shape
    stands out from the background.

    The background is the median border pixel and the shape's colour the mean of the pixels
    farthest from it; a pixel's coverage is its unmixing weight between the two. Position: the
    coverage centroid's quadrant. Colour: the nearest palette colour. Shape: a triangle's
    centroid sits 1/6 of its height below its box's centre (circles and squares: 0); a square's
    extent along the diagonals is sqrt(2) times its width (a circle's: 1). On the renders the
    three statistics separate with wide margins (tested on every split).
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"describe expects RGB images [N, H, W, 3], got shape {images.shape}")
    yy, xx = np.mgrid[: images.shape[1], : images.shape[2]]
    out: list[Scene | None] = []
    for image in images:
        found = _coverage(image)
        if found is None:
            out.append(None)
            continue
        coverage, colour = found
        rows, cols = np.nonzero(coverage > 0.5)
        if len(rows) < 12:
            out.append(None)
            continue
        weight = coverage.sum()
        cy, cx = (coverage * yy).sum() / weight, (coverage * xx).sum() / weight
        position = 2 * int(cy >= image.shape[0] / 2) + int(cx >= image.shape[1] / 2)
        height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
        drop = (cy - (rows.min() + rows.max()) / 2) / height
        diagonal = (np.ptp(rows + cols) + np.ptp(rows - cols) + 2) / (2 * np.sqrt(2))
        if drop > 0.065:
            shape = "triangle"
        elif diagonal / ((height + width) / 2) > 1.16:
            shape = "square"
        else:
            shape = "circle"
        nearest = int(np.argmin(np.linalg.norm(PALETTE - colour, axis=-1)))
        out.append(Scene(nearest, SHAPES.index(shape), position))
    return out
