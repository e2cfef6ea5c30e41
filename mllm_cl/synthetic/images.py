"""Drawing helpers for the synthetic world's images: coloured shapes and short words on a plain canvas.

Scenes are described as data (`Shape`, `Word`) and rendered with Pillow at 4x the target size, then
averaged down, so edges are smooth even at the tiny vision tower's 64x64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "yellow": (240, 200, 20),
    "purple": (148, 60, 190),
    "orange": (255, 127, 14),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES: dict[str, float] = {"small": 0.08, "big": 0.2}  # radius as a share of the image side
BACKGROUND = (250, 250, 250)
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    colour: str  # one of COLOURS
    size: str  # one of SIZES
    x: float  # centre, as a share of the image side (0 = left, 1 = right)
    y: float  # centre, as a share of the image side (0 = top, 1 = bottom)


@dataclass(frozen=True)
class Word:
    text: str
    colour: str
    x: float  # centre, as a share of the image side
    y: float


def radius(size: str) -> float:
    """Radius of a shape of this size, as a share of the image side."""
    return SIZES[size]


def _shape_points(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if kind == "star":
        points = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return points
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {SHAPES}")


@lru_cache(maxsize=4)
def _font(pixels: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=pixels)


def render(items: list[Shape | Word], image_size: int = 64) -> Image.Image:
    """Draw a scene on a plain background: (image_size, image_size) RGB."""
    side = image_size * SUPERSAMPLE
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font(max(8, round(side * 0.28)))
    for item in items:
        fill = COLOURS[item.colour]
        cx, cy = item.x * side, item.y * side
        if isinstance(item, Word):
            draw.text((cx, cy), item.text, fill=fill, font=font, anchor="mm", stroke_width=SUPERSAMPLE // 2,
                      stroke_fill=fill)
        elif item.kind == "circle":
            r = radius(item.size) * side
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_points(item.kind, cx, cy, radius(item.size) * side), fill=fill)
    return image.resize((image_size, image_size), Image.Resampling.BOX)  # average each 4x4 block
