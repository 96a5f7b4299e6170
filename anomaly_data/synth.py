"""Procedural textures and objects with exact-mask defects, written in MVTec layout plus meta.json.

Deterministic: the same (classes, seed, counts) write byte-identical files.

The legacy classes (LEGACY_CLASSES) stay because the test fixtures and several tests score exactly these
images (disc and weave with hole / stain defects, whose every defect is a colour outlier) and the micro-CLIP's
zero-shot check measures on them as classes its pretraining world never shows; world classes are drawn
by anomaly_data/world.py. Both meet anomaly_data/generator.py's interface (`LEGACY`, `world.WORLD`), whose one
writer lays the classes out, and draw with the shared primitives of anomaly_data/drawing.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kano.core.errors import KanoError

from . import world
from .drawing import ObjectCanvas, blob, line_mask, noise_image, point_in, rng, segment, walk
from .generator import Drawn, Spec, check_count, check_out, write_class, write_meta
from .world import SEEN_DEFECTS, WORLD_AUX, WORLD_CLASSES, WORLD_DEFECTS, WORLD_TARGET

# The first generation of classes (kept for the unit tests): every defect here is a colour outlier.
TEXTURES = ("weave", "stripes", "checker", "noise", "wood", "dots", "grid", "marble", "knit")
OBJECTS = ("disc", "tile", "ring", "pill", "nut", "triangle", "coin")
LEGACY_CLASSES = TEXTURES + OBJECTS
LEGACY_DEFECTS = ("hole", "scratch", "stain", "crack", "missing", "colour")
SYNTH_CLASSES = LEGACY_CLASSES + WORLD_CLASSES
DEFECTS = LEGACY_DEFECTS + tuple(d for d in WORLD_DEFECTS if d not in LEGACY_DEFECTS)
# Legacy names on world classes: the world's kind of the same meaning.
_WORLD_ALIAS = {"hole": "dark_spot", "colour": "hue", "missing": "part_missing"}


def _palette(cls: str) -> tuple[np.ndarray, np.ndarray]:
    """Two class colours; kept away from black so that a hole (near-black) is visible on every class."""
    r = rng(7, cls)
    a = r.uniform(70, 210, 3)
    b = np.clip(a + r.uniform(-70, 70, 3), 40, 235)
    if b.mean() < 100:
        b = b + (100 - b.mean())
    return a, b


def _texture(cls: str, size: int, r: np.random.Generator) -> np.ndarray:
    a, b = _palette(cls)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    ph, freq = r.uniform(0, 2 * math.pi), r.uniform(0.9, 1.1)
    if cls == "weave":
        t = 0.5 + 0.25 * (np.sin(x * 0.45 * freq + ph) + np.sin(y * 0.45 * freq + ph))
    elif cls == "stripes":
        ang = r.uniform(-0.2, 0.2) + 0.6
        t = 0.5 + 0.5 * np.sin((x * math.cos(ang) + y * math.sin(ang)) * 0.3 * freq + ph)
    elif cls == "checker":
        s = int(16 * freq)
        t = (((x + ph * 5) // s + (y + ph * 3) // s) % 2) * 0.8 + 0.1
    elif cls == "wood":
        cx, cy = r.uniform(-size, 0), r.uniform(0, size)
        t = 0.5 + 0.5 * np.sin(np.hypot(x - cx, (y - cy) * 0.3) * 0.25 * freq + ph)
    elif cls == "grid":
        s = int(24 * freq)
        t = ((((x + ph * 4) % s) < 3) | (((y + ph * 4) % s) < 3)).astype(float) * 0.85 + 0.05
    elif cls == "marble":
        base = noise_image(r.normal(0, 1, (size // 16, size // 16)), size) / 255.0
        t = 0.5 + 0.5 * np.sin((x * 0.05 + base * 6.0) + ph)
    elif cls == "knit":
        t = 0.5 + 0.25 * (np.sin((x + y) * 0.35 * freq + ph) + np.sin((x - y) * 0.2 * freq))
    elif cls == "dots":
        s = 20
        t = ((((x + ph * 3) % s) - s / 2) ** 2 + (((y + ph * 2) % s) - s / 2) ** 2 < 20).astype(float) * 0.8 + 0.1
    else:  # noise
        t = noise_image(r.normal(0, 1, (size // 8, size // 8)), size) / 255.0
    img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    img = img * r.uniform(0.9, 1.1) + r.normal(0, 4, img.shape)  # lighting varies between images
    return np.clip(img, 0, 255)


def _object(cls: str, size: int, r: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An object on a plain background; returns (image, object mask)."""
    a, b = _palette(cls)
    bg = np.clip(255 - a * 0.6, 0, 255)
    cv = ObjectCanvas(size, bg)
    c = size / 2 + r.uniform(-size * 0.04, size * 0.04, 2)
    rad = size * r.uniform(0.3, 0.34)
    box = [c[0] - rad, c[1] - rad, c[0] + rad, c[1] + rad]
    col = tuple(int(v) for v in b)
    if cls in ("disc", "ring", "coin"):  # a round body; ring and coin add to it below
        cv.fill("ellipse", box, col)
    if cls == "tile":
        cv.fill("rounded_rectangle", box, col, radius=int(rad * 0.2))
    elif cls == "ring":
        cv.fill("ellipse", [c[0] - rad * 0.5, c[1] - rad * 0.5, c[0] + rad * 0.5, c[1] + rad * 0.5], cut=True)
    elif cls == "nut":
        hexagon = [(c[0] + rad * math.cos(t), c[1] + rad * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 7)[:-1] + r.uniform(0, 1)]
        cv.fill("polygon", hexagon, col)
        cv.fill("ellipse", [c[0] - rad * 0.4, c[1] - rad * 0.4, c[0] + rad * 0.4, c[1] + rad * 0.4], cut=True)
    elif cls == "triangle":
        ang = r.uniform(-0.2, 0.2) - math.pi / 2
        tri = [(c[0] + rad * 1.1 * math.cos(ang + k * 2 * math.pi / 3), c[1] + rad * 1.1 * math.sin(ang + k * 2 * math.pi / 3)) for k in range(3)]
        cv.fill("polygon", tri, col)
    elif cls == "coin":
        cv.draw.ellipse([c[0] - rad * 0.8, c[1] - rad * 0.8, c[0] + rad * 0.8, c[1] + rad * 0.8], outline=tuple(int(v * 0.7) for v in b), width=3)
    elif cls == "pill":
        cv.fill("rounded_rectangle", [c[0] - rad, c[1] - rad * 0.55, c[0] + rad, c[1] + rad * 0.55], col, radius=int(rad * 0.55))
    arr, obj = cv.arrays()
    shade = np.linspace(0.92, 1.08, size)[None, :, None]
    arr = np.clip(arr * shade * r.uniform(0.9, 1.1) + r.normal(0, 4, arr.shape), 0, 255)
    return arr, obj


