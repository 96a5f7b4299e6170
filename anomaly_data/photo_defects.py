"""Defects synthesised on a user's own normal photos, written as an MVTec-layout dataset with exact masks.

`synthesize_from_photos(src, out)` reads a folder of normal photos (a plain folder, or a class folder whose
train/good it takes; never a dataset's test/ or ground_truth/ images) and writes

    OUT/CLASS/train/good/NNN.png        every photo (RGB, long side at most `max_side`)
    OUT/CLASS/test/good/NNN.png         the same photos (a training set's normal part, as in the paper's protocol,
                                        where training uses the auxiliary dataset's test split)
    OUT/CLASS/test/KIND/NNN.png         a photo with one synthetic defect
    OUT/CLASS/ground_truth/KIND/NNN_mask.png
    OUT/CLASS/defects.json              per defect image: its source photo (test/good/NNN.png), kind, scope
                                        (local or whole) and, for whole-image kinds, region and parameters
    OUT/meta.json                       (anomaly_data.readers.write_meta)

Exact masks: every local defect is drawn inside a region that lies on the foreground, and the written mask is
(defect image != source image) on any channel, computed on the 8-bit arrays that are saved losslessly (PNG). So
the mask covers exactly the changed pixels, nothing more, and never leaves the foreground. (Whole-image kinds,
below, mark their whole region.)

By default every kind is written, local and whole-image alike (--defects local or --defects whole picks one
half), so a method choosing its settings on these defects sees both.

Local kinds and their sources:
- cutpaste: a rectangle of the same photo, colour-jittered and pasted elsewhere (Li et al., "CutPaste:
  Self-Supervised Learning for Anomaly Detection and Localization", CVPR 2021; area 2-15 % of the image,
  aspect ratio 0.3-3.3 as in their paper).
- cutpaste_scar: a long thin rectangle (width 2-16 px, length 10-25 px at 256 px, scaled with the photo),
  rotated by -45..45 degrees, jittered and pasted (the same paper's "scar" variant).
- texture: a foreign texture blended through a thresholded Perlin-noise mask (Zavrtanik et al., "DRAEM - A
  discriminatively trained reconstruction embedding for surface anomaly detection", ICCV 2021: Perlin scales
  2^0..2^6, threshold 0.5, opacity beta in [0, 0.8)). The texture is another photo of the same folder, shifted
  and passed through one of DRAEM's colour augmenters (invert, solarise, posterise, channel swap, gamma), or
  a procedural Perlin colour texture when the folder holds one photo.
- colour: a blob whose hue is turned by 90-270 degrees and whose saturation is raised.
- scratch: a thin random-walk line, much lighter or darker than the pixels under it.
- smear: a blob replaced by a blurred, dragged copy of the photo (motion-smear).
- missing: a blob on the object's outline removed and filled from its surroundings (harmonic fill: each
  pixel the mean of its four neighbours, the boundary held fixed), so the background or the object's own
  surface flows into the hole.

Whole-image kinds change the whole photo or the whole foreground (chosen at random, even odds, when the
foreground is smaller than the photo; always the foreground when --foreground names a folder of masks): the defects that no single patch shows, only the photo as a whole
(an evenly blurrier, flatter, noisier or off-colour photo, a surface whose grain is coarser or turned).
Their mask is that region, every pixel of it, and every changed pixel lies inside it (a pixel of a flat area
that blur leaves equal still belongs to the blurred region). Each records its region and parameters in
defects.json. Strengths are milder than the weakest severities of their source, so that the change is there
but not glaring (what a drifting camera or a process change does):
- contrast: each channel's deviations from its mean over the region scaled by c in [0.55, 0.8] (Hendrycks and
  Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019,
  ImageNet-C "contrast": the same formula, c 0.4 down to 0.05).
- blur: a Gaussian blur of sigma 0.5-1.2 % of the short side (1.3-3.1 px at 256 px; ImageNet-C
  "gaussian_blur", sigma 1-6 px at 224 px).
- noise: independent Gaussian noise of sigma 5-12 grey levels per pixel and channel (ImageNet-C
  "gaussian_noise", sigma 0.08-0.38 of the range, 20-97 levels).
- lightness: HSV value V shifted by +-0.07..0.15, hue and saturation kept (ImageNet-C "brightness" adds 0.1-0.5
  to V). With V the largest channel, the pixel scales by clip(V + d, 0, 1) / V; a black pixel becomes grey d.
- colour_cast: per-channel gains 1 + a u, u a random unit vector orthogonal to grey (1, 1, 1) (so the gains
  average 1 and the brightness stays about the same), a in [0.1, 0.2]: a white-balance error. Kano's own.
- rescale: the surface magnified by 1.3-1.7 or shrunk by 0.6-0.77 about the region's centre (bilinear, mirrored
  at the photo's border): a texture whose grain is coarser or finer. Kano's own.
- rotate: the surface turned by 10-45 degrees either way about the region's centre (bilinear, mirrored at the
  border): a texture whose grain runs another way. Kano's own; on a texture with no direction (sand, noise)
  a turn changes little, so this kind tests direction-bearing surfaces only.

Foreground (`foreground=`):
- "auto": distance of each pixel's colour from the border colour (median of a frame 4 % of the short side
  wide), smoothed (Gaussian, sigma 1 % of the short side), thresholded by Otsu's method, holes filled, the
  largest connected part kept. Suits an object photographed on a plain background. When that part covers
  less than 5 % or more than 95 % of the photo, or its median pixel is not farther from the border colour than
  twice the border's own spread (90th percentile) plus 10 (a texture, or no contrast), the whole photo is
  the foreground and the photo is listed in the returned summary's "whole_image_foreground".
- "none": the whole photo (textures, surfaces filling the frame).
- a folder of masks: one per photo, paired by stem (NNN.png, NNN_mask.png, ...), any nonzero pixel is object.

Deterministic: the same photos, options and seed write byte-identical files.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage

from kano.core.errors import KanoError

from .drawing import blob, line_mask, point_in, walk
from .generator import Drawn, Spec, check_count, check_out, write_class, write_meta
from .io import IMAGE_EXTS, is_image, load_image, load_mask, pair_masks

LOCAL_DEFECTS = ("cutpaste", "cutpaste_scar", "texture", "colour", "scratch", "smear", "missing")
WHOLE_DEFECTS = ("contrast", "blur", "noise", "lightness", "colour_cast", "rescale", "rotate")
PHOTO_DEFECTS = LOCAL_DEFECTS + WHOLE_DEFECTS  # the default: both halves, n_per_defect images of each kind
DEFECT_GROUPS = {"local": LOCAL_DEFECTS, "whole": WHOLE_DEFECTS}  # names --defects takes for a whole half
MIN_WHOLE_CHANGE = 1.0  # a whole-image defect must change its region by at least this mean |difference| (grey levels)
MIN_SIDE = 64          # below this the smallest defects (scars 2 px wide, blobs 4 % of the side) are a few pixels
MIN_CHANGED = 0.0015   # a defect image must change at least this share of the photo (retries, then an error)
AUTO_FG_RANGE = (0.05, 0.95)  # an automatic foreground outside this share of the photo is not trusted
TRIES = 25
OBJECT_CONTRAST = 10.0  # RGB distance an object's median pixel must lie beyond twice the border's 90th-percentile spread


@dataclass
class PhotoSynthResult:
    out: Path
    class_name: str
    n_photos: int
    counts: dict[str, int] = field(default_factory=dict)
    whole_image_foreground: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # unreadable photos left out: "NAME: why"


# ---------------------------------------------------------------- inputs

def normal_photos(src: Path) -> tuple[list[Path], str]:
    """The normal photos of `src` and the class name it suggests: a class folder (train/good inside) gives its
    train/good photos; a plain folder its own images. Test and ground-truth folders are refused."""
    src = Path(src)
    if not src.is_dir():
        raise KanoError(f"--from must be an existing folder of normal photos, got {'a file' if src.exists() else 'no such folder'}: {src}")
    parts = [p.lower() for p in src.resolve().parts[-2:]]
    if "test" in parts or "ground_truth" in parts:
        raise KanoError(f"--from must be a folder of normal photos (a plain folder, or a class folder whose train/good is "
                        f"used), never a dataset's test or ground_truth images, got {src}")
    if (src / "train" / "good").is_dir():
        folder, name = src / "train" / "good", src.resolve().name
    else:
        folder, name = src, src.resolve().name
    files = [p for p in sorted(folder.iterdir()) if is_image(p)]
    if not files:
        others = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        got = f"{len(others)} other files ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})" if others else "an empty folder"
        raise KanoError(f"--from {folder} must contain normal photos ({', '.join(IMAGE_EXTS)}), got {got}")
    return files, name


def _fit(img: Image.Image, max_side: int) -> Image.Image:
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    f = max_side / max(w, h)
    return img.resize((max(1, round(w * f)), max(1, round(h * f))), Image.Resampling.LANCZOS)


# the shrinking above, for evaluator.overlap: a calibration photo is compared with what this module wrote of it
fit_long_side = _fit


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold (1979) on values in [0, 1]: the cut maximising the between-class variance, 256 bins."""
    hist, edges = np.histogram(values, bins=256, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu0 = np.cumsum(p * centres)
    mu = mu0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu * w0 - mu0) ** 2 / (w0 * (1 - w0))
    between[~np.isfinite(between)] = -1
    return float(edges[int(np.argmax(between)) + 1])


