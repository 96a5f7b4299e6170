"""Anomaly maps as pictures a person reads at a glance (PIL only).

The colour scale is defined and stated on every picture (`MapScale`, `map_scale`):
- relative to the pixel threshold t (the calibration's, `kano calibrate`), by default: colours run linearly
  from 0 (darkest) through t (the middle colour) to 2t and above (brightest); the legend's ticks are
  multiples of t and its title gives t and where it came from. A map is drawn on the scale of its own
  detector's threshold, so maps of very different magnitudes (a trained micro-CLIP whose softmax saturates at
  1e-4, a floor whose map reaches 0.5) read alike: at or above the middle colour is at or above the threshold.
- absolute, 0 to 1, without a pixel threshold (M = G_σ(Mᵃ + 1 − Mⁿ)/2 and the image score live there), or when
  the pixel threshold is not a normal float (below 1.2e-38, the smallest normal float32, the maps' type: a map
  cannot be compared with it); the picture says why.
A degenerate map, all values below 1e-3 of the scale's level, is said so in words on a grey cell instead of
being drawn black. A panel shows, left to right and labelled: the image, the ground truth (where there is
one), the map, and the map over the image. Over the image only the part of the map at or above the level
(the pixel threshold; without one, the image threshold in use, else OVERLAY_LEVEL) is drawn: below it the
photo is shown in grey, so an object's own red or blue paint is never read as heat. The ground truth, where
there is one, is outlined on the map and the overlay. The title holds the image's name, its score, the
threshold and the decision (and, in evaluation, the truth), then the scale.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SCALE = (0.0, 1.0)
# The map's even-odds point: Mᵃ and Mⁿ are per-pixel probabilities of "abnormal" and "normal", so a pixel at
# or above 0.5 is one the model rates at least as likely anomalous as normal. Below it the overlay is clear.
OVERLAY_LEVEL = 0.5
# 'inferno'-like stops (dark = normal, bright yellow = anomalous): perceptually ordered, readable in grey.
_STOPS = np.array([[0.00, 0, 0, 4], [0.13, 31, 12, 72], [0.25, 85, 15, 109], [0.38, 136, 34, 106], [0.50, 186, 54, 85],
                   [0.63, 227, 89, 51], [0.75, 249, 140, 10], [0.88, 249, 201, 50], [1.00, 252, 255, 164]])
CONTOUR = (0, 255, 255)          # ground-truth outline: cyan, absent from the colour map
RED, GREEN, GREY, BLACK = (200, 0, 0), (0, 130, 40), (90, 90, 90), (0, 0, 0)


# the smallest normal float32 (the maps' type): a pixel threshold below it (or 0, NaN, inf) cannot scale a map
NORMAL_MIN = float(np.finfo(np.float32).tiny)
# a map whose maximum is below this share of the scale's level is degenerate: said in words, not drawn black
DEGENERATE = 1e-3


@dataclass(frozen=True)
class MapScale:
    """How map values become colours: linearly from 0 (darkest) to `top` (brightest; above it clipped).
    level: the overlay's level and the legend's marked value; relative: ticks as multiples of `level`
    (the pixel threshold); title: the legend's statement; note: why the default scale could not be used."""

    top: float
    level: float
    relative: bool
    title: str
    note: str | None = None

    def degenerate(self, amap: np.ndarray) -> str | None:
        """Words for a map whose maximum is below DEGENERATE x level (None when the map can be drawn)."""
        peak = float(np.nanmax(amap)) if np.size(amap) else 0.0
        if not peak >= DEGENERATE * self.level:
            what = "the pixel threshold" if self.relative else "the level"
            return f"degenerate map: max {peak:.2g} < 1/1000 of {what} {self.level:.3g}"
        return None


def is_normal(v) -> bool:
    """v is a finite number at least NORMAL_MIN (a pixel threshold a map can be drawn relative to)."""
    return isinstance(v, (int, float, np.floating)) and not isinstance(v, bool) and math.isfinite(v) and v >= NORMAL_MIN


