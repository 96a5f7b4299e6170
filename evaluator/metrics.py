"""Exact, fast anomaly-detection metrics on numpy or torch inputs (CPU or GPU).

Equal to scikit-learn (roc_auc_score, average_precision_score, precision_recall_curve F1) including
ties and scores outside [0, 1]: nothing here applies a sigmoid or clips scores. Pixel metrics keep
scores in float32 (no float64 copy of every pixel).
"""

from __future__ import annotations

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


def image_auroc(labels, scores) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) identity; ties count one half. labels (N,), scores (N,)."""
    y, s = _flat(labels, scores)
    pos, neg = s[y], s[~y]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    neg_sorted = torch.sort(neg).values
    below = torch.searchsorted(neg_sorted, pos, right=False).double()
    upto = torch.searchsorted(neg_sorted, pos, right=True).double()
    return float(((below + upto) / 2).sum() / (pos.numel() * neg.numel()))


pixel_auroc = image_auroc


CHUNK = 1 << 22  # pixels per step of the running sums: bounds the float64 work memory


def _sorted_group_sums(scores: torch.Tensor, weights: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sort scores descending; return the 1-based positions of the last element of every tie group and, for
    each weight tensor, its running sum (float64) at those positions. Sums are built chunk by chunk, so no
    float64 copy of every element is ever held."""
    order = torch.argsort(scores, descending=True, stable=True)
    n = order.numel()
    ends, sums = [], [[] for _ in weights]
    carry = [torch.zeros((), dtype=torch.float64, device=scores.device) for _ in weights]
    for start in range(0, n, CHUNK):
        idx = order[start:start + CHUNK]
        s = scores[idx]
        nxt = scores[order[start + CHUNK]] if start + CHUNK < n else None
        last = torch.ones_like(s, dtype=torch.bool)
        last[:-1] = s[1:] != s[:-1]
        if nxt is not None:
            last[-1] = bool(s[-1] != nxt)
        pos = torch.nonzero(last).squeeze(1)
        ends.append(pos + start + 1)
        for k, w in enumerate(weights):
            c = torch.cumsum(w[idx].to(torch.float64), 0) + carry[k]
            sums[k].append(c[pos])
            carry[k] = c[-1]
    return torch.cat(ends).to(torch.float64), [torch.cat(x) for x in sums]


def _pr_curve(labels, scores) -> tuple[torch.Tensor, torch.Tensor, int]:
    """true positives and predicted positives at each distinct threshold (descending)."""
    y, s = _flat(labels, scores)
    pp, (tp,) = _sorted_group_sums(s, [y])
    return tp, pp, int(y.sum())


def average_precision(labels, scores) -> float:
    """AP = Σ (R_n - R_{n-1}) P_n over distinct thresholds, as scikit-learn."""
    tp, pp, n_pos = _pr_curve(labels, scores)
    if n_pos == 0:
        return float("nan")
    precision, recall = tp / pp, tp / n_pos
    prev = torch.cat([recall.new_zeros(1), recall[:-1]])
    return float(((recall - prev) * precision).sum())


pixel_ap = average_precision


def f1_max(labels, scores) -> float:
    """Maximum F1 over all thresholds."""
    tp, pp, n_pos = _pr_curve(labels, scores)
    if n_pos == 0:
        return float("nan")
    precision, recall = tp / pp, tp / n_pos
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(precision))
    return float(f1.max())


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


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Exact AUPRO (anomalib's definition): per-region overlap averaged over all 8-connected GT regions,
    against the false-positive rate on normal pixels, over every distinct threshold; the curve is
    interpolated at `fpr_limit` and its area divided by `fpr_limit`. masks, maps (N, H, W)."""
    m = _t(masks).cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    regions = _regions(m.reshape((-1,) + m.shape[-2:]))
    n_regions = int(regions.max())
    s = _t(maps).float().reshape(-1)
    if n_regions == 0:
        return float("nan")
    r = torch.from_numpy(regions.reshape(-1)).to(s.device)
    sizes = torch.bincount(r, minlength=n_regions + 1).double()
    inv = (1.0 / (sizes * n_regions)).to(torch.float32)
    inv[0] = 0.0
    weight = inv[r]  # float32 per pixel; summed in float64 chunk by chunk
    normal = r == 0
    n_normal = float(normal.sum())
    if n_normal == 0:
        return float("nan")
    _, (pro, fp) = _sorted_group_sums(s, [weight, normal])
    fpr = fp / n_normal
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
    """The metrics.json keys for one class; pixel ones None without masks."""
    out: dict[str, float | None] = {"image_auroc": image_auroc(labels, scores), "image_ap": average_precision(labels, scores),
                                    "image_f1_max": f1_max(labels, scores)}
    if masks is not None and maps is not None and bool((_t(masks) > 0).any()):
        out.update(pixel_auroc=pixel_auroc(masks, maps), pixel_ap=pixel_ap(masks, maps), pixel_f1_max=pixel_f1_max(masks, maps),
                   aupro=aupro(masks, maps))
    else:
        out.update(pixel_auroc=None, pixel_ap=None, pixel_f1_max=None, aupro=None)
    return {k: (None if v is None or v != v else float(v)) for k, v in out.items()}
