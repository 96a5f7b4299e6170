"""Forward time of the full KAnoCLIP model against plain open_clip `encode_image`, same size and batch.

    python bench/bench_model.py --backbone ViT-L-14-336-quickgelu --image-size 518 --batches 1 8

Random weights are fine for timing (pass MODEL:PRETRAINED to use real ones). Prints one ratio per batch size.
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    from kanoclip import KAnoCLIP, build_backbone

    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="ViT-L-14-336-quickgelu")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    bb = build_backbone(a.backbone, image_size=a.image_size, device=a.device)
    model = KAnoCLIP(bb).eval()
    print(f"backbone {a.backbone}, image {bb.image_size}px ({bb.grid}x{bb.grid} patches), device {a.device}, threads {torch.get_num_threads()}")
    print(f"{'batch':>5} {'encode_image s':>15} {'backbone+VV s':>14} {'full model s':>13} {'VV/encode':>10} {'full/encode':>12}")
    amp = torch.autocast("cuda", dtype=torch.float16) if a.device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), amp:  # warm-up once at batch 1 (allocator, kernels, tokenizer caches)
        x = torch.randn(1, 3, bb.image_size, bb.image_size, device=a.device)
        bb.clip.encode_image(x), bb(x), model(x, ["object"])
    for n in a.batches:
        x = torch.randn(n, 3, bb.image_size, bb.image_size, device=a.device)
        with torch.inference_mode(), amp:
            t_ref = timed(lambda: bb.clip.encode_image(x), a.repeats)
            t_vv = timed(lambda: bb(x), a.repeats)
            t_full = timed(lambda: model(x, ["object"] * n), a.repeats)
        print(f"{n:>5} {t_ref:>15.3f} {t_vv:>14.3f} {t_full:>13.3f} {t_vv / t_ref:>10.2f} {t_full / t_ref:>12.2f}")


if __name__ == "__main__":
    main()
