"""The synthetic world: textures and part-objects where colour statistics and self-similarity are not enough.

Two families of classes, each drawn deterministically from its name:

- Textures: a procedural intensity field t(x, y) in [0, 1] (stripes, weave, plaid, brick, ripples, ...)
  with a class orientation and frequency, coloured between two class colours. Colours and backgrounds
  span the whole intensity range: dark-on-dark and bright-on-bright classes exist.
- Part-objects: a body (rectangle, disc, hexagon, capsule) carrying 3 parts that are each unique in
  the image (one chip, one LED, one label, one hole ...) at class-specific places. A patch unlike the
  rest of its image is normal here, so "unusual" is not "defective".

Normal variation in every image: a small shift and rotation (objects), phase / orientation /
frequency jitter (textures), an illumination gradient, a global gain and sensor noise.

Defect kinds, in three groups (DEFECT_GROUPS):

- surface: dark_spot, bright_spot, scratch (bright or dark), crack, stain, hue (hue rotated at
  constant luminance)
- structural, built from the image's own content: rotated (a patch of the same image rotated or
  flipped, pasted elsewhere), warp (a local swirl), blur, sharpen, orientation / frequency (the
  texture re-rendered inside a region with another orientation / frequency). Textures only.
- part: part_missing, part_moved, part_recolour (takes another part's colour: no new colour appears),
  part_extra (one too many: a copy of a part in a free place). Part-objects only.

SEEN_DEFECTS are the kinds the auxiliary classes carry; HELD_OUT_DEFECTS appear only in the targets,
so results can be reported for kinds seen in training and kinds never seen.

Every draw comes from a generator seeded by (seed, class, split, index): output is deterministic.
Images are float64 (H, W, 3) in [0, 255]; masks are bool (H, W).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .drawing import ObjectCanvas, blob, line_mask, noise_image, point_in, rng, segment, walk
from .generator import Drawn, Spec

WORLD_TEXTURES = ("linen", "corduroy", "tartan", "brick", "dune", "grain", "mesh", "scales", "twill", "felt",
                  "perforated", "parquet")
WORLD_OBJECTS = ("circuit", "badge", "pager", "remote", "thermostat", "socket", "calculator", "tag", "padlock",
                 "switchplate", "gauge", "radio")
WORLD_CLASSES = WORLD_TEXTURES + WORLD_OBJECTS
# Auxiliary (training) and target (zero-shot evaluation) classes: disjoint, both holding textures and objects.
WORLD_AUX = ("linen", "corduroy", "brick", "mesh", "scales", "felt", "circuit", "badge", "remote", "socket", "tag",
             "gauge")
WORLD_TARGET = ("tartan", "dune", "grain", "twill", "perforated", "parquet", "pager", "thermostat", "calculator",
                "padlock", "switchplate", "radio")

SURFACE_DEFECTS = ("dark_spot", "bright_spot", "scratch", "crack", "stain", "hue")
STRUCTURAL_DEFECTS = ("rotated", "warp", "blur", "sharpen", "orientation", "frequency")
PART_DEFECTS = ("part_missing", "part_moved", "part_recolour", "part_extra")
DEFECT_GROUPS = {"surface": SURFACE_DEFECTS, "structural": STRUCTURAL_DEFECTS, "part": PART_DEFECTS}
WORLD_DEFECTS = SURFACE_DEFECTS + STRUCTURAL_DEFECTS + PART_DEFECTS
HELD_OUT_DEFECTS = ("crack", "hue", "warp", "sharpen", "frequency", "part_extra")
SEEN_DEFECTS = tuple(d for d in WORLD_DEFECTS if d not in HELD_OUT_DEFECTS)
# The groups of defect kinds a comparison in this world reports (None: every kind).
COMPARISON_GROUPS = {"all": None, "seen": SEEN_DEFECTS, "held_out": HELD_OUT_DEFECTS, **DEFECT_GROUPS}

# Texture families: which field each class uses, and whether rotating it changes how it looks.
_TEX_FIELD = {"linen": "weave", "corduroy": "stripes", "tartan": "plaid", "brick": "brick", "dune": "dune",
              "grain": "wood", "mesh": "grid", "scales": "scales", "twill": "chevron", "felt": "noise",
              "perforated": "dots", "parquet": "blocks"}
_ISOTROPIC = ("noise",)  # rotated / orientation defects are invisible on an isotropic field: not drawn there


def applies(cls: str, kind: str) -> bool:
    """Whether defect `kind` can be drawn on world class `cls`."""
    if cls in WORLD_TEXTURES:
        if kind in PART_DEFECTS:
            return False
        if kind in ("rotated", "orientation") and _TEX_FIELD[cls] in _ISOTROPIC:
            return False
        return kind in SURFACE_DEFECTS + STRUCTURAL_DEFECTS
    return kind in SURFACE_DEFECTS + PART_DEFECTS


def _lum(c: np.ndarray) -> np.ndarray:
    return c[..., 0] * 0.299 + c[..., 1] * 0.587 + c[..., 2] * 0.114


def _colour(r: np.random.Generator, lum: float, sat: float) -> np.ndarray:
    """An RGB colour of the given luminance (0-255) and saturation-like spread."""
    hue = r.uniform(0, 2 * math.pi)
    cb, cr = sat * math.cos(hue), sat * math.sin(hue)
    rgb = np.array([lum + 1.402 * cr, lum - 0.344136 * cb - 0.714136 * cr, lum + 1.772 * cb])
    return np.clip(rgb, 0, 255)


# ---------------------------------------------------------------- textures

def _tex_class(cls: str) -> dict:
    """Class constants: two colours (any intensity), orientation, frequency (cycles per image width)."""
    r = rng(11, cls)
    base = r.uniform(25, 230)
    contrast = r.uniform(35, 80) * (1 if base < 128 else -1)
    return {"field": _TEX_FIELD[cls], "a": _colour(r, base, r.uniform(5, 40)), "b": _colour(r, np.clip(base + contrast, 5, 250), r.uniform(5, 40)),
            "theta": r.uniform(0, math.pi), "freq": r.uniform(4.0, 6.5), "seed": int(r.integers(1 << 30))}


def _smooth_noise(seed: int, size: int, cells: int) -> np.ndarray:
    return noise_image(np.random.default_rng(seed).normal(0, 1, (cells, cells)), size, 1e-9).astype(np.float64) / 255.0


def _field(p: dict, x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """The texture's intensity in [0, 1] at (x, y) (pixel units; arrays of any shape)."""
    th, ph = p["theta"], p["phase"]
    w = 2 * math.pi * p["freq"] / size
    a1, a2, f1, f2 = p.get("bend", (0.0, 0.0, 0.0, 0.0))
    # normal variation: a smooth bend of the coordinates (local orientation drifts by up to ~0.3 rad and the
    # local frequency by ~15 % across the image), so a region of another orientation or scale is not unique
    x, y = x + a1 * size * np.sin(2 * math.pi * y / size + f1), y + a2 * size * np.sin(2 * math.pi * x / size + f2)
    u = x * math.cos(th) + y * math.sin(th)
    v = -x * math.sin(th) + y * math.cos(th)
    f = p["field"]
    if f == "stripes":
        return 0.5 + 0.5 * np.sin(u * w + ph)
    if f == "weave":
        return 0.5 + 0.25 * (np.sin(u * w + ph) + np.sin(v * w * 0.8 + ph * 1.3))
    if f == "plaid":
        return np.clip(0.35 * (np.sin(u * w + ph) > 0.3) + 0.35 * (np.sin(v * w * 0.6 + ph) > 0.5) + 0.3 * (np.sin(u * w * 3) > 0), 0, 1)
    if f == "brick":
        row = np.floor(v * w / math.pi + ph)
        uu = u * w / (2 * math.pi) + 0.5 * (row % 2)
        mortar = (np.abs(((v * w / math.pi + ph) % 1.0) - 0.5) > 0.42) | (np.abs((uu % 1.0) - 0.5) > 0.45)
        return np.where(mortar, 0.05, 0.85)
    if f == "dune":
        return 0.5 + 0.5 * np.sin(u * w + 2.2 * np.sin(v * w * 0.35 + ph) + ph)
    if f == "wood":
        return 0.5 + 0.5 * np.sin(np.hypot(u + 3 * size, v * 0.15) * w + ph)
    if f == "grid":
        return np.where((np.cos(u * w + ph) > 0.85) | (np.cos(v * w + ph) > 0.85), 0.95, 0.1)
    if f == "scales":
        row = np.floor(v * w / math.pi)
        uu = (u * w / (2 * math.pi) + 0.5 * (row % 2)) % 1.0 - 0.5
        vv = (v * w / math.pi) % 1.0
        return np.where(np.hypot(uu, vv * 0.9) < 0.55, 0.15 + 0.7 * vv, 0.9)
    if f == "chevron":
        return 0.5 + 0.5 * np.sin((u + np.abs(((v * w / (2 * math.pi)) % 1.0) - 0.5) * 2 * math.pi / w) * w + ph)
    if f == "dots":
        uu = (u * w / (2 * math.pi) + ph) % 1.0 - 0.5
        vv = (v * w / (2 * math.pi) + ph) % 1.0 - 0.5
        return np.where(np.hypot(uu, vv) < 0.25, 0.9, 0.1)
    if f == "blocks":
        cu, cv = np.floor(u * w / (2 * math.pi) + ph), np.floor(v * w / (2 * math.pi))
        flip = (cu + cv) % 2
        return 0.5 + 0.5 * np.sin(np.where(flip > 0, u, v) * w * 3 + ph)
    # noise: isotropic blobs, frequency sets their size; sampled through the coordinates so warps move it
    n = p["noise"]
    s = n.shape[0]
    scale = p["freq"] / 5.0 * (n.shape[0] / 2) / size
    off = ph / (2 * math.pi) * s  # the phase picks where in the class's noise sheet this image lies
    xi = np.clip((x * scale + off) % (s - 1), 0, s - 1).astype(int)
    yi = np.clip((y * scale + off * 0.7) % (s - 1), 0, s - 1).astype(int)
    return n[yi, xi]


