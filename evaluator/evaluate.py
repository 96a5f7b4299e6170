"""`kano eval`: batched inference per class, exact metrics, reports and overlay images."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from anomaly_data import SampleDataset, load_dataset, load_image, prompt_name, raise_batch_errors
from kano.errors import KanoError

from .metrics import METRIC_KEYS, all_metrics
from .visualize import panel


def run_inference(model, samples, names: list[str], batch_size: int, device: torch.device, workers: int = 0,
                  advance: Callable[[int], None] = lambda k: None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> image scores (N,), maps (N, S, S) float32, masks (N, S, S) uint8, S = the model's image size."""
    bb = model.backbone
    ds = SampleDataset(samples, bb.image_size, bb.mean, bb.std)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda")
    scores, maps, masks = [], [], []
    # KAnoCLIP.forward runs the backbone in `backbone_autocast` (the precision the training cache used) and
    # everything after it in float32, so no autocast here
    with torch.inference_mode():
        for batch in loader:
            raise_batch_errors(batch)
            res = model(batch["image"].to(device, non_blocking=True), [names[i] for i in batch["index"].tolist()]).inference()
            scores.append(res.image_score.float().cpu())
            maps.append(res.anomaly_map.float().cpu())
            masks.append(batch["mask"].to(torch.uint8))
            advance(len(batch["index"]))
    return torch.cat(scores), torch.cat(maps), torch.cat(masks)


def evaluate(model, data: str, out_dir: Path, classes: list[str] | None = None, batch_size: int = 8, workers: int = 0,
             device: torch.device | None = None, prompt_names: dict | None = None, n_overlays: int = 4,
             progress: Callable | None = None, allow_missing_masks: bool = False) -> dict:
    """Evaluate on KIND:PATH; writes metrics.json/.csv/.md and overlays/ into out_dir. Returns the metrics dict.
    allow_missing_masks: an anomalous image without a mask (its class having masks) warns instead of failing."""
    device = device or model.backbone.device
    dataset = load_dataset(data, missing_masks="warn" if allow_missing_masks else "error")
    classes = classes or dataset.classes
    samples = dataset.samples("test", classes)
    if not samples:
        raise KanoError(f"{data} must hold test images for {', '.join(classes)}, got none")
    out_dir = Path(out_dir)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    names_map = {c: (prompt_names or {}).get(c) or prompt_name(c) for c in classes}
    advance, close = progress(len(samples)) if progress else (lambda k: None, lambda: None)
    per_class: dict[str, dict] = {}
    try:
        for cls in classes:
            cs = [s for s in samples if s.class_name == cls]
            scores, maps, masks = run_inference(model, cs, [names_map[cls]] * len(cs), batch_size, device, workers, advance)
            labels = torch.tensor([s.label for s in cs])
            with_masks = dataset.has_masks(cls)
            mdev = device if device.type == "cuda" else torch.device("cpu")  # metrics on the GPU when there is one
            per_class[cls] = all_metrics(labels, scores, masks.to(mdev) if with_masks else None, maps.to(mdev) if with_masks else None)
            per_class[cls]["n_images"] = len(cs)
            per_class[cls]["n_anomalous"] = int(labels.sum())
            _write_overlays(out_dir / "overlays", cls, cs, scores, maps, masks, n_overlays)
    finally:
        close()
    mean = {}
    for k in METRIC_KEYS:
        vals = [m[k] for m in per_class.values() if m[k] is not None]
        mean[k] = float(np.mean(vals)) if vals else None
    result = {"dataset": data, "classes": per_class, "mean": mean}
    write_reports(result, out_dir)
    return result


def _write_overlays(folder: Path, cls: str, samples, scores, maps, masks, n: int) -> None:
    """The highest-scoring anomalous images and the highest-scoring normal one: where the model is most sure and most wrong."""
    order = torch.argsort(scores, descending=True).tolist()
    bad = [i for i in order if samples[i].label == 1][: max(1, n - 1)]
    good = [i for i in order if samples[i].label == 0][:1]
    for i in bad + good:
        s = samples[i]
        title = f"{cls} / {s.defect} / {Path(s.image_path).name}  score {float(scores[i]):.3f}"
        img = panel(load_image(s.image_path), masks[i].numpy(), maps[i].float().numpy(), title)
        img.save(folder / f"{cls}_{s.defect}_{Path(s.image_path).stem}.png")


def write_reports(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=1))
    rows = [(c, *[m[k] for k in METRIC_KEYS]) for c, m in result["classes"].items()] + [("mean", *[result["mean"][k] for k in METRIC_KEYS])]
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", *METRIC_KEYS])
        w.writerows([[r[0], *["" if v is None else f"{v:.6f}" for v in r[1:]]] for r in rows])
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    md = [f"# Kano evaluation: {result['dataset']}", "", "| class | " + " | ".join(METRIC_KEYS) + " |",
          "|---" * (len(METRIC_KEYS) + 1) + "|"]
    md += ["| " + " | ".join([r[0], *[pct(v) for v in r[1:]]]) + " |" for r in rows]
    md += ["", "Values in percent. aupro: exact AUPRO up to FPR 0.3 (anomalib's definition)."]
    (out_dir / "metrics.md").write_text("\n".join(md) + "\n")


def table_rows(result: dict) -> list[tuple]:
    rows = [(c, *[m[k] for k in METRIC_KEYS]) for c, m in result["classes"].items()]
    rows.append(("mean", *[result["mean"][k] for k in METRIC_KEYS]))
    return rows
