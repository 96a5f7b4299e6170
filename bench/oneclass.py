"""One-class benchmark: methods fitted on good photos only, scored on small local and whole-image defects.

    python bench/oneclass.py [--out oneclass_out] [--seeds 0,1] [--sets hazelnut,brick,hazelnut1024 (grass too)]
                             [--methods oneclass,patchcore,padim,kanoclip,winclip+,median_colour,self_similarity]
                             [--epochs 2] [--k-shot 4] [--scale 1.0] [--hazelnut DIR]

Evaluation sets (made here, per seed; the seed changes the split, the crops and the defects):
- hazelnut: the real hazelnut photos (Intel's Hazelnut Toy, CC-BY-4.0: ../shared/data/hazelnut_toy, the 512-px
  originals, when present, else the 256-px copies in tests/data/hazelnut_toy): its 34 good photos at 256 px,
  shuffled, 18 to fit and 12 good test photos; small local defects (3 per kind) and whole-image defects (1 per
  kind) drawn here on the test photos, and 8 of the set's 17 real painted defects (small) with their masks.
- brick, grass: crops of 128 px from two CC0 texture photos of scikit-image (bench/data/textures, SOURCE.md
  there): 20 fit crops from the upper half of the photo, 12 good test crops from the lower half, so no test pixel
  was seen in fitting; small (3 per kind) and whole-image defects (1 per kind) drawn here.
- hazelnut1024: the hazelnut photos scaled to 1024 px (from the 512-px originals), 10 to fit, 6 good test photos
  and 6 with a defect of about 1 % of the side (a 10-15 px spot or stain).
--scale multiplies every count (fit sets at least 4 photos).

Defects: the kinds below are drawn by this file's own code from its own random streams (BENCH_SALT), with other
formulas than `kano data synth --from` where both have a kind of the same sort (PIL's enhancers against
per-channel formulas, one-channel tint against zero-sum gains, luminance grain against per-channel noise, a
zoomed crop against an affine resample), so the benchmark does not grade a method by the generator it chose
its settings on.
- small: spot (a disc, 3-6 % of the side, much darker or lighter), scratch (a thin polyline, 15-30 % of the
  side long), stain (an ellipse whose colour is multiplied towards brown); masks exactly the changed pixels.
- whole (the whole photo; mask = the whole photo): defocus (Gaussian blur of 0.5-0.9 % of the side), flat
  (PIL contrast 0.6-0.75), grain (luminance noise, sigma 6-10 levels), exposure (PIL brightness 0.8-0.88 or
  1.12-1.2), tint (one channel x 0.85-0.9), zoom (the central 1/1.25-1/1.45 of the photo enlarged to the full
  size).

Methods, each through the `kano` CLI (every command is printed before it runs, so each can be re-run by hand):
- oneclass, patchcore, padim: `kano data synth --from FIT` (the recommended recipe: the synthetic defects are
  what oneclass chooses its variant on), `kano train --method M --data mvtec:SYNTH --backbone micro`;
- kanoclip: `kano train` (KAnoCLIP, micro-CLIP, --epochs, the demo's Bi-CMCI width, a built-in knowledge base) on
  the same synthetic set;
- winclip+: `kano predict --method winclip --backbone micro --reference FIT --k-shot K` (few-shot, no fitting);
- median_colour, self_similarity: the zero-parameter floors.
Then `kano predict` on the test images (maps on, panels off). A method the installed Kano lacks is reported as
missing, never given a number.

Measured per set, seed and method: image AUROC and pixel AUROC over the good test photos against the small
defects, the whole-image defects and all defects (computed here from predictions.jsonl and the maps by the
Mann-Whitney rank formula, ties counted half, not by Kano's metric code); fit time (wall seconds of
`kano train`; synth time apart); images per second of `kano predict` (wall, model loading included); peak
memory (the largest resident set of the process running the command). Each command runs in a child forked
from this process after `import torch, kano.cli`, so the interpreter's start-up is not timed, and the child's
resident set includes the ~0.3-0.5 GB of imported libraries.

Writes OUT/results.json (every row) and OUT/table.md (the tables printed at the end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
TEXTURES = ROOT / "bench" / "data" / "textures"
# the 512-px originals beside the checkout (../shared, or ../../shared from a worktree), else the 256-px test copies
HAZEL_CANDIDATES = (ROOT.parent / "shared" / "data" / "hazelnut_toy", ROOT.parent.parent / "shared" / "data" / "hazelnut_toy",
                    ROOT / "tests" / "data" / "hazelnut_toy")
BENCH_SALT = 0x0C1A55  # the bench's own random streams: never those of `kano data synth --from`
SMALL = ("spot", "scratch", "stain")
WHOLE = ("defocus", "flat", "grain", "exposure", "tint", "zoom")
TINY = ("spot", "stain")  # the 1024-px set's defects, about 1 % of the side
METHODS = ("oneclass", "patchcore", "padim", "kanoclip", "winclip+", "median_colour", "self_similarity")
ONE_CLASS = ("oneclass", "patchcore", "padim")
GROUPS = ("small", "whole", "all")


@dataclass(frozen=True)
class SetSpec:
    """One evaluation set. side: photo side in px; per-kind counts; tiny: defects of about 1 % of the side."""
    name: str
    source: str          # "hazelnut" or a texture file stem
    side: int
    n_fit: int
    n_good: int
    n_small: int         # images per small kind
    n_whole: int         # images per whole-image kind
    n_painted: int = 0   # real painted defects (hazelnut: up to 17)
    tiny: bool = False


def default_sets(scale: float = 1.0) -> dict[str, SetSpec]:
    """The sets at `scale` x their default counts (at least 1 each, fit at least 4)."""
    n = lambda v, low=1: max(low, int(round(v * scale)))
    return {
        "hazelnut": SetSpec("hazelnut", "hazelnut", 256, n(18, 4), n(12), n(3), n(1), n_painted=min(17, n(8))),
        "brick": SetSpec("brick", "brick", 128, n(20, 4), n(12), n(3), n(1)),
        "grass": SetSpec("grass", "grass", 128, n(20, 4), n(12), n(3), n(1)),
        "hazelnut1024": SetSpec("hazelnut1024", "hazelnut", 1024, n(10, 4), n(6), n(3), 0, tiny=True),
    }


def _rng(seed: int, *keys) -> np.random.Generator:
    return np.random.default_rng([BENCH_SALT, seed, *[zlib.crc32(str(k).encode()) for k in keys]])


# ---------------------------------------------------------------- the bench's own defects

def object_region(rgb: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels farther than 60 (RGB distance) from the median colour of a 4-pixel frame, or the
    whole photo when that leaves under 5 % of it (a texture)."""
    f = rgb.astype(np.float64)
    frame = np.concatenate([f[:4].reshape(-1, 3), f[-4:].reshape(-1, 3), f[:, :4].reshape(-1, 3), f[:, -4:].reshape(-1, 3)])
    far = np.linalg.norm(f - np.median(frame, axis=0), axis=2) > 60
    return far if far.mean() > 0.05 else np.ones(far.shape, bool)