def _render_texture(p: dict, size: int, x=None, y=None) -> np.ndarray:
    if x is None:
        y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    t = _field(p, x, y, size)
    return p["a"][None, None] * (1 - t[..., None]) + p["b"][None, None] * t[..., None]


def _texture_params(cls: str, size: int, r: np.random.Generator) -> dict:
    p = dict(_tex_class(cls))
    p["theta"] += r.normal(0, 0.04)
    p["freq"] *= r.uniform(0.96, 1.04)
    p["phase"] = r.uniform(0, 2 * math.pi)
    p["bend"] = (r.uniform(0.02, 0.05) * r.choice([-1, 1]), r.uniform(0.02, 0.05) * r.choice([-1, 1]),
                 r.uniform(0, 2 * math.pi), r.uniform(0, 2 * math.pi))
    if p["field"] == "noise":
        p["noise"] = _smooth_noise(p["seed"], size * 2, 16)
    return p


# ---------------------------------------------------------------- part-objects

_PART_SHAPES = ("square", "circle", "bar", "triangle", "ring", "cross")
_CELLS = [(-0.5, -0.5), (0.0, -0.5), (0.5, -0.5), (-0.5, 0.0), (0.0, 0.0), (0.5, 0.0), (-0.5, 0.5), (0.0, 0.5), (0.5, 0.5)]
_LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6))


