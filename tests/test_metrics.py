"""Metrics against scikit-learn and an independent exact AUPRO."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from kano.evaluator.metrics import (aupro, aupro_200, average_precision, f1_max, image_auroc, pixel_auroc, pixel_metrics,
                               ranking_metrics)


def sk_f1_max(y, s):
    p, r, _ = precision_recall_curve(y, s)
    f = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0)
    return f.max()


CASES = []
rng = np.random.default_rng(0)
for n, rounding, scale in [(50, None, 1.0), (1000, 0, 3.0), (5000, 1, 10.0), (300, None, 1e-3)]:
    y = rng.random(n) < 0.3
    s = rng.normal(size=n) * scale + y * scale - 5.0  # outside [0, 1] on purpose
    if rounding is not None:
        s = np.round(s, rounding)  # many ties
    CASES.append((y, s))


@pytest.mark.parametrize("y,s", CASES)
def test_equal_to_scikit_learn(y, s):
    assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-6)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-6)
    assert f1_max(y, s) == pytest.approx(sk_f1_max(y, s), abs=1e-6)
    # torch inputs, float32 scores
    assert image_auroc(torch.tensor(y), torch.tensor(s, dtype=torch.float32)) == pytest.approx(
        roc_auc_score(y, s.astype(np.float32)), abs=1e-6)


def test_all_ties_and_single_class():
    y = np.array([0, 1, 0, 1])
    assert image_auroc(y, np.ones(4)) == 0.5
    assert np.isnan(image_auroc(np.zeros(4), np.arange(4)))
    assert np.isnan(average_precision(np.zeros(4), np.arange(4)))


def test_pixel_metrics_on_maps():
    r = np.random.default_rng(1)
    masks = np.zeros((6, 32, 32), np.uint8)
    masks[0, 5:12, 5:12] = 1
    masks[3, 20:30, 2:6] = 1
    maps = (r.random((6, 32, 32)) + masks * 0.6).astype(np.float32)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-6)


def reference_aupro(masks, maps, limit=0.3):
    """Independent exact AUPRO: a loop over every distinct threshold, regions by scipy, PRO per region."""
    regions = []
    for m in masks:
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(len(regions), lab == k) for k in range(1, n + 1)]
    img_of = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        img_of += [i] * n
    normal = masks == 0
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(np.mean([(pred[img_of[j]] & reg).sum() / reg.sum() for j, reg in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    x = np.concatenate([fprs[fprs <= limit], [limit]])
    yv = np.concatenate([pros[fprs <= limit], [np.interp(limit, fprs, pros)]])
    return np.trapezoid(yv, x) / limit


def test_aupro_equals_independent_exact_reference():
    r = np.random.default_rng(2)
    masks = np.zeros((4, 24, 24), np.uint8)
    masks[0, 2:6, 2:6] = 1
    masks[0, 15:22, 10:12] = 1   # two regions in one image
    masks[1, 8:20, 8:20] = 1
    masks[1, 7, 7] = 1           # touches diagonally: one 8-connected region
    maps = np.round(r.random((4, 24, 24)) + masks * 0.4, 2).astype(np.float32)  # ties
    assert aupro(masks, maps) == pytest.approx(reference_aupro(masks, maps), abs=1e-6)
    assert aupro(masks, maps, fpr_limit=0.1) == pytest.approx(reference_aupro(masks, maps, 0.1), abs=1e-6)


def test_aupro_perfect_and_peers_version():
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 4:8, 4:8] = 1
    perfect = masks.astype(np.float32)
    assert aupro(masks, perfect) == pytest.approx(1.0)
    r = np.random.default_rng(3)
    noisy = (r.random((2, 16, 16)) + masks).astype(np.float32)
    a, b = aupro(masks, noisy), aupro_200(masks, noisy)
    assert 0 <= b <= 1 and abs(a - b) < 0.1
    assert np.isnan(aupro(np.zeros((1, 4, 4)), np.zeros((1, 4, 4))))


def test_nan_scores_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0, 1], [0.1, float("nan")])


@pytest.mark.parametrize("case", ["ties", "top_and_bottom", "one_positive", "all_distinct"])
def test_positive_thresholds_only_across_tie_groups(case):
    """The curves are evaluated only where positives enter: ties of positives with negatives, positives at the
    highest and lowest score, a single positive, and runs of negatives between positive thresholds."""
    r = np.random.default_rng(4)
    masks = np.zeros((3, 20, 20), np.uint8)
    masks[0, 3:9, 3:9] = 1
    masks[2, 10:18, 12:14] = 1
    maps = {"ties": np.round(r.random((3, 20, 20)) + masks * 0.3, 1),
            "top_and_bottom": r.random((3, 20, 20)),
            "one_positive": r.random((3, 20, 20)),
            "all_distinct": r.random((3, 20, 20)) + masks * 0.2}[case].astype(np.float32)
    if case == "top_and_bottom":
        maps[0, 3, 3], maps[2, 10, 12] = 5.0, -5.0      # a positive above every pixel, one below every pixel
    if case == "one_positive":
        masks = np.zeros_like(masks)
        masks[1, 7, 7] = 1
    for scores in (maps, maps.astype(np.float64)):      # packed keys and the sort with indices
        y, s = masks.ravel(), scores.ravel()
        rm = ranking_metrics(y, s)
        assert (rm["auroc"], rm["ap"], rm["f1_max"]) == pytest.approx(sk_three(y, s), abs=1e-9)
    assert aupro(masks, maps) == pytest.approx(reference_aupro(masks, maps), abs=1e-6)
    assert aupro(masks, maps, fpr_limit=0.05) == pytest.approx(reference_aupro(masks, maps, 0.05), abs=1e-6)


def sk_three(y, s):
    """scikit-learn's three calls, the reference for the one-sort functions."""
    return roc_auc_score(y, s), average_precision_score(y, s), sk_f1_max(y, s)