def _defect(img: np.ndarray, region: np.ndarray, kind: str, background: np.ndarray, r: np.random.Generator):
    size = img.shape[0]
    x, y = point_in(region, r, size // 6)
    s = size * r.uniform(0.07, 0.12)
    if kind in ("hole", "stain", "missing", "colour"):
        shape = blob(size, x, y, s, r)
    elif kind == "scratch":
        ang, ln = r.uniform(0, math.pi), size * r.uniform(0.2, 0.35)
        shape = line_mask(size, segment(x, y, ang, ln), int(r.integers(4, 8)))
    else:  # crack: a jagged random walk
        shape = line_mask(size, walk(x, y, r.uniform(0, 2 * math.pi), 9, 7, 0.7, r), 3)
    mask = shape & (region if kind != "missing" else np.ones_like(region))
    out = img.copy()
    if kind == "hole":
        out[mask] = r.uniform(5, 30)
    elif kind == "scratch":
        out[mask] = 235 if img[mask].mean() < 128 else 20
    elif kind == "stain":
        col = r.uniform(0, 255, 3)
        out[mask] = out[mask] * 0.3 + col * 0.7
    elif kind == "crack":
        out[mask] = out[mask] * 0.15
    elif kind == "missing":
        out[mask] = background[mask]
    else:  # colour: rotate the channels
        out[mask] = out[mask][:, [2, 0, 1]] * 0.7 + 60
    mask = mask & (np.abs(out - img).sum(-1) > 24)  # only pixels that really changed count as defect
    return np.clip(out, 0, 255), mask


def _make(cls: str, size: int, r: np.random.Generator):
    if cls in TEXTURES:
        img = _texture(cls, size, r)
        region = np.ones(img.shape[:2], bool)
        background = np.full_like(img, img.mean((0, 1)) * 0.4)
    else:
        img, region = _object(cls, size, r)
        background = np.broadcast_to(np.median(img[~region], axis=0), img.shape).copy()
    return img, region, background


class _Legacy:
    """The legacy classes' generator (anomaly_data/generator.py's interface): a normal image, or one defect
    re-drawn (same image, further draws) until it changes more than 30 pixels, at most 20 times."""

    def draw(self, spec: Spec, r: np.random.Generator) -> Drawn:
        img, region, background = _make(spec.cls, spec.size, r)
        if spec.normal:
            return Drawn(img)
        for _ in range(20):
            bad_img, mask = _defect(img, region, spec.role, background, r)
            if mask.sum() > 30:
                break
        return Drawn(bad_img, mask)


LEGACY = _Legacy()


def _kinds_for(cls: str, defects: tuple[str, ...] | None) -> list[str]:
    """The defect folders written for a class: the requested kinds that apply to it, in order, deduplicated."""
    if cls in WORLD_CLASSES:
        asked = WORLD_DEFECTS if defects is None else [_WORLD_ALIAS.get(d, d) for d in defects]
        kinds = [d for d in asked if d in WORLD_DEFECTS and world.applies(cls, d)]
    else:
        asked = LEGACY_DEFECTS if defects is None else defects
        kinds = [d for d in asked if d in LEGACY_DEFECTS and not (d == "missing" and cls in TEXTURES)]
    return list(dict.fromkeys(kinds))


def synthesize(out: Path, classes: list[str] | None = None, seed: int = 0, size: int = 256, n_train: int = 4,
               n_good: int = 6, n_per_defect: int = 3, defects: tuple[str, ...] | None = ("hole", "scratch", "stain", "crack"),
               force: bool = True) -> Path:
    """Write classes in MVTec layout under `out` plus out/meta.json. Returns out.

    classes: legacy classes (LEGACY_CLASSES: colour-outlier defects only) and/or world classes
    (anomaly_data.world: textures and part-objects, surface / structural / part defects). defects:
    kinds to write (None: every kind that applies); a kind that does not apply to a class is skipped
    for it ("hole", "colour", "missing" mean dark_spot, hue, part_missing on world classes).
    force=False refuses a folder that already holds files.
    """
    classes = list(classes or SYNTH_CLASSES)
    unknown = [c for c in classes if c not in SYNTH_CLASSES]
    if unknown:
        raise KanoError(f"synthetic class must be one of {', '.join(SYNTH_CLASSES)}, got {', '.join(unknown)}")
    bad = [d for d in (defects or ()) if d not in DEFECTS]
    if bad:
        raise KanoError(f"defect kind must be one of {', '.join(DEFECTS)}, got {', '.join(bad)}")
    check_count("size (--size)", size, 32)
    check_count("n_train (--n-train)", n_train, 0)
    check_count("n_good (--n-good)", n_good, 0)
    check_count("n_per_defect (--n-defect)", n_per_defect, 0)
    out = check_out(out, force)

    for cls in classes:
        gen = world.WORLD if cls in WORLD_CLASSES else LEGACY
        write_class(out, cls, gen, seed, size, {"train": n_train, "good": n_good,
                                                **{kind: n_per_defect for kind in _kinds_for(cls, defects)}})
    write_meta(out)
    return out


def synthesize_world(out: Path, split: str = "target", seed: int = 0, size: int = 128, n_train: int = 0, n_good: int = 8,
                     n_per_defect: int = 2, classes: list[str] | None = None, defects: tuple[str, ...] | None = None,
                     force: bool = True) -> Path:
    """The world's auxiliary or target set in MVTec layout (+ meta.json).

    split "aux": WORLD_AUX classes with SEEN_DEFECTS only (what training may see); split "target":
    WORLD_TARGET classes with every kind that applies (SEEN_DEFECTS and HELD_OUT_DEFECTS)."""
    if split not in ("aux", "target"):
        raise KanoError(f"split (--world) must be one of aux, target, got {split!r}")
    if classes is None:
        classes = list(WORLD_AUX if split == "aux" else WORLD_TARGET)
    if defects is None:
        defects = SEEN_DEFECTS if split == "aux" else WORLD_DEFECTS
    return synthesize(out, classes, seed=seed, size=size, n_train=n_train, n_good=n_good, n_per_defect=n_per_defect,
                      defects=tuple(defects), force=force)


def synthesize_demo_world(root: Path, seed: int = 0, size: int = 96, n_good: int = 8, n_per_defect: int = 2,
                          n_aux_good: int = 9, n_aux_per_defect: int = 4) -> tuple[str, str]:
    """The data `kano demo` and bench/table1.py train and evaluate on: root/aux (auxiliary classes, seen kinds
    only, from `seed`) and root/target (the unseen target classes, every kind, from seed + 1); a set already
    there (its meta.json written) is kept. -> ("mvtec:root/aux", "mvtec:root/target")."""
    aux, target = Path(root) / "aux", Path(root) / "target"
    if not (aux / "meta.json").is_file():
        synthesize_world(aux, "aux", seed=seed, size=size, n_good=n_aux_good, n_per_defect=n_aux_per_defect)
    if not (target / "meta.json").is_file():
        synthesize_world(target, "target", seed=seed + 1, size=size, n_good=n_good, n_per_defect=n_per_defect)
    return f"mvtec:{aux}", f"mvtec:{target}"
