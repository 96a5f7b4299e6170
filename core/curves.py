"""The ranking sweep under every threshold-based number Kano computes: the metrics (evaluator/metrics.py,
whose docstring explains the one-sort method) and the decision threshold `kano train` calibrates on its
auxiliary data (`f1_threshold`). It lives in the bottom layer so that training and evaluation share it."""

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


class Curves(NamedTuple):
    """The ranking curves at the thresholds where recall changes: the distinct scores of the positives,
    descending (K entries). above: pixels with score >= t; pos_above: positives with score >= t;
    neg_gt: negatives with score > t (int64); weight_above: the sum of region weights of the positives with
    score >= t (float64, or None). Between two such thresholds only negatives enter, so every metric here
    (AUROC, AP, F1-max, the PRO curve) follows from these K points exactly."""

    above: torch.Tensor
    pos_above: torch.Tensor
    neg_gt: torch.Tensor
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
    negative (a label, or a region id for AUPRO); weights (R+1,) per id, summed over positives above each
    threshold. After the sort only the P positives are visited (a binary search each into the sorted
    pixels), so the cost beyond the sort is O(P log n), not O(n)."""
    n = scores.numel()
    if n == 0:
        raise ValueError("scores must not be empty, got 0 elements")
    low = 0xFFFFFFFF
    if scores.dtype == torch.float32 and int(ids.max()) < 2**31:
        ks = _sort((_order_key(scores) << 32) | ids)                      # ties: negatives (id 0) first
        pos_idx = torch.nonzero((ks & low) != 0).squeeze(1)
        pk = ks[pos_idx] >> 32                                            # the positives' score keys, ascending
        first = torch.ones_like(pk, dtype=torch.bool)
        first[1:] = pk[1:] != pk[:-1]
        u = pk[first]                                                     # (K,) distinct positive scores, ascending
        lt = torch.searchsorted(ks, u << 32)                              # pixels with score < u
        le = torch.searchsorted(ks, (u << 32) | low, right=True)          # pixels with score <= u
        pos_ids = ks[pos_idx] & low
    else:  # float64 scores (image level, small): the same from a sort with indices
        sv, order = torch.sort(scores)
        sid = ids[order]
        pos_idx = torch.nonzero(sid != 0).squeeze(1)
        pk = sv[pos_idx]
        first = torch.ones_like(pk, dtype=torch.bool)
        first[1:] = pk[1:] != pk[:-1]
        u = pk[first]
        lt = torch.searchsorted(sv, u)
        le = torch.searchsorted(sv, u, right=True)
        pos_ids = sid[pos_idx]
    n_pos = pos_idx.numel()
    if n_pos == 0:
        z = torch.zeros(0, dtype=torch.int64, device=scores.device)
        return Curves(z, z, z, None if weights is None else z.double(), n, 0)
    pos_lt = torch.nonzero(first).squeeze(1)                               # positives with score < u
    pos_le = torch.cat([pos_lt[1:], pos_lt.new_tensor([n_pos])])           # positives with score <= u
    weight_above = None
    if weights is not None:
        w = weights.to(torch.float64)[pos_ids]                             # weights of the positives, ascending score
        cw = torch.cat([w.new_zeros(1), torch.cumsum(w, 0)])
        weight_above = (cw[-1] - cw[pos_lt]).flip(0)
    return Curves((n - lt).flip(0), (n_pos - pos_lt).flip(0), ((n - le) - (n_pos - pos_le)).flip(0), weight_above, n, n_pos)


def f1_threshold(labels, scores) -> float:
    """The score threshold with the best F1 on (labels (N,), scores (N,)): midway between the best
    threshold's score and the next lower score (the score itself when none is lower); 0.5 when the labels
    are all one class. F1 is maximal where positives enter the ranking, i.e. at one of the curve's points;
    of equal maxima the highest threshold wins."""
    y, s = _flat(labels, scores)
    if y.all() or (~y).all():
        return 0.5
    c = _curves(s, y.to(torch.int64))
    f1 = 2 * c.pos_above.double() / (c.above.double() + c.n_pos)
    t = torch.unique(s[y]).flip(0)[int(torch.argmax(f1))]  # the curve's points are the distinct positive scores, descending
    lower = s[s < t]
    return float((t + lower.max()) / 2) if len(lower) else float(t)
