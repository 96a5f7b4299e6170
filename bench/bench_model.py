"""Forward time of the full KAnoCLIP model against plain open_clip `encode_image`, same size and batch.

    python bench/bench_model.py --backbone ViT-L-14-336-quickgelu --image-size 518 --batches 1 8 --repeats 3

Random weights are fine for timing (pass MODEL:PRETRAINED to use real ones). At every batch size each case
runs once as a warm-up, then `--repeats` rounds in alternating order; prints the median seconds with their
min-max spread and the ratios to encode_image taken within each round (median, min-max).
"""

from __future__ import annotations

import argparse

import torch

from _repeat import alternate, paired_ratio, spread


def main() -> None:
    from kano.kanoclip import KAnoCLIP, build_backbone

    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="ViT-L-14-336-quickgelu")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    torch.manual_seed(0)
    bb = build_backbone(a.backbone, image_size=a.image_size, device=a.device)
    model = KAnoCLIP(bb).eval()
    print(f"backbone {a.backbone}, image {bb.image_size}px ({bb.grid}x{bb.grid} patches), device {a.device}, "
          f"threads {torch.get_num_threads()}, {a.repeats} rounds after a warm-up at each batch size")
    amp = torch.autocast("cuda", dtype=torch.float16) if a.device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    for n in a.batches:
        x = torch.randn(n, 3, bb.image_size, bb.image_size, device=a.device)
        names = ["object"] * n
        with torch.inference_mode(), amp:
            t = alternate({"encode_image": lambda: bb.clip.encode_image(x), "backbone+VV": lambda: bb(x),
                           "full model": lambda: model(x, names)}, repeats=a.repeats)
        vv = paired_ratio(t["backbone+VV"], t["encode_image"])
        full = paired_ratio(t["full model"], t["encode_image"])
        print(f"batch {n}: encode_image {spread(t['encode_image'])}, backbone+VV {spread(t['backbone+VV'])}, "
              f"full model {spread(t['full model'])}")
        print(f"batch {n}: ratio VV/encode {spread(vv, 'x', 2)}, full/encode {spread(full, 'x', 2)}")


if __name__ == "__main__":
    main()