def auto_foreground(rgb: np.ndarray) -> np.ndarray | None:
    """(H, W) bool object estimate of an (H, W, 3) uint8 photo (see the module docstring), or None when no object
    stands out (too small, too large, or no clearer from the border colour than the border varies)."""
    h, w = rgb.shape[:2]
    b = max(1, round(0.04 * min(h, w)))
    img = rgb.astype(np.float64)
    frame = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3), img[:, :b].reshape(-1, 3), img[:, -b:].reshape(-1, 3)])
    centre = np.median(frame, axis=0)
    raw = np.linalg.norm(img - centre, axis=2)
    spread = float(np.percentile(np.linalg.norm(frame - centre, axis=1), 90))
    dist = ndimage.gaussian_filter(raw, sigma=max(1.0, 0.01 * min(h, w)))
    top = float(dist.max())
    if top <= 1e-9:
        return None
    dist /= top
    fg = ndimage.binary_fill_holes(dist > _otsu(dist))
    labels, n = ndimage.label(fg)
    if n == 0:
        return None
    sizes = ndimage.sum(fg, labels, index=np.arange(1, n + 1))
    fg = labels == (int(np.argmax(sizes)) + 1)
    share = fg.mean()
    # an object must stand out from the background by more than the background's own variation
    stands_out = float(np.median(raw[fg])) > 2 * spread + OBJECT_CONTRAST
    return fg if stands_out and AUTO_FG_RANGE[0] <= share <= AUTO_FG_RANGE[1] else None


