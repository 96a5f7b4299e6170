"""Exact, fast anomaly-detection metrics on numpy or torch inputs (CPU or GPU).

Equal to scikit-learn (roc_auc_score, average_precision_score, precision_recall_curve F1) including
ties and scores outside [0, 1]: nothing here applies a sigmoid or clips scores. Pixel metrics keep
scores in float32 (no float64 copy of every pixel).

One sort serves every ranking metric of a set (`ranking_metrics`, `pixel_metrics`): each float32 score
is mapped to an order-preserving 32-bit integer and packed with the pixel's label (or its ground-truth
region id, for AUPRO) into one int64 key, and the keys are sorted once (numpy's SIMD sort on the CPU,
torch's on the GPU). Every metric here changes only where positives enter the ranking (between two such
thresholds only negatives are added), so after the sort only the positives are visited: at each distinct
positive score, a binary search in the sorted keys gives the pixels above it, the negatives above and
tied, and the region weights above. AUROC is the Mann-Whitney count in integers (exact); AP and F1-max
follow scikit-learn's definitions over distinct thresholds; the PRO curve is the same polyline as over
every threshold, without its collinear points. The work beyond the sort is O(P log n) for P positives.
"""

from __future__ import annotations

import numpy as np
import torch

from kano.core.curves import Curves, _curves, _flat, _t  # the one ranking sweep


def _auroc(c: Curves) -> float:
    """Mann-Whitney in integers: each positive wins against the negatives below it and half against those it
    ties; 2U = Σ_groups pos_eq · (neg_lt + neg_le); AUROC = 2U / (2·P·N), exact (= the ROC trapezoid)."""
    n_neg = c.n - c.n_pos
    if c.n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_ge = c.above - c.pos_above                                         # negatives with score >= t
    pos_eq = c.pos_above - torch.cat([c.pos_above.new_zeros(1), c.pos_above[:-1]])
    area2 = int((pos_eq * ((n_neg - neg_ge) + (n_neg - c.neg_gt))).sum())
    return area2 / (2 * c.n_pos * n_neg)


def _ap_f1(c: Curves) -> tuple[float, float]:
    """AP = Σ (R_n - R_{n-1}) P_n over distinct thresholds (scikit-learn's; thresholds where no positive enters
    add nothing), and the maximum F1 (reached where positives enter: between, only negatives are added)."""
    if c.n_pos == 0:
        return float("nan"), float("nan")
    tp, pp = c.pos_above.double(), c.above.double()
    precision, recall = tp / pp, tp / c.n_pos
    prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    ap = float(((recall - prev) * precision).sum())
    f1 = 2 * tp / (pp + c.n_pos)  # = 2PR / (P + R)
    return ap, float(f1.max())


def ranking_metrics(labels, scores) -> dict[str, float]:
    """auroc, ap, f1_max of labels (N,) against scores (N,) from one sort."""
    y, s = _flat(labels, scores)
    c = _curves(s, y.to(torch.int64))
    ap, f1 = _ap_f1(c)
    return {"auroc": _auroc(c), "ap": ap, "f1_max": f1}


def image_auroc(labels, scores) -> float:
    """ROC AUC (ties count one half). labels (N,), scores (N,)."""
    return ranking_metrics(labels, scores)["auroc"]


pixel_auroc = image_auroc


def average_precision(labels, scores) -> float:
    """AP = Σ (R_n - R_{n-1}) P_n over distinct thresholds, as scikit-learn."""
    return ranking_metrics(labels, scores)["ap"]


pixel_ap = average_precision


def f1_max(labels, scores) -> float:
    """Maximum F1 over all thresholds."""
    return ranking_metrics(labels, scores)["f1_max"]


pixel_f1_max = f1_max


def _regions(masks: np.ndarray) -> np.ndarray:
    """Label 8-connected regions per image with ids unique across the set; 0 = normal. masks (N, H, W)."""
    from scipy import ndimage

    out = np.zeros(masks.shape, dtype=np.int32)
    offset = 0
    for i, m in enumerate(masks):
        fg = m > 0
        if not fg.any():  # most test images are normal: nothing to label
            continue
        n = ndimage.label(fg, structure=np.ones((3, 3), dtype=int), output=out[i])
        out[i][fg] += offset
        offset += n
    return out


def _region_curves(masks, maps) -> Curves | None:
    """Curves of maps against the masks' 8-connected regions; weight_above = mean PRO over regions. None without regions."""
    m = _t(masks).cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    regions = _regions(m.reshape((-1,) + m.shape[-2:]))
    n_regions = int(regions.max())
    s = _t(maps).float().reshape(-1)
    if s.numel() != regions.size:
        raise ValueError(f"masks and maps must have the same number of elements, got {regions.size} and {s.numel()}")
    if torch.isnan(s).any():
        raise ValueError("scores must not contain NaN")
    if n_regions == 0:
        return None
    r = torch.from_numpy(regions.reshape(-1)).to(s.device).to(torch.int64)
    sizes = torch.bincount(r[r > 0], minlength=n_regions + 1).double()  # the anomalous pixels only: few
    inv = 1.0 / (sizes * n_regions)
    inv[0] = 0.0
    return _curves(s, r, inv)