def map_scale(pixel_threshold: float | None = None, threshold: float | None = None, source: str | None = None) -> MapScale:
    """The scale of the module docstring: relative to `pixel_threshold` when it is a normal float, else absolute
    0-1 with the level `threshold` (the image threshold in use) or OVERLAY_LEVEL. source: where the pixel
    threshold came from ("calibration"), stated in the legend."""
    note = None
    if pixel_threshold is not None:
        if is_normal(pixel_threshold):
            t = float(pixel_threshold)
            return MapScale(2 * t, t, True, f"colours: map / pixel threshold t = {t:.3g}" + (f" ({source})" if source else "")
                            + "; middle colour = t, brightest >= 2t")
        note = (f"pixel threshold {pixel_threshold!r} is not a normal float (< {NORMAL_MIN:.2g}): "
                "maps drawn on the absolute 0-1 scale")
    level = OVERLAY_LEVEL if threshold is None else float(threshold)
    title = "colours: map value on the absolute 0-1 scale" + ("" if pixel_threshold is not None else " (no pixel threshold: "
                                                              "`kano calibrate` gives one)")
    return MapScale(1.0, level, False, title, note)


ABSOLUTE = MapScale(1.0, OVERLAY_LEVEL, False, "colours: map value on the absolute 0-1 scale")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


_LEVELS = 65535  # colorize's table: the map quantised to 1/65535 of the scale, far below one 8-bit colour step


@functools.lru_cache(maxsize=1)
def _colour_table() -> np.ndarray:
    """(_LEVELS + 1, 3) uint8: the stops interpolated at every table level."""
    v = np.linspace(0.0, 1.0, _LEVELS + 1)
    return np.round(np.stack([np.interp(v, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)], -1)).astype(np.uint8)


def colorize(m: np.ndarray, top: float | None = None) -> np.ndarray:
    """(H, W) values on [0, top] (default SCALE) -> (H, W, 3) uint8; values outside are clipped to its ends, NaN is
    the bottom. One table lookup (within one colour level of interpolating the stops per pixel, and about
    5x faster: 1.5 ms against 8 ms for a 224² map; a gallery colours one map per panel)."""
    lo, hi = (SCALE[0], top) if top is not None else SCALE
    m = np.clip((np.nan_to_num(np.asarray(m, dtype=np.float64)) - lo) / (hi - lo), 0, 1)
    return _colour_table()[np.rint(m * _LEVELS).astype(np.int32)]


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) float map -> (H, W) float32 at size=(W, H), bilinear, values kept as they are (no 8-bit step)."""
    return np.asarray(Image.fromarray(np.asarray(amap, dtype=np.float32)).resize(size, Image.BILINEAR), dtype=np.float32)


def contour(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """(H, W) bool: the pixels of the mask's regions within `width` pixels of their edge (inside)."""
    m = np.asarray(mask) > 0
    inner = m.copy()
    for _ in range(width):  # erode by one pixel (4-neighbourhood) per step
        p = np.pad(inner, 1, constant_values=False)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def overlay(image: Image.Image, amap: np.ndarray, level: float = OVERLAY_LEVEL, mask: np.ndarray | None = None,
            colors: np.ndarray | None = None, top: float | None = None) -> Image.Image:
    """The map over the image at the map's size: the photo in grey; where the map is >= level its colour,
    more opaque the higher it is (alpha 0.45 at the level up to 0.9 at the top of the scale); below the
    level nothing. The ground-truth outline (mask at the map's size) in CONTOUR. colors: colorize(amap), when
    the caller has it already."""
    h, w = amap.shape
    grey = np.asarray(image.convert("L").resize((w, h), Image.BILINEAR))
    out = np.repeat(grey[..., None], 3, -1)
    hi = SCALE[1] if top is None else top
    m = np.nan_to_num(np.asarray(amap, dtype=np.float32))
    sel = m >= level  # only these pixels are blended; the rest stay grey (most of a map, usually)
    if sel.any():
        t = np.clip((m[sel] - level) / max(hi - level, 1e-6), 0, 1)
        alpha = (0.45 + 0.45 * t)[:, None]
        c = colorize(m[sel], hi) if colors is None else colors[sel]
        out[sel] = np.round(grey[sel][:, None].astype(np.float32) * (1 - alpha) + c.astype(np.float32) * alpha).astype(np.uint8)
    if mask is not None:
        out[contour(mask, max(1, round(min(h, w) / 128)))] = CONTOUR
    return Image.fromarray(out)