# ---------------------------------------------------------------- shapes and noise

def perlin(shape: tuple[int, int], res: tuple[int, int], r: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise in about [-1, 1], (H, W), with res[0] x res[1] lattice cells."""
    h, w = shape
    gh, gw = res[0] + 1, res[1] + 1
    angles = r.uniform(0, 2 * math.pi, (gh, gw))
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    y = np.linspace(0, res[0], h, endpoint=False)
    x = np.linspace(0, res[1], w, endpoint=False)
    yi, xi = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - yi)[:, None], (x - xi)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grad[(yi + dy)[:, None], (xi + dx)[None, :]]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    fade = lambda t: t * t * t * (t * (t * 6 - 15) + 10)  # Perlin's 2002 quintic: zero first and second derivative at 0, 1
    uy, ux = fade(fy), fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return math.sqrt(2) * (top * (1 - uy) + bottom * uy)


def _blob(h: int, w: int, cx: float, cy: float, radius: float, r: np.random.Generator) -> np.ndarray:
    """An irregular filled polygon around (cx, cy) with 7-12 corners at random directions, (H, W) bool."""
    n = int(r.integers(7, 13))
    return blob((w, h), cx, cy, radius, r, low=0.55, angles=np.sort(r.uniform(0, 2 * math.pi, n)))


def _inner(fg: np.ndarray, margin: int) -> np.ndarray:
    """Foreground pixels at least `margin` px inside it (the foreground itself when that leaves nothing)."""
    inner = ndimage.binary_erosion(fg, iterations=max(1, margin))
    return inner if inner.any() else fg


def _jitter(patch: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """CutPaste's colour jitter: brightness and contrast by up to 10 %, per-channel gain by up to 10 %."""
    p = patch.astype(np.float64)
    mean = p.mean()
    p = (p - mean) * r.uniform(0.9, 1.1) + mean * r.uniform(0.9, 1.1)
    return p * r.uniform(0.9, 1.1, 3)


def _paste(img: np.ndarray, fg: np.ndarray, patch_w: int, patch_h: int, angle: float, r: np.random.Generator):
    """Cut a patch_w x patch_h rectangle of img, jitter and rotate it, paste it centred on a foreground pixel.
    Returns (float image, region it may change)."""
    h, w = img.shape[:2]
    patch_w, patch_h = min(patch_w, w - 2), min(patch_h, h - 2)
    x0, y0 = int(r.integers(0, w - patch_w)), int(r.integers(0, h - patch_h))
    patch = Image.fromarray(np.clip(_jitter(img[y0:y0 + patch_h, x0:x0 + patch_w], r), 0, 255).astype(np.uint8))
    shape = Image.new("L", patch.size, 255)
    if angle:
        patch = patch.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
        shape = shape.rotate(angle, resample=Image.Resampling.NEAREST, expand=True)
    cx, cy = point_in(_inner(fg, min(patch.size) // 4), r, 0)
    px, py = int(round(cx - patch.size[0] / 2)), int(round(cy - patch.size[1] / 2))
    layer = Image.fromarray(img.astype(np.uint8))
    cover = Image.new("L", (w, h), 0)
    layer.paste(patch, (px, py), shape)
    cover.paste(shape, (px, py))
    return np.asarray(layer).astype(np.float64), np.asarray(cover) > 0


_AUGMENTERS = ("invert", "solarise", "posterise", "channels", "gamma")


def _augment(tex: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """One of DRAEM's colour augmenters on an (H, W, 3) float image in [0, 255]."""
    kind = _AUGMENTERS[int(r.integers(len(_AUGMENTERS)))]
    if kind == "invert":
        return 255 - tex
    if kind == "solarise":
        return np.where(tex >= 128, 255 - tex, tex)
    if kind == "posterise":
        return np.floor(tex / 64) * 64
    if kind == "channels":
        return tex[..., list(r.permutation(3))][..., ::-1]
    return 255 * (tex / 255) ** r.uniform(0.4, 2.5)


def _procedural_texture(h: int, w: int, r: np.random.Generator) -> np.ndarray:
    a, b = r.uniform(0, 255, 3), r.uniform(0, 255, 3)
    t = (perlin((h, w), (int(r.integers(2, 9)), int(r.integers(2, 9))), r) + 1) / 2
    return a * t[..., None] + b * (1 - t[..., None])


def _harmonic_fill(img: np.ndarray, hole: np.ndarray, iters: int = 400) -> np.ndarray:
    """Fill `hole` (bool) of a float (H, W, 3) image from its surroundings: Jacobi iterations of the discrete
    Laplace equation inside the hole, the pixels outside held fixed (started at the mean of the hole's rim)."""
    ys, xs = np.nonzero(hole)
    y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, img.shape[0])
    x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, img.shape[1])
    crop, m = img[y0:y1, x0:x1].copy(), hole[y0:y1, x0:x1]
    rim = ndimage.binary_dilation(m) & ~m
    crop[m] = crop[rim].mean(axis=0) if rim.any() else crop.mean(axis=(0, 1))
    for _ in range(iters):
        p = np.pad(crop, ((1, 1), (1, 1), (0, 0)), mode="edge")
        avg = (p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]) / 4
        crop[m] = avg[m]
    out = img.copy()
    out[y0:y1, x0:x1] = crop
    return out


# ---------------------------------------------------------------- whole-image defects

def whole_params(kind: str, side: int, r: np.random.Generator) -> dict:
    """Random parameters of a whole-image defect `kind` on a photo whose short side is `side` px (ranges in the
    module docstring)."""
    sign = 1.0 if r.random() < 0.5 else -1.0
    if kind == "contrast":
        return {"factor": float(r.uniform(0.55, 0.8))}
    if kind == "blur":
        return {"sigma_px": float(side * r.uniform(0.005, 0.012))}
    if kind == "noise":
        return {"sigma": float(r.uniform(5.0, 12.0)), "noise_seed": int(r.integers(2 ** 31))}
    if kind == "lightness":
        return {"shift": sign * float(r.uniform(0.07, 0.15))}
    if kind == "colour_cast":
        v = r.normal(size=3)
        v -= v.mean()  # orthogonal to grey
        u = v / max(float(np.linalg.norm(v)), 1e-12)
        return {"gains": [float(g) for g in 1 + r.uniform(0.1, 0.2) * u]}
    if kind == "rescale":
        return {"factor": float(r.uniform(1.3, 1.7)) if sign > 0 else float(r.uniform(0.6, 0.77))}
    if kind == "rotate":
        return {"degrees": sign * float(r.uniform(10.0, 45.0))}
    raise KanoError(f"whole-image defect kind must be one of {', '.join(WHOLE_DEFECTS)}, got {kind!r}")


def _resample(f: np.ndarray, centre: tuple[float, float], matrix: np.ndarray) -> np.ndarray:
    """out(p) = f(centre + matrix @ (p - centre)) for every pixel p = (y, x) of a float (H, W, 3) image: bilinear,
    mirrored at the border."""
    h, w = f.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    d = np.stack([yy - centre[0], xx - centre[1]])
    src = np.tensordot(matrix, d, axes=1) + np.array(centre)[:, None, None]
    return np.stack([ndimage.map_coordinates(f[..., c], src, order=1, mode="mirror") for c in range(3)], axis=-1)


def whole_change(kind: str, img: np.ndarray, region: np.ndarray, params: dict) -> np.ndarray:
    """The float (H, W, 3) photo after the whole-image defect `kind` with `params` (whole_params), computed over
    `region` ((H, W) bool: the pixels the statistics and centre are taken from; the caller keeps the change
    only there)."""
    f = img.astype(np.float64)
    if kind == "contrast":
        mean = f[region].mean(axis=0)
        return mean + params["factor"] * (f - mean)
    if kind == "blur":
        s = params["sigma_px"]
        return np.stack([ndimage.gaussian_filter(f[..., c], s, mode="mirror") for c in range(3)], axis=-1)
    if kind == "noise":
        return f + np.random.default_rng(params["noise_seed"]).normal(0.0, params["sigma"], f.shape)
    if kind == "lightness":
        v = f.max(axis=2, keepdims=True) / 255
        target = np.clip(v + params["shift"], 0.0, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            scaled = np.where(v > 0, f * target / np.where(v > 0, v, 1), 255 * target)
        return scaled
    if kind == "colour_cast":
        return f * np.asarray(params["gains"], dtype=np.float64)
    ys, xs = np.nonzero(region)
    centre = (float(ys.mean()), float(xs.mean()))
    if kind == "rescale":
        return _resample(f, centre, np.eye(2) / params["factor"])
    if kind == "rotate":
        t = math.radians(params["degrees"])
        return _resample(f, centre, np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]))
    raise KanoError(f"whole-image defect kind must be one of {', '.join(WHOLE_DEFECTS)}, got {kind!r}")