def _obj_class(cls: str) -> dict:
    """Body shape and colour, background, and 3 unique parts (shape, colour, cell, size) for a class."""
    r = rng(13, cls)
    body_lum = r.uniform(30, 225)
    # backgrounds across the range: sometimes nearly the body's own intensity (dark-on-dark, bright-on-bright)
    bg_lum = np.clip(body_lum + r.choice([-1, 1]) * r.uniform(20, 110), 8, 248)
    body = _colour(r, body_lum, r.uniform(5, 45))
    bg = _colour(r, float(bg_lum), r.uniform(0, 25))
    shapes = r.choice(len(_PART_SHAPES), 3, replace=False)
    # every class puts its 3 parts on one line of the 3x3 grid (a row, a column or a diagonal): a grammar
    # shared by all classes, so a part off that line (moved, one too many) is learnable across classes
    cells = list(_LINES[int(r.integers(len(_LINES)))])
    r.shuffle(cells)
    parts = []
    for k in range(3):
        lum = np.clip(body_lum + r.choice([-1, 1]) * r.uniform(45, 110), 5, 250)
        if abs(lum - body_lum) < 40:
            lum = np.clip(body_lum + (100 if body_lum < 128 else -100), 5, 250)
        parts.append({"shape": _PART_SHAPES[shapes[k]], "colour": _colour(r, float(lum), r.uniform(10, 70)),
                      "cell": int(cells[k]), "size": r.uniform(0.2, 0.28), "angle": r.uniform(0, math.pi)})
    return {"body_shape": ["rect", "rounded", "disc", "hexagon", "capsule"][int(r.integers(5))], "body": body, "bg": bg,
            "parts": parts, "aspect": r.uniform(0.75, 1.0)}


