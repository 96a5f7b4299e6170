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

import time
from pathlib import Path
from typing import Callable

import torch

from kano.anomaly_data import Sample
from kano.anomaly_data.names import class_word
from kano.errors import KanoError

from . import report
from .evaluate import run_inference
from .predict_files import MAX_MAP_SIDE, begin, collect_images, finish, map_size, write_record  # noqa: F401 (re-exported)


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
    names = begin(out_dir, files, identity, force)
    samples = [Sample(str(f.resolve()), None, class_name, "unknown", 0) for f in files]
    prompts = [word] * len(samples)
    errors: dict[int, str] = {}
    advance, close = progress(len(samples)) if progress else (lambda k: None, lambda: None)
    try:
        scores, maps, _ = run_inference(model, samples, prompts, batch_size, device, workers, advance, errors=errors)
    finally:
        close()
    records = [write_record(out_dir, f, name, class_name, threshold, None if i in errors else float(scores[i]), maps[i].numpy(),
                            errors.get(i), word=word, threshold_source=threshold_source) for i, (f, name) in enumerate(zip(files, names))]
    header = {"class": class_name, "class_word": word, "threshold": threshold, "threshold_source": threshold_source,
              "provenance": {**report.provenance(method, model.backbone.image_size, started, None), "class_words": {class_name: word}}}
    finish(out_dir, records, header, identity)
    return records
