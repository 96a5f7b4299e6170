"""The zero-parameter floors on the synthetic world, per defect group (and seen / held-out kinds).

    python bench/world_floors.py [--size 128] [--n-good 8] [--n-defect 2] [--methods a,b] [--backbone tiny]

Writes the world's target set to a temporary folder, scores it with every baseline of
evaluator.baselines and prints image / pixel AUROC per group: each group's subset is the class's
normal test images plus the images of the group's kinds, averaged over the classes holding it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def group_metrics(samples, scores, maps, masks, groups: dict[str, tuple[str, ...]]) -> dict[str, tuple[float, float]]:
    from kano.evaluator.metrics import image_auroc, pixel_auroc

    out = {}
    classes = sorted({s.class_name for s in samples})
    for g, kinds in groups.items():
        ia, pa = [], []
        for c in classes:
            idx = [i for i, s in enumerate(samples) if s.class_name == c and (s.label == 0 or s.defect in kinds)]
            if not any(samples[i].label for i in idx):
                continue
            lab = torch.tensor([samples[i].label for i in idx])
            ia.append(image_auroc(lab, scores[idx]))
            pa.append(pixel_auroc(masks[idx], maps[idx]))
        out[g] = (float(np.mean(ia)), float(np.mean(pa))) if ia else (float("nan"), float("nan"))
    return out


def main() -> None:
    from kano.anomaly_data import SampleDataset, load_dataset, synthesize_world
    from kano.anomaly_data.world import DEFECT_GROUPS, HELD_OUT_DEFECTS, SEEN_DEFECTS
    from kano.evaluator.baselines import METHODS, load_baseline

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n-good", type=int, default=8)
    ap.add_argument("--n-defect", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--methods", default=",".join(m for m in METHODS if m != "mutual"))
    ap.add_argument("--backbone", default=None, help="also run mutual on this backbone")
    ap.add_argument("--data", default=None, help="an existing MVTec-layout folder instead of a fresh target set")
    a = ap.parse_args()
    groups = {**DEFECT_GROUPS, "seen": SEEN_DEFECTS, "held_out": HELD_OUT_DEFECTS, "all": SEEN_DEFECTS + HELD_OUT_DEFECTS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.data) if a.data else synthesize_world(Path(tmp) / "target", "target", seed=a.seed, size=a.size,
                                                            n_good=a.n_good, n_per_defect=a.n_defect)
        ds = load_dataset(f"mvtec:{root}")
        methods = a.methods.split(",") + (["mutual"] if a.backbone else [])
        rows = []
        for m in methods:
            t0 = time.perf_counter()
            model, _ = load_baseline(m, None, a.backbone if m == "mutual" else None, None, torch.device("cpu"))
            size = model.backbone.image_size
            scores, maps, masks, samples = [], [], [], []
            for c in ds.classes:
                cs = ds.samples("test", [c])
                items = [SampleDataset(cs, size, model.backbone.mean, model.backbone.std)[i] for i in range(len(cs))]
                imgs = torch.stack([it["image"] for it in items])
                with torch.inference_mode():
                    chunks = [imgs] if model.transductive else imgs.split(16)
                    res = [model(x, [c] * len(x)).inference() for x in chunks]
                scores.append(torch.cat([r.image_score for r in res]))
                maps.append(torch.cat([r.anomaly_map for r in res]))
                masks.append(torch.stack([it["mask"] for it in items]))
                samples += cs
            gm = group_metrics(samples, torch.cat(scores), torch.cat(maps), torch.cat(masks), groups)
            rows.append((m, gm, time.perf_counter() - t0))
        print(f"{'method':26s}" + "".join(f"{g:>18s}" for g in groups) + "   (image / pixel AUROC %)")
        for m, gm, dt in rows:
            print(f"{m:26s}" + "".join(f"{100 * gm[g][0]:8.1f} /{100 * gm[g][1]:6.1f}  " for g in groups) + f"  {dt:.0f}s")


if __name__ == "__main__":
    main()