def _object_params(cls: str, size: int, r: np.random.Generator) -> dict:
    p = _obj_class(cls)
    p = {**p, "parts": [dict(q) for q in p["parts"]]}
    p["cx"], p["cy"] = size / 2 + r.uniform(-0.04, 0.04, 2) * size
    p["rot"] = r.normal(0, 0.08)
    p["rad"] = size * r.uniform(0.42, 0.45)
    for q in p["parts"]:
        q["jx"], q["jy"] = r.uniform(-0.03, 0.03, 2)
    return p


def _poly(points, cx, cy, rot):
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + px * c - py * s, cy + px * s + py * c) for px, py in points]


def _body_polygon(p: dict) -> list:
    rad, asp = p["rad"], p["aspect"]
    shape = p["body_shape"]
    if shape == "disc":
        pts = [(rad * math.cos(t), rad * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 64, endpoint=False)]
    elif shape == "hexagon":
        pts = [(rad * 1.08 * math.cos(t), rad * 1.08 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 6, endpoint=False) + math.pi / 6]
    elif shape == "capsule":
        h = rad * asp * 0.8
        pts = [(rad - h + h * math.cos(t), h * math.sin(t)) for t in np.linspace(-math.pi / 2, math.pi / 2, 16)]
        pts += [(-rad + h + h * math.cos(t), h * math.sin(t)) for t in np.linspace(math.pi / 2, 3 * math.pi / 2, 16)]
    elif shape == "rounded":
        w, h, c = rad, rad * asp, rad * 0.25
        pts = []
        for (sx, sy, a0) in ((1, 1, 0), (-1, 1, math.pi / 2), (-1, -1, math.pi), (1, -1, 3 * math.pi / 2)):
            pts += [(sx * (w - c) + c * math.cos(t), sy * (h - c) + c * math.sin(t)) for t in np.linspace(a0, a0 + math.pi / 2, 6)]
    else:
        w, h = rad, rad * asp
        pts = [(-w, -h), (w, -h), (w, h), (-w, h)]
    return _poly(pts, p["cx"], p["cy"], p["rot"])


def _part_centre(p: dict, q: dict, cell: int | None = None, jitter: bool = True) -> tuple[float, float]:
    gx, gy = _CELLS[q["cell"] if cell is None else cell]
    ext = p["rad"] * 0.62
    ox = gx * ext * 2 * 0.85 + (q["jx"] * p["rad"] if jitter else 0)
    oy = gy * ext * 2 * 0.85 * p["aspect"] + (q["jy"] * p["rad"] if jitter else 0)
    c, s = math.cos(p["rot"]), math.sin(p["rot"])
    return p["cx"] + ox * c - oy * s, p["cy"] + ox * s + oy * c


