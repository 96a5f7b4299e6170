"""`kano calibrate`: per-class decision thresholds with a guaranteed false-alarm rate (split conformal prediction).

Image threshold. The run scores n normal images of a class that it never trained on (the calibration set).
With the alarm rate A, let k = ceil((n + 1)(1 - A)) and t = the k-th smallest of the n scores (1-based). An
image is called anomalous when its score is > t. If a new normal image and the calibration images are
exchangeable (drawn alike), its score is at most the k-th smallest of the n + 1 scores with probability at
least k / (n + 1) >= 1 - A, whatever the model and the score distribution, ties included; so the false-alarm
rate on new normal images is at most A (Vovk et al., "Algorithmic Learning in a Random World", 2005; Angelopoulos
and Bates, "A Gentle Introduction to Conformal Prediction", 2021, section 1 and appendix D). It needs k <= n,
i.e. n >= 1/A - 1 images. Kano decides "anomalous when score >= threshold" everywhere, so the threshold stored is
the smallest float above t: a score equal to t counts as normal, as the guarantee requires.

Pixel threshold. The same rank k over the n images' map maxima: a new normal image has any pixel at or above
it with probability at most A. Since the share of an image's pixels marked is at most 1 when any is and 0
otherwise, the expected share of normal pixels marked is at most A as well (a conservative bound: usually far
lower).

RUN/calibration.json (never a change to the weights):
    {"format": 1, "run_weights_sha256": the digest config.json records, "alarm_rate": A, "created": ISO date,
     "source": "kano calibrate" or "holdout" (`kano train --holdout`),
     "classes": {CLASS: {"image_threshold": float, "pixel_threshold": float, "n": n, "rank": k,
                         "data_sha256": digest of the sorted file names and bytes, "class_word": the prompt word}}}
Calibrating again with the same alarm rate keeps the other classes; another alarm rate starts the file anew.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from kano.core.errors import KanoError

CALIBRATION_FILE = "calibration.json"
FORMAT = 1


def check_alarm_rate(alarm_rate: float) -> float:
    if isinstance(alarm_rate, bool) or not isinstance(alarm_rate, (int, float)) or not 0.0 < float(alarm_rate) < 1.0:
        raise KanoError(f"--alarm-rate must be a number in (0, 1), the share of normal images you accept to flag "
                        f"(e.g. 0.05), got {alarm_rate}")
    return float(alarm_rate)


def images_needed(alarm_rate: float) -> int:
    """The fewest calibration images for alarm rate A: the smallest n with n >= 1/A - 1."""
    a = check_alarm_rate(alarm_rate)
    return max(1, math.ceil(1.0 / a - 1.0 - 1e-9))


def conformal_rank(n: int, alarm_rate: float) -> int:
    """k = ceil((n + 1)(1 - A)), 1-based; KanoError when k > n (too few images for A)."""
    a = check_alarm_rate(alarm_rate)
    k = math.ceil((n + 1) * (1.0 - a) - 1e-9)  # 1e-9: (n+1)(1-A) is a whole number in exact arithmetic, e.g. 10 * 0.8
    if n < 1 or k > n:
        raise KanoError(f"calibration needs at least {images_needed(a)} normal images for --alarm-rate {a:g} "
                        f"(n >= 1/A - 1), got {n}; add images or raise the alarm rate (with {n} images: A >= "
                        f"{1.0 / (n + 1) if n >= 1 else 1:.3g})")
    return k


def conformal_threshold(scores, alarm_rate: float) -> tuple[float, float, int]:
    """-> (threshold, t, k): t the k-th smallest score, threshold the smallest float above t (decide `>=`)."""
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if not np.isfinite(s).all():
        raise KanoError(f"calibration scores must be finite numbers, got {int((~np.isfinite(s)).sum())} NaN or inf")
    k = conformal_rank(len(s), alarm_rate)
    t = float(s[k - 1])
    return float(np.nextafter(t, np.inf)), t, k


def data_sha256(files: list[Path]) -> str:
    """sha256 over the files sorted by name: each name, a NUL, its bytes' sha256."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda p: (Path(p).name, str(p))):
        h.update(Path(f).name.encode() + b"\0" + hashlib.sha256(Path(f).read_bytes()).digest())
    return h.hexdigest()


