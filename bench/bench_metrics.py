"""Pixel AUROC / AP on a 100 x 518 x 518 class against scikit-learn, in one process.

    python bench/bench_metrics.py [--images 100] [--size 518]
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def main() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    from evaluator.metrics import average_precision, pixel_auroc

    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--size", type=int, default=518)
    a = ap.parse_args()
    r = np.random.default_rng(0)
    masks = np.zeros((a.images, a.size, a.size), np.uint8)
    for i in range(0, a.images, 2):
        y, x = r.integers(0, a.size - 60, 2)
        masks[i, y:y + 60, x:x + 40] = 1
    maps = (r.random(masks.shape, dtype=np.float32) + masks * 0.3).astype(np.float16).astype(np.float32)  # fp16 maps: many ties
    print(f"{masks.size / 1e6:.1f} M pixels, {masks.mean() * 100:.2f}% anomalous")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter(); ours = pixel_auroc(masks, maps); t_ours = time.perf_counter() - t
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter(); ref = roc_auc_score(masks.ravel(), maps.ravel()); t_ref = time.perf_counter() - t
    rss2 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"pixel AUROC  kano {t_ours:6.2f}s  scikit-learn {t_ref:6.2f}s  speed-up {t_ref / t_ours:4.1f}x  |diff| {abs(ours - ref):.1e}")
    print(f"peak RSS growth: kano {(rss1 - rss0) / 1024:.0f} MiB, scikit-learn (after kano) {(rss2 - rss1) / 1024:.0f} MiB; "
          f"the inputs themselves: {(masks.nbytes + maps.nbytes) / 2**20:.0f} MiB")
    t = time.perf_counter(); ours = average_precision(masks, maps); t_ours = time.perf_counter() - t
    t = time.perf_counter(); ref = average_precision_score(masks.ravel(), maps.ravel()); t_ref = time.perf_counter() - t
    print(f"pixel AP     kano {t_ours:6.2f}s  scikit-learn {t_ref:6.2f}s  speed-up {t_ref / t_ours:4.1f}x  |diff| {abs(ours - ref):.1e}")


if __name__ == "__main__":
    main()
