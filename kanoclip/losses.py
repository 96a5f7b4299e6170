"""Losses of eq. 13-15. All are well defined on all-normal batches (empty masks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss on probabilities. prob, target (N, H, W) -> scalar."""
    p = prob.float().clamp(EPS, 1 - EPS)
    t = target.float()
    p_t = p * t + (1 - p) * (1 - t)
    return (-(1 - p_t) ** gamma * torch.log(p_t)).mean()


def smoothed_focal(probs: torch.Tensor, target: torch.Tensor, gamma: float, smooth: float) -> torch.Tensor:
    """The focal loss of April-GAN's and MVFA-AD's code (their loss.py FocalLoss, two classes, alpha 1): probs
    (N, 2, H, W) {normal, abnormal} probabilities, target (N, H, W) in {0, 1} -> mean over pixels of
    -(1 - pt)^gamma log pt, pt = sum_c clamp(onehot_c, smooth, 1 - smooth) p_c + smooth. The smoothing bounds
    -log pt by about -log(smooth) on confidently wrong pixels (at logit scale 100 that changes the loss by tens of
    percent against `focal_loss`)."""
    onehot = F.one_hot(target.long(), 2).permute(0, 3, 1, 2).to(probs.dtype)
    if smooth:
        onehot = onehot.clamp(smooth, 1 - smooth)
    pt = (onehot * probs).sum(1) + smooth
    return (-(1 - pt) ** gamma * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per image, averaged. prob, target (N, H, W) -> scalar."""
    p, t = prob.float().flatten(1), target.float().flatten(1)
    return (1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)).mean()


def local_loss(map_abnormal: torch.Tensor, map_normal: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Eq. 15: Focal(Mᵃ, G) + Dice(Mⁿ, 1 - G) + Dice(Mᵃ, G). Maps and mask (N, H, W)."""
    return focal_loss(map_abnormal, mask, gamma) + dice_loss(map_normal, 1 - mask) + dice_loss(map_abnormal, mask)


def global_loss(prob: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 14: BCE on the global anomaly probability (N,) against labels (N,)."""
    return F.binary_cross_entropy(prob.float().clamp(EPS, 1 - EPS), labels.float())