def run_digest(run_dir: str | os.PathLike) -> str:
    """The weights' digest the run's config.json records (`kano train` writes it)."""
    from kano.kanoclip.runs import read_config

    cfg = read_config(Path(run_dir))
    ranks = cfg.get("ranks")
    first = ranks[0] if isinstance(ranks, list) and ranks else None
    digest = first.get("weights_sha256") if isinstance(first, dict) else None
    if not isinstance(digest, str):
        raise KanoError(f"{Path(run_dir) / 'config.json'} must record the weights' digest (ranks[0].weights_sha256, written "
                        f"by a finished `kano train`), got none: finish or repeat the training")
    return digest


def load_calibration(run_dir: str | os.PathLike) -> dict | None:
    """RUN/calibration.json, checked (format, and made for this run's weights), or None when the run has none."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        cal = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KanoError(f"{path} must be the JSON file `kano calibrate` writes, got an unreadable file ({exc})") from None
    if not isinstance(cal, dict) or cal.get("format") != FORMAT or not isinstance(cal.get("classes"), dict):
        raise KanoError(f"{path} must be a calibration of format {FORMAT} with a \"classes\" object (as `kano calibrate` "
                        f"writes it), got {'format ' + repr(cal.get('format')) if isinstance(cal, dict) else type(cal).__name__}")
    want = run_digest(run_dir)
    if cal.get("run_weights_sha256") != want:
        raise KanoError(f"{path} must be made for this run's weights (sha256 {want[:16]}...), got a calibration made for "
                        f"{str(cal.get('run_weights_sha256'))[:16]}... (another run, or weights trained again): "
                        f"run `kano calibrate --run {run_dir} ...` again")
    for cls, entry in cal["classes"].items():
        for key in ("image_threshold", "pixel_threshold"):
            v = entry.get(key) if isinstance(entry, dict) else None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise KanoError(f"{path}: classes.{cls}.{key} must be a number, got {v!r}")
    return cal


def calibrated_threshold(run_dir: str | os.PathLike, class_name: str, weights_sha256: str | None = None, *,
                         required: bool = False) -> float | None:
    """The class's calibrated image threshold, or None when the run has no calibration (or, unless `required`,
    none for this class). required=True: a class missing from an existing calibration is an error.
    weights_sha256: the digest of the weights in use, when the caller holds them (checked as well)."""
    cal = load_calibration(run_dir)
    if cal is None:
        return None
    if weights_sha256 is not None and cal["run_weights_sha256"] != weights_sha256:
        raise KanoError(f"{Path(run_dir) / CALIBRATION_FILE} must be made for the weights in use (sha256 {weights_sha256[:16]}...), "
                        f"got a calibration made for {str(cal['run_weights_sha256'])[:16]}...: run `kano calibrate` again")
    entry = cal["classes"].get(class_name)
    if entry is None:
        if required:
            raise KanoError(f"class must be one of the classes calibrated in {Path(run_dir) / CALIBRATION_FILE} "
                            f"({', '.join(sorted(cal['classes'])) or 'none'}), got {class_name!r}: run `kano calibrate --run "
                            f"{run_dir} --normal {class_name}=DIR ...` or pass --threshold")
        return None
    return float(entry["image_threshold"])


def _held_out(run_dir: Path) -> list[str]:
    """The photos a one-class run kept out of its fit (`kano train --holdout`; config.json "holdout"): part of its
    training folder, never fitted on."""
    from kano.kanoclip.runs import read_config

    h = read_config(run_dir).get("holdout")
    return [str(f) for f in h.get("files", [])] if isinstance(h, dict) else []


def _training_overlap(run_dir: Path, files: list[Path]) -> list[tuple[Path, str]]:
    """Calibration files whose bytes equal a file of the run's training data (when that data is still there)."""
    from kano.anomaly_data import load_dataset
    from kano.kanoclip.runs import read_config

    cfg = read_config(run_dir)
    spec = cfg.get("data")
    try:
        ds = load_dataset(str(spec), missing_masks="ignore")
        if cfg.get("kind") == "one-class":  # fitted on train/good only: the dataset's test photos were never seen
            train_files = [Path(s.image_path) for s in ds.samples("train", cfg.get("train_classes")) if s.label == 0]
        else:
            train_files = [Path(s.image_path) for s in ds.samples(split=None)]
    except Exception:  # training data moved or gone: nothing to compare with
        return []
    sizes: dict[int, list[Path]] = {}
    for f in files:
        sizes.setdefault(f.stat().st_size, []).append(f)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    mine = {digest(f): f for group in sizes.values() for f in group}
    hits = []
    for t in train_files:
        if t.is_file() and t.stat().st_size in sizes and (d := digest(t)) in mine:
            hits.append((mine[d], str(t)))
    return hits