@pytest.mark.parametrize("y,s", CASES)
def test_one_sort_ranking_metrics_equal_scikit_learn(y, s):
    for scores in (s, s.astype(np.float32)):  # float64 (sorted with indices) and float32 (packed keys)
        r = ranking_metrics(y, scores)
        auc, ap, f1 = sk_three(y, scores)
        assert r["auroc"] == pytest.approx(auc, abs=1e-9)
        assert r["ap"] == pytest.approx(ap, abs=1e-9)
        assert r["f1_max"] == pytest.approx(f1, abs=1e-9)


def test_one_sort_pixel_metrics_with_ties_signed_zeros_and_negatives():
    r = np.random.default_rng(5)
    masks = np.zeros((5, 40, 40), np.uint8)
    masks[0, 3:15, 3:9] = 1
    masks[2, 20:38, 30:33] = 1
    masks[4, 0:5, 0:40] = 1
    maps = (r.normal(size=masks.shape) + masks * 0.8).astype(np.float16).astype(np.float32)  # fp16 values: many ties
    maps[1, :10] = 0.0
    maps[1, 10:20] = -0.0       # equal to 0.0: must tie with it, though its bits differ
    maps[0, 3:6, 3:9] = -0.0    # anomalous pixels inside that tie group
    maps[3] = -1e30             # far below everything
    res = pixel_metrics(masks, maps)
    auc, ap, f1 = sk_three(masks.ravel(), maps.ravel())
    assert res["pixel_auroc"] == pytest.approx(auc, abs=1e-9)
    assert res["pixel_ap"] == pytest.approx(ap, abs=1e-9)
    assert res["pixel_f1_max"] == pytest.approx(f1, abs=1e-9)
    assert res["aupro"] == pytest.approx(reference_aupro(masks, maps), abs=1e-6)
    # torch input gives the same
    t = pixel_metrics(torch.from_numpy(masks), torch.from_numpy(maps))
    assert t == pytest.approx(res, abs=1e-12)
    # without AUPRO
    assert set(pixel_metrics(masks, maps, with_aupro=False)) == {"pixel_auroc", "pixel_ap", "pixel_f1_max"}


def test_one_sort_hand_computed():
    # scores 3 > 2 = 2 > 1, labels 1, 0, 1, 0. Pairs (pos, neg): (3,2) win, (3,1) win, (2,2) tie, (2,1) win -> 3.5/4.
    # Thresholds: >=3: tp 1 pp 1 (P 1, R 1/2); >=2: tp 2 pp 3 (P 2/3, R 1); AP = 1/2*1 + 1/2*2/3 = 5/6.
    # F1 at >=3: 2*1/(1+2) = 2/3; at >=2: 2*2/(3+2) = 4/5; at >=1: 2*2/(4+2) = 2/3 -> 4/5.
    r = ranking_metrics([1, 0, 1, 0], np.array([3, 2, 2, 1], np.float32))
    assert r == {"auroc": 3.5 / 4, "ap": pytest.approx(5 / 6, abs=1e-15), "f1_max": pytest.approx(4 / 5, abs=1e-15)}
