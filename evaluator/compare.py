"""Several methods on one dataset, in one table: metrics over all defects and per group of defect kinds.

Used by the demo to put a trained run beside the untrained model, the zero-shot methods, the zero-parameter
detectors and the transductive floors (`to_markdown` renders its table). A group's subset of a class is its normal test images plus the
images of the group's kinds; each group's metric is the mean over the classes holding that group.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kano.anomaly_data import load_dataset, prompt_name

from .evaluate import run_inference
from .metrics import aupro, image_auroc, pixel_auroc


def score_classes(model, data: str, classes: list[str] | None = None, batch_size: int = 16, device: torch.device | None = None,
                  prompt_names: dict | None = None) -> dict[str, tuple[list, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """-> {class: (samples, image scores (N,), maps (N, S, S), masks (N, S, S))} on the test split of KIND:PATH."""
    device = device or model.backbone.device
    ds = load_dataset(data)
    out = {}
    for cls in classes or ds.classes:
        cs = ds.samples("test", [cls])
        name = (prompt_names or {}).get(cls) or prompt_name(cls)
        bs = len(cs) if model.transductive else batch_size
        model.begin_class(cls, name)  # per-class state, e.g. WinCLIP+'s reference images
        out[cls] = (cs, *run_inference(model, cs, [name] * len(cs), bs, device))
    return out


def grouped_metrics(scored: dict, groups: dict[str, tuple[str, ...] | None], with_aupro: tuple[str, ...] = ("all",)) -> dict:
    """{group: {"image_auroc", "pixel_auroc"[, "aupro"], "n_classes"}}; a group of None means every defect kind."""
    res = {}
    for g, kinds in groups.items():
        vals: dict[str, list[float]] = {"image_auroc": [], "pixel_auroc": [], "aupro": []}
        for cls, (samples, scores, maps, masks) in scored.items():
            idx = [i for i, s in enumerate(samples) if s.label == 0 or kinds is None or s.defect in kinds]
            labels = torch.tensor([samples[i].label for i in idx])
            if not labels.any() or labels.all():
                continue
            vals["image_auroc"].append(image_auroc(labels, scores[idx]))
            vals["pixel_auroc"].append(pixel_auroc(masks[idx], maps[idx]))
            if g in with_aupro:
                vals["aupro"].append(aupro(masks[idx], maps[idx]))
        res[g] = {k: (float(np.mean(v)) if v else None) for k, v in vals.items()}
        res[g]["n_classes"] = len(vals["image_auroc"])
    return res


def compare(entries: list[dict], data: str, groups: dict[str, tuple[str, ...] | None], out_json: Path | None = None,
            log: Callable[[str], None] = lambda s: None, about: dict | None = None) -> list[dict]:
    """entries: [{"name", "kind", "model", "prompt_names"?} or {"name", "kind", "scored"} (scores already made, as
    evaluator.evaluate's `scored` gives them)] -> one record per entry with its grouped metrics.
    about: what produced the table (seed, backbone, ...), written beside the rows with Kano's version and commit."""
    rows = []
    for e in entries:
        if "scored" in e:
            scored = e["scored"]
        else:
            log(f"  scoring {e['name']} ({e['kind']})")
            scored = score_classes(e["model"], data, prompt_names=e.get("prompt_names"))
        rows.append({"name": e["name"], "kind": e["kind"], "metrics": grouped_metrics(scored, groups)})
    if out_json is not None:
        from .report import stamp

        produced = {**(about or {}), **stamp()}
        Path(out_json).write_text(json.dumps({"dataset": data, "groups": {g: list(k) if k else None for g, k in groups.items()},
                                              "produced_by": produced, "rows": rows}, indent=1))
    return rows


GROUP_COLUMNS = (("seen", "seen img/px"), ("held_out", "held-out img/px"), ("part", "part img/px"), ("structural", "struct. img/px"))
NOTE = ("per-image and untrained methods see one image at a time; transductive ones score each test image",
        "against the other test images of its class (no labels, no training).")


def table_cells(rows: list[dict]) -> tuple[list[str], list[tuple[str, ...]]]:
    """compare()'s records -> (column heads, one tuple of cells per method): percent with one decimal over all
    defect kinds (image AUROC, pixel AUROC, AUPRO), then "image / pixel AUROC" per group of GROUP_COLUMNS."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
    head = ["method", "kind", "img AUROC", "px AUROC", "AUPRO", *[h for _, h in GROUP_COLUMNS]]
    table = []
    for r in rows:
        m = r["metrics"]
        table.append((r["name"], r["kind"], pct(m["all"]["image_auroc"]), pct(m["all"]["pixel_auroc"]), pct(m["all"]["aupro"]),
                      *[f"{pct(m[g]['image_auroc'])} / {pct(m[g]['pixel_auroc'])}" for g, _ in GROUP_COLUMNS]))
    return head, table


def to_markdown(rows: list[dict]) -> str:
    head, table = table_cells(rows)
    md = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"] + ["| " + " | ".join(t) + " |" for t in table]
    return "\n".join(md + ["", *NOTE]) + "\n"