def decision(score: float | None, threshold: float | None, label: int | None = None) -> tuple[str, tuple]:
    """("score 0.356 >= threshold 0.303: ANOMALOUS", colour), with the truth appended when `label` is known."""
    if score is None or score != score:
        return "not scored", GREY
    if threshold is None:
        text, colour = f"score {_num(score)} (no threshold: no decision)", GREY
        if label is not None:
            text += f"; truth: {'anomalous' if label else 'normal'}"
        return text, colour
    anomalous = score >= threshold
    text = f"score {_num(score)} {'>=' if anomalous else '<'} threshold {_num(threshold)}: {'ANOMALOUS' if anomalous else 'normal'}"
    colour = RED if anomalous else GREEN
    if label is not None:
        if bool(label) == anomalous:
            text += f"; truth: {'anomalous' if label else 'normal'} (correct)"
        else:
            text += "; truth: normal (FALSE ALARM)" if not label else "; truth: anomalous (MISSED)"
            colour = (170, 90, 0)
    return text, colour


def _num(v: float) -> str:
    """A score or threshold for a caption: 3 decimals, or 3 significant digits below 0.01."""
    return f"{v:.3f}" if v == 0 or abs(v) >= 0.01 else f"{v:.3g}"


def colorbar(height: int, level: float | None = OVERLAY_LEVEL, threshold: float | None = None, width: int = 16,
             scale: MapScale | None = None) -> Image.Image:
    """The colour scale, top = scale.top, with tick numbers (multiples of t when relative to the pixel threshold t);
    marks the overlay level (a white line) and the image threshold on the absolute scale (a red triangle)."""
    scale = scale or MapScale(SCALE[1], OVERLAY_LEVEL if level is None else level, False, "")
    font = _font(11)
    lo, hi = SCALE[0], scale.top
    values = np.linspace(hi, lo, height, dtype=np.float64)[:, None].repeat(width, 1)
    bar = Image.fromarray(colorize(values, hi))
    canvas = Image.new("RGB", (width + 52, height + 12), (255, 255, 255))
    canvas.paste(bar, (2, 6))
    d = ImageDraw.Draw(canvas)
    d.rectangle([2, 6, 2 + width - 1, 6 + height - 1], outline=BLACK)
    y_of = lambda v: 6 + round((hi - v) / (hi - lo) * (height - 1))
    if scale.relative:
        ticks = [(0.0, "0"), (0.5, "0.5t"), (1.0, "t"), (1.5, "1.5t"), (2.0, ">=2t")]
        ticks = [(f * scale.level, text) for f, text in ticks]
    else:
        ticks = [(v, f"{v:.2f}") for v in np.linspace(lo, hi, 5)]
    for v, text in ticks:
        y = y_of(v)
        d.line([2 + width, y, 6 + width, y], fill=BLACK)
        d.text((8 + width, y - 6), text, fill=BLACK, font=font)
    if level is not None:  # the overlay's level: a white tick across the bar
        y = y_of(min(level, hi))
        d.line([0, y, 2 + width, y], fill=(255, 255, 255), width=1)
    if threshold is not None and not scale.relative and threshold <= hi:
        y = y_of(threshold)
        d.polygon([(0, y - 4), (0, y + 4), (5, y)], fill=RED)
    return canvas


