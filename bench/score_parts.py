"""Which half of KAnoCLIP's image score carries the signal: p_global, max M, and their mean, per run.

    python bench/score_parts.py --data DIR/data/target --run DIR/run [--run OTHER/run ...] [--untrained micro] [--musc micro]

The image score is (p_global + max M) / 2 (kanoclip/model.py, ModelOutput). For each run (and, with
`--untrained SPEC`, the untrained model with fixed prompts on that backbone) this scores every test image
of every class of `--data` (MVTec layout) and prints the class-mean image AUROC of p_global alone, of max M
alone and of the score, with the pixel AUROC of M beside them. A map whose maximum is at chance drags the
image score down even where its pixel AUROC is fine: that is what this separates.

With `--musc SPEC`, full MuSc on that backbone (kanoclip/musc.py; each class's test set as one batch) is split the
same way: its map's maximum alone against its image score, RsCIN of that maximum re-scored over the class tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def class_batches(data: str, backbone):
    """Per class of `data`: (class, images (N, 3, S, S), masks (N, S, S), labels (N,)), each class as one batch."""
    from kano.anomaly_data import SampleDataset, load_dataset

    ds_all = load_dataset(data)
    for cls in ds_all.classes:
        samples = ds_all.samples("test", [cls])
        ds = SampleDataset(samples, backbone.image_size, backbone.mean, backbone.std)
        items = [ds[i] for i in range(len(ds))]
        yield (cls, torch.stack([it["image"] for it in items]), torch.stack([it["mask"] for it in items]),
               torch.tensor([s.label for s in samples]))


def parts(model, data: str, prompt_names: dict) -> dict[str, float]:
    from kano.anomaly_data import prompt_name
    from kano.evaluator.metrics import image_auroc, pixel_metrics

    rows = []
    for cls, x, masks, labels in class_batches(data, model.backbone):
        with torch.inference_mode():
            o = model(x, [prompt_names.get(cls) or prompt_name(cls)] * len(x))
        peak = o.anomaly_map.flatten(1).max(1).values
        rows.append((image_auroc(labels, o.global_prob), image_auroc(labels, peak), image_auroc(labels, o.image_score),
                     pixel_metrics(masks, o.anomaly_map, with_aupro=False)["pixel_auroc"] if masks.any() else float("nan")))
    a = np.nanmean(np.array(rows, dtype=float), 0) * 100
    return dict(zip(("p_global", "max_M", "score", "pixel"), a.tolist()))


def musc_parts(spec: str, data: str) -> dict[str, float]:
    """Class-mean % of full MuSc: image AUROC of max M alone and of RsCIN(max M) (its image score), pixel AUROC."""
    from kano.evaluator.metrics import image_auroc, pixel_metrics
    from kano.kanoclip import build_backbone
    from kano.kanoclip.musc import MuSc

    model = MuSc(build_backbone(spec)).eval()
    rows = []
    for _, x, masks, labels in class_batches(data, model.backbone):
        with torch.inference_mode():
            o = model(x)
        rows.append((image_auroc(labels, o.anomaly_map.flatten(1).max(1).values), image_auroc(labels, o.image_score),
                     pixel_metrics(masks, o.anomaly_map, with_aupro=False)["pixel_auroc"] if masks.any() else float("nan")))
    a = np.nanmean(np.array(rows, dtype=float), 0) * 100
    return dict(zip(("max_M", "score", "pixel"), a.tolist()))


def main(argv=None) -> int:
    from kano.evaluator import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="an MVTec-layout folder")
    ap.add_argument("--run", action="append", default=[], help="a kano train run folder (repeatable)")
    ap.add_argument("--untrained", default=None, help="also the untrained model with fixed prompts on this backbone")
    ap.add_argument("--image-size", type=int, default=96, help="for --untrained")
    ap.add_argument("--musc", default=None, help="also full MuSc on this backbone: max M alone against RsCIN's score")
    a = ap.parse_args(argv)
    cpu = torch.device("cpu")
    entries = [(r, *load_model(r, None, None, cpu)) for r in a.run]
    if a.untrained:
        entries.append((f"untrained {a.untrained}", *load_model(None, a.untrained, a.image_size, cpu)))
    print(f"{'model':>40} {'p_global':>9} {'max M':>7} {'score':>7} {'px AUROC':>9}   (class-mean %, {a.data})")
    for name, model, info in entries:
        p = parts(model, f"mvtec:{a.data}", (info or {}).get("prompt_names") or {})
        print(f"{name[-40:]:>40} {p['p_global']:>9.1f} {p['max_M']:>7.1f} {p['score']:>7.1f} {p['pixel']:>9.1f}")
    if a.musc:
        p = musc_parts(a.musc, f"mvtec:{a.data}")
        print(f"{('MuSc ' + a.musc + ' (score = RsCIN)')[-40:]:>40} {'-':>9} {p['max_M']:>7.1f} {p['score']:>7.1f} {p['pixel']:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
