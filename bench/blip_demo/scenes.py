"""Procedurally generated scenes with captions that are right by construction (the demo model's world).

A square white canvas holds one or two objects that do not overlap and are separated horizontally. Each is a
circle, an axis-aligned square or an apex-up triangle, in one of six colours, small (bounding box side 48-80 px
at 384x384) or large (128-176 px), scaled with the canvas. The caption names the objects from left to right:
`a small red circle`, `a large blue square and a small yellow triangle`; with the prompt `a picture of` it is
`a picture of a small red circle`.

For variety the generator varies canvas size, positions, colour (jitter around each named colour), edge
smoothing, file format and JPEG quality, and stores some JPEGs rotated or mirrored with an EXIF orientation
that turns them back: such a scene is only captioned right if the orientation is honoured.
"""

from __future__ import annotations

import io
import itertools
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": (48, 80), "large": (128, 176)}  # bounding box side at 384x384
PROMPT = "a picture of"
REFERENCE_CANVAS = 384
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that stores a scene so that exif_transpose() shows it upright.
_STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # left, top, right, bottom (exclusive)

    def describe(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    image: Image.Image  # upright, RGB
    objects: tuple[SceneObject, ...]  # left to right

    @property
    def caption(self) -> str:
        return " and ".join(o.describe() for o in self.objects)

    def prompted_caption(self) -> str:
        return f"{PROMPT} {self.caption}"

    def mirrored(self) -> Scene:
        """The scene mirrored left to right: the same objects, described in the opposite order."""
        width = self.image.size[0]
        objects = tuple(
            SceneObject(o.shape, o.colour, o.size, (width - o.box[2], o.box[1], width - o.box[0], o.box[3]))
            for o in reversed(self.objects)
        )
        return Scene(self.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), objects)


@dataclass(frozen=True, kw_only=True)
class SceneStyle:
    """How much variety to draw scenes with."""

    canvas: tuple[int, int] = (160, 800)
    native_canvas: float = 0.0  # probability of a 384x384 canvas (no resizing needed: cheaper to train on)
    two_objects: float = 0.6  # probability of two objects rather than one
    colour_jitter: int = 18
    smooth_edges: float = 0.5  # probability of drawing at 2x and box-downsampling (anti-aliased edges)


def _box_side(rng: random.Random, size: str, canvas: int) -> int:
    low, high = SIZES[size]
    return max(2, round(rng.uniform(low, high) * canvas / REFERENCE_CANVAS))


def _layout(rng: random.Random, sides: list[int], canvas: int) -> list[tuple[int, int]] | None:
    """Top-left corners for boxes of the given sides: inside the canvas, x-ranges disjoint with a gap."""
    gap = max(2, round(8 * canvas / REFERENCE_CANVAS))
    free = canvas - sum(sides) - gap * (len(sides) - 1)
    if free < 0:
        return None
    cuts = sorted(rng.uniform(0, free) for _ in range(len(sides)))
    corners, x = [], 0.0
    for side, cut in zip(sides, [cuts[0]] + [b - a for a, b in itertools.pairwise(cuts)], strict=True):
        x += cut
        corners.append((round(x), rng.randint(0, canvas - side)))
        x += side + gap
    return corners


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill, scale: int) -> None:
    left, top, right, bottom = (v * scale for v in box)
    right, bottom = right - 1, bottom - 1
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    else:
        draw.polygon([(left, bottom), (right, bottom), ((left + right) / 2, top)], fill=fill)


def render(rng: random.Random, style: SceneStyle = SceneStyle()) -> Scene:
    canvas = REFERENCE_CANVAS if rng.random() < style.native_canvas else rng.randint(*style.canvas)
    count = 2 if rng.random() < style.two_objects else 1
    while True:
        kinds = [(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES))) for _ in range(count)]
        sides = [_box_side(rng, size, canvas) for _, _, size in kinds]
        corners = _layout(rng, sides, canvas)
        if corners is not None:
            break
    scale = 2 if rng.random() < style.smooth_edges else 1
    image = Image.new("RGB", (canvas * scale, canvas * scale), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    objects = []
    for (shape, colour, size), side, (x, y) in zip(kinds, sides, corners, strict=True):
        fill = tuple(min(255, max(0, c + rng.randint(-style.colour_jitter, style.colour_jitter)))
                     for c in COLOURS[colour])
        box = (x, y, x + side, y + side)
        _draw(draw, shape, box, fill, scale)
        objects.append(SceneObject(shape, colour, size, box))
    if scale > 1:
        image = image.reduce(scale)
    return Scene(image, tuple(sorted(objects, key=lambda o: o.box[0] + o.box[2])))


def encode(scene: Scene, rng: random.Random, *, fmt: str | None = None, quality: int | None = None,
           orientation: int | None = None) -> bytes:
    """The scene as a file: JPEG (some stored rotated/mirrored with an EXIF orientation) or PNG.

    Unset arguments are drawn at random: 75% JPEG at quality 35-95, a quarter of those with an orientation.
    """
    fmt = fmt or ("JPEG" if rng.random() < 0.75 else "PNG")
    buffer = io.BytesIO()
    if fmt == "PNG":
        scene.image.save(buffer, "PNG")
        return buffer.getvalue()
    quality = quality or rng.randint(35, 95)
    if orientation is None:
        orientation = rng.choice(list(_STORE)) if rng.random() < 0.25 else 1
    stored = scene.image if orientation == 1 else scene.image.transpose(_STORE[orientation])
    exif = Image.Exif()
    if orientation != 1:
        exif[ORIENTATION_TAG] = orientation
    stored.save(buffer, "JPEG", quality=quality, exif=exif)
    return buffer.getvalue()
