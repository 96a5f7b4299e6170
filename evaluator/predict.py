"""`kano predict`: score new images. Per image: a decision, a labelled panel, the raw map, a JSON line.

Files in OUT (see evaluator.outputs for when an existing OUT is accepted):
- predictions.jsonl: one record per input image, in input order (an unreadable image gets a record with
  "error" and no score; the others go on);
- panels/NAME.png: image | map | map over image, colour bar, score, threshold and decision in the title;
- maps/NAME.npy (float32) and maps/NAME.png (16-bit grey, 65535 = 1.0): the map at the image's own size,
  or, for images larger than MAX_MAP_SIDE on their long side, downscaled to MAX_MAP_SIDE (the record says
  so: "map_downscaled": true, "map_size" vs "image_size");
- index.html: a gallery page of all of it.
NAME is the file's stem, sanitised; inputs with the same stem get their parent folders' names too
(a/x/001.png -> a_x_001 beside b/x/001.png -> b_x_001), so no two records share a file.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kano.anomaly_data import Sample, image_size, is_image_path, list_images, load_image
from kano.anomaly_data.names import class_word
from kano.errors import KanoError

from . import outputs, report
from .evaluate import run_inference
from .visualize import map_to_png16, panel, resize_map

# Maps are written at the image's size up to this many pixels on the long side (2048: every benchmark's
# images fit; a float32 map is then at most 16 MB). Larger images get a map downscaled to this size.
MAX_MAP_SIDE = 2048


def collect_images(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += list_images(p)
        elif p.is_file():
            if not is_image_path(p):
                raise KanoError(f"input {p} must be an image file (png, jpg, bmp, tif, webp) or a folder, got another file type")
            files.append(p)
        else:
            raise KanoError(f"input {p} must be an existing image file or folder, got no such path")
    if not files:
        raise KanoError("predict needs at least one image or folder, got none")
    return files


def map_size(w: int, h: int, limit: int = MAX_MAP_SIDE) -> tuple[int, int]:
    """(W, H) of the written map: the image's own, or scaled so that the long side is `limit`."""
    if max(w, h) <= limit:
        return w, h
    f = limit / max(w, h)
    return max(1, round(w * f)), max(1, round(h * f))


def predict(model, inputs: list[str], class_name: str, out_dir: Path, threshold: float | None, batch_size: int = 8,
            device: torch.device | None = None, prompt: str | None = None, progress: Callable | None = None, *,
            method: dict | None = None, force: bool = False, workers: int = 0, threshold_source: str | None = None) -> list[dict]:
    """Score images of one class; writes the files listed in the module docstring; returns the records.
    prompt: the class word (None: anomaly_data.names.class_word's rule); threshold_source: where `threshold`
    came from ("command line", "calibration", "run"), recorded beside it."""
    started = time.time()
    device = device or model.backbone.device
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise KanoError(f"threshold must be in [0, 1], got {threshold}")
    files = collect_images(inputs)
    out_dir = Path(out_dir)
    method = method or {"kind": "model", "name": type(model).__name__, "backbone": model.backbone.spec}
    word = prompt or class_word(class_name)
    identity = {"method": method, "class": class_name, "class_word": word, "threshold": threshold,
                "threshold_source": threshold_source, "inputs": [str(f.resolve()) for f in files],
                "image_size": model.backbone.image_size}
    outputs.claim(out_dir, "predict", identity, force)
    (out_dir / "maps").mkdir(exist_ok=True)
    (out_dir / "panels").mkdir(exist_ok=True)
    names = outputs.unique_names([[f.stem, *reversed(f.resolve().parent.parts[-4:])] for f in files])
    samples = [Sample(str(f.resolve()), None, class_name, "unknown", 0) for f in files]
    prompts = [word] * len(samples)
    errors: dict[int, str] = {}
    advance, close = progress(len(samples)) if progress else (lambda k: None, lambda: None)
    try:
        scores, maps, _ = run_inference(model, samples, prompts, batch_size, device, workers, advance, errors=errors)
    finally:
        close()
    records, written = [], []
    for i, (f, name) in enumerate(zip(files, names)):
        rec: dict = {"image": str(f), "name": name, "class": class_name, "class_word": word, "threshold": threshold,
                     "threshold_source": threshold_source}
        try:
            if i in errors:
                raise KanoError(errors[i])
            s = float(scores[i])
            with warnings.catch_warnings():  # PIL's decompression-bomb warning: the size is what we check here
                warnings.simplefilter("ignore")
                w, h = image_size(f)
            mw, mh = map_size(w, h)
            amap = resize_map(maps[i].numpy(), (mw, mh))
            rel = {"panel_png": f"panels/{name}.png", "map_npy": f"maps/{name}.npy", "map_png": f"maps/{name}.png"}
            np.save(outputs.inside(out_dir, out_dir / rel["map_npy"]), amap)
            map_to_png16(amap).save(outputs.inside(out_dir, out_dir / rel["map_png"]))
            written += [rel["map_npy"], rel["map_png"]]
            img = load_image(f)
            pic = panel(img, maps[i].numpy(), name=f"{class_name} / {f.name}", score=s, threshold=threshold,
                        threshold_source=threshold_source)
            pic.save(outputs.inside(out_dir, out_dir / rel["panel_png"]))
            written.append(rel["panel_png"])
            rec.update(score=round(s, 6), anomalous=None if threshold is None else bool(s >= threshold),
                       panel_png=str(out_dir / rel["panel_png"]), map_npy=str(out_dir / rel["map_npy"]),
                       map_png=str(out_dir / rel["map_png"]), image_size=[w, h], map_size=[mw, mh],
                       map_downscaled=(mw, mh) != (w, h), map_max=round(float(amap.max()), 6), error=None, rel=rel)
        except KanoError as exc:
            rec.update(score=None, anomalous=None, error=str(exc))
        except MemoryError:
            rec.update(score=None, anomalous=None, error=f"image {f} is too large to draw in memory")
        records.append(rec)
    header = {"class": class_name, "class_word": word, "threshold": threshold, "threshold_source": threshold_source,
              "provenance": {**report.provenance(method, model.backbone.image_size, started, None), "class_words": {class_name: word}}}
    with open(out_dir / "predictions.jsonl", "w") as jl:
        for rec in records:
            jl.write(json.dumps({k: v for k, v in rec.items() if k != "rel"}) + "\n")
    (out_dir / "index.html").write_text(report.predict_html(records, header))
    written += ["predictions.jsonl", "index.html"]
    outputs.write_manifest(out_dir, "predict", identity, written)
    for rec in records:
        rec.pop("rel", None)
    return records