def _inside(region: np.ndarray, margin: int) -> np.ndarray:
    """Region pixels at least `margin` px from its edge or the photo's border, the region itself if none."""
    from scipy import ndimage

    inner = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1] >= max(1, margin)
    return inner if inner.any() else region


def small_defect(kind: str, img: np.ndarray, region: np.ndarray, r: np.random.Generator, tiny: bool = False):
    """(defect image (H, W, 3) uint8, mask (H, W) bool = exactly the changed pixels) of a small local defect."""
    h, w = img.shape[:2]
    side = min(h, w)
    for _ in range(20):
        ys, xs = np.nonzero(_inside(region, int(0.08 * side)))
        k = int(r.integers(len(ys)))
        cx, cy = float(xs[k]), float(ys[k])
        shape = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(shape)
        f = img.astype(np.float64)
        if kind == "spot":
            d = side * (r.uniform(0.01, 0.015) if tiny else r.uniform(0.03, 0.06))
            draw.ellipse([cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2], fill=255)
            sel = np.asarray(shape) > 0
            delta = r.uniform(60, 100) * (-1 if f[sel].mean() > 128 else 1)
            new = f + delta
        elif kind == "scratch":
            length, ang = side * r.uniform(0.15, 0.3), r.uniform(0, 2 * math.pi)
            pts = [(cx, cy)]
            for _ in range(3):
                ang += r.uniform(-0.4, 0.4)
                pts.append((pts[-1][0] + length / 3 * math.cos(ang), pts[-1][1] + length / 3 * math.sin(ang)))
            draw.line(pts, fill=255, width=max(1, int(round(side * r.uniform(0.008, 0.015)))))
            sel = np.asarray(shape) > 0
            delta = r.uniform(70, 110) * (-1 if f[sel].mean() > 128 else 1)
            new = f + delta
        elif kind == "stain":
            a = side * (r.uniform(0.005, 0.008) if tiny else r.uniform(0.04, 0.08))
            b = a * r.uniform(0.6, 1.0)
            draw.ellipse([cx - a, cy - b, cx + a, cy + b], fill=255)
            sel = np.asarray(shape) > 0
            new = f * np.array([r.uniform(0.55, 0.75), r.uniform(0.65, 0.85), r.uniform(0.8, 1.0)])[::-1]
        else:
            raise ValueError(f"small defect kind must be one of {', '.join(SMALL)}, got {kind!r}")
        sel &= region
        out = img.copy()
        out[sel] = np.clip(np.round(new[sel]), 0, 255).astype(np.uint8)
        mask = np.any(out != img, axis=2)
        if mask.sum() >= 4:
            return out, mask
    raise ValueError(f"no room for a {kind} defect on a {w}x{h} photo")


