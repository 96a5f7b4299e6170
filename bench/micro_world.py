"""The micro-CLIP's pretraining world: procedural textures and objects with captions and defect masks.

Every image is a pure function of (seed, index): `sample(seed, i, size)` -> (uint8 image (S, S, 3),
bool defect mask (S, S), caption, normal phrase, abnormal phrase). The class names, the patterns and shapes
and the defect kinds here are disjoint from `anomaly_data/synth.py` (the demo's and the tests' world)
and from the world's target classes (anomaly_data/world.py WORLD_TARGET, and their looks: no plaid,
ripple, wood-ring, chevron, polka-dot or parquet fields here) by construction: `check_disjoint()` asserts
the names. `world_sample` adds captioned images of the world's *auxiliary* classes with the defect kinds
the auxiliary set carries (anomaly_data/world.py SEEN_DEFECTS). Defect kinds never shown to the micro-CLIP:
the world's HELD_OUT_DEFECTS (cracks, an extra part, sharpening, local warps, texture frequency changes,
hue shifts at constant luminance), so "held out" means held out of pretraining and of training alike.
The primitives (seeding, blobs, strokes, random walks, resized noise, the object canvas) come from
anomaly_data/drawing.py, the same code the world and the legacy generator draw with; the micro-CLIP was
pretrained on their exact pixels. Its pictures are drawn by `MICRO`, a generator of anomaly_data/generator.py's
interface, once `sample` has picked the class and the kind.
"""

from __future__ import annotations

import math
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from kano.anomaly_data.drawing import ObjectCanvas, blob, line_mask, mask_of, noise_image, point_in, rng, segment, walk
from kano.anomaly_data.generator import Drawn, Spec

COLOURS = {  # name -> RGB; dark and bright ones alike, so intensity alone says little
    "red": (200, 40, 40), "green": (50, 160, 60), "blue": (40, 70, 200), "yellow": (230, 210, 50),
    "orange": (235, 130, 30), "purple": (130, 50, 160), "brown": (120, 75, 40), "grey": (128, 128, 128),
    "white": (235, 235, 230), "black": (30, 30, 32), "pink": (235, 140, 180), "teal": (30, 140, 140),
    "beige": (215, 195, 160), "navy": (25, 35, 90), "olive": (110, 120, 40), "cyan": (80, 200, 220),
}
# texture class -> (family, allowed colour names)
TEXTURE_CLASSES = {
    "canvas": ("weave_fine", ("beige", "white", "grey")), "mesh": ("grid_thin", ("grey", "black", "white")),
    "brick": ("brick", ("red", "brown", "orange")),
    "gravel": ("cells", ("grey", "beige", "brown")), "felt": ("fine_noise", ("green", "red", "grey")),
    "denim": ("diagonal", ("blue", "navy", "black")), "tweed": ("fleck", ("brown", "grey", "olive")),
    "trellis": ("diamond", ("white", "brown", "green")), "honeycomb": ("hex", ("yellow", "orange", "brown")),
    "speckle": ("speckle", ("white", "grey", "pink")), "terrazzo": ("chips", ("beige", "white", "grey")),
    "cork": ("coarse_noise", ("brown", "beige", "orange")), "linen": ("weave_coarse", ("white", "beige", "grey")),
    "bark": ("streaks", ("brown", "black", "olive")),
    "scales": ("scales", ("green", "teal", "olive")), "sand": ("grain", ("beige", "yellow", "orange")),
}
# object class -> (body shape, allowed colours, part kind, part count)
OBJECT_CLASSES = {
    "button": ("circle", ("black", "white", "red", "blue"), "hole", 4),
    "washer": ("annulus", ("grey", "white", "black"), None, 0),
    "gear": ("gear", ("grey", "brown", "yellow"), None, 0),
    "badge": ("shield", ("blue", "red", "green"), "star", 1),
    "token": ("octagon", ("yellow", "orange", "purple"), "dot", 1),
    "ticket": ("rect", ("white", "blue", "black"), "chip", 1),
    "dial": ("circle", ("white", "black", "beige"), "needle", 1),
    "plug": ("rect_tall", ("white", "black", "grey"), "prong", 2),
    "socket": ("square", ("white", "beige", "grey"), "slot", 2),
    "medal": ("circle", ("yellow", "orange", "grey"), "ribbon", 1),
    "label": ("rect", ("white", "yellow", "pink"), "line", 3),
    "tag": ("rounded", ("orange", "green", "white"), "hole", 1),
    "lens": ("circle", ("cyan", "black", "navy"), "glint", 1),
    "lid": ("rounded", ("red", "teal", "purple"), "tab", 1),
    "chipboard": ("square", ("green", "navy", "black"), "chip", 3),
    "domino": ("rect_tall", ("white", "black", "beige"), "dot", 2),
    "spanner": ("key", ("yellow", "grey", "brown"), None, 0),
    "leaf": ("leaf", ("green", "olive", "orange"), "vein", 1),
    "star": ("star", ("yellow", "red", "white"), None, 0),
    "bead": ("circle", ("purple", "pink", "teal"), "hole", 1),
}
SHAPE_WORDS = {"circle": "round", "annulus": "ring-shaped", "gear": "toothed", "shield": "shield-shaped", "octagon": "octagonal",
               "rect": "rectangular", "rect_tall": "rectangular", "square": "square", "rounded": "rounded", "key": "long",
               "leaf": "oval", "star": "star-shaped"}
