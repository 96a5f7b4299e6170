"""`kano train --method NAME` for a one-class method (kanoclip/one_class.py): read the normal photos of a dataset's
train/good, hold some back (`holdout`), fit, save the run in the run format (weights.safetensors = the fitted
tensors, config.json), no knowledge base, no masks, no epochs.

What the fit may read besides the normal photos: the synthetic defects that `kano data synth --from` wrote (the
class folder then holds defects.json), to choose among the method's own variants. A dataset without defects.json
is a dataset of real photos, and its test split is never read.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from kano.anomaly_data import Sample, SampleDataset, image_size, load_dataset, raise_batch_errors
from kano.core.curves import f1_threshold
from kano.core.device import resolve_device
from kano.core.errors import KanoError
from kano.core.files import read_manifest

from . import checkpoint as ckpt
from .config import TrainConfig

SYNTH_RECORD = "defects.json"  # written by `kano data synth --from` (anomaly_data/photo_defects.py)
MAX_SIDE = 1024                # the largest working side chosen by default (memory: maps of S x S per image)


def working_size(files: list[str], given: int | None, cls) -> int:
    """The side S the photos are scored at: `given`, else the class's `choose_image_size(sides)` when it has one
    (Kano's oneclass: the photos' native long side), else its default_image_size."""
    if given is not None:
        return given
    chooser = getattr(cls, "choose_image_size", None)
    if chooser is None:
        return int(getattr(cls, "default_image_size", 256))
    sides = [max(image_size(f)) for f in files]
    return int(chooser(sides, MAX_SIDE))


def split_holdout(files: list[str], fraction: float | None, seed: int) -> tuple[list[str], list[str]]:
    """-> (files to fit on, files held back): a seeded random `fraction` of the photos (rounded down, at least 1)."""
    if not fraction:
        return list(files), []
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(files), generator=g).tolist()
    k = max(1, int(math.floor(len(files) * fraction)))
    held = sorted(order[:k])
    return [f for i, f in enumerate(files) if i not in set(held)], [files[i] for i in held]


def _batches(samples: list[Sample], size: int, mean, std, batch_size: int):
    ds = SampleDataset(samples, size, mean, std, mask_size=8)
    for a in range(0, len(ds), batch_size):
        items = [ds[i] for i in range(a, min(a + batch_size, len(ds)))]
        raise_batch_errors({"error": [b["error"] for b in items]})
        yield torch.stack([b["image"] for b in items]), torch.arange(a, a + len(items))


def synthetic_validation(root: Path, cls: str, samples: list[Sample], fit_files: list[str]) -> tuple[list[Sample], list[int]] | None:
    """The synthetic defects of `data synth --from` (test split, kinds other than good) and, for each, the index in
    `fit_files` of the photo it was drawn on (-1: a held-back photo, or unknown). None without defects.json."""
    record = root / cls / SYNTH_RECORD
    if not record.is_file():
        return None
    try:
        rows = json.loads(record.read_text()).get("defects", [])
    except (OSError, ValueError, AttributeError) as exc:
        raise KanoError(f"{record} must be the JSON `kano data synth --from` writes, got an unreadable file ({exc})") from None
    source = {str((root / cls / r["image"]).resolve()): r.get("source", "") for r in rows if isinstance(r, dict) and "image" in r}
    by_name = {Path(f).name: i for i, f in enumerate(fit_files)}  # test/good/NNN.png is train/good/NNN.png
    defects = [s for s in samples if s.label == 1]
    src = [by_name.get(Path(source.get(str(Path(s.image_path).resolve()), "")).name, -1) for s in defects]
    return defects, src


def fit_run(cfg: TrainConfig, *, holdout: float | None = None, min_holdout: int = 0, log: Callable[[str], None] = print,
            progress: Callable | None = None) -> dict:
    """Fit cfg.method on the normal photos of cfg.data's train/good and save the run into cfg.out.

    holdout: the fraction of the photos kept out of the fit (for the caller's calibration; their paths are
    recorded in config.json as "holdout"); min_holdout: the fewest photos that calibration needs (checked before
    anything is fitted). Returns {run_dir, threshold, holdout_files: {class: [paths]}, fit: what the method recorded,
    seconds}."""
    from kano.kanoclip.registry import build_one_class

    t0 = time.perf_counter()
    run_dir = Path(cfg.out)
    if run_dir.exists() and not run_dir.is_dir():
        raise KanoError(f"--out must be a directory (a new one), got an existing file {run_dir}")
    if read_manifest(run_dir) is not None or (run_dir / ckpt.CONFIG).is_file():
        raise KanoError(f"--out {run_dir} must be a new folder, got one that holds a run or results; pass another --out")
    dataset = load_dataset(cfg.data, missing_masks="ignore")
    classes = cfg.classes or list(dataset.classes)
    if len(classes) != 1:
        raise KanoError(f"--method {cfg.method} fits one product per run: --data must hold one class or --classes must "
                        f"name one, got {len(classes)} ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    cls = classes[0]
    good = sorted((s for s in dataset.samples("train", [cls]) if s.label == 0), key=lambda s: s.image_path)
    if not good:
        raise KanoError(f"--data {cfg.data} must hold normal photos in {cls}/train/good (a one-class method learns from "
                        f"them; `kano data synth --from PHOTOS` makes that layout), got none")
    files = [s.image_path for s in good]
    fit_files, held = split_holdout(files, holdout, cfg.seed)
    if holdout and len(held) < min_holdout:
        raise KanoError(f"--holdout {holdout:g} of {len(files)} photos must hold back at least {min_holdout} photos for "
                        f"calibration at the chosen alarm rate, got {len(held)}; raise --holdout, add photos or raise --alarm-rate")
    if len(fit_files) < 4:
        raise KanoError(f"--method {cfg.method} needs at least 4 normal photos to fit on (after --holdout), got {len(fit_files)} "
                        f"in {cls}/train/good")
    device = resolve_device(cfg.device)
    from kano.kanoclip.registry import METHODS, resolve

    model_cls = resolve(METHODS[cfg.method].model)
    size = working_size(fit_files, cfg.image_size, model_cls)
    torch.manual_seed(cfg.seed)
    model = build_one_class(cfg.method, cfg.backbone, cfg.model, size, device, stages=cfg.stages)
    bb = model.backbone
    fit_samples = [Sample(f, None, cls, "good", 0, "train") for f in fit_files]
    test = dataset.samples("test", [cls])
    val = synthetic_validation(Path(dataset.root), cls, test, fit_files)

    def good_batches():
        return _batches(fit_samples, size, bb.mean, bb.std, cfg.batch_size)

    def validation():
        if val is None:
            return None
        defects, src = val

        def it():
            for x, idx in _batches(defects, size, bb.mean, bb.std, cfg.batch_size):
                yield (x, torch.ones(len(idx)), [defects[i].defect for i in idx.tolist()],
                       torch.tensor([src[i] for i in idx.tolist()], dtype=torch.long))
        return it()

    from kano.kanoclip.one_class import FitData

    log(f"fitting {cfg.method} on {len(fit_files)} normal photos of {cls} at {size} px"
        + (f" ({len(held)} held back for calibration)" if held else "")
        + (f"; choosing among its variants on {len(val[0])} synthetic defects ({SYNTH_RECORD})" if val else
           "; no synthetic defects (no defects.json): the default variant, and the test split is not read"))
    data = FitData(files=fit_files, good=good_batches, validation=validation, log=log, progress=progress, seed=cfg.seed)
    with torch.no_grad():
        fit_info = model.fit(data)
    model.eval()
    threshold = _threshold(model, fit_info)
    state = model.trainable_state_dict()
    digest = ckpt.weights_digest(state)
    sides = [image_size(f) for f in fit_files[:200]]
    config = {
        "kano_version": ckpt.library_versions()["kano"], "backbone": cfg.backbone, "image_size": size,
        "stages": model.encoder.stages if model.encoder is not None else None, "vv_start": None, "pos_resize": None,
        "method": cfg.method, "kind": "one-class", "model": model.cfg.to_dict(), "model_used": model.describe(),
        "train": cfg.to_dict(), "kb": None, "train_classes": [cls], "prompt_names": {cls: cls}, "data": cfg.data,
        "n_samples": len(fit_files), "fit_photos": {"n": len(fit_files), "median_size": [statistics.median(w for w, _ in sides),
                                                                                       statistics.median(h for _, h in sides)]},
        "holdout": {"fraction": holdout, "files": held} if holdout else None,
        "fit": fit_info, "git_commit": ckpt.git_commit(), "seed": cfg.seed, "versions": ckpt.library_versions(),
        "world_size": 1, "threshold": threshold,
        "threshold_source": "F1-best on the synthetic defects (out-of-fold scores)" if threshold is not None else None,
        "status": "finished", "ranks": [{"rank": 0, "weights_sha256": digest}], "seconds": round(time.perf_counter() - t0, 2)}
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save_weights(run_dir / ckpt.WEIGHTS, state)
    ckpt.save_config(run_dir, config)
    return {"run_dir": str(run_dir), "threshold": threshold, "holdout_files": {cls: held} if held else {},
            "fit": fit_info, "seconds": config["seconds"], "image_size": size, "class": cls}


def _threshold(model, fit_info: dict) -> float | None:
    """The F1-best image threshold over the method's own validation scores (synthetic defects and out-of-fold normal
    photos), when it recorded them; else None (calibrate with `kano calibrate`)."""
    v = fit_info.get("validation_scores") if isinstance(fit_info, dict) else None
    if not v or not v.get("labels") or len(set(v["labels"])) < 2:
        return None
    return float(f1_threshold(torch.tensor(v["labels"], dtype=torch.float32), torch.tensor(v["scores"], dtype=torch.float32)))