def panel(image: Image.Image, amap: np.ndarray, *, mask: np.ndarray | None = None, name: str = "", score: float | None = None,
          threshold: float | None = None, label: int | None = None, level: float | None = None, size: int = 224,
          threshold_source: str | None = None, pixel_threshold: float | None = None,
          pixel_source: str | None = "calibration") -> Image.Image:
    """One labelled picture: image | ground truth (when `mask` is given) | map | map over image, a colour bar,
    and a title: `name`, then the score, threshold (and where it came from) and decision (and the truth when
    `label` is given), then the colour scale in words (map_scale(pixel_threshold, threshold)). level: the
    overlay's level; None: the scale's (the pixel threshold, else the threshold, else OVERLAY_LEVEL).

    image: any size (shown with its aspect ratio, long side `size`); amap (h, w), any size (stretched to the
    image, as the model's squash resize); mask (h', w') {0, 1} or None."""
    scale = map_scale(pixel_threshold, threshold, pixel_source)
    if level is None:
        level = scale.level
    W, H = image.size
    cw, ch = (size, max(1, round(size * H / W))) if W >= H else (max(1, round(size * W / H)), size)
    img = image.convert("RGB").resize((cw, ch), Image.BILINEAR)
    m = resize_map(amap, (cw, ch))
    gt = None if mask is None else np.asarray(Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).resize((cw, ch), Image.NEAREST)) > 127
    title_font, label_font = _font(14), _font(12)
    degenerate = scale.degenerate(m)
    colors = colorize(m, scale.top)
    if degenerate:  # not drawn black: a grey cell that says so
        heat = np.full((ch, cw, 3), 200, np.uint8)
    else:
        heat = colors.copy()
    if gt is not None:
        heat[contour(gt, 2)] = CONTOUR
    parts = [("image", img)]
    if gt is not None:
        parts.append(("ground truth", Image.fromarray(gt.astype(np.uint8) * 255).convert("RGB")))
    name_of = "t" if scale.relative and level == scale.level else _num(level)
    shown = (f"map >= {name_of} over image" if (m >= level).any()
             else f"nothing >= {name_of} (map max {_num(float(m.max()))})")
    heat_img = Image.fromarray(heat)
    if degenerate:
        hd = ImageDraw.Draw(heat_img)
        words = degenerate.split(": ", 1)
        for i, line in enumerate([words[0] + ":", *_wrap(words[1] if len(words) > 1 else "", 30)]):
            hd.text((6, 6 + 15 * i), line, fill=BLACK, font=label_font)
    parts += [("anomaly map", heat_img), (shown, overlay(img, m, level, gt, colors, scale.top))]
    gap, top, label_h = 8, 62 + (18 if scale.note else 0), 18
    bar = colorbar(ch, level, threshold, scale=scale)
    width = max(len(parts) * (cw + gap) + bar.width + gap, 640)
    canvas = Image.new("RGB", (width, top + label_h + ch + bar.height - ch + 4), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    text, colour = decision(score, threshold, label)
    if threshold is not None and threshold_source:
        text += f" (threshold from the {threshold_source})"
    d.text((gap, 4), name, fill=BLACK, font=title_font)
    d.text((gap, 23), text, fill=colour, font=title_font)
    d.text((gap, 42), scale.title, fill=BLACK, font=label_font)
    if scale.note:
        d.text((gap, 60), scale.note, fill=RED, font=label_font)
    x = gap
    for caption, part in parts:
        d.text((x, top), caption, fill=GREY, font=label_font)
        canvas.paste(part, (x, top + label_h))
        x += cw + gap
    canvas.paste(bar, (x, top + label_h - 6))
    return canvas


def _wrap(text: str, n: int) -> list[str]:
    lines, cur = [], ""
    for w in text.split():
        if cur and len(cur) + 1 + len(w) > n:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + ([cur] if cur else [])


def defect_mask(amap: np.ndarray, pixel_threshold: float) -> Image.Image:
    """(H, W) map -> a binary 8-bit PNG image: 255 where the map is >= the pixel threshold, else 0."""
    return Image.fromarray(np.where(np.nan_to_num(np.asarray(amap, dtype=np.float64)) >= pixel_threshold, 255, 0).astype(np.uint8))


def map_to_png16(amap: np.ndarray) -> Image.Image:
    """(H, W) map on SCALE -> a 16-bit grey PNG image: value = round(65535 · (m − lo) / (hi − lo)), clipped."""
    lo, hi = SCALE
    v = np.clip((np.nan_to_num(np.asarray(amap, dtype=np.float64)) - lo) / (hi - lo), 0, 1)
    return Image.fromarray(np.round(v * 65535).astype(np.uint16))


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write an 8-bit RGB image as a PNG: filter type 1 (Sub: each byte minus the one a pixel to its left) on
    every row, computed in one numpy pass, and deflate with run-length matching only (Z_RLE, level 1).
    Pillow's encoder tries its adaptive filters on each row; for a panel (flat white margins, smooth maps
    and photos) this is about 1.3x faster than unfiltered level-1 deflate and the file is smaller too
    (about 200 KB against 240 KB for a 998x302 panel); a gallery writes many panels per class."""
    a = np.asarray(image.convert("RGB"), dtype=np.uint8)
    h, w = a.shape[:2]
    flat = a.reshape(h, 3 * w)
    rows = np.empty((h, 1 + 3 * w), dtype=np.uint8)
    rows[:, 0] = 1                                         # each scanline starts with its filter type
    rows[:, 1:4] = flat[:, :3]                             # the first pixel has nothing to its left (counts as 0)
    np.subtract(flat[:, 3:], flat[:, :-3], out=rows[:, 4:])  # uint8 arithmetic wraps modulo 256, as the filter does

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_RLE)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)   # 8 bits, colour type 2 (RGB), deflate, filter set 0, no interlace
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", z.compress(rows.tobytes()) + z.flush())
                           + chunk(b"IEND", b""))
