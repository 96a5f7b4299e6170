"""`kano eval` throughput against the model alone, and the pixel metrics against scikit-learn, in one run.

    python bench/bench_eval.py [--backbones tiny ViT-B-16-quickgelu] [--images 64 8] [--repeats 3]
                               [--px-images 40] [--px-size 518]

1. Pipeline vs model. A synthetic class (PNG files on disk, MVTec layout) is evaluated by the library call
   `kano eval` makes (evaluator.evaluate: DataLoader with the default --workers, decoding and resizing in
   worker processes, the model, exact metrics, overlays, reports) and, separately, the same model runs
   alone on the same images already decoded, resized and normalised into one tensor (forward + copy of
   scores and maps to the CPU), once as torch runs it by default (one forward at a time, all intra-op
   threads) and once split over the parallel single-thread streams `kano eval` uses on the CPU with
   --workers 0 (evaluator.evaluate.cpu_streams; 2 on two cores). Random weights (the untrained zero-shot
   model) at 224 px. One warm-up of each, then `--repeats` rounds, each of the three first in turn; the
   median images/s of each and the pipeline's ratio to both model references are printed: the first is
   the issue's yardstick, the second what decoding, metrics, overlays and reports cost on their own.
2. Metrics. Pixel AUROC, AP and F1-max of `--px-images` maps of `--px-size`² (fp16-rounded, so with many
   ties) by Kano's one-sort `pixel_metrics` against scikit-learn's three calls (roc_auc_score,
   average_precision_score, precision_recall_curve for F1-max); the largest absolute difference is printed.

The machine's load is printed beside the numbers: timings on a shared machine are inflated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def load() -> str:
    try:
        a = os.getloadavg()
        return f"load average {a[0]:.1f} / {a[1]:.1f} / {a[2]:.1f} on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"


def synth_class(root: Path, n_images: int) -> str:
    from kano.anomaly_data import synthesize

    per = max(1, (n_images // 2) // 3)
    synthesize(root, ["disc"], seed=0, size=256, n_train=0, n_good=n_images - 3 * per, n_per_defect=per,
               defects=("hole", "scratch", "stain"))
    return f"mvtec:{root}"


def bench_pipeline(spec: str, n_images: int, repeats: int, batch_size: int, tmp: Path, device: torch.device) -> tuple[float, float]:
    from kano.anomaly_data import SampleDataset, load_dataset, prompt_name
    from kano.evaluator import evaluate, load_model
    from kano.evaluator.evaluate import cpu_streams, default_workers, in_streams

    data = synth_class(tmp / f"data_{spec}", n_images)
    model, _ = load_model(None, spec, 224, device)
    samples = load_dataset(data).samples("test", ["disc"])
    ds = SampleDataset(samples, model.backbone.image_size, model.backbone.mean, model.backbone.std)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))]).to(device)       # (N, 3, 224, 224), preloaded
    names = [prompt_name("disc")] * len(ds)
    n = len(ds)

    def model_only() -> float:
        t = time.perf_counter()
        with torch.inference_mode():  # the model sets its own backbone precision
            for i in range(0, n, batch_size):
                res = model(images[i:i + batch_size], names[i:i + batch_size]).inference()
                res.image_score.float().cpu(), res.anomaly_map.float().cpu()
        return n / (time.perf_counter() - t)

    starts = list(range(0, n, batch_size))
    k = cpu_streams(device, 0, len(starts), model)

    def model_streams() -> float:
        # the same model split over the parallel single-thread streams that `kano eval` itself uses on the CPU
        # (evaluator.evaluate.cpu_streams, in_streams), on the preloaded tensors: the pipeline's ratio against
        # this says what decoding, metrics, overlays and reports cost, apart from the scheduling gain
        def one(i):
            res = model(images[i:i + batch_size], names[i:i + batch_size]).inference()
            return res.image_score.float().cpu(), res.anomaly_map.float().cpu()

        t = time.perf_counter()
        for _ in in_streams(starts, k, one):
            pass
        return n / (time.perf_counter() - t)

    def pipeline() -> float:
        t = time.perf_counter()
        evaluate(model, data, tmp / f"out_{spec}", ["disc"], batch_size=batch_size, device=device)
        return n / (time.perf_counter() - t)

    model_only(), model_streams(), pipeline()  # warm-up: allocator, tokenizer and prompt caches, first worker start
    fns = [("model", model_only), ("streams", model_streams), ("pipeline", pipeline)]
    rates = {name: [] for name, _ in fns}
    for r in range(repeats):
        for name, fn in fns[r % 3:] + fns[:r % 3]:  # each one first in turn
            rates[name].append(fn())
    m, ms, p = (statistics.median(rates[k]) for k in ("model", "streams", "pipeline"))
    print(f"{spec:>22} {n:>6} {default_workers():>7} {k:>7} {m:>12.1f} {ms:>14.1f} {p:>14.1f} {p / m:>7.2f} {p / ms:>9.2f}   "
          + " | ".join(f"{name} {' '.join(f'{x:.1f}' for x in rates[name])}" for name, _ in fns))
    return m, p


def bench_metrics(n_images: int, size: int, repeats: int) -> None:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    from kano.evaluator.metrics import pixel_metrics

    r = np.random.default_rng(0)
    masks = np.zeros((n_images, size, size), np.uint8)
    for i in range(0, n_images, 2):
        y, x = r.integers(0, size - 60, 2)
        masks[i, y:y + 60, x:x + 40] = 1
    maps = (r.random(masks.shape, dtype=np.float32) + masks * 0.3).astype(np.float16).astype(np.float32)

    def sk():
        y, s = masks.ravel(), maps.ravel()
        p, rc, _ = precision_recall_curve(y, s)
        f1 = np.where(p + rc > 0, 2 * p * rc / np.where(p + rc > 0, p + rc, 1), 0).max()
        return roc_auc_score(y, s), average_precision_score(y, s), f1

    def ours():
        m = pixel_metrics(masks, maps, with_aupro=False)
        return m["pixel_auroc"], m["pixel_ap"], m["pixel_f1_max"]

    t_ours, t_sk = [], []
    for k in range(repeats):
        for name, fn in ((("kano", ours), ("sk", sk)) if k % 2 == 0 else (("sk", sk), ("kano", ours))):
            t = time.perf_counter()
            v = fn()
            (t_ours if name == "kano" else t_sk).append(time.perf_counter() - t)
            if name == "kano":
                v_ours = v
            else:
                v_sk = v
    t = time.perf_counter()
    pixel_metrics(masks, maps)
    t_all = time.perf_counter() - t
    a, b = statistics.median(t_ours), statistics.median(t_sk)
    diff = max(abs(x - y) for x, y in zip(v_ours, v_sk))
    print(f"pixel AUROC+AP+F1max on {masks.size / 1e6:.1f} M pixels ({masks.mean() * 100:.2f}% anomalous, fp16 ties): "
          f"kano one sort {a:.2f}s, scikit-learn three calls {b:.2f}s, speed-up {b / a:.1f}x, max |diff| {diff:.1e} "
          f"(medians of {repeats}, alternating); with AUPRO from the same sort {t_all:.2f}s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", nargs="+", default=["tiny", "ViT-B-16-quickgelu"])
    ap.add_argument("--images", type=int, nargs="+", default=[64, 16], help="images per backbone (one value, or one per backbone)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--px-images", type=int, default=40)
    ap.add_argument("--px-size", type=int, default=518)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (metrics stay on the CPU, against scikit-learn)")
    a = ap.parse_args()
    counts = a.images if len(a.images) == len(a.backbones) else [a.images[0]] * len(a.backbones)
    torch.manual_seed(0)
    device = torch.device(a.device)
    print(f"{load()}; torch threads {torch.get_num_threads()}; model on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"{'backbone':>22} {'images':>6} {'workers':>7} {'streams':>7} {'model img/s':>12} {'model streams':>14} "
          f"{'pipeline img/s':>14} {'ratio':>7} {'ratio vs':>9}   (each round)")
    print(f"{'':>22} {'':>6} {'':>7} {'':>7} {'':>12} {'img/s':>14} {'':>14} {'':>7} {'streams':>9}")
    with tempfile.TemporaryDirectory(prefix="kano-bench-eval-") as tmp:
        for spec, n in zip(a.backbones, counts):
            bench_pipeline(spec, n, a.repeats, a.batch_size, Path(tmp), device)
    bench_metrics(a.px_images, a.px_size, a.repeats)
    print(f"{load()} (after)")


if __name__ == "__main__":
    main()