def make_whole_defect(kind: str, img: np.ndarray, fg: np.ndarray, r: np.random.Generator,
                      name: str = "photo", confine: bool = False) -> tuple[np.ndarray, np.ndarray, dict]:
    """(defect image (H, W, 3) uint8, mask (H, W) bool, record) for a whole-image defect on an (H, W, 3) uint8
    photo and its (H, W) bool foreground. The mask is the changed region (the whole photo, or the whole
    foreground; only the foreground when `confine`, as for masks the user drew) and holds every pixel that
    differs from `img`; the record names the region and parameters."""
    side = min(img.shape[:2])
    for _ in range(TRIES):
        whole_photo = bool(fg.all()) or (not confine and r.random() < 0.5)
        region = np.ones(fg.shape, bool) if whole_photo else fg
        params = whole_params(kind, side, r)
        drawn = whole_change(kind, img, region, params)
        out = img.copy()
        out[region] = np.clip(np.round(drawn[region]), 0, 255).astype(np.uint8)
        if np.abs(out.astype(np.float64) - img)[region].mean() >= MIN_WHOLE_CHANGE:
            return out, region, {"region": "photo" if whole_photo else "foreground", "params": params}
    raise KanoError(f"{name} must change by at least {MIN_WHOLE_CHANGE} grey levels on average under a '{kind}' defect, "
                    f"got less in {TRIES} tries (a flat photo); use other kinds (--defects local)")


