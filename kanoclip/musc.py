"""MuSc (Li et al., "MuSc: Zero-Shot Industrial Anomaly Classification and Segmentation with Mutual Scoring
of the Unlabeled Images", ICLR 2024) on a frozen Kano backbone, and `MutualFusion`, Kano's own addition.

MuSc is transductive: it scores each test image against the other (unlabeled) test images of its class, so
one forward pass must receive a class's whole test set. Three parts, each a pure function here:

- LNAMD (local neighbourhood aggregation with multiple degrees), `lnamd`: per stage, the patch tokens of
  each image on their grid are layer-normalised over the whole (C, H, W) map, each token is replaced by
  the mean of its r x r neighbourhood (zero padding counted), and tokens are L2-normalised;
- MSM (mutual scoring module), `msm`: each patch of image i gets, for every other image j, its smallest
  Euclidean distance to j's patches; the interval average over j keeps the lowest 30 % of those distances.
  `musc_patch_scores` averages MSM over the stages and over r in {1, 3, 5};
- RsCIN (re-scoring with constrained image-level neighbourhood), `rscin`: image scores (the map's maximum,
  min-max normalised over the class) are re-scored as the mean over k in {1, 2, 3} of the similarity-
  weighted average over each image's k most similar images (class-token cosine similarity, itself included).

Constants and their sources (MuSc public code: github.com/xrli-U/MuSc):

- R_LIST = (1, 3, 5): MuSc public code, configs/musc.yaml `r_list` (MuSc paper Sec. 3, LNAMD);
- INTERVAL = (0.0, 0.3): MuSc public code, models/musc.py `topmin_min=0, topmin_max=0.3` (the interval average
  of MuSc paper Sec. 3, MSM); the upper end is floor(0.3 * (N - 1)) images, as the public code counts them;
- RSCIN_K = (1, 2, 3): MuSc public code, models/musc.py `k_score` for MVTec AD and every dataset but VisA
  (VisA: 1, 8, 9);
- LAYER_NORM_EPS = 1e-5: MuSc public code, models/modules/_LNAMD.py (torch.nn.LayerNorm's default, no affine);
- stages: the backbone's `stages` (6, 12, 18, 24 on ViT-L-14-336 = the public code's feature_layers
  [5, 11, 17, 23], 0-based); tokens are the Q-K residual stream at those blocks before ln_post / proj, as
  the public code takes them; the class token for RsCIN is the L2-normalised `encode_image` feature;
- maps upsampled bilinearly with align_corners=True and not smoothed: MuSc public code, models/musc.py.

Kano's departures, each because Kano's evaluator needs it: patch scores are halved (Euclidean distance between
unit vectors is in [0, 2]) so that maps are in [0, 1] through a fixed scaling; the interval keeps at least one
image (the public code's floor keeps none below 4 test images, a NaN); negative class-token similarities count
as 0 in RsCIN so that its weights stay a convex combination and scores stay in [0, 1]; a class whose image
scores are all equal gets RsCIN scores of 0 (the public code divides by zero).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kano.errors import KanoError

from .model import InferenceBatch
from .protocol import MethodDefaults

R_LIST = (1, 3, 5)
INTERVAL = (0.0, 0.3)
RSCIN_K = (1, 2, 3)
LAYER_NORM_EPS = 1e-5
FUSION_RULE = ("map = (method map + MuSc map) / 2, image score = (method score + MuSc score) / 2 "
               "(Kano's own addition, not from a paper)")


def lnamd(tokens: torch.Tensor, r: int) -> torch.Tensor:
    """LNAMD at one degree. tokens (N, L, C) on a square grid (L = g * g) -> (N, L, C), unit norm per token.

    Per image: layer norm over all C * g * g values (no affine), then the mean over each token's r x r
    neighbourhood (r odd; zero padding counts towards the r * r), then L2 normalisation."""
    n, l, c = tokens.shape
    g = math.isqrt(l)
    if g * g != l:
        raise ValueError(f"patch tokens must form a square grid, got {l}")
    if r < 1 or r % 2 == 0:
        raise ValueError(f"LNAMD degree r must be an odd integer >= 1, got {r}")
    x = tokens.float().transpose(1, 2).reshape(n, c, g, g)
    x = F.layer_norm(x, (c, g, g), eps=LAYER_NORM_EPS)
    if r > 1:
        x = F.avg_pool2d(x, r, stride=1, padding=r // 2, count_include_pad=True)
    return F.normalize(x.flatten(2).transpose(1, 2), dim=-1)


def interval_count(n_others: int, interval: tuple[float, float] = INTERVAL) -> tuple[int, int]:
    """(k_min, k_max): MSM averages the sorted distances to the other images from index k_min up to k_max
    (exclusive); fractions count floor(fraction * n_others) images, at least one image kept."""
    lo, hi = (int(f * n_others) if f < 1 else int(f) for f in interval)
    lo, hi = min(lo, hi), max(lo, hi)
    hi = min(max(hi, lo + 1), n_others)
    return min(lo, hi - 1), hi


def msm(z: torch.Tensor, interval: tuple[float, float] = INTERVAL) -> torch.Tensor:
    """MSM. z (N, L, C) unit-norm tokens of one class's N test images -> (N, L) scores in [0, 2]:
    for each patch of image i, its smallest Euclidean distance to the patches of each image j != i,
    sorted over j, averaged over the interval `interval_count(N - 1)` (the lowest 30 % by default)."""
    n, l, c = z.shape
    if n < 2:
        raise KanoError(f"transductive methods need at least 2 test images per class, got {n}")
    lo, hi = interval_count(n - 1, interval)
    out = torch.empty(n, l, dtype=torch.float32, device=z.device)
    z = z.float()
    for i in range(n):  # one image at a time: the full (N, L, N, L) distance tensor would not fit for real CLIPs
        others = torch.cat([z[:i], z[i + 1:]]).reshape(-1, c)
        d = torch.cdist(z[i], others).view(l, n - 1, l).amin(-1)          # (L, N - 1)
        out[i] = d.sort(dim=1).values[:, lo:hi].mean(1)
    return out


def musc_patch_scores(stage_tokens: list[torch.Tensor], r_list=R_LIST, interval=INTERVAL) -> torch.Tensor:
    """stage_tokens: per stage (N, L, C) -> (N, S, L): per stage, MSM averaged over the degrees r of LNAMD.
    MuSc's patch score is the mean over S of this."""
    return torch.stack([torch.stack([msm(lnamd(t, r), interval) for r in r_list]).mean(0) for t in stage_tokens], 1)


