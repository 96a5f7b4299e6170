"""Drawing primitives shared by the synthetic generators: anomaly_data/world.py, anomaly_data/synth.py,
anomaly_data/photo_defects.py and the micro-CLIP's captioned world (bench/micro_world.py); the interface they
meet and the writer of their datasets are anomaly_data/generator.py.

Each helper takes its random draws from the caller's generator in the order the caller used to draw them
inline, and returns exactly the pixels the inline code drew: the shipped micro-CLIP was pretrained on these
images and the demo's numbers are measured on them, so one changed draw or pixel changes both.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
from PIL import Image, ImageDraw


def rng(seed: int, *keys) -> np.random.Generator:
    """A generator seeded by (seed, keys...): crc32 of each key's text, so it is stable across processes."""
    return np.random.default_rng([seed, *[zlib.crc32(str(k).encode()) for k in keys]])


def mask_of(size: int | tuple[int, int], draw) -> np.ndarray:
    """The pixels `draw(ImageDraw.Draw)` fills with a non-zero value on a blank canvas of `size`: a side (square)
    or (width, height). -> bool (H, W)."""
    img = Image.new("L", tuple(size) if isinstance(size, tuple) else (size, size), 0)
    draw(ImageDraw.Draw(img))
    return np.asarray(img) > 0


class ObjectCanvas:
    """An RGB picture (size, size) on a plain background `bg` and the mask of the object drawn on it, drawn
    together: `fill(shape, xy, colour)` paints an ImageDraw shape ("ellipse", "polygon", "rectangle",
    "rounded_rectangle") in `colour` on the picture and 255 on the mask; with cut=True it cuts a hole through
    the object (the background's colour, 0 on the mask). `draw` paints on the picture alone (parts, rims)."""

    def __init__(self, size: int, bg) -> None:
        self.bg = tuple(int(v) for v in bg)
        self.image = Image.new("RGB", (size, size), self.bg)
        self.mask = Image.new("L", (size, size), 0)
        self.draw = ImageDraw.Draw(self.image)
        self._mask_draw = ImageDraw.Draw(self.mask)

    def fill(self, shape: str, xy, colour=None, cut: bool = False, **kw) -> None:
        getattr(self.draw, shape)(xy, fill=self.bg if cut else colour, **kw)
        getattr(self._mask_draw, shape)(xy, fill=0 if cut else 255, **kw)

    def arrays(self, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
        """(picture (S, S, 3) of `dtype`, object mask (S, S) bool)."""
        return np.asarray(self.image, dtype=dtype), np.asarray(self.mask) > 0


def point_in(region: np.ndarray, r: np.random.Generator, margin: int) -> tuple[float, float]:
    """A uniformly drawn (x, y) of `region` at least `margin` pixels inside the image border."""
    sub = region[margin:-margin, margin:-margin] if margin else region
    ys, xs = np.nonzero(sub)
    k = r.integers(len(ys))
    return float(xs[k] + margin), float(ys[k] + margin)


def blob(size: int | tuple[int, int], x: float, y: float, rad: float, r: np.random.Generator, corners: int = 8,
         low: float = 0.6, angles=None) -> np.ndarray:
    """An irregular polygon around (x, y), each corner's x and y offsets at low-1.3 x rad (two draws a corner):
    a bool mask (H, W) of `size` (as mask_of's). angles: the corners' directions (default `corners` evenly spaced)."""
    if angles is None:
        angles = np.linspace(0, 2 * math.pi, corners + 1)[:-1]
    pts = [(x + rad * r.uniform(low, 1.3) * math.cos(t), y + rad * r.uniform(low, 1.3) * math.sin(t)) for t in angles]
    return mask_of(size, lambda d: d.polygon(pts, fill=255))


def segment(x: float, y: float, ang: float, length: float) -> list[tuple[float, float]]:
    """The two ends of a straight stroke of `length` centred on (x, y) at angle `ang`."""
    return [(x - length / 2 * math.cos(ang), y - length / 2 * math.sin(ang)), (x + length / 2 * math.cos(ang), y + length / 2 * math.sin(ang))]


def walk(x: float, y: float, ang: float, steps: int, step: float, turn: float, r: np.random.Generator) -> list[tuple[float, float]]:
    """A jagged path from (x, y): `steps` steps of `step` pixels, each turning by up to +-`turn` radians."""
    pts = [(x, y)]
    for _ in range(steps):
        ang += r.uniform(-turn, turn)
        x, y = x + step * math.cos(ang), y + step * math.sin(ang)
        pts.append((x, y))
    return pts


def line_mask(size: int | tuple[int, int], pts: list[tuple[float, float]], width: int) -> np.ndarray:
    """The pixels a polyline of `width` through `pts` covers: a bool mask (H, W) of `size` (as mask_of's)."""
    return mask_of(size, lambda d: d.line(pts, fill=255, width=width))


def noise_image(n: np.ndarray, size: int, eps: float = 0.0) -> np.ndarray:
    """A small noise array stretched to [0, 255], quantised to 8 bits and resized bicubically to (size, size): uint8.

    The quantisation is part of the look (and of every image drawn from it), so it stays."""
    u8 = ((n - n.min()) / (n.max() - n.min() + eps) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(u8).resize((size, size), Image.BICUBIC))