# ---------------------------------------------------------------- one defect

def _draw(kind: str, img: np.ndarray, fg: np.ndarray, others: list[np.ndarray], r: np.random.Generator):
    """(float image, region it may change) for one defect of `kind` on an (H, W, 3) uint8 photo."""
    h, w = img.shape[:2]
    side = min(h, w)
    f = img.astype(np.float64)
    if kind == "cutpaste":
        area = r.uniform(0.02, 0.15) * h * w
        aspect = math.exp(r.uniform(math.log(0.3), math.log(3.3)))
        pw, ph = max(2, int(round(math.sqrt(area * aspect)))), max(2, int(round(math.sqrt(area / aspect))))
        return _paste(f, fg, pw, ph, 0.0, r)
    if kind == "cutpaste_scar":
        s = side / 256
        pw, ph = max(2, int(round(r.uniform(2, 16) * s))), max(3, int(round(r.uniform(10, 25) * s)))
        return _paste(f, fg, pw, ph, float(r.uniform(-45, 45)), r)
    if kind == "texture":
        k = int(r.integers(0, 7))
        scale = 2 ** k
        noise = perlin((h, w), (min(scale, h // 2), min(scale, w // 2)), r)
        noise = np.asarray(Image.fromarray(((noise + 2) * 50).astype(np.uint8)).rotate(float(r.uniform(-90, 90)))) / 50 - 2
        region = noise > 0.5
        if others:
            tex = others[int(r.integers(len(others)))].astype(np.float64)
            tex = np.roll(tex, (int(r.integers(h)), int(r.integers(w))), axis=(0, 1))
            tex = _augment(np.asarray(Image.fromarray(tex.astype(np.uint8)).resize((w, h), Image.Resampling.BILINEAR)).astype(np.float64), r)
        else:
            tex = _procedural_texture(h, w, r)
        beta = r.uniform(0.0, 0.8)
        return f * beta + tex * (1 - beta), region
    if kind == "colour":
        x, y = point_in(_inner(fg, int(0.04 * side)), r, 0)
        region = _blob(h, w, x, y, side * r.uniform(0.04, 0.1), r)
        hsv = np.asarray(Image.fromarray(img).convert("HSV")).astype(np.int64).copy()
        hsv[..., 0] = (hsv[..., 0] + int(r.integers(64, 192))) % 256
        hsv[..., 1] = np.maximum(hsv[..., 1], int(r.integers(120, 220)))
        return np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float64), region
    if kind == "scratch":
        x, y = point_in(_inner(fg, int(0.05 * side)), r, 0)
        ang, step = r.uniform(0, 2 * math.pi), side * r.uniform(0.015, 0.03)
        pts = walk(x, y, ang, int(r.integers(8, 20)), step, 0.35, r)
        region = line_mask((w, h), pts, max(1, int(round(side * r.uniform(0.006, 0.016)))))
        under = f[region & fg].mean() if (region & fg).any() else f.mean()
        tone = r.uniform(200, 250) if under < 128 else r.uniform(5, 50)
        return np.broadcast_to(np.array([tone, tone, tone]) * r.uniform(0.9, 1.1, 3), f.shape).copy(), region
    if kind == "smear":
        x, y = point_in(_inner(fg, int(0.04 * side)), r, 0)
        region = _blob(h, w, x, y, side * r.uniform(0.05, 0.12), r)
        radius = side * r.uniform(0.015, 0.04)
        blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius))).astype(np.float64)
        dx, dy = (int(round(v)) for v in r.uniform(-1, 1, 2) * side * 0.05)
        return np.roll(blurred, (dy, dx), axis=(0, 1)), region
    if kind == "missing":
        edge = fg & ~ndimage.binary_erosion(fg)
        whole = fg.all()
        x, y = point_in(edge if edge.any() and not whole else _inner(fg, int(0.06 * side)), r, 0)
        region = _blob(h, w, x, y, side * r.uniform(0.05, 0.11), r) & fg
        if not region.any():
            return f, region
        return _harmonic_fill(f, region), region
    raise KanoError(f"defect kind must be one of {', '.join(PHOTO_DEFECTS)}, got {kind!r}")


