"""Glue for `kano eval` and `kano predict`: build the model, call the library, print results."""

from __future__ import annotations

from pathlib import Path

import torch

from kano import ui


def _device(name: str | None) -> torch.device:
    from trainer.train import resolve_device

    return resolve_device(name)


def evaluate(*, data, run, backbone, out, classes, batch_size, workers, image_size, device, allow_missing_masks=False) -> dict:
    from evaluator import METRIC_KEYS, evaluate as run_eval, load_model
    from evaluator.evaluate import table_rows

    dev = _device(device)
    model, info = load_model(str(run) if run else None, backbone, image_size, dev)
    result = run_eval(model, data, Path(out), classes, batch_size, workers, dev, info["prompt_names"],
                      progress=ui.progress_factory("evaluating"), allow_missing_masks=allow_missing_masks)
    short = {"image_auroc": "img AUROC", "image_ap": "img AP", "image_f1_max": "img F1max", "pixel_auroc": "px AUROC",
             "pixel_ap": "px AP", "pixel_f1_max": "px F1max", "aupro": "AUPRO"}
    rows = [(r[0], *["-" if v is None else f"{100 * v:.1f}" for v in r[1:]]) for r in table_rows(result)]
    ui.print_table(f"{data} ({'run ' + str(run) if run else 'untrained ' + backbone}), %", ["class", *[short[k] for k in METRIC_KEYS]], rows)
    ui.out.print(f"metrics written to {out}/metrics.json, metrics.csv, metrics.md; overlays in {out}/overlays")
    return result


def predict(*, inputs, class_name, run, backbone, out, threshold, batch_size, device) -> list[dict]:
    from evaluator import load_model, predict as run_predict

    dev = _device(device)
    model, info = load_model(str(run) if run else None, backbone, None, dev)
    if threshold is None:
        threshold = info["threshold"]
    prompt = info["prompt_names"].get(class_name)
    records = run_predict(model, inputs, class_name, Path(out), threshold, batch_size, dev, prompt,
                          progress=ui.progress_factory("scoring"))
    ui.print_table(f"predictions ({class_name})", ["image", "score", "anomalous"],
                   [(Path(r["image"]).name, r["score"], "-" if r["anomalous"] is None else ("yes" if r["anomalous"] else "no")) for r in records])
    if threshold is None:
        ui.err.print("no threshold (untrained backbone and no --threshold): scores only")
    ui.out.print(f"maps and predictions.jsonl written to {out}")
    return records