PART_WORDS = {"hole": "hole", "star": "star emblem", "dot": "dot", "chip": "chip", "needle": "needle", "prong": "prong",
              "slot": "slot", "ribbon": "ribbon", "line": "printed line", "tab": "tab", "glint": "highlight", "vein": "vein"}
SURFACE_DEFECTS = ("hole", "scratch", "stain", "chip", "discolour", "thread", "spot", "dent")
PART_DEFECTS = ("part_missing", "part_moved", "part_colour")
CLASSES = tuple(TEXTURE_CLASSES) + tuple(OBJECT_CLASSES)

NORMAL_WORDS = ("flawless", "normal", "perfect", "intact", "undamaged", "good", "clean", "defect-free", "pristine")
ABNORMAL_WORDS = ("damaged", "abnormal", "defective", "faulty", "broken", "flawed")
NORMAL_TEMPLATES = (
    "a photo of a {n} {c}.", "a photo of a {n} {col} {c}.", "a {n} {col} {c}.", "a {col} {shape}{c} in perfect condition.",
    "a normal image of {c}.", "a close-up photo of a {n} {c}.", "a {col} {c} with no defects.", "an image of a {n} {shape}{c}.",
    "a {c} without any damage.", "a photo of a normal {c}.", "a perfect {c}.", "a {n} {c} surface.", "a flawless {col} {c}.",
    "a photo of a {n} object.", "a {n} {col} object.",
)
ABNORMAL_TEMPLATES = (
    "a photo of a {a} {c} with {d}{loc}.", "a photo of a {a} {col} {c} with {d}.", "a {a} {c}: {d}{loc}.",
    "an abnormal image of {c} with {d}.", "a {col} {shape}{c} with {d}{loc}.", "a {c} with {d}.",
    "a close-up photo of a {col} {c} showing {d}{loc}.", "a photo of an abnormal {c}.", "a photo of a damaged {c}.",
    "a {a} {c}.", "{d} on a {col} {c}.", "a photo of a {a} object with {d}.", "a {a} object with {d}{loc}.",
)
LOCATIONS = (("top left", "top", "top right"), ("left", "centre", "right"), ("bottom left", "bottom", "bottom right"))


def check_disjoint() -> None:
    """The pretraining classes must be none of the demo's/tests' target classes: not the legacy synthetic
    classes, not the world's targets, not a built-in pack class. (The world's auxiliary classes may share a
    name: KAnoCLIP trains on those, so nothing is measured on them.)"""
    import json
    from pathlib import Path

    from kano.anomaly_data import synth

    legacy = getattr(synth, "LEGACY_CLASSES", synth.TEXTURES + synth.OBJECTS)
    try:
        from kano.anomaly_data.world import WORLD_TARGET
    except ImportError:  # before the world's classes exist
        WORLD_TARGET = ()
    pack = json.loads((Path(__file__).resolve().parent.parent / "kb_builder" / "builtin_pack.json").read_text())
    clash = set(CLASSES) & (set(legacy) | set(WORLD_TARGET) | {c.lower() for c in pack["classes"]})
    assert not clash, f"pretraining classes must be unseen elsewhere, got {sorted(clash)}"