def make_defect(kind: str, img: np.ndarray, fg: np.ndarray, others: list[np.ndarray], r: np.random.Generator,
                name: str = "photo") -> tuple[np.ndarray, np.ndarray]:
    """(defect image (H, W, 3) uint8, mask (H, W) bool) for an (H, W, 3) uint8 photo and its (H, W) bool
    foreground. The mask is exactly the pixels that differ from `img`, and lies inside `fg`."""
    need = max(4, int(MIN_CHANGED * fg.size))
    for _ in range(TRIES):
        drawn, region = _draw(kind, img, fg, others, r)
        region = region & fg
        out = img.copy()
        out[region] = np.clip(np.round(drawn[region]), 0, 255).astype(np.uint8)
        mask = np.any(out != img, axis=2)
        if mask.sum() >= need:
            return out, mask
    raise KanoError(f"{name} must leave room for a '{kind}' defect of at least {need} changed pixels on its foreground "
                    f"({int(fg.sum())} px), got none in {TRIES} tries; use a larger photo, --foreground none, or other kinds")


# ---------------------------------------------------------------- the dataset

@dataclass
class PhotoGenerator:
    """The photos' generator (anomaly_data/generator.py's interface): normal picture i is photo i as read; a
    defect picture takes its photo at random and draws one defect of its role's kind on it (make_defect or
    make_whole_defect), its record naming the source photo, the kind, the changed pixels and the scope."""

    photos: list[np.ndarray]  # (H, W, 3) uint8 each
    fgs: list[np.ndarray]  # (H, W) bool foreground of each
    files: list[Path]
    confine: bool = False  # whole-image kinds stay on the foreground (masks the user drew)

    def draw(self, spec: Spec, r: np.random.Generator) -> Drawn:
        if spec.normal:
            return Drawn(self.photos[spec.index])
        kind, photos = spec.role, self.photos
        j = int(r.integers(len(photos)))
        others = [p for k, p in enumerate(photos) if k != j]
        extra: dict = {"scope": "local"}
        if kind in WHOLE_DEFECTS:
            img, mask, info = make_whole_defect(kind, photos[j], self.fgs[j], r, name=f"photo {self.files[j]}", confine=self.confine)
            extra = {"scope": "whole", **info}
        else:
            img, mask = make_defect(kind, photos[j], self.fgs[j], others, r, name=f"photo {self.files[j]}")
        return Drawn(img, mask, {"source": f"test/good/{j:03d}.png", "kind": kind,
                                 "changed_pixels": int(np.any(img != photos[j], axis=2).sum()), **extra})