def _aupro_from(c: Curves, fpr_limit: float) -> float:
    """Area under (FPR, PRO) up to fpr_limit / fpr_limit. The curve over every distinct threshold has, between
    two thresholds where positives enter, only horizontal steps (negatives enter, PRO stays), so its
    vertices are (0, 0), then per positive threshold (FPR just above it, the previous PRO) and (FPR at it,
    its PRO), then (1, the last PRO): the same polyline, without its collinear points."""
    n_normal = c.n - c.n_pos
    if n_normal == 0:
        return float("nan")
    k = c.above.numel()
    before, at = c.neg_gt.double() / n_normal, (c.above - c.pos_above).double() / n_normal
    pro = c.weight_above
    fpr = torch.stack([before, at], 1).reshape(-1)                          # (2K,) fb_1, f_1, fb_2, f_2, ...
    prev = torch.cat([pro.new_zeros(1), pro[:-1]])
    pv = torch.stack([prev, pro], 1).reshape(-1)
    fpr_np = np.concatenate([[0.0], fpr.cpu().numpy(), [1.0]])
    pro_np = np.concatenate([[0.0], pv.cpu().numpy(), [float(pro[-1]) if k else 0.0]])
    keep = fpr_np <= fpr_limit
    x, yv = fpr_np[keep], pro_np[keep]
    if x[-1] < fpr_limit:  # interpolate the curve at the limit
        j = int(np.searchsorted(fpr_np, fpr_limit, side="left"))
        x0, x1, y0, y1 = fpr_np[j - 1], fpr_np[j], pro_np[j - 1], pro_np[j]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y1
        x, yv = np.append(x, fpr_limit), np.append(yv, y_lim)
    return float(np.trapezoid(yv, x) / fpr_limit)


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Exact AUPRO (anomalib's definition): per-region overlap averaged over all 8-connected GT regions,
    against the false-positive rate on normal pixels, over every distinct threshold; the curve is
    interpolated at `fpr_limit` and its area divided by `fpr_limit`. masks, maps (N, H, W)."""
    c = _region_curves(masks, maps)
    return float("nan") if c is None else _aupro_from(c, fpr_limit)


def pixel_metrics(masks, maps, with_aupro: bool = True, fpr_limit: float = 0.3) -> dict[str, float]:
    """pixel_auroc, pixel_ap, pixel_f1_max (and aupro) of maps (N, H, W) against masks (N, H, W), all from
    ONE sort of the pixels: a pixel's key carries its region id, whose nonzero-ness is its label."""
    if with_aupro:
        c = _region_curves(masks, maps)
        if c is not None:
            ap, f1 = _ap_f1(c)
            return {"pixel_auroc": _auroc(c), "pixel_ap": ap, "pixel_f1_max": f1, "aupro": _aupro_from(c, fpr_limit)}
    r = ranking_metrics(masks, maps)
    out = {"pixel_auroc": r["auroc"], "pixel_ap": r["ap"], "pixel_f1_max": r["f1_max"]}
    if with_aupro:
        out["aupro"] = float("nan")
    return out


def aupro_200(masks, maps, fpr_limit: float = 0.3, n_thresholds: int = 200) -> float:
    """AUPRO as most CLIP anomaly-detection papers publish it (cflow-ad's code): 200 evenly spaced
    thresholds, curve points with FPR < limit, FPR rescaled by its maximum, area by trapezoids.
    Differs from `aupro` by up to ~1.4 points; report which one you use."""
    m = (_t(masks).cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)) > 0
    a = _t(maps).float().cpu().numpy()
    regions = _regions(m)
    n_regions = int(regions.max())
    if n_regions == 0:
        return float("nan")
    sizes = np.bincount(regions.ravel(), minlength=n_regions + 1)
    normal = ~m
    n_normal = normal.sum()
    fprs, pros = [], []
    for th in np.linspace(a.min(), a.max(), n_thresholds):
        binary = a > th
        hit = np.bincount(regions[binary].ravel(), minlength=n_regions + 1)
        pros.append(float((hit[1:] / sizes[1:]).mean()))
        fprs.append(float((binary & normal).sum() / n_normal))
    fprs_a, pros_a = np.array(fprs), np.array(pros)
    keep = fprs_a < fpr_limit
    if keep.sum() < 2:
        return float("nan")
    f, p = fprs_a[keep], pros_a[keep]
    f = f / f.max()
    order = np.argsort(f, kind="stable")
    return float(np.trapezoid(p[order], f[order]))


METRIC_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro")


def all_metrics(labels, scores, masks=None, maps=None) -> dict[str, float | None]:
    """The metrics.json keys for one class; pixel ones None without masks. One sort for the image metrics,
    one sort of the pixels for the four pixel metrics."""
    r = ranking_metrics(labels, scores)
    out: dict[str, float | None] = {"image_auroc": r["auroc"], "image_ap": r["ap"], "image_f1_max": r["f1_max"]}
    if masks is not None and maps is not None and bool((_t(masks) > 0).any()):
        out.update(pixel_metrics(masks, maps))
    else:
        out.update(pixel_auroc=None, pixel_ap=None, pixel_f1_max=None, aupro=None)
    return {k: (None if v is None or v != v else float(v)) for k, v in out.items()}
