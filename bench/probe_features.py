"""How much a backbone's patch tokens say about defects: a linear probe, auxiliary -> target.

    python bench/probe_features.py --backbone micro --aux DIR/data/aux --target DIR/data/target [--context]

Fits a class-balanced logistic regression on the patch tokens of the auxiliary images (the four stages,
L2-normalised and concatenated; a patch is a defect when >= 20 % of it is in the mask), scores every
target patch, upsamples the patch scores bilinearly to the image and prints the mean over target classes
of image AUROC (max of the map) and pixel AUROC, then the image-level ceiling: a logistic regression on each
image's mean- or max-pooled patch tokens (good vs defective), auxiliary -> target. `--context` appends, per stage, each patch's distance to
its 3 nearest patches outside its 3x3 neighbourhood (self-similarity on the backbone's features).
`--tokens pixels` probes the raw 8x8 pixel patches instead; `--image-size S` runs the backbone at S px (a finer
grid: position embeddings interpolated as in training at any size). This is the ceiling check docs/methods-results.md quotes:
if a probe on the frozen features cannot find the defects, no head trained on them will.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def load_samples(root: str):
    from kano.anomaly_data import load_dataset

    return load_dataset(f"mvtec:{root}").samples("test")


def features(bb, root: str, tokens: str, context: bool):
    from kano.anomaly_data import SampleDataset

    samples = load_samples(root)
    ds = SampleDataset(samples, bb.image_size, bb.mean, bb.std)
    xs, ms = [], []
    with torch.inference_mode():
        for i in range(0, len(ds), 32):
            b = [ds[j] for j in range(i, min(len(ds), i + 32))]
            im, mk = torch.stack([x["image"] for x in b]), torch.stack([x["mask"] for x in b])
            if tokens == "pixels":
                p = bb.patch_size
                xs.append(F.unfold(im, p, stride=p).transpose(1, 2))
            else:
                fs = [F.normalize(t, dim=-1) for t in bb(im, vv=tokens == "vv").patch_tokens]
                if context:
                    g = int(round(fs[0].shape[1] ** 0.5))
                    yy, xx = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
                    yy, xx = yy.reshape(-1), xx.reshape(-1)
                    near = ((yy[:, None] - yy[None]).abs() <= 1) & ((xx[:, None] - xx[None]).abs() <= 1)
                    fs = fs + [torch.cat([1 - (f @ f.transpose(1, 2)).masked_fill(near, -2).topk(3, -1).values.mean(-1, keepdim=True)
                                          for f in fs], -1) * 10]
                xs.append(torch.cat(fs, -1))
            ms.append(mk)
    return torch.cat(xs).numpy(), torch.cat(ms).float(), samples


def main(argv=None) -> int:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from kano.kanoclip import build_backbone

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="micro")
    ap.add_argument("--aux", required=True, help="auxiliary folder (MVTec layout, e.g. kano demo's DIR/data/aux)")
    ap.add_argument("--target", required=True, help="target folder (MVTec layout)")
    ap.add_argument("--tokens", choices=("vv", "qk", "pixels"), default="vv")
    ap.add_argument("--context", action="store_true")
    ap.add_argument("--image-size", type=int, default=None, help="backbone input size (default: its own, 96 for micro)")
    ap.add_argument("--C", type=float, default=1.0, help="inverse regularisation strength")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    bb = build_backbone(args.backbone, image_size=args.image_size, device="cpu")
    xa, ma, _ = features(bb, args.aux, args.tokens, args.context)
    xt, mt, st = features(bb, args.target, args.tokens, args.context)
    g, size = int(round(xa.shape[1] ** 0.5)), bb.image_size
    ya = (F.avg_pool2d(ma[:, None], size // g)[:, 0].reshape(len(ma), -1).numpy() > 0.2).reshape(-1)
    clf = LogisticRegression(C=args.C, max_iter=300, class_weight="balanced").fit(xa.reshape(-1, xa.shape[-1]), ya)
    scores = clf.decision_function(xt.reshape(-1, xt.shape[-1])).reshape(len(xt), 1, g, g)
    maps = F.interpolate(torch.tensor(scores).float(), size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    img, pix = [], []
    for c in sorted({s.class_name for s in st}):
        idx = [i for i, s in enumerate(st) if s.class_name == c]
        img.append(roc_auc_score([st[i].label for i in idx], maps[idx].reshape(len(idx), -1).max(1)))
        pix.append(roc_auc_score(mt[idx].numpy().reshape(-1) > 0.5, maps[idx].reshape(-1)))
    # the image-level ceiling: a logistic regression on each image's pooled patch tokens, auxiliary -> target
    la = np.array([s.label for s in load_samples(args.aux)])
    lt = np.array([s.label for s in st])
    pooled = {}
    for name, pool in (("mean", lambda x: x.mean(1)), ("max", lambda x: x.max(1))):
        s2 = LogisticRegression(C=args.C, max_iter=500, class_weight="balanced").fit(pool(xa), la).decision_function(pool(xt))
        pooled[name] = np.mean([roc_auc_score(lt[[i for i, s in enumerate(st) if s.class_name == c]],
                                              s2[[i for i, s in enumerate(st) if s.class_name == c]])
                                for c in sorted({s.class_name for s in st})])
    print(f"{args.backbone} {args.tokens}{' + context' if args.context else ''}: probe image AUROC {100 * np.mean(img):.1f}, "
          f"pixel AUROC {100 * np.mean(pix):.1f} over {len(img)} target classes ({len(ya)} auxiliary patches, "
          f"{100 * ya.mean():.1f} % defect; {time.perf_counter() - t0:.0f} s); image-level probe on pooled tokens: "
          f"mean-pooled {100 * pooled['mean']:.1f}, max-pooled {100 * pooled['max']:.1f} image AUROC")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