def _foregrounds(photos: list[np.ndarray], files: list[Path], foreground: str | Path) -> tuple[list[np.ndarray], list[str]]:
    whole: list[str] = []
    if str(foreground) == "none":
        return [np.ones(p.shape[:2], bool) for p in photos], whole
    if str(foreground) == "auto":
        fgs = []
        for p, f in zip(photos, files):
            fg = auto_foreground(p)
            if fg is None:
                whole.append(f.name)
                fg = np.ones(p.shape[:2], bool)
            fgs.append(fg)
        return fgs, whole
    mask_dir = Path(foreground)
    if not mask_dir.is_dir():
        raise KanoError(f"--foreground must be auto, none or a folder of masks (one per photo, same stem), got {foreground}")
    pairs = pair_masks(files, mask_dir)
    missing = [f.name for f, m in pairs.items() if m is None]
    if missing:
        raise KanoError(f"--foreground {mask_dir} must hold a mask for every photo (same stem), got none for "
                        f"{', '.join(missing[:3])}{' and more' if len(missing) > 3 else ''}")
    fgs = []
    for p, f in zip(photos, files):
        m = pairs[f]
        full = load_image(f).size
        mask = Image.fromarray(load_mask(m, full) * 255).resize((p.shape[1], p.shape[0]), Image.Resampling.NEAREST)
        fg = np.asarray(mask) > 0
        if not fg.any():
            raise KanoError(f"foreground mask {m} must mark the object (nonzero pixels), got an empty mask")
        fgs.append(fg)
    return fgs, whole


