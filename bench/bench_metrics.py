"""Pixel AUROC / AP on a 100 x 518 x 518 class against scikit-learn, in one process.

    python bench/bench_metrics.py [--images 100] [--size 518] [--repeats 3]

Each implementation runs once as a warm-up, then `--repeats` rounds in alternating order; prints the median
seconds with their min-max spread and the speed-up taken within each round.
"""

from __future__ import annotations

import argparse
import resource

import numpy as np

from _repeat import alternate, paired_ratio, spread


def main() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    from kano.evaluator.metrics import average_precision, pixel_auroc

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--size", type=int, default=518)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    r = np.random.default_rng(0)
    masks = np.zeros((a.images, a.size, a.size), np.uint8)
    for i in range(0, a.images, 2):
        y, x = r.integers(0, a.size - 60, 2)
        masks[i, y:y + 60, x:x + 40] = 1
    maps = (r.random(masks.shape, dtype=np.float32) + masks * 0.3).astype(np.float16).astype(np.float32)  # fp16 maps: many ties
    print(f"{masks.size / 1e6:.1f} M pixels, {masks.mean() * 100:.2f}% anomalous; {a.repeats} rounds after a warm-up")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ours = pixel_auroc(masks, maps)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ref = roc_auc_score(masks.ravel(), maps.ravel())
    rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"pixel AUROC |kano - scikit-learn| = {abs(ours - ref):.1e}")
    print(f"peak RSS growth: kano {(rss1 - rss0) / 1024:.0f} MiB, scikit-learn (after kano) {(rss2 - rss1) / 1024:.0f} MiB; "
          f"the inputs themselves: {(masks.nbytes + maps.nbytes) / 2**20:.0f} MiB")
    t = alternate({"kano": lambda: pixel_auroc(masks, maps), "sklearn": lambda: roc_auc_score(masks.ravel(), maps.ravel())},
                  repeats=a.repeats, warmup=0)  # the calls above were the warm-up
    up = paired_ratio(t["sklearn"], t["kano"])
    print(f"pixel AUROC  kano {spread(t['kano'], 's', 2)}  scikit-learn {spread(t['sklearn'], 's', 2)}  speed-up {spread(up, 'x', 1)}")
    ours, ref = average_precision(masks, maps), average_precision_score(masks.ravel(), maps.ravel())
    print(f"pixel AP |kano - scikit-learn| = {abs(ours - ref):.1e}")
    t = alternate({"kano": lambda: average_precision(masks, maps),
                   "sklearn": lambda: average_precision_score(masks.ravel(), maps.ravel())}, repeats=a.repeats, warmup=0)
    up = paired_ratio(t["sklearn"], t["kano"])
    print(f"pixel AP     kano {spread(t['kano'], 's', 2)}  scikit-learn {spread(t['sklearn'], 's', 2)}  speed-up {spread(up, 'x', 1)}")


if __name__ == "__main__":
    main()