# -- textures --------------------------------------------------------------------------------
def _texture_field(family: str, s: int, r: np.random.Generator) -> np.ndarray:
    """A pattern in [0, 1], (s, s). Parameters jitter per image (normal variation)."""
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    f = r.uniform(0.85, 1.15)
    ang = r.uniform(-0.15, 0.15)
    xr, yr = x * math.cos(ang) - y * math.sin(ang), x * math.sin(ang) + y * math.cos(ang)
    ph = r.uniform(0, 2 * math.pi)

    def noise(cells):
        return noise_image(r.normal(0, 1, (cells, cells)).astype(np.float32), s, 1e-6).astype(np.float32) / 255

    if family == "weave_fine":
        return 0.5 + 0.25 * (np.sin(xr * 1.2 * f + ph) * np.sign(np.sin(yr * 0.6 * f)) + np.sin(yr * 1.2 * f))
    if family == "weave_coarse":
        return 0.5 + 0.25 * (np.sin(xr * 0.5 * f + ph) * np.sign(np.sin(yr * 0.25 * f)) + np.sin(yr * 0.5 * f))
    if family == "grid_thin":
        p = 9 * f
        return (((xr + ph) % p < 1.6) | ((yr + ph) % p < 1.6)).astype(np.float32)
    if family == "brick":
        h = 10 * f
        row = np.floor((yr + ph) / h)
        off = (row % 2) * 10 * f
        return 1.0 - (((yr + ph) % h < 1.5) | ((xr + off) % (20 * f) < 1.5)).astype(np.float32) * 0.9
    if family == "cells":
        pts = r.uniform(0, s, (40, 2))
        d = np.sqrt(((np.stack([x, y], -1)[:, :, None, :] - pts[None, None]) ** 2).sum(-1))
        d.sort(-1)
        return np.clip((d[..., 1] - d[..., 0]) / 6, 0, 1)
    if family == "fine_noise":
        return noise(s // 2)
    if family == "coarse_noise":
        return noise(max(3, s // 12))
    if family == "diagonal":
        return 0.5 + 0.5 * np.sin((xr + yr) * 0.9 * f + ph) * (0.7 + 0.3 * noise(s // 4))
    if family == "fleck":
        return np.clip(0.5 + 0.2 * noise(s // 3) + (r.random((s, s)) > 0.96) * 0.6, 0, 1)
    if family == "diamond":
        return ((np.abs(np.sin((xr + yr) * 0.2 * f + ph)) < 0.15) | (np.abs(np.sin((xr - yr) * 0.2 * f)) < 0.15)).astype(np.float32)
    if family == "hex":
        a = np.sin(xr * 0.35 * f + ph) + np.sin((0.5 * xr + 0.866 * yr) * 0.35 * f) + np.sin((-0.5 * xr + 0.866 * yr) * 0.35 * f)
        return np.clip((a + 1.5) / 3, 0, 1)
    if family == "speckle":
        return np.clip(0.3 + (r.random((s, s)) > 0.9) * 0.7 + 0.1 * noise(s // 6), 0, 1)
    if family == "chips":
        img = Image.new("L", (s, s), 60)
        d = ImageDraw.Draw(img)
        for _ in range(int(s * s / 120)):
            cx, cy, rr = r.uniform(0, s), r.uniform(0, s), r.uniform(1.5, 4)
            d.polygon([(cx + rr * math.cos(t), cy + rr * math.sin(t)) for t in r.uniform(0, 6.3, 5)], fill=int(r.uniform(120, 255)))
        return np.asarray(img, np.float32) / 255
    if family == "streaks":
        n = np.asarray(Image.fromarray((noise(s // 3) * 255).astype(np.uint8)).resize((s // 8, s), Image.BICUBIC).resize((s, s), Image.BICUBIC), np.float32) / 255
        return np.clip((n - 0.3) * 2, 0, 1)
    if family == "scales":
        p = 10 * f
        row = np.floor(yr / p)
        xx = (xr + (row % 2) * p / 2) % p - p / 2
        yy = yr % p
        return np.clip(np.hypot(xx, yy) / p, 0, 1)
    # grain
    return np.clip(0.5 + 0.25 * r.normal(0, 1, (s, s)) * 0.6 + 0.2 * noise(s // 8), 0, 1)


def _colour(name: str, r: np.random.Generator) -> np.ndarray:
    return np.clip(np.array(COLOURS[name], np.float32) + r.normal(0, 10, 3), 0, 255)


def _second_colour(c: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """A companion shade: darker or lighter by a visible amount, so the pattern shows."""
    k = r.uniform(0.45, 0.7) if c.mean() > 110 else r.uniform(1.6, 2.4)
    return np.clip(c * k + (0 if c.mean() > 110 else 25), 0, 255)


def _texture(cls: str, s: int, r: np.random.Generator):
    family, cols = TEXTURE_CLASSES[cls]
    col = cols[r.integers(len(cols))]
    a = _colour(col, r)
    b = _second_colour(a, r)
    t = _texture_field(family, s, r)[..., None]
    img = a * (1 - t) + b * t
    return img, np.ones((s, s), bool), col, {}


# -- objects ---------------------------------------------------------------------------------
def _body_polygon(shape: str, c, rad: float, r: np.random.Generator) -> list | None:
    rot = r.uniform(-0.2, 0.2)
    if shape == "octagon":
        return [(c[0] + rad * math.cos(rot + k * math.pi / 4 + math.pi / 8), c[1] + rad * math.sin(rot + k * math.pi / 4 + math.pi / 8)) for k in range(8)]
    if shape == "gear":
        pts = []
        for k in range(32):
            rr = rad * (1.0 if (k // 2) % 2 == 0 else 0.8)
            t = rot + k * 2 * math.pi / 32
            pts.append((c[0] + rr * math.cos(t), c[1] + rr * math.sin(t)))
        return pts
    if shape == "shield":
        return [(c[0] - rad, c[1] - rad * 0.9), (c[0] + rad, c[1] - rad * 0.9), (c[0] + rad, c[1] + rad * 0.1), (c[0], c[1] + rad), (c[0] - rad, c[1] + rad * 0.1)]
    if shape == "star":
        return [(c[0] + (rad if k % 2 == 0 else rad * 0.45) * math.cos(rot - math.pi / 2 + k * math.pi / 5),
                 c[1] + (rad if k % 2 == 0 else rad * 0.45) * math.sin(rot - math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "leaf":
        return [(c[0] + rad * math.cos(t) * 0.55, c[1] + rad * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24)[:-1]]
    return None


def _draw_part(d: ImageDraw.ImageDraw, kind: str, p, u: float, fill) -> None:
    """One part of size unit u at point p."""
    x, y = p
    if kind in ("hole", "dot"):
        d.ellipse([x - u, y - u, x + u, y + u], fill=fill)
    elif kind == "star":
        d.polygon([(x + (u * 1.6 if k % 2 == 0 else u * 0.7) * math.cos(-math.pi / 2 + k * math.pi / 5),
                    y + (u * 1.6 if k % 2 == 0 else u * 0.7) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)], fill=fill)
    elif kind == "chip":
        d.rectangle([x - u * 1.3, y - u, x + u * 1.3, y + u], fill=fill)
    elif kind == "needle":
        d.line([(x, y), (x + u * 3, y - u * 2.5)], fill=fill, width=max(2, int(u * 0.6)))
    elif kind in ("prong", "slot"):
        d.rectangle([x - u * 0.45, y - u * 1.4, x + u * 0.45, y + u * 1.4], fill=fill)
    elif kind == "ribbon":
        d.polygon([(x - u * 1.5, y - u * 2), (x + u * 1.5, y - u * 2), (x + u * 0.8, y + u), (x - u * 0.8, y + u)], fill=fill)
    elif kind == "line":
        d.rectangle([x - u * 3, y - u * 0.35, x + u * 3, y + u * 0.35], fill=fill)
    elif kind == "tab":
        d.rectangle([x - u * 1.8, y - u * 0.7, x + u * 1.8, y + u * 0.7], fill=fill)
    elif kind == "glint":
        d.ellipse([x - u * 1.2, y - u * 0.7, x + u * 1.2, y + u * 0.7], fill=fill)
    elif kind == "vein":
        d.line([(x, y - u * 4), (x, y + u * 4)], fill=fill, width=max(2, int(u * 0.5)))


def _part_points(shape: str, kind: str, n: int, c, rad: float) -> list:
    if kind == "hole" and n == 4:
        o = rad * 0.28
        return [(c[0] - o, c[1] - o), (c[0] + o, c[1] - o), (c[0] - o, c[1] + o), (c[0] + o, c[1] + o)]
    if kind == "hole" and shape == "rounded":
        return [(c[0], c[1] - rad * 0.6)]
    if kind in ("prong", "slot", "dot") and n == 2:
        return [(c[0] - rad * 0.3, c[1]), (c[0] + rad * 0.3, c[1])] if kind != "dot" else [(c[0], c[1] - rad * 0.4), (c[0], c[1] + rad * 0.4)]
    if kind == "line":
        return [(c[0], c[1] - rad * 0.35), (c[0], c[1]), (c[0], c[1] + rad * 0.35)]
    if kind == "chip" and n == 3:
        return [(c[0] - rad * 0.45, c[1] - rad * 0.3), (c[0] + rad * 0.45, c[1] - rad * 0.3), (c[0], c[1] + rad * 0.4)]
    if kind == "chip":
        return [(c[0] - rad * 0.45, c[1] - rad * 0.1)]
    if kind == "ribbon":
        return [(c[0], c[1] - rad * 0.7)]
    if kind == "glint":
        return [(c[0] - rad * 0.35, c[1] - rad * 0.35)]
    if kind == "tab":
        return [(c[0], c[1] + rad * 0.55)]
    return [(c[0], c[1])]


def _object(cls: str, s: int, r: np.random.Generator, part_defect: str | None):
    shape, cols, part, n_parts = OBJECT_CLASSES[cls]
    col = cols[r.integers(len(cols))]
    body = _colour(col, r)
    # background anywhere on the intensity range, sometimes close to the body (dark on dark)
    bg = np.clip(r.uniform(0, 255) * np.ones(3) + r.normal(0, 15, 3), 0, 255) if r.random() < 0.7 else np.clip(body * r.uniform(0.6, 1.4), 0, 255)
    if np.abs(bg - body).sum() < 60:
        bg = np.clip(bg + (60 if bg.mean() < 128 else -60), 0, 255)
    cv = ObjectCanvas(s, bg)
    c = (s / 2 + r.uniform(-0.05, 0.05) * s, s / 2 + r.uniform(-0.05, 0.05) * s)
    rad = s * r.uniform(0.3, 0.36)
    fill = tuple(int(v) for v in body)
    box = [c[0] - rad, c[1] - rad, c[0] + rad, c[1] + rad]
    poly = _body_polygon(shape, c, rad, r)
    if poly is not None:
        cv.fill("polygon", poly, fill)
    elif shape in ("circle", "annulus"):
        cv.fill("ellipse", box, fill)
        if shape == "annulus":
            cv.fill("ellipse", [c[0] - rad * 0.45, c[1] - rad * 0.45, c[0] + rad * 0.45, c[1] + rad * 0.45], cut=True)
    elif shape == "key":
        cv.fill("ellipse", [c[0] - rad, c[1] - rad * 0.45, c[0] - rad * 0.1, c[1] + rad * 0.45], fill)
        cv.fill("rectangle", [c[0] - rad * 0.2, c[1] - rad * 0.12, c[0] + rad, c[1] + rad * 0.12], fill)
        for k in range(3):
            cv.fill("rectangle", [c[0] + rad * (0.35 + 0.22 * k), c[1] + rad * 0.1, c[0] + rad * (0.47 + 0.22 * k), c[1] + rad * 0.35], fill)
    else:
        w, h = {"rect": (1.0, 0.65), "rect_tall": (0.6, 1.0), "square": (0.9, 0.9), "rounded": (0.8, 0.8)}[shape]
        rb = [c[0] - rad * w, c[1] - rad * h, c[0] + rad * w, c[1] + rad * h]
        cv.fill("rounded_rectangle", rb, fill, radius=int(rad * (0.3 if shape == "rounded" else 0.08)))
    d = cv.draw
    region = cv.arrays()[1]
    defect = np.zeros((s, s), bool)
    info = {"shape": shape, "part": part}
    if part:
        pts = _part_points(shape, part, n_parts, c, rad)
        u = rad * 0.12
        pcol = bg if part in ("hole", "slot") else (_second_colour(body, r) if part not in ("star", "chip", "ribbon") else
                                                    np.array(COLOURS["yellow" if col != "yellow" else "red"], np.float32))
        pfill = tuple(int(v) for v in pcol)
        k_def = int(r.integers(len(pts)))
        for k, p in enumerate(pts):
            if part_defect in ("part_missing", "part_moved", "part_colour") and k == k_def:
                pmask = mask_of(s, lambda dd: _draw_part(dd, part, p, u, 255))
                if part_defect == "part_colour":
                    alt = [n for n in COLOURS if np.abs(np.array(COLOURS[n]) - pcol).sum() > 200 and np.abs(np.array(COLOURS[n]) - body).sum() > 150]
                    word = alt[r.integers(len(alt))]
                    _draw_part(d, part, p, u, COLOURS[word])
                    defect |= pmask
                    info["part_colour_word"] = word
                    continue
                defect |= pmask
                if part_defect == "part_moved":
                    q = (p[0] + r.choice([-1, 1]) * rad * r.uniform(0.35, 0.55), p[1] + r.choice([-1, 1]) * rad * r.uniform(0.3, 0.5))
                    _draw_part(d, part, q, u, pfill)
                    defect |= mask_of(s, lambda dd: _draw_part(dd, part, q, u, 255))
                continue
            _draw_part(d, part, p, u, pfill)
        if part_defect == "part_extra":
            q = (c[0] + r.uniform(-0.5, 0.5) * rad, c[1] + r.uniform(-0.5, 0.5) * rad)
            _draw_part(d, part, q, u, pfill)
            defect |= mask_of(s, lambda dd: _draw_part(dd, part, q, u, 255))
    arr = np.asarray(cv.image, np.float32)
    info["changed"] = defect  # a missing part leaves body colour where it was: the mask marks that place
    info["bg"] = bg
    return arr, region, col, info


# -- defects ---------------------------------------------------------------------------------
def _surface_defect(img: np.ndarray, region: np.ndarray, kind: str, bg: np.ndarray, r: np.random.Generator):
    """Returns (image, mask, phrase)."""
    s = img.shape[0]
    m = s // 6  # a point at least m pixels inside the border, or anywhere on the region when none is
    x, y = point_in(region, r, m) if region[m:-m, m:-m].any() else point_in(region, r, 0)
    out = img.copy()
    size_word = ""
    if kind == "hole":
        rad = s * r.uniform(0.04, 0.08)
        mask = blob(s, x, y, rad, r, corners=9) & region
        out[mask] = r.uniform(0, 25)
        size_word = "small " if rad < s * 0.06 else "large "
        phrase = r.choice([f"a dark round hole", f"a {size_word}hole", "a hole or missing piece", "a puncture", "a poke hole", "a dark hole"])
    elif kind in ("scratch", "crack", "thread"):
        if kind == "scratch":
            ang, ln = r.uniform(0, math.pi), s * r.uniform(0.2, 0.4)
            mask = line_mask(s, segment(x, y, ang, ln), int(r.integers(1, 3))) & region
        else:
            ang = r.uniform(0, 2 * math.pi)
            pts = walk(x, y, ang, int(r.integers(6, 11)), s * 0.035, 0.8 if kind == "crack" else 0.4, r)
            mask = line_mask(s, pts, 2 if kind == "crack" else 1) & region
        if kind == "scratch":
            bright = r.random() < 0.5
            out[mask] = r.uniform(215, 255) if bright else r.uniform(0, 40)
            tone = "bright" if bright else "dark"
            phrase = r.choice([f"a thin {tone} scratch", "a scratch across its surface", f"a long {tone} scratch", "a scratch", "a thin cut"])
        elif kind == "crack":
            out[mask] = out[mask] * 0.2
            phrase = r.choice(["a crack", "a dark jagged crack", "a crack breaking its regular appearance", "a fracture line", "a thin crack"])
        else:
            cname = list(COLOURS)[r.integers(len(COLOURS))]
            out[mask] = np.array(COLOURS[cname], np.float32)
            phrase = r.choice([f"a {cname} foreign thread", "a deformation or foreign object", "a loose fibre", "a stray hair", "a foreign object"])
            if np.abs(out[mask] - img[mask]).sum(-1).mean() < 60:
                out[mask] = 255 - img[mask]
    elif kind in ("stain", "discolour"):
        rad = s * r.uniform(0.06, 0.11)
        mask = blob(s, x, y, rad, r, corners=9) & region
        soft = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.GaussianBlur(1.5)), np.float32)[..., None] / 255
        if kind == "stain":
            cname = list(COLOURS)[r.integers(len(COLOURS))]
            col = np.array(COLOURS[cname], np.float32)
            out = out * (1 - 0.7 * soft) + col * 0.7 * soft
            phrase = r.choice(["a stain", f"a {cname} stain", "a stain or discoloured area", "a blot of contamination", "a spot of dirt", "a smear"])
        else:
            out = out * (1 - soft) + (out[..., [1, 2, 0]] * 0.8 + 40) * soft
            phrase = r.choice(["a discoloured area", "a faded patch", "a patch of the wrong colour", "a stain or discoloured area", "a discoloured patch"])
        mask = soft[..., 0] > 0.5
    elif kind == "chip":
        # a missing corner / chipped edge: a bite out of the region's border, background shows
        edge = region & ~np.asarray(Image.fromarray(region.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(5))).astype(bool)
        ex, ey = point_in(edge if edge.any() else region, r, 0)
        mask = blob(s, ex, ey, s * r.uniform(0.05, 0.09), r, corners=9) & region
        out[mask] = bg
        phrase = r.choice(["a missing corner", "a chipped edge", "a broken piece", "a hole or missing piece", "a missing chunk", "a broken edge"])
    elif kind == "spot":
        rad = s * r.uniform(0.025, 0.05)
        mask = blob(s, x, y, rad, r, corners=9) & region
        out[mask] = r.uniform(235, 255)
        phrase = r.choice(["a bright spot", "a shiny glare spot", "a white speck", "a bright speck", "a small bright fleck"])
    else:  # dent: a darker shaded crescent, as a depression lit from one side
        rad = s * r.uniform(0.06, 0.1)
        mask = blob(s, x, y, rad, r, corners=9) & region
        yy, xx = np.mgrid[0:s, 0:s]
        shade = np.where(((xx - x) + (yy - y)) > 0, 0.55, 1.35)[..., None]
        out = np.where(mask[..., None], np.clip(out * shade, 0, 255), out)
        phrase = r.choice(["a dent", "a small dent", "a deformation or foreign object", "a pressed-in dent", "a bump"])
    mask = mask & (np.abs(out - img).sum(-1) > 20)
    return out, mask, phrase


def _where(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    s = mask.shape[0]
    return LOCATIONS[min(2, int(ys.mean() / s * 3))][min(2, int(xs.mean() / s * 3))]


def _articles(text: str) -> str:
    return re.sub(r"\b([aA]) (?=[aeiou])", lambda m: m.group(1) + "n ", text)


class _Micro:
    """The captioned world's generator (anomaly_data/generator.py's interface): a texture or object of `spec.cls`,
    normal variation, and a defect of `spec.role` unless the role is normal. Its record: the defect kind (None
    also when a surface defect vanished into the pattern: the picture is then normal), the phrase naming it,
    the colour word and the body shape."""

    def draw(self, spec: Spec, r: np.random.Generator) -> Drawn:
        cls, size, kind = spec.cls, spec.size, None if spec.normal else spec.role
        is_obj = cls in OBJECT_CLASSES
        if is_obj:
            img, region, col, info = _object(cls, size, r, kind if kind in PART_DEFECTS else None)
            bg = info["bg"]
        else:
            img, region, col, info = _texture(cls, size, r)
            bg = img.mean((0, 1)) * 0.35
        # normal variation: illumination gradient, gain, sensor noise
        g = np.linspace(1 - r.uniform(0, 0.12), 1 + r.uniform(0, 0.12), size, dtype=np.float32)
        grad = g[None, :, None] if r.random() < 0.5 else g[:, None, None]
        clean = np.clip(img * grad * r.uniform(0.9, 1.1), 0, 255)
        mask = np.zeros((size, size), bool)
        phrase = ""
        if kind in PART_DEFECTS:
            mask = info.get("changed", mask)
            pw = PART_WORDS[info["part"]]
            phrase = {"part_missing": r.choice([f"its {pw} missing", f"a missing {pw}", f"no {pw}", "a missing part"]),
                      "part_extra": r.choice([f"an extra {pw}", f"one {pw} too many", "an extra part"]),
                      "part_moved": r.choice([f"a misplaced {pw}", f"its {pw} in the wrong place", "a part in the wrong place"]),
                      "part_colour": r.choice([f"a {pw} of the wrong colour", f"a {info.get('part_colour_word', 'strange')} {pw}", "a recoloured part"])}[kind]
            out = clean
        elif kind:
            out, mask, phrase = _surface_defect(clean, region, kind, bg * np.ones(3, np.float32), r)
            if mask.sum() < 3:  # the defect vanished into the pattern: call the image normal
                kind, mask, out = None, np.zeros_like(mask), clean
        else:
            out = clean
        out = np.clip(out + r.normal(0, 3, out.shape), 0, 255).astype(np.uint8)
        return Drawn(out, mask, {"kind": kind, "phrase": phrase, "colour": col, "shape": info.get("shape", "")})


MICRO = _Micro()


def sample(seed: int, index: int, size: int = 112, p_defect: float = 0.5, classes: tuple[str, ...] = CLASSES):
    """One captioned image: (image uint8 (S,S,3), mask bool (S,S), caption, normal phrase, abnormal phrase, meta)."""
    r = rng(seed, index)
    cls = classes[r.integers(len(classes))]
    is_obj = cls in OBJECT_CLASSES
    defective = r.random() < p_defect
    kind = None
    if defective:
        has_part = is_obj and OBJECT_CLASSES[cls][2] is not None
        pool = SURFACE_DEFECTS + (PART_DEFECTS if has_part else ())
        if not is_obj:
            pool = tuple(k for k in pool if k != "chip")
        kind = pool[r.integers(len(pool))]
    d = MICRO.draw(Spec(cls, kind or "good", index, size), r)
    out, mask, kind, phrase, col, shape = d.image, d.mask, d.record["kind"], d.record["phrase"], d.record["colour"], d.record["shape"]
    name = cls
    shape = SHAPE_WORDS.get(shape, "")
    shape = (shape + " ") if shape and r.random() < 0.5 else ""
    loc = f" in the {_where(mask)}" if kind and mask.any() and r.random() < 0.6 else ""
    loc = loc.replace("in the centre", "near the centre")
    nw, aw = NORMAL_WORDS[r.integers(len(NORMAL_WORDS))], ABNORMAL_WORDS[r.integers(len(ABNORMAL_WORDS))]
    if kind:
        t = ABNORMAL_TEMPLATES[r.integers(len(ABNORMAL_TEMPLATES))]
        caption = t.format(a=aw, c=name, col=col, shape=shape, d=phrase, loc=loc)
    else:
        t = NORMAL_TEMPLATES[r.integers(len(NORMAL_TEMPLATES))]
        caption = t.format(n=nw, c=name, col=col, shape=shape)
    caption = _articles(caption[0].lower() + caption[1:])
    # the two phrases the patch-level loss contrasts: what a normal part of this image is, and what its defect is
    normal_phrase = NORMAL_TEMPLATES[r.integers(len(NORMAL_TEMPLATES))].format(n=nw, c=name, col=col, shape="")
    if kind:
        abnormal_phrase = f"a {aw} {name} with {phrase}."
    else:
        k2 = SURFACE_DEFECTS[r.integers(len(SURFACE_DEFECTS))]
        abnormal_phrase = r.choice([f"a photo of a {aw} {name}.", f"a photo of an abnormal {name}.", f"a {aw} {name} with a {k2}."])
    normal_phrase, abnormal_phrase = _articles(normal_phrase), _articles(abnormal_phrase)
    meta = {"class": cls, "colour": col, "defect": kind}
    return out, mask, caption, normal_phrase, abnormal_phrase, meta


# -- the KAnoCLIP world's auxiliary classes, captioned ------------------------------------------
# The micro-CLIP also sees the auxiliary classes of anomaly_data/world.py (never its target classes), with
# the defect kinds the auxiliary set carries (never HELD_OUT_DEFECTS), each described in words, the way
# real CLIP has seen photos of damaged things of many kinds before anyone trains a detector on it.
WORLD_PHRASES = {
    "dark_spot": ("a dark spot", "a dark blot", "a small dark mark"),
    "bright_spot": ("a bright spot", "a light blot", "a small bright mark"),
    "scratch": ("a scratch", "a thin scratch", "a long thin line"),
    "stain": ("a stain", "a faint stain", "a discoloured patch"),
    "rotated": ("a patch turned the wrong way", "a rotated patch", "a piece of the pattern pasted askew"),
    "blur": ("a blurred patch", "a smeared area", "a soft, blurry region"),
    "orientation": ("a patch of the pattern running the wrong way", "a misaligned region", "a region of crooked pattern"),
    "part_missing": ("a missing part", "a part missing", "an empty spot where a part should be"),
    "part_moved": ("a misplaced part", "a part in the wrong place", "a part off its line"),
    "part_recolour": ("a part of the wrong colour", "a recoloured part", "a part painted like another one"),
}


def world_sample(seed: int, index: int, size: int = 96, p_defect: float = 0.5):
    """One captioned image of a world auxiliary class: the same tuple as `sample`."""
    from kano.anomaly_data import world

    r = rng(seed, "world", index)
    cls = world.WORLD_AUX[r.integers(len(world.WORLD_AUX))]
    kinds = [k for k in world.SEEN_DEFECTS if world.applies(cls, k) and k in WORLD_PHRASES]
    kind = kinds[r.integers(len(kinds))] if r.random() < p_defect else None
    d = world.WORLD.draw(Spec(cls, kind or "good", index, size), r)
    img = np.clip(d.image, 0, 255).astype(np.uint8)
    mask = d.mask if kind else np.zeros((size, size), bool)
    nw, aw = NORMAL_WORDS[r.integers(len(NORMAL_WORDS))], ABNORMAL_WORDS[r.integers(len(ABNORMAL_WORDS))]
    normal_phrase = _articles(f"a photo of a {nw} {cls}.")
    if kind:
        phrase = WORLD_PHRASES[kind][r.integers(3)]
        loc = f" in the {_where(mask)}".replace("in the centre", "near the centre") if r.random() < 0.5 else ""
        caption = r.choice([f"a photo of a {aw} {cls} with {phrase}{loc}.", f"a {aw} {cls}: {phrase}{loc}.",
                            f"a {cls} with {phrase}.", f"{phrase} on a {cls}."])
        abnormal_phrase = f"a {aw} {cls} with {phrase}."
    else:
        caption = r.choice([f"a photo of a {nw} {cls}.", f"a {nw} {cls}.", f"a {cls} with no defects.", f"a {nw} {cls} surface."])
        abnormal_phrase = f"a photo of a {aw} {cls}."
    return img, mask, _articles(caption), normal_phrase, _articles(abnormal_phrase), {"class": cls, "colour": None, "defect": kind}