def whole_defect(kind: str, img: np.ndarray, r: np.random.Generator) -> np.ndarray:
    """The (H, W, 3) uint8 photo with a whole-image defect of `kind` (mask: the whole photo)."""
    pil = Image.fromarray(img)
    side = min(img.shape[:2])
    if kind == "defocus":
        return np.asarray(pil.filter(ImageFilter.GaussianBlur(side * r.uniform(0.005, 0.009))))
    if kind == "flat":
        return np.asarray(ImageEnhance.Contrast(pil).enhance(r.uniform(0.6, 0.75)))
    if kind == "grain":
        noise = r.normal(0, r.uniform(6, 10), img.shape[:2])[..., None]
        return np.clip(np.round(img + noise), 0, 255).astype(np.uint8)
    if kind == "exposure":
        factor = r.uniform(0.8, 0.88) if r.random() < 0.5 else r.uniform(1.12, 1.2)
        return np.asarray(ImageEnhance.Brightness(pil).enhance(factor))
    if kind == "tint":
        out = img.astype(np.float64)
        out[..., int(r.integers(3))] *= r.uniform(0.85, 0.9)
        return np.clip(np.round(out), 0, 255).astype(np.uint8)
    if kind == "zoom":
        h, w = img.shape[:2]
        z = r.uniform(1.25, 1.45)
        cw, ch = w / z, h / z
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        return np.asarray(pil.resize((w, h), Image.Resampling.LANCZOS, box=box))
    raise ValueError(f"whole-image defect kind must be one of {', '.join(WHOLE)}, got {kind!r}")


# ---------------------------------------------------------------- the sets

def _hazel_dir(given: Path | None) -> Path:
    for d in ([given] if given else HAZEL_CANDIDATES):
        if d is not None and (d / "train" / "good").is_dir():
            return d
    raise SystemExit(f"--hazelnut must be the Hazelnut Toy folder (train/good inside), got none of "
                     f"{', '.join(str(d) for d in ([given] if given else HAZEL_CANDIDATES))}")