def _draw_part(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, s: float, rot: float, fill, hole_fill) -> None:
    if shape == "circle":
        d.ellipse([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "ring":
        d.ellipse([cx - s, cy - s, cx + s, cy + s], fill=fill)
        d.ellipse([cx - s * 0.5, cy - s * 0.5, cx + s * 0.5, cy + s * 0.5], fill=hole_fill)
    elif shape == "square":
        d.polygon(_poly([(-s, -s), (s, -s), (s, s), (-s, s)], cx, cy, rot), fill=fill)
    elif shape == "bar":
        d.polygon(_poly([(-s * 1.5, -s * 0.4), (s * 1.5, -s * 0.4), (s * 1.5, s * 0.4), (-s * 1.5, s * 0.4)], cx, cy, rot), fill=fill)
    elif shape == "triangle":
        d.polygon(_poly([(s * math.cos(a), s * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)], cx, cy, rot), fill=fill)
    else:  # cross
        d.polygon(_poly([(-s, -s * 0.3), (s, -s * 0.3), (s, s * 0.3), (-s, s * 0.3)], cx, cy, rot), fill=fill)
        d.polygon(_poly([(-s * 0.3, -s), (s * 0.3, -s), (s * 0.3, s), (-s * 0.3, s)], cx, cy, rot), fill=fill)


def _render_object(p: dict, size: int, placements: list[tuple[dict, float, float]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> (clean image (S, S, 3), body mask (S, S) bool). placements: (part, x, y) to draw (default: every part in place)."""
    cv = ObjectCanvas(size, p["bg"])
    bcol = tuple(int(v) for v in p["body"])
    cv.fill("polygon", _body_polygon(p), bcol)
    if placements is None:
        placements = [(q, *_part_centre(p, q)) for q in p["parts"]]
    for q, x, y in placements:
        _draw_part(cv.draw, q["shape"], x, y, q["size"] * p["rad"] * 0.9, p["rot"] + q["angle"], tuple(int(v) for v in q["colour"]), bcol)
    return cv.arrays()


def _free_cells(p: dict, exclude: set[int]) -> list[int]:
    return [c for c in range(len(_CELLS)) if c not in exclude]


# ---------------------------------------------------------------- normal variation

def _nuisance(size: int, r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Multiplicative illumination (S, S, 1) and additive sensor noise (S, S, 3)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size - 0.5
    a = r.uniform(0, 2 * math.pi)
    gain = r.uniform(0.9, 1.1) * (1 + r.uniform(0.0, 0.25) * (x * math.cos(a) + y * math.sin(a)))
    noise = r.normal(0, r.uniform(1.5, 5.0), (size, size, 3))
    return gain[..., None], noise


def _finish(clean: np.ndarray, gain: np.ndarray, noise: np.ndarray) -> np.ndarray:
    return np.clip(clean * gain + noise, 0, 255)


# ---------------------------------------------------------------- defects

def _disk(size: int, x: float, y: float, rad: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return (xx - x) ** 2 + (yy - y) ** 2 <= rad * rad


def _surface(img: np.ndarray, region: np.ndarray, kind: str, r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    out = img.copy()
    x, y = point_in(region, r, size // 6)
    s = size * r.uniform(0.05, 0.08)
    if kind in ("dark_spot", "bright_spot", "stain", "hue"):
        mask = blob(size, x, y, s if kind != "stain" else s * 1.3, r) & region
    elif kind == "scratch":
        ang, ln = r.uniform(0, math.pi), size * r.uniform(0.2, 0.35)
        mask = line_mask(size, segment(x, y, ang, ln), max(2, int(size * r.uniform(0.012, 0.025)))) & region
    else:  # crack: a jagged random walk
        mask = line_mask(size, walk(x, y, r.uniform(0, 2 * math.pi), 10, size * 0.03, 0.8, r), max(2, size // 80)) & region
    px = out[mask]
    if kind == "dark_spot":
        out[mask] = px * r.uniform(0.25, 0.45)
    elif kind == "bright_spot":
        out[mask] = px + (255 - px) * r.uniform(0.55, 0.75)
    elif kind == "scratch":  # bright or dark at random, whatever the surface
        out[mask] = px + (255 - px) * 0.7 if r.random() < 0.5 else px * 0.3
    elif kind == "crack":
        out[mask] = px * 0.2 if _lum(px).mean() > 60 else px + (255 - px) * 0.6
    elif kind == "stain":
        col = _colour(r, float(_lum(px).mean()) + r.uniform(-40, 40), r.uniform(20, 60))
        out[mask] = px * 0.4 + col * 0.6
    else:  # hue: rotate (Cb, Cr) by 90-180 degrees, keep Y: constant luminance
        yl = _lum(px)
        cb, cr = (px[:, 2] - yl) / 1.772, (px[:, 0] - yl) / 1.402
        a = r.uniform(math.pi / 2, math.pi) * r.choice([-1, 1])
        sat = max(1.0, 25.0 / (np.hypot(cb, cr).mean() + 1e-6))  # grey surfaces get some colour so the shift shows
        cb2 = (cb * math.cos(a) - cr * math.sin(a)) * sat
        cr2 = (cb * math.sin(a) + cr * math.cos(a)) * sat
        out[mask] = np.stack([yl + 1.402 * cr2, yl - 0.344136 * cb2 - 0.714136 * cr2, yl + 1.772 * cb2], -1)
    return np.clip(out, 0, 255), mask


def _structural(p: dict, clean: np.ndarray, kind: str, r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = clean.shape[0]
    rad = size * r.uniform(0.12, 0.16)
    full = np.ones((size, size), bool)
    x, y = point_in(full, r, int(rad) + 2)
    mask = _disk(size, x, y, rad)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = clean.copy()
    if kind == "rotated":  # a patch of this same image, rotated or flipped, pasted elsewhere
        for _ in range(20):
            sx, sy = point_in(full, r, int(rad * 1.5) + 2)
            if math.hypot(sx - x, sy - y) > 2.5 * rad:
                break
        op = r.choice(["rot90", "rot270", "flip", "rot45", "rot135"])
        half = int(rad * 1.5)
        src = Image.fromarray(clean[int(sy) - half:int(sy) + half, int(sx) - half:int(sx) + half].astype(np.uint8))
        src = {"rot90": src.transpose(Image.Transpose.ROTATE_90), "rot270": src.transpose(Image.Transpose.ROTATE_270),
               "flip": src.transpose(Image.Transpose.FLIP_TOP_BOTTOM if abs(math.cos(p["theta"])) > 0.7 else Image.Transpose.FLIP_LEFT_RIGHT),
               "rot45": src.rotate(45, Image.BILINEAR), "rot135": src.rotate(135, Image.BILINEAR)}[op]
        patch = np.asarray(src, dtype=np.float64)
        canvas = out.copy()
        x0, y0 = int(x) - half, int(y) - half
        x1, y1 = max(0, x0), max(0, y0)
        x2, y2 = min(size, x0 + 2 * half), min(size, y0 + 2 * half)
        canvas[y1:y2, x1:x2] = patch[y1 - y0:y2 - y0, x1 - x0:x2 - x0]
        out[mask] = canvas[mask]
    elif kind == "warp":  # a swirl: coordinates rotated by an angle that fades to 0 at the rim
        d = np.hypot(xx - x, yy - y) / rad
        ang = r.uniform(1.2, 2.0) * r.choice([-1, 1]) * np.clip(1 - d, 0, 1) ** 2
        wx = x + (xx - x) * np.cos(ang) - (yy - y) * np.sin(ang)
        wy = y + (xx - x) * np.sin(ang) + (yy - y) * np.cos(ang)
        out[mask] = _render_texture(p, size, wx[mask], wy[mask])
    elif kind in ("blur", "sharpen"):
        im = Image.fromarray(clean.astype(np.uint8))
        f = im.filter(ImageFilter.GaussianBlur(size * r.uniform(0.012, 0.02))) if kind == "blur" else \
            im.filter(ImageFilter.UnsharpMask(radius=max(2, size // 60), percent=int(r.uniform(250, 400)), threshold=0))
        out[mask] = np.asarray(f, dtype=np.float64)[mask]
    elif kind == "orientation":
        q = dict(p, theta=p["theta"] + r.uniform(math.pi / 5, math.pi / 2) * r.choice([-1, 1]))
        out[mask] = _render_texture(q, size, xx[mask], yy[mask])
    else:  # frequency
        q = dict(p, freq=p["freq"] * (r.uniform(1.7, 2.3) if r.random() < 0.5 else r.uniform(0.4, 0.55)))
        out[mask] = _render_texture(q, size, xx[mask], yy[mask])
    return out, mask


def _part_defect(p: dict, size: int, kind: str, r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    parts = p["parts"]
    k = int(r.integers(len(parts)))
    used = {q["cell"] for q in parts}
    place = [(q, *_part_centre(p, q)) for q in parts]
    if kind == "part_missing":
        place.pop(k)
    elif kind == "part_moved":
        cell = int(r.choice(_free_cells(p, used)))
        place[k] = (parts[k], *_part_centre(p, parts[k], cell))
    elif kind == "part_recolour":  # another part's colour: no colour new to the image appears
        other = parts[(k + 1 + int(r.integers(len(parts) - 1))) % len(parts)]
        place[k] = (dict(parts[k], colour=other["colour"]), *place[k][1:])
    else:  # part_extra: one too many, a copy of a part in a free cell
        cell = int(r.choice(_free_cells(p, used)))
        place.append((parts[k], *_part_centre(p, parts[k], cell)))
    img, _ = _render_object(p, size, place)
    return img, place


# ---------------------------------------------------------------- one image

def make_normal(cls: str, size: int, r: np.random.Generator) -> np.ndarray:
    """One defect-free image of world class `cls`: (S, S, 3) float64 in [0, 255]."""
    if cls in WORLD_TEXTURES:
        clean = _render_texture(_texture_params(cls, size, r), size)
    else:
        clean, _ = _render_object(_object_params(cls, size, r), size)
    gain, noise = _nuisance(size, r)
    return _finish(clean, gain, noise)


def make_defective(cls: str, kind: str, size: int, r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One image of `cls` with one defect of `kind`: (image (S, S, 3) float64, mask (S, S) bool).

    The mask holds the pixels the defect changed (surface and part kinds: where the clean render
    differs by more than a few levels) or the region re-drawn (structural kinds)."""
    if not applies(cls, kind):
        raise ValueError(f"defect {kind} does not apply to class {cls}")
    obj = cls in WORLD_OBJECTS
    p = _object_params(cls, size, r) if obj else _texture_params(cls, size, r)
    clean, body = _render_object(p, size) if obj else (_render_texture(p, size), np.ones((size, size), bool))
    gain, noise = _nuisance(size, r)
    for _ in range(20):
        if kind in SURFACE_DEFECTS:
            bad, region = _surface(clean, body if obj else np.ones((size, size), bool), kind, r)
            mask = region & (np.abs(bad - clean).max(-1) > 12)
        elif kind in STRUCTURAL_DEFECTS:
            bad, mask = _structural(p, clean, kind, r)
        else:
            bad, _ = _part_defect(p, size, kind, r)
            mask = np.abs(bad - clean).max(-1) > 12
        if mask.sum() > max(12, size * size // 1500):
            break
    return _finish(bad, gain, noise), mask


class _World:
    """The world's generator (anomaly_data/generator.py's interface): make_normal or make_defective."""

    def draw(self, spec: Spec, r: np.random.Generator) -> Drawn:
        if spec.normal:
            return Drawn(make_normal(spec.cls, spec.size, r))
        return Drawn(*make_defective(spec.cls, spec.role, spec.size, r))


WORLD = _World()
