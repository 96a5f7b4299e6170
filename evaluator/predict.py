"""`kano predict`: score new images; per image a decision, a heat-map PNG, the raw map as NPY, a JSON line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from anomaly_data import Sample, is_image_path, list_images, load_image, prompt_name
from kano.errors import KanoError

from .evaluate import run_inference
from .visualize import overlay


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


def predict(model, inputs: list[str], class_name: str, out_dir: Path, threshold: float | None, batch_size: int = 8,
            device: torch.device | None = None, prompt: str | None = None, progress: Callable | None = None) -> list[dict]:
    """Score images of one class. Writes OUT/maps/*.png, *.npy and OUT/predictions.jsonl; returns the records."""
    device = device or model.backbone.device
    files = collect_images(inputs)
    out_dir = Path(out_dir)
    (out_dir / "maps").mkdir(parents=True, exist_ok=True)
    samples = [Sample(str(f.resolve()), None, class_name, "unknown", 0) for f in files]
    names = [prompt or prompt_name(class_name)] * len(samples)
    advance, close = progress(len(samples)) if progress else (lambda k: None, lambda: None)
    try:
        scores, maps, _ = run_inference(model, samples, names, batch_size, device, 0, advance)
    finally:
        close()
    records = []
    used = set()
    with open(out_dir / "predictions.jsonl", "w") as jl:
        for f, s, m in zip(files, scores.tolist(), maps):
            stem = f.stem if f.stem not in used else f"{f.parent.name}_{f.stem}"
            used.add(stem)
            img = load_image(f)
            amap = np.asarray(Image.fromarray(m.float().numpy()).resize(img.size, Image.BILINEAR), dtype=np.float32)
            np.save(out_dir / "maps" / f"{stem}.npy", amap)
            overlay(img, amap).save(out_dir / "maps" / f"{stem}.png")
            rec = {"image": str(f), "class": class_name, "score": round(float(s), 6),
                   "anomalous": None if threshold is None else bool(s >= threshold), "threshold": threshold,
                   "map_png": str(out_dir / "maps" / f"{stem}.png"), "map_npy": str(out_dir / "maps" / f"{stem}.npy"),
                   "map_max": round(float(amap.max()), 6)}
            jl.write(json.dumps(rec) + "\n")
            records.append(rec)
    return records