def _source_photos(spec: SetSpec, seed: int, hazel: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(fit photos, good test photos), (side, side, 3) uint8 each."""
    r = _rng(seed, spec.name, "split")
    if spec.source == "hazelnut":
        files = sorted((hazel / "train" / "good").iterdir()) + sorted((hazel / "test" / "good").iterdir())
        order = r.permutation(len(files))
        if spec.n_fit + spec.n_good > len(files):
            raise SystemExit(f"{spec.name}: --scale asks for {spec.n_fit} + {spec.n_good} photos, the folder holds {len(files)}")
        load = lambda f: np.asarray(Image.open(f).convert("RGB").resize((spec.side, spec.side), Image.Resampling.LANCZOS))
        return ([load(files[i]) for i in order[:spec.n_fit]],
                [load(files[i]) for i in order[spec.n_fit:spec.n_fit + spec.n_good]])
    tex = np.asarray(Image.open(TEXTURES / f"{spec.source}.png").convert("RGB"))
    h, w = tex.shape[:2]
    half = h // 2
    if half < spec.side or w < spec.side:
        raise SystemExit(f"{spec.name}: crops of {spec.side} px need a texture of at least {2 * spec.side} px, got {w}x{h}")

    def crops(y0: int, n: int) -> list[np.ndarray]:
        out = []
        for _ in range(n):
            y, x = y0 + int(r.integers(half - spec.side + 1)), int(r.integers(w - spec.side + 1))
            out.append(tex[y:y + spec.side, x:x + spec.side].copy())
        return out
    return crops(0, spec.n_fit), crops(half, spec.n_good)


def build_set(spec: SetSpec, seed: int, out: Path, hazel: Path) -> dict:
    """Write OUT/fit/NNN.png, OUT/test/{good,KIND}/NNN.png, OUT/masks/KIND/NNN.png, OUT/test.txt and OUT/labels.json;
    return the labels: per test image its path, kind, group (good, small or whole), mask path (None for good) and
    the good test photo it was drawn on (None for good and painted photos)."""
    shutil.rmtree(out, ignore_errors=True)
    fit, good = _source_photos(spec, seed, hazel)
    (out / "fit").mkdir(parents=True)
    for i, p in enumerate(fit):
        Image.fromarray(p).save(out / "fit" / f"{i:03d}.png", compress_level=1)
    rows = []

    def save(kind: str, group: str, i: int, img: np.ndarray, mask: np.ndarray | None, source: int | None = None) -> None:
        (out / "test" / kind).mkdir(parents=True, exist_ok=True)
        path = out / "test" / kind / f"{i:03d}.png"
        Image.fromarray(img).save(path, compress_level=1)
        mpath = None
        if mask is not None:
            (out / "masks" / kind).mkdir(parents=True, exist_ok=True)
            mpath = out / "masks" / kind / f"{i:03d}.png"
            Image.fromarray(mask.astype(np.uint8) * 255).save(mpath, compress_level=1)
        rows.append({"image": str(path), "kind": kind, "group": group, "mask": str(mpath) if mpath else None,
                     "source": None if source is None else str(out / "test" / "good" / f"{source:03d}.png")})

    for i, p in enumerate(good):
        save("good", "good", i, p, None)
    for kind in (TINY if spec.tiny else SMALL):
        for i in range(spec.n_small):
            r = _rng(seed, spec.name, kind, i)
            j = int(r.integers(len(good)))
            img, mask = small_defect(kind, good[j], object_region(good[j]), r, tiny=spec.tiny)
            save(kind, "small", i, img, mask, j)
    for kind in WHOLE if spec.n_whole else ():
        for i in range(spec.n_whole):
            r = _rng(seed, spec.name, kind, i)
            j = int(r.integers(len(good)))
            save(kind, "whole", i, whole_defect(kind, good[j], r), np.ones(good[j].shape[:2], bool), j)
    if spec.n_painted:
        painted = sorted((hazel / "test" / "colour").iterdir())
        pick = sorted(_rng(seed, spec.name, "painted").permutation(len(painted))[:spec.n_painted])
        for i, f in enumerate(painted[k] for k in pick):
            img = Image.open(f).convert("RGB").resize((spec.side, spec.side), Image.Resampling.LANCZOS)
            m = Image.open(hazel / "ground_truth" / "colour" / f"{f.stem}.png").convert("L")
            mask = np.asarray(m.resize((spec.side, spec.side), Image.Resampling.NEAREST)) > 127
            save("painted", "small", i, np.asarray(img), mask)
    (out / "test.txt").write_text("".join(r["image"] + "\n" for r in rows))
    labels = {"set": spec.name, "seed": seed, "side": spec.side, "n_fit": len(fit), "images": rows}
    (out / "labels.json").write_text(json.dumps(labels, indent=1))
    return labels


# ---------------------------------------------------------------- metrics (Mann-Whitney, independent of Kano's)

def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Probability that a positive outscores a negative, ties counted half (the Mann-Whitney U over n+ n-);
    None without both classes."""
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def score_predictions(pred_dir: Path, labels: dict) -> dict:
    """Image and pixel AUROC per group (small, whole, all) from a `kano predict` folder: rows in test.txt order."""
    rows = [json.loads(line) for line in (pred_dir / "predictions.jsonl").read_text().splitlines() if line.strip()]
    images = labels["images"]
    if len(rows) != len(images):
        raise RuntimeError(f"{pred_dir}: {len(rows)} rows for {len(images)} test images")
    errors = [r for r in rows if r.get("error")]
    if errors:
        raise RuntimeError(f"{pred_dir}: {len(errors)} images not scored ({errors[0]['error']})")
    maps, masks = [], []
    for r, lab in zip(rows, images):
        m = np.load(pred_dir / r["map_npy"]) if r.get("map_npy") else None
        if m is None:
            maps.append(None)
            masks.append(None)
            continue
        m = np.asarray(m, dtype=np.float32).squeeze()
        if lab["mask"]:
            mk = Image.open(lab["mask"]).convert("L")
            if mk.size != (m.shape[1], m.shape[0]):
                mk = mk.resize((m.shape[1], m.shape[0]), Image.Resampling.NEAREST)
            mk = np.asarray(mk) > 127
        else:
            mk = np.zeros(m.shape, bool)
        maps.append(m)
        masks.append(mk)
    out = {}
    for g in GROUPS:
        keep = [i for i, lab in enumerate(images) if lab["group"] == "good" or (lab["group"] == g or (g == "all" and lab["group"] != "good"))]
        if not any(images[i]["group"] != "good" for i in keep):
            out[g] = {"image_auroc": None, "pixel_auroc": None, "n_defect": 0}
            continue
        y = np.array([images[i]["group"] != "good" for i in keep])
        s = np.array([rows[i]["score"] for i in keep], dtype=np.float64)
        pix = None
        if all(maps[i] is not None for i in keep):
            pix = auroc(np.concatenate([masks[i].ravel() for i in keep]), np.concatenate([maps[i].ravel() for i in keep]))
        out[g] = {"image_auroc": auroc(y, s), "pixel_auroc": pix, "n_defect": int(y.sum())}
    return out


# ---------------------------------------------------------------- running the CLI

class Runner:
    """Runs `kano` commands in children forked from this process (torch and the CLI imported once, here)."""

    def __init__(self, log: Path):
        import torch  # noqa: F401  (imported before forking: the children share it)

        from kano.cli import app

        self.app = app
        self.log = log

    def __call__(self, *args) -> dict:
        argv = [str(a) for a in args]
        line = "$ kano " + " ".join(shlex.quote(a) for a in argv)
        print(line, flush=True)
        with open(self.log, "a") as fh:
            fh.write(line + "\n")
        sys.stdout.flush()
        sys.stderr.flush()
        t = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: run the command, exit with its code, never return into the parent's loop
            code = 1
            try:
                res = self.app(argv, standalone_mode=False, prog_name="kano")
                code = 0 if res in (None, 0) else int(res)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException as e:  # a KanoError or a crash: say it, then exit non-zero
                print(f"kano {argv[0]} failed: {type(e).__name__}: {e}", file=sys.stderr)
                if not type(e).__name__.endswith("KanoError"):
                    traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - t
        code = os.waitstatus_to_exitcode(status)
        return {"code": code, "wall_s": wall, "peak_mb": usage.ru_maxrss / 1024}


def git_commit() -> str:
    """The checkout's commit (with '+changes' when files differ from it), or 'unknown' outside git."""
    import subprocess

    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def available_methods() -> set[str]:
    from kano.core.registry import METHODS as REG

    have = set(REG)
    return {m for m in METHODS if (m.rstrip("+") if m == "winclip+" else m) in have}


def run_set(kano: Runner, spec: SetSpec, seed: int, labels: dict, set_dir: Path, work: Path, methods: list[str],
            have: set[str], args, kb: Path, config: Path, save=lambda rows: None) -> list[dict]:
    """Every method on one set and seed; `save(rows so far)` after each, so a stopped run keeps its scored rows."""
    rows = []
    commit = git_commit()
    # the class (and the prompts' word) is what the photos show: hazelnut for both hazelnut sets
    test_list, fit_dir, cls = set_dir / "test.txt", set_dir / "fit", spec.source
    n_test = len(labels["images"])
    synth, synth_s = work / "synth", None

    def predict(name: str, *how) -> dict:
        pdir = work / "predict" / name
        step = kano("predict", test_list, "--class", cls, "--out", pdir, "--no-panels", "--force", "--batch-size", 8, *how)
        if step["code"] != 0:
            return {"error": f"kano predict exited with {step['code']}"}
        res = {"predict_s": step["wall_s"], "img_per_s": n_test / step["wall_s"], "peak_mb_predict": step["peak_mb"]}
        res["metrics"] = score_predictions(pdir, labels)
        return res

    for m in methods:
        row = {"set": spec.name, "seed": seed, "method": m, "n_test": n_test, "n_fit": labels["n_fit"], "side": spec.side,
               "kano_commit": commit, "threads": os.environ.get("OMP_NUM_THREADS")}
        if m not in have:
            row["error"] = "not in this Kano's method table (kano.core.registry)"
            print(f"- {m}: missing from this Kano, skipped", flush=True)
            rows.append(row)
            continue
        try:
            if m in ONE_CLASS or m == "kanoclip":
                if synth_s is None:
                    step = kano("data", "synth", "--from", fit_dir, "--classes", cls, "--out", synth, "--seed", seed,
                                "--size", spec.side, "--n-defect", args.n_defect, "--force")
                    if step["code"] != 0:
                        raise RuntimeError(f"kano data synth exited with {step['code']}")
                    synth_s = step["wall_s"]
                run = work / "runs" / m
                shutil.rmtree(run, ignore_errors=True)
                if m == "kanoclip":
                    step = kano("train", "--config", config, "--kb", kb, "--data", f"mvtec:{synth}", "--backbone", "micro",
                                "--epochs", args.epochs, "--seed", seed, "--image-size", 96, "--cache", "memory", "--out", run)
                else:
                    step = kano("train", "--method", m, "--data", f"mvtec:{synth}", "--backbone", "micro", "--seed", seed, "--out", run)
                if step["code"] != 0:
                    raise RuntimeError(f"kano train exited with {step['code']}")
                row.update(fit_s=step["wall_s"], synth_s=synth_s, peak_mb_fit=step["peak_mb"])
                row.update(predict(m, "--run", run))
            elif m == "winclip+":
                row.update(predict(m, "--method", "winclip", "--backbone", "micro", "--reference", fit_dir, "--k-shot", args.k_shot))
            else:
                row.update(predict(m, "--method", m))
        except Exception as e:  # one method failing must not stop the others; the row says why
            row["error"] = f"{type(e).__name__}: {e}"
        if "error" in row:
            print(f"- {m}: {row['error']}", flush=True)
        rows.append(row)
        save(rows)
    return rows


# ---------------------------------------------------------------- the table

def _pct(vals: list) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    mean = 100 * sum(vals) / len(vals)
    return f"{mean:.1f}" if len(vals) == 1 else f"{mean:.1f} ({100 * min(vals):.0f}-{100 * max(vals):.0f})"


def _num(vals: list, fmt: str) -> str:
    vals = [v for v in vals if v is not None]
    return format(sum(vals) / len(vals), fmt) if vals else "-"


def tables(rows: list[dict], methods: list[str], sets: list[str]) -> str:
    head = ("| method | image AUROC small | whole | all | pixel AUROC small | whole | all | fit s | img/s | peak MB |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    md = []
    for name in sets + ["mean over sets"]:
        lines = [f"### {name}", "", head]
        for m in methods:
            sel = [r for r in rows if r["method"] == m and (r["set"] == name or (name == "mean over sets" and r["set"] in sets))]
            ok = [r for r in sel if "metrics" in r]
            if not ok:
                why = sel[0].get("error", "not run") if sel else "not run"
                lines.append(f"| {m} | {why} |" + " |" * 9)
                continue
            if name == "mean over sets":  # per seed, the mean over the sets that have the group; then over seeds
                per_seed = {}
                for r in ok:
                    per_seed.setdefault(r["seed"], []).append(r)

                def agg(g: str, key: str) -> list:
                    out = []
                    for rs in per_seed.values():
                        v = [r["metrics"][g][key] for r in rs if r["metrics"][g][key] is not None]
                        out.append(sum(v) / len(v) if v else None)
                    return out
            else:
                def agg(g: str, key: str) -> list:
                    return [r["metrics"][g][key] for r in ok]
            cells = [_pct(agg(g, "image_auroc")) for g in GROUPS] + [_pct(agg(g, "pixel_auroc")) for g in GROUPS]
            peak = [max(r.get("peak_mb_fit") or 0, r.get("peak_mb_predict") or 0) for r in ok]
            cells += [_num([r.get("fit_s") for r in ok], ".1f"), _num([r.get("img_per_s") for r in ok], ".2f"), _num(peak, ".0f")]
            missing = len(sel) - len(ok)
            lines.append(f"| {m}{f' ({missing} failed)' if missing else ''} | " + " | ".join(cells) + " |")
        md.append("\n".join(lines))
    return "\n\n".join(md)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("oneclass_out"))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--sets", default="hazelnut,brick,hazelnut1024", help="of hazelnut, brick, grass, hazelnut1024")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--epochs", type=int, default=2, help="KAnoCLIP's training epochs")
    ap.add_argument("--k-shot", type=int, default=4, help="WinCLIP+'s reference photos (the first K fit photos)")
    ap.add_argument("--n-defect", type=int, default=2, help="`data synth --from`'s images per kind (14 kinds)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every set's photo and defect counts")
    ap.add_argument("--fresh", action="store_true", help="score every method again (default: keep the scored rows of "
                                                          "OUT/results.json for the same set, seed, method and options)")
    ap.add_argument("--table-from", default="", help="comma-separated results.json files: print their rows' tables (for the "
                                                     "--sets and --methods given; a later file's row replaces an earlier "
                                                     "one's), run nothing")
    ap.add_argument("--redo", default="", help="comma-separated methods to score again even when OUT/results.json has them")
    ap.add_argument("--hazelnut", type=Path, default=None, help="the Hazelnut Toy folder (default: ../shared/data/hazelnut_toy, "
                                                                "else tests/data/hazelnut_toy)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    all_sets = default_sets(args.scale)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [s for s in sets if s not in all_sets] + [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"--sets must be of {', '.join(all_sets)} and --methods of {', '.join(METHODS)}, got {', '.join(bad)}")
    if args.table_from:
        latest = {}  # a later file's row replaces an earlier one's for the same set, seed and method
        for f in args.table_from.split(","):
            if not Path(f).is_file():
                raise SystemExit(f"--table-from must name results.json files of this script, got no file {f}")
            latest.update({(r["set"], r["seed"], r["method"]): r for r in json.loads(Path(f).read_text())["rows"]})
        rows = list(latest.values())
        commits = sorted({r.get("kano_commit", "unknown") for r in rows if r["method"] in methods and r["set"] in sets})
        print(tables(rows, methods, sets) + f"\n\nRows from {args.table_from}; Kano commits {', '.join(commits)}.")
        return
    hazel = _hazel_dir(args.hazelnut)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "commands.txt").write_text("")
    kano = Runner(out / "commands.txt")
    have = available_methods()
    kb, config = out / "kb.duckdb", out / "train_config.json"
    if "kanoclip" in methods and "kanoclip" in have:
        from kano.demo import DEMO_MODEL

        config.write_text(json.dumps({"model": DEMO_MODEL}))  # the demo's narrower Bi-CMCI: minutes on two cores
        if not kb.is_file():
            kano("kb", "build", "--classes", ",".join(sorted({all_sets[n].source for n in sets})), "--llm", "builtin", "--kb", kb)
    # rows kept from an earlier run into OUT with the same options (the sets are rebuilt byte for byte from the seed)
    same = ("epochs", "k_shot", "n_defect", "scale")
    kept: dict = {}
    if not args.fresh and (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        if all(old.get("args", {}).get(k) == getattr(args, k) for k in same):
            redo = {m.strip() for m in args.redo.split(",") if m.strip()}
            kept = {(r["set"], r["seed"], r["method"]): r for r in old["rows"] if "metrics" in r and r["method"] not in redo}
    rows: list[dict] = []
    for seed in seeds:
        for name in sets:
            spec = all_sets[name]
            set_dir = out / "sets" / f"seed{seed}" / name
            labels = build_set(spec, seed, set_dir, hazel)
            counts = {}
            for im in labels["images"]:
                counts[im["group"]] = counts.get(im["group"], 0) + 1
            print(f"== {name}, seed {seed}: {spec.side} px, {labels['n_fit']} fit photos, test {counts}", flush=True)
            todo = [m for m in methods if (name, seed, m) not in kept]
            rows += [kept[(name, seed, m)] for m in methods if (name, seed, m) in kept]
            if todo != methods:
                print(f"kept from {out / 'results.json'}: {', '.join(m for m in methods if m not in todo)}", flush=True)
            def save(new: list[dict], before: list[dict] = list(rows)) -> None:
                (out / "results.json").write_text(json.dumps({"hazelnut": str(hazel), "args": vars(args) | {"out": str(out), "hazelnut": str(hazel)},
                                                              "rows": before + new}, indent=1, default=str))
            rows += run_set(kano, spec, seed, labels, set_dir, out / "work" / f"seed{seed}" / name, todo, have, args, kb, config, save)
            save([], rows)
    md = tables(rows, methods, sets)
    took = time.perf_counter() - t0
    footer = (f"\nImage / pixel AUROC in percent: the mean over seeds {args.seeds} (min-max); the 'mean over sets' rows take, per "
              f"seed, the mean over the sets that have the group. fit s: `kano train` wall seconds; img/s: `kano predict` "
              f"(model loading included); peak MB: largest resident set of a command. Hazelnut photos from {hazel}. "
              f"Finished in {took:.0f} s.")
    (out / "table.md").write_text(md + "\n" + footer + "\n")
    print("\n" + md + "\n" + footer)


if __name__ == "__main__":
    main()
