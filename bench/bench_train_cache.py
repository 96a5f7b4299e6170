"""Training epoch time with the frozen-feature cache against recomputing the backbone every epoch.

    python bench/bench_train_cache.py [--backbone ViT-B-16-quickgelu] [--epochs 3]

Builds a small synthetic auxiliary set and a built-in knowledge base in a temporary folder,
trains twice (cache memory / cache off) and prints the per-epoch seconds and their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    from anomaly_data import synthesize
    from kb_builder import BuildConfig, build_knowledge_base
    from knowledge_store import KnowledgeStore
    from trainer import TrainConfig, train

    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="ViT-B-16-quickgelu")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-good", type=int, default=8, help="normal test images per class")
    ap.add_argument("--n-classes", type=int, default=4, help="synthetic classes (at most 4)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        classes = ["disc", "weave", "ring", "grid"][: a.n_classes]
        synthesize(tmp / "aux", classes, size=128, n_good=a.n_good, n_per_defect=2, defects=("hole", "scratch"))
        store = KnowledgeStore(tmp / "kb.duckdb")
        build_knowledge_base(store, BuildConfig(classes=classes), None, None)
        rows = {}
        for mode in ("memory", "off"):
            cfg = TrainConfig(kb=str(tmp / "kb.duckdb"), data=f"mvtec:{tmp / 'aux'}", backbone=a.backbone, out=str(tmp / f"run_{mode}"),
                              epochs=a.epochs, cache=mode, image_size=a.image_size)
            rows[mode] = [r["seconds"] for r in train(cfg, log=lambda s: None)["log"]]
        print(f"backbone {a.backbone}, {a.epochs} epochs on {len(classes)} synthetic classes ({len(classes) * (a.n_good + 4)} images)")
        print(f"{'epoch':>5} {'cache s':>9} {'no cache s':>11} {'ratio':>7}")
        for i, (c, o) in enumerate(zip(rows["memory"], rows["off"]), 1):
            print(f"{i:>5} {c:>9.2f} {o:>11.2f} {c / o:>7.2f}")
        later_c = sum(rows["memory"][1:]) / max(1, len(rows["memory"]) - 1)
        later_o = sum(rows["off"][1:]) / max(1, len(rows["off"]) - 1)
        print(f"epochs after the first: {later_c:.2f}s with the cache vs {later_o:.2f}s recomputing ({later_c / later_o:.2f}x); "
              f"with the cache they cost {later_c / rows['memory'][0]:.2f} of the first epoch")


if __name__ == "__main__":
    main()