def synthesize_from_photos(src: str | Path, out: str | Path, class_name: str | None = None, *, seed: int = 0,
                           max_side: int = 256, n_per_defect: int = 3, defects: tuple[str, ...] | None = None,
                           foreground: str | Path = "auto", force: bool = False, strict: bool = False) -> PhotoSynthResult:
    """Write the dataset described in the module docstring. Returns a summary (counts per kind, photos whose
    automatic foreground fell back to the whole photo, unreadable photos left out). strict: an unreadable
    photo is an error (default: as eval and predict, it is named, counted and left out)."""
    check_count("max_side (--size)", max_side, MIN_SIDE)
    check_count("n_per_defect (--n-defect)", n_per_defect, 1)
    kinds = list(dict.fromkeys(k for d in (defects or PHOTO_DEFECTS) for k in DEFECT_GROUPS.get(d, (d,))))
    bad = [k for k in kinds if k not in PHOTO_DEFECTS]
    if bad:
        raise KanoError(f"defect kind (--defects) with --from must be one of {', '.join(PHOTO_DEFECTS)} (or local, whole: "
                        f"each half), got {', '.join(bad)}")
    files, default_name = normal_photos(Path(src))
    cls = class_name or default_name
    if not cls or "/" in cls or "\\" in cls or cls in (".", "..") or cls.startswith("."):
        raise KanoError(f"--classes with --from must be one class name (letters, digits, _ or -), got {cls!r}")
    out = check_out(out, force, source=src)
    photos, kept, skipped = [], [], []
    for f in files:
        try:
            img = _fit(load_image(f), max_side)
        except KanoError as exc:
            if strict:
                raise
            skipped.append(f"{f.name}: {exc}")
            continue
        kept.append(f)
        if min(img.size) < MIN_SIDE:
            raise KanoError(f"photo {f} must be at least {MIN_SIDE} px on its short side for the defect sizes "
                            f"(scars 2 px wide, blobs 4-12 % of the side), got {img.size[0]}x{img.size[1]}")
        photos.append(np.asarray(img, dtype=np.uint8).copy())
    if not photos:
        raise KanoError(f"--from {src} must hold at least one readable photo, got {len(files)} unreadable: {skipped[0]}")
    files = kept
    fgs, whole = _foregrounds(photos, files, foreground)
    gen = PhotoGenerator(photos, fgs, files, confine=str(foreground) not in ("auto", "none"))
    records = write_class(out, cls, gen, seed, max_side, {"train": len(photos), "good": len(photos),
                                                          **{kind: n_per_defect for kind in kinds}})
    counts = {kind: n_per_defect for kind in kinds}
    (out / cls / "defects.json").write_text(json.dumps({"seed": seed, "foreground": str(foreground), "defects": records}, indent=1))
    write_meta(out)
    return PhotoSynthResult(out, cls, len(photos), counts, whole, skipped)


def describe(result: PhotoSynthResult) -> str:
    """The lines `kano data synth --from` prints."""
    kinds = ", ".join(f"{k} {n}" for k, n in result.counts.items())
    lines = [f"wrote {result.out}: class {result.class_name}, {result.n_photos} normal photos (train/good and test/good), "
             f"defects: {kinds} (meta.json, {result.class_name}/defects.json included)"]
    if result.skipped:
        lines += [f"not used (unreadable): {s}" for s in result.skipped[:20]]
        lines.append(f"{len(result.skipped)} unreadable photo(s) skipped; --strict makes this an error")
    if result.whole_image_foreground:
        names = result.whole_image_foreground
        lines.append(f"no object found against the border colour in {len(names)} photo(s) ({', '.join(names[:3])}"
                     f"{', ...' if len(names) > 3 else ''}): defects may land anywhere on them (pass --foreground DIR_OF_MASKS to steer them)")
    return "\n".join(lines)
