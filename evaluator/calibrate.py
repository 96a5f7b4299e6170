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

The calibration is keyed by the scoring mode it was made for (`scoring_mode`): the method, its backbone and the
digest of the weights in use (a run's trained weights, else the backbone's parameters), the digest of the
reference images and K (few-shot), the input size, and per class the prompt word. Scores of another mode live
on another scale, so a calibration is only ever used for the mode it names: any other is refused, naming the
field that differs (`check_mode`), never reused.

Where it lives: RUN/calibration.json for a trained run scored as it is (no references); any other mode (few-shot
on a run, a method on a backbone, a zero-parameter floor) writes the file you name (`--calibration FILE`) and
reads it back with the same option (predict, eval, the API, export, serve).

The file (never a change to the weights):
    {"format": 2, "mode": {"method", "backbone", "weights_sha256", "references_sha256", "k_shot", "image_size"},
     "alarm_rate": A, "source": "kano calibrate" or "holdout" (`kano train --holdout`), "created": ISO date,
     "classes": {CLASS: {"image_threshold": float, "pixel_threshold": float, "n": n, "rank": k,
                         "data_sha256": digest of the sorted file names and bytes, "class_word": the prompt word}}}
A format-1 file (a run's, keyed by its weights alone) is read as the run's own mode.
Calibrating again with the same alarm rate and mode keeps the other classes; otherwise the file starts anew.
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
FORMAT = 2
MODE_FIELDS = ("method", "backbone", "weights_sha256", "references_sha256", "k_shot", "image_size")


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


def module_sha256(module) -> str | None:
    """sha256 over a module's parameters and buffers (sorted names, dtype, shape, bytes); None when it has none.
    Cached on the module: the backbones are frozen."""
    import torch

    if not isinstance(module, torch.nn.Module):
        return None
    cached = getattr(module, "_kano_weights_sha256", None)
    if cached is not None:
        return cached
    state = module.state_dict()
    if not state:
        return None
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    object.__setattr__(module, "_kano_weights_sha256", digest)
    return digest


def _reference_files(refs) -> list[str]:
    if isinstance(refs, dict):  # per class (eval's train split): every class's files
        return sorted({f for fs in refs.values() for f in fs})
    return sorted(refs or [])


def scoring_mode(method: dict, model, weights_sha256: str | None = None) -> dict:
    """The key a calibration is made for (MODE_FIELDS). method: the provenance description (evaluator.report,
    evaluator.methods); model: what scores (its .backbone: image size, and, without a run, the weights digested);
    weights_sha256: a trained run's weights digest (config.json), None for methods without training."""
    name = str(method.get("method") or method.get("name") or "").lower().rstrip("+")
    bb = getattr(model, "backbone", None)
    refs = _reference_files(method.get("references"))
    return {"method": name, "backbone": method.get("backbone"),
            "weights_sha256": weights_sha256 or module_sha256(bb),
            "references_sha256": data_sha256([Path(f) for f in refs]) if refs else None,
            "k_shot": int(method.get("k_shot") or 0), "image_size": getattr(bb, "image_size", None)}


def _short(v) -> str:
    return "none" if v is None else (v[:16] + "..." if isinstance(v, str) and len(v) == 64 else repr(v))


def check_mode(path: Path, made_for: dict, mode: dict) -> None:
    """KanoError naming every field where the calibration's mode differs from the one in use."""
    diff = [k for k in MODE_FIELDS if k in made_for and made_for.get(k) != mode.get(k)]
    if diff:
        what = "; ".join(f"{k} {_short(made_for.get(k))} there, {_short(mode.get(k))} here" for k in diff)
        raise KanoError(f"{path} must be a calibration of the scoring mode in use, got one made for another mode ({what}): "
                        f"its thresholds are on another scale; calibrate this mode (`kano calibrate` with the same --run/"
                        f"--backbone/--method/--reference/--k-shot and --calibration FILE, then pass --calibration FILE), "
                        f"or give --threshold")


def read_calibration(path: str | os.PathLike, run_digest_: str | None = None) -> dict:
    """A calibration file, checked for form; a format-1 file (a run's) gets the mode of the run's own scoring
    (its weights digest, no references). KanoError when unreadable."""
    path = Path(path)
    if not path.is_file():
        raise KanoError(f"--calibration must be a calibration file (`kano calibrate ... --calibration FILE` writes it), "
                        f"got {path}, {'a folder' if path.is_dir() else 'no such file'}")
    try:
        cal = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KanoError(f"{path} must be the JSON file `kano calibrate` writes, got an unreadable file ({exc})") from None
    fmt = cal.get("format") if isinstance(cal, dict) else None
    if not isinstance(cal, dict) or fmt not in (1, FORMAT) or not isinstance(cal.get("classes"), dict) \
            or (fmt == FORMAT and not isinstance(cal.get("mode"), dict)):
        raise KanoError(f"{path} must be a calibration of format {FORMAT} with a \"mode\" and a \"classes\" object (as "
                        f"`kano calibrate` writes it), got {'format ' + repr(fmt) if isinstance(cal, dict) else type(cal).__name__}")
    if fmt == 1:
        cal = {**cal, "format": FORMAT,
               "mode": {"weights_sha256": cal.get("run_weights_sha256"), "references_sha256": None, "k_shot": 0}}
    for cls, entry in cal["classes"].items():
        for key in ("image_threshold", "pixel_threshold"):
            v = entry.get(key) if isinstance(entry, dict) else None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise KanoError(f"{path}: classes.{cls}.{key} must be a number, got {v!r}")
    return cal


def load_calibration(run_dir: str | os.PathLike) -> dict | None:
    """RUN/calibration.json, checked for form and made for this run's weights, or None when the run has none."""
    path = Path(run_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    cal = read_calibration(path)
    want = run_digest(run_dir)
    if cal["mode"].get("weights_sha256") != want:
        raise KanoError(f"{path} must be made for this run's weights (sha256 {want[:16]}...), got a calibration made for "
                        f"{str(cal['mode'].get('weights_sha256'))[:16]}... (another run, or weights trained again): "
                        f"run `kano calibrate --run {run_dir} ...` again")
    return cal


def calibration_entry(path: Path, cal: dict, mode: dict, class_name: str, word: str | None, *, required: bool = True) -> dict | None:
    """The class's entry of a calibration checked against the mode in use and the class word: a calibration of
    another mode or word is refused by name; a class it lacks is an error when `required`, else None."""
    check_mode(path, cal["mode"], mode)
    entry = cal["classes"].get(class_name)
    if entry is None:
        if required:
            from kano.anomaly_data.names import closest, known_words

            where = (f"class must be one of the classes calibrated in {path} "
                     f"({', '.join(sorted(cal['classes'])) or 'none'}), got {class_name!r}")
            if (meant := closest(class_name, cal["classes"])) is not None:  # a misspelling of a calibrated class
                raise KanoError(f"{where}: did you mean {meant!r}? Pass --class {meant} (or --threshold)")
            fixed = closest(class_name, known_words()) or class_name  # advice carries the corrected name, never the typo
            fixed = fixed.replace(" ", "_")
            hint = f" (did you mean {fixed!r}?)" if fixed != class_name else ""
            raise KanoError(f"{where}{hint}: run `kano calibrate --normal {fixed}=DIR ...` for this mode, or pass --threshold")
        return None
    made = entry.get("class_word")
    if word is not None and made is not None and made != word:
        raise KanoError(f"{path} must be a calibration of the scoring mode in use, got one made for another mode (class_word "
                        f"{made!r} there, {word!r} here for class {class_name}): calibrate with this --class-word, or give "
                        f"the word it was made with")
    return entry


def calibrated_threshold(run_dir: str | os.PathLike, class_name: str, weights_sha256: str | None = None, *,
                         required: bool = False) -> float | None:
    """The class's calibrated image threshold in RUN/calibration.json, or None when the run has none (or,
    unless `required`, none for this class); weights_sha256: the digest of the weights in use (checked)."""
    cal = load_calibration(run_dir)
    if cal is None:
        return None
    mode = {"weights_sha256": weights_sha256 or cal["mode"].get("weights_sha256")}
    entry = calibration_entry(Path(run_dir) / CALIBRATION_FILE, {**cal, "mode": {"weights_sha256": cal["mode"].get("weights_sha256")}},
                              mode, class_name, None, required=required)
    return None if entry is None else float(entry["image_threshold"])


def _held_out(run_dir: Path) -> list[str]:
    """The photos a one-class run kept out of its fit (`kano train --holdout`; config.json "holdout")."""
    from kano.kanoclip.runs import read_config

    h = read_config(run_dir).get("holdout")
    return [str(f) for f in h.get("files", [])] if isinstance(h, dict) else []


def _training_overlap(run_dir: Path, files: list[Path]) -> list[tuple[Path, Path]]:
    """Calibration files whose decoded pixels equal a normal image of the run's training data (evaluator.overlap),
    when that data is still there."""
    from kano.anomaly_data import load_dataset
    from kano.kanoclip.runs import read_config

    from .overlap import training_overlap

    cfg = read_config(run_dir)
    spec = cfg.get("data")
    try:
        ds = load_dataset(str(spec), missing_masks="ignore")
        if cfg.get("kind") == "one-class":  # fitted on train/good only: the dataset's test photos were never seen
            train_files = [Path(s.image_path) for s in ds.samples("train", cfg.get("train_classes")) if s.label == 0]
        else:
            train_files = [Path(s.image_path) for s in ds.samples(split=None) if s.label == 0]
    except Exception:  # training data moved or gone: nothing to compare with
        return []
    return training_overlap(train_files, files)


def calibrate(run_dir: str | os.PathLike, normal: dict[str, list[Path]], alarm_rate: float, *, batch_size: int = 8,
              device=None, workers: int = 0, progress: Callable | None = None, log: Callable[[str], None] = lambda s: None,
              out: str | os.PathLike | None = None, warn: Callable[[str], None] | None = None, strict: bool = False,
              source: str = "kano calibrate") -> dict:
    """A trained run scored as it is: RUN/calibration.json (calibrate_detector with Detector.load). source: what made
    the calibration, recorded in the file ("holdout": `kano train --holdout`, on the photos the run kept out of its fit)."""
    from kano.evaluator.detector import Detector

    det = Detector.load(run_dir, device=device, batch_size=batch_size)
    return calibrate_detector(det, normal, alarm_rate, None, workers=workers, progress=progress, log=log, out=out, warn=warn,
                              strict=strict, source=source)


def default_destination(det) -> Path | None:
    """Where a calibration goes without --calibration: RUN/calibration.json for a run scored as it is, else none."""
    if det.run_dir is not None and det.references is None:
        return det.run_dir / CALIBRATION_FILE
    return None


def calibrate_detector(det, normal: dict[str, list[Path]], alarm_rate: float, dest: str | os.PathLike | None, *,
                       class_words: dict[str, str] | None = None, workers: int = 0, progress: Callable | None = None,
                       log: Callable[[str], None] = lambda s: None, out: str | os.PathLike | None = None,
                       warn: Callable[[str], None] | None = None, strict: bool = False, source: str = "kano calibrate") -> dict:
    """Score each class's normal images with the detector (kano.api.Detector: whatever `kano predict` runs) and
    write the calibration of its scoring mode to `dest` (None: default_destination). Returns the calibration.
    class_words: class -> prompt word (default: the detector's rule); out: an optional folder for
    calibration_scores.csv (each image's score and map maximum) and a copy of the calibration. warn: where
    warnings go (default: standard error). strict: an unreadable image is an error; otherwise it is named, counted
    and left out (n counts the images scored)."""
    from kano.anomaly_data import Sample

    a = check_alarm_rate(alarm_rate)
    if warn is None:
        from kano.core import ui

        warn = lambda s: ui.err.print(s, markup=False)  # noqa: E731
    if not normal:
        raise KanoError("--normal must be given at least once as CLASS=DIR (normal images of that class), got none")
    for cls, files in normal.items():
        conformal_rank(len(files), a)  # too few images: refused before any scoring
    dest = Path(dest) if dest is not None else default_destination(det)
    if dest is None:
        what = "few-shot on a run (--reference)" if det.run_dir is not None else f"{det.method.get('name')} without a run folder"
        raise KanoError(f"--calibration FILE must name where to write the calibration of this scoring mode ({what}), got none: "
                        f"only a run scored as it is keeps its calibration in the run folder; pass the same --calibration "
                        f"FILE to predict, eval, export and serve")
    if dest.is_dir():
        raise KanoError(f"--calibration must be a file to write (e.g. {dest / 'calibration.json'}), got the folder {dest}")
    if det.run_dir is not None:
        held_out = set(_held_out(det.run_dir))  # a one-class run's --holdout photos: in its folder, never fitted on
        if hits := _training_overlap(det.run_dir, [f for fs in normal.values() for f in fs if str(f) not in held_out]):
            from .overlap import overlap_message

            raise KanoError(overlap_message(hits))
    mode = det.mode()
    classes, rows = {}, []
    for cls, files in normal.items():
        word = det.class_word(cls, (class_words or {}).get(cls))
        if (msg := det.word_warning(word)) is not None:
            warn(f"warning: --normal {cls}=...: {msg}")  # the same rule as predict: a typo here becomes a class of its own
        det.begin_class(cls, word)
        samples = [Sample(str(Path(f).resolve()), None, cls, "good", 0) for f in files]
        advance, close = progress(len(samples)) if progress else (lambda k: None, lambda: None)
        kept, det.workers = det.workers, workers  # calibrate's own --workers, for this scoring only
        try:
            errors: dict[int, str] | None = None if strict else {}
            scores, maps, _ = det.score_samples(samples, [word] * len(samples), det.batch_size, advance, errors)
        finally:
            det.workers = kept
            close()
        if errors:  # as eval and predict: an unreadable photo is named, counted and left out; --strict stops instead
            for _, e in sorted(errors.items()):
                warn(f"not scored (left out of the calibration): {e}")
            warn(f"{len(errors)} unreadable image(s) of {cls} skipped; --strict makes this an error")
            keep = [i for i in range(len(files)) if i not in errors]
            files, scores, maps = [files[i] for i in keep], scores[keep], maps[keep]
        s = scores.double().numpy()
        peaks = maps.flatten(1).amax(dim=1).double().numpy()
        thr, t, k = conformal_threshold(s, a)
        pthr, _, _ = conformal_threshold(peaks, a)
        # scores lie in [0, 1] and a threshold above 1 is refused downstream: when t is 1.0 itself, 1.0 is kept
        classes[cls] = {"image_threshold": min(thr, 1.0), "pixel_threshold": min(pthr, 1.0), "n": len(files),
                        "rank": k, "data_sha256": data_sha256(files), "class_word": word}
        rows += [(cls, Path(f).name, float(v), float(p)) for f, v, p in zip(files, s, peaks)]
        log(f"{cls}: n={len(files)}, rank k={k}: image threshold {thr:.6g} (score {t:.6g} and below is normal), "
            f"pixel threshold {pthr:.4g}, class word {word!r}")
    old = _previous(dest, mode, a, log)
    cal = {"format": FORMAT, "mode": mode, "alarm_rate": a, "source": source,
           "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "classes": {**old, **classes}}
    _write_json(dest, cal)
    if out is not None:
        _write_scores(Path(out), rows, cal)
    return cal


def _previous(dest: Path, mode: dict, alarm_rate: float, log: Callable[[str], None]) -> dict:
    """Classes of an earlier calibration in `dest` to keep: those of the same mode and alarm rate."""
    if not dest.is_file():
        return {}
    try:
        old = read_calibration(dest)
        check_mode(dest, old["mode"], mode)
    except KanoError as exc:
        log(f"replacing {dest}: {exc}")
        return {}
    if old.get("alarm_rate") != alarm_rate:
        if old["classes"]:
            log(f"replacing the calibration at alarm rate {old.get('alarm_rate')} (classes {', '.join(sorted(old['classes']))})")
        return {}
    return dict(old["classes"])


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        raise KanoError(f"{path} must be writable, got {exc.strerror or exc}") from None


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