def rscin(scores: torch.Tensor, class_tokens: torch.Tensor, k_list=RSCIN_K) -> torch.Tensor:
    """RsCIN. scores (N,), class_tokens (N, E) -> (N,) in [0, 1].

    s = min-max normalised scores; W = cosine similarities of the class tokens (negatives as 0); for each k,
    W_k keeps in each row its k largest entries (the image itself included), P_k = W_k row-normalised;
    result = mean over k of P_k s. k is capped at N."""
    n = scores.shape[0]
    s = scores.double()
    span = s.max() - s.min()
    s = (s - s.min()) / span if span > 0 else torch.zeros_like(s)
    t = F.normalize(class_tokens.double(), dim=-1)
    w = (t @ t.T).clamp(min=0)
    out = torch.zeros_like(s)
    for k in k_list:
        k = min(int(k), n)
        idx = w.topk(k, dim=1).indices
        wk = torch.zeros_like(w).scatter(1, idx, w.gather(1, idx))
        out += (wk / wk.sum(1, keepdim=True)) @ s
    return (out / len(k_list)).float().clamp(0, 1)


def stage_features(backbone, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """images (N, 3, S, S) normalised -> (class tokens (N, E) = encode_image, [(N, L, W) per stage]): the Q-K
    stream's residual tokens after each of `backbone.stages` (no ln_post, no proj), class token dropped."""
    feats = backbone(images, vv=False, raw=True)
    return feats.global_feature.float(), [t.float() for t in feats.patch_tokens]


class MuSc(nn.Module, MethodDefaults):
    """Full MuSc on a frozen `Backbone`. forward(images (N, 3, S, S), class_names) -> InferenceBatch (stage_maps (N, n_stages, g, g),
    all in [0, 1]), where the N
    images are ONE class's whole test set (`transductive`: evaluate_method passes them as one batch).
    The map is the mean over stages and degrees of MSM / 2, upsampled; the image score is RsCIN of its max."""

    transductive = True

    def __init__(self, backbone, r_list=R_LIST, interval=INTERVAL, k_list=RSCIN_K):
        super().__init__()
        self.backbone = backbone
        self.r_list, self.interval, self.k_list = tuple(r_list), tuple(interval), tuple(k_list)

    def constants(self) -> dict:
        return {"r_list": list(self.r_list), "interval": list(self.interval), "rscin_k": list(self.k_list),
                "stages": list(self.backbone.stages), "layer_norm_eps": LAYER_NORM_EPS}

    def forward(self, images: torch.Tensor, class_names: list[str] | None = None) -> InferenceBatch:
        n, _, h, w = images.shape
        if n < 2:
            raise KanoError(f"transductive methods need at least 2 test images per class, got {n}")
        glob, tokens = stage_features(self.backbone, images)
        per_stage = musc_patch_scores(tokens, self.r_list, self.interval) / 2  # Euclidean on unit vectors: [0, 2]
        g = math.isqrt(per_stage.shape[-1])
        stage_maps = per_stage.view(n, -1, g, g).clamp(0, 1)
        amap = F.interpolate(stage_maps.mean(1, keepdim=True), size=(h, w), mode="bilinear", align_corners=True)[:, 0]
        score = rscin(amap.flatten(1).amax(1), glob, self.k_list)
        return InferenceBatch(score.to(images.device), amap.clamp(0, 1), stage_maps)


class MutualFusion(nn.Module, MethodDefaults):
    """Kano's own addition, not from a paper: a per-image method fused with MuSc on the same frozen backbone.
    forward(images (N, 3, S, S), class_names) -> InferenceBatch with map = (method map + MuSc map) / 2 and
    image score = (method score + MuSc score) / 2; stage_maps are MuSc's. Transductive, as MuSc."""

    transductive = True

    def __init__(self, model: nn.Module, musc: MuSc):
        super().__init__()
        self.model, self.musc = model, musc
        self.backbone = model.backbone  # images are prepared for the method; MuSc shares its backbone

    def begin_class(self, folder_class: str, prompt_class: str) -> None:
        self.model.begin_class(folder_class, prompt_class)  # e.g. WinCLIP+'s per-class references

    def forward(self, images: torch.Tensor, class_names: list[str]) -> InferenceBatch:
        a = self.model(images, class_names).inference()
        b = self.musc(images, class_names).inference()
        bmap = b.anomaly_map
        if bmap.shape[-2:] != a.anomaly_map.shape[-2:]:
            bmap = F.interpolate(bmap[:, None], size=a.anomaly_map.shape[-2:], mode="bilinear", align_corners=True)[:, 0]
        amap = (a.anomaly_map.float() + bmap.float()) / 2
        score = (a.image_score.float() + b.image_score.float()) / 2
        return InferenceBatch(score, amap, b.stage_maps)