def calibrate(run_dir: str | os.PathLike, normal: dict[str, list[Path]], alarm_rate: float, *, batch_size: int = 8,
              device=None, workers: int = 0, progress: Callable | None = None, log: Callable[[str], None] = lambda s: None,
              out: str | os.PathLike | None = None, source: str = "kano calibrate") -> dict:
    """Score each class's normal images with the run, write RUN/calibration.json; returns the written calibration.
    out: an optional folder for calibration_scores.csv (each image's score and map maximum). source: what made the
    calibration, recorded in the file ("holdout": `kano train --holdout`, on the photos the run kept out of its fit)."""
    from kano.anomaly_data import Sample, prompt_name
    from kano.evaluator.evaluate import run_inference
    from kano.evaluator.loading import load_model
    from kano.core.device import resolve_device

    a = check_alarm_rate(alarm_rate)
    run_dir = Path(run_dir)
    if not normal:
        raise KanoError("--normal must be given at least once as CLASS=DIR (normal images of that class), got none")
    for cls, files in normal.items():
        conformal_rank(len(files), a)  # too few images: refused before any scoring
    digest = run_digest(run_dir)
    held_out = set(_held_out(run_dir))
    for f, t in _training_overlap(run_dir, [f for fs in normal.values() for f in fs if str(f) not in held_out]):
        raise KanoError(f"calibration image {f} must be one the run never trained on, got the same bytes as its training "
                        f"image {t}: hold normal images out of training for calibration")
    dev = resolve_device(device)
    model, info = load_model(str(run_dir), None, None, dev)
    classes, rows = {}, []
    for cls, files in normal.items():
        word = info["prompt_names"].get(cls) or prompt_name(cls)
        samples = [Sample(str(Path(f).resolve()), None, cls, "good", 0) for f in files]
        advance, close = progress(len(samples)) if progress else (lambda k: None, lambda: None)
        try:
            scores, maps, _ = run_inference(model, samples, [word] * len(samples), batch_size, dev, workers, advance)
        finally:
            close()
        s = scores.double().numpy()
        peaks = maps.flatten(1).amax(dim=1).double().numpy()
        thr, t, k = conformal_threshold(s, a)
        pthr, _, _ = conformal_threshold(peaks, a)
        # scores lie in [0, 1] and a threshold above 1 is refused downstream: when t is 1.0 itself, 1.0 is kept
        classes[cls] = {"image_threshold": min(thr, 1.0), "pixel_threshold": min(pthr, 1.0), "n": len(files),
                        "rank": k, "data_sha256": data_sha256(files), "class_word": word}
        rows += [(cls, Path(f).name, float(v), float(p)) for f, v, p in zip(files, s, peaks)]
        log(f"{cls}: n={len(files)}, rank k={k}: image threshold {thr:.6f} (score {t:.6f} and below is normal), "
            f"pixel threshold {pthr:.4g}, class word {word!r}")
    old = _previous(run_dir, a, log)
    cal = {"format": FORMAT, "run_weights_sha256": digest, "alarm_rate": a, "source": source,
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "classes": {**old, **classes}}
    _write_json(run_dir / CALIBRATION_FILE, cal)
    if out is not None:
        _write_scores(Path(out), rows, cal)
    return cal


def _previous(run_dir: Path, alarm_rate: float, log: Callable[[str], None]) -> dict:
    """Classes of an earlier calibration to keep: those of the same run and alarm rate."""
    try:
        old = load_calibration(run_dir)
    except KanoError as exc:
        log(f"replacing {run_dir / CALIBRATION_FILE}: {exc}")
        return {}
    if old is None:
        return {}
    if old.get("alarm_rate") != alarm_rate:
        if old["classes"]:
            log(f"replacing the calibration at alarm rate {old.get('alarm_rate')} (classes {', '.join(sorted(old['classes']))})")
        return {}
    return dict(old["classes"])


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        raise KanoError(f"{path} must be writable (the run folder), got {exc.strerror or exc}") from None


def _write_scores(out: Path, rows: list[tuple], cal: dict) -> None:
    import csv

    from .outputs import inside

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KanoError(f"--out {out} must be a folder that can be created, got {exc.strerror or exc}") from None
    with open(inside(out, out / "calibration_scores.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", "image", "score", "map_max"])
        w.writerows(rows)
    _write_json(inside(out, out / CALIBRATION_FILE), cal)
