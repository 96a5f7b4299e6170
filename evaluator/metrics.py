"""Exact, fast anomaly-detection metrics on numpy or torch inputs (CPU or GPU).

Equal to scikit-learn (roc_auc_score, average_precision_score, precision_recall_curve F1) including
ties and scores outside [0, 1]: nothing here applies a sigmoid or clips scores. Pixel metrics keep
scores in float32 (no float64 copy of every pixel).

One sort serves every ranking metric of a set (`ranking_metrics`, `pixel_metrics`): each float32 score
is mapped to an order-preserving 32-bit integer and packed with the pixel's label (or its ground-truth
region id, for AUPRO) into one int64 key; a single sort of these keys (numpy's SIMD sort on the CPU,
torch's on the GPU) yields, at every distinct threshold, the number of pixels above it, the positives
above it and the region weights above it. AUROC is then the trapezoid of the ROC curve computed in
integers (exact), AP and F1-max follow scikit-learn's definitions over distinct thresholds.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

Array = "np.ndarray | torch.Tensor"


def _t(x, dtype=None, device=None) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if device is not None:
        t = t.to(device)
    return t.to(dtype) if dtype is not None else t


def _flat(labels, scores) -> tuple[torch.Tensor, torch.Tensor]:
    s = _t(scores)
    s = s.float() if s.dtype != torch.float64 else s
    y = _t(labels, device=s.device).reshape(-1) > 0
    s = s.reshape(-1)
    if y.numel() != s.numel():
        raise ValueError(f"labels and scores must have the same number of elements, got {y.numel()} and {s.numel()}")
    if torch.isnan(s).any():
        raise ValueError("scores must not contain NaN")
    return y, s


CHUNK = 1 << 22  # elements per step of the boundary scan: bounds the work memory beyond the sorted keys


class Curves(NamedTuple):
    """At every distinct threshold t, descending (G entries): pixels with score >= t, positives with
    score >= t (int64), and the sum of region weights of the pixels with score >= t (float64, or None)."""

    above: torch.Tensor
    pos_above: torch.Tensor
    weight_above: torch.Tensor | None
    n: int
    n_pos: int


def _order_key(s: torch.Tensor) -> torch.Tensor:
    """float32 (n,) -> int64 (n,) in the same order (IEEE-754 bits, negatives flipped); -0.0 equals 0.0."""
    b = (s + 0.0).view(torch.int32)  # x + 0.0 turns -0.0 into +0.0, so the two tie as they compare equal
    return torch.where(b < 0, b ^ 0x7FFFFFFF, b).to(torch.int64)


def _sort(k: torch.Tensor) -> torch.Tensor:
    if k.device.type == "cpu":
        return torch.from_numpy(np.sort(k.numpy()))  # numpy's SIMD sort: ~10x torch's CPU sort on int64
    return torch.sort(k).values


def _curves(scores: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor | None = None) -> Curves:
    """One ascending sort of (score, id) pairs. scores (n,) float32/float64, ids (n,) int64 >= 0 with 0 =
    negative (a label, or a region id for AUPRO); weights (R+1,) per id, summed over pixels above each threshold."""
    n = scores.numel()
    if n == 0:
        raise ValueError("scores must not be empty, got 0 elements")
    if scores.dtype == torch.float32 and int(ids.max()) < 2**31:
        ks = _sort((_order_key(scores) << 32) | ids)
        key_of = lambda a, b: ks[a:b] >> 32
        id_of = lambda idx: ks[idx] & 0xFFFFFFFF
        pos_idx = torch.nonzero((ks & 0xFFFFFFFF) != 0).squeeze(1)
    else:  # float64 scores (image level, small): the same curves from a sort with indices
        sv, order = torch.sort(scores, stable=True)
        sid = ids[order]
        key_of = lambda a, b: sv[a:b]
        id_of = lambda idx: sid[idx]
        pos_idx = torch.nonzero(sid != 0).squeeze(1)
    starts = [torch.zeros(1, dtype=torch.int64, device=scores.device)]
    for a in range(1, n, CHUNK):  # group starts: positions whose score differs from the previous one
        b = min(n, a + CHUNK)
        starts.append(torch.nonzero(key_of(a, b) != key_of(a - 1, b - 1)).squeeze(1) + a)
    start = torch.cat(starts)                                            # (G,) ascending thresholds
    pos_before = torch.searchsorted(pos_idx, start)                      # positives strictly below each group
    n_pos = pos_idx.numel()
    above = (n - start).flip(0)
    pos_above = (n_pos - pos_before).flip(0)
    weight_above = None
    if weights is not None:
        w = weights.to(torch.float64)[id_of(pos_idx)]                    # weights of the positive pixels, in sorted order
        cw = torch.cat([w.new_zeros(1), torch.cumsum(w, 0)])
        weight_above = (cw[-1] - cw[pos_before]).flip(0)
    return Curves(above, pos_above, weight_above, n, n_pos)


def _auroc(c: Curves) -> float:
    """Trapezoid under the ROC curve in integers: Σ Δfp·(tp + tp_prev) / (2·P·N), exact."""
    n_neg = c.n - c.n_pos
    if c.n_pos == 0 or n_neg == 0:
        return float("nan")
    tp, fp = c.pos_above, c.above - c.pos_above
    zero = tp.new_zeros(1)
    d_fp = fp - torch.cat([zero, fp[:-1]])
    area2 = int((d_fp * (tp + torch.cat([zero, tp[:-1]]))).sum())
    return area2 / (2 * c.n_pos * n_neg)


def _ap_f1(c: Curves) -> tuple[float, float]:
    """AP = Σ (R_n - R_{n-1}) P_n over distinct thresholds (scikit-learn's), and the maximum F1."""
    if c.n_pos == 0:
        return float("nan"), float("nan")
    tp, pp = c.pos_above.double(), c.above.double()
    precision, recall = tp / pp, tp / c.n_pos
    prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    ap = float(((recall - prev) * precision).sum())
    f1 = 2 * tp / (pp + c.n_pos)  # = 2PR / (P + R), 0 where tp = 0
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
        lab, n = ndimage.label(m > 0, structure=np.ones((3, 3), dtype=int))
        out[i] = np.where(lab > 0, lab + offset, 0)
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
    sizes = torch.bincount(r, minlength=n_regions + 1).double()
    inv = 1.0 / (sizes * n_regions)
    inv[0] = 0.0
    return _curves(s, r, inv)


def _aupro_from(c: Curves, fpr_limit: float) -> float:
    n_normal = c.n - c.n_pos
    if n_normal == 0:
        return float("nan")
    fpr = (c.above - c.pos_above).double() / n_normal
    pro = c.weight_above
    fpr, pro = torch.cat([fpr.new_zeros(1), fpr]), torch.cat([pro.new_zeros(1), pro])
    fpr_np, pro_np = fpr.cpu().numpy(), pro.cpu().numpy()
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
