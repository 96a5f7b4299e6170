"""Training epoch time with the frozen-feature cache against recomputing the backbone every epoch.

    python bench/bench_train_cache.py [--backbone ViT-B-16-quickgelu] [--epochs 3] [--repeats 3]

Builds a small synthetic auxiliary set and a built-in knowledge base in a temporary folder, then trains
with cache memory and cache off: one 1-epoch warm-up run of each, then `--repeats` rounds in alternating
order. Prints, over the rounds, the median (min-max) seconds of the first epoch and of the later epochs, and
the cache/no-cache ratio of the later epochs taken within each round.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _repeat import spread


def main() -> None:
    from kano.anomaly_data import synthesize
    from kano.kb_builder import BuildConfig, build_knowledge_base
    from kano.knowledge_store import KnowledgeStore
    from kano.trainer import TrainConfig, train

    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="ViT-B-16-quickgelu")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-good", type=int, default=8, help="normal test images per class")
    ap.add_argument("--n-classes", type=int, default=4, help="synthetic classes (at most 4)")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    if a.epochs < 2:
        raise SystemExit(f"--epochs must be >= 2 (later epochs are what the cache speeds up), got {a.epochs}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        classes = ["disc", "weave", "ring", "grid"][: a.n_classes]
        synthesize(tmp / "aux", classes, size=128, n_good=a.n_good, n_per_defect=2, defects=("hole", "scratch"))
        store = KnowledgeStore(tmp / "kb.duckdb")
        build_knowledge_base(store, BuildConfig(classes=classes), None, None)
        runs = iter(range(10 ** 6))

        def run(mode: str, epochs: int) -> list[float]:
            cfg = TrainConfig(kb=str(tmp / "kb.duckdb"), data=f"mvtec:{tmp / 'aux'}", backbone=a.backbone,
                              out=str(tmp / f"run_{mode}_{next(runs)}"), epochs=epochs, cache=mode, image_size=a.image_size)
            return [r["seconds"] for r in train(cfg, log=lambda s: None)["log"]]

        run("memory", 1), run("off", 1)   # warm-up: imports, backbone build, allocator, kernels
        rounds: dict[str, list[list[float]]] = {"memory": [], "off": []}
        for r in range(a.repeats):
            for mode in (("memory", "off") if r % 2 == 0 else ("off", "memory")):
                rounds[mode].append(run(mode, a.epochs))
        later = {m: [statistics.mean(e[1:]) for e in rs] for m, rs in rounds.items()}
        first = {m: [e[0] for e in rs] for m, rs in rounds.items()}
        n_img = len(classes) * (a.n_good + 4)
        print(f"backbone {a.backbone}, {a.epochs} epochs on {len(classes)} synthetic classes ({n_img} images), "
              f"{a.repeats} rounds after a warm-up")
        for m, label in (("memory", "cache"), ("off", "no cache")):
            print(f"{label:>9}: first epoch {spread(first[m], 's', 2)}, later epochs {spread(later[m], 's', 2)}")
        ratio = [c / o for c, o in zip(later["memory"], later["off"])]
        of_first = [c / f for c, f in zip(later["memory"], first["memory"])]
        print(f"later epochs, cache / no cache: {spread(ratio, 'x', 2)}; with the cache a later epoch costs "
              f"{spread(of_first, 'x', 2)} of the first")


if __name__ == "__main__":
    main()
