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
  min-max normalised over the class) are re-scored as the mean over the windows k (1, 2, 3 on MVTec AD) of the
  similarity-weighted average over each image's k most similar images (class-token cosine similarity, itself
  included).

Constants and their sources (MuSc public code: github.com/xrli-U/MuSc):

- R_LIST = (1, 3, 5): MuSc public code, configs/musc.yaml `r_list` (MuSc paper Sec. 3, LNAMD);
- INTERVAL = (0.0, 0.3): MuSc public code, models/musc.py `topmin_min=0, topmin_max=0.3` (the interval average
  of MuSc paper Sec. 3, MSM); the upper end is floor(0.3 * (N - 1)) images, as the public code counts them;
- RsCIN windows per dataset kind, `rscin_windows`: (1, 8, 9) for VisA (MuSc public code, models/musc.py line 243,
  `k_score = [1, 8, 9]` when the dataset is 'visa'), (1, 2, 3) for MVTec AD (line 245) and, as the public code's
  else branch does (line 247, BTAD included), for every other kind; `kano eval --rscin-windows` overrides them;
- LAYER_NORM_EPS = 1e-5: MuSc public code, models/modules/_LNAMD.py (torch.nn.LayerNorm's default, no affine);
- stages: the backbone's `stages` (6, 12, 18, 24 on ViT-L-14-336 = the public code's feature_layers
  [5, 11, 17, 23], 0-based); tokens are the Q-K residual stream at those blocks before ln_post / proj, as
  the public code takes them; the class token for RsCIN is the L2-normalised `encode_image` feature;
- maps upsampled bilinearly with align_corners=True and not smoothed: MuSc public code, models/musc.py;
- the map is the mean MSM distance itself (in [0, 2]: Euclidean distance between unit vectors), as the public
  code reports it (`map_scale` 1); `kano eval --mutual` fuses MuSc at `map_scale` 0.5 so that both halves of its
  mean are in [0, 1];
- position embeddings at another grid than the weights' resampled bicubically without antialias, as its vendored
  open_clip does (models/backbone/open_clip/model.py `resize_pos_embed`; `kano eval --method musc` builds its
  backbone with pos_resize "bicubic", kanoclip/pos_embed.py);
- negative class-token similarities enter RsCIN as they are (the public code does not clamp them; CLIP class
  tokens are in practice all positively correlated). `clamp_negative=True` counts them as 0.

Kano's choices where the public code has no answer: the interval keeps at least one image (the public code's floor
keeps none below 5 test images and averages an empty set, a NaN); a class whose image scores are all equal gets
RsCIN scores of 0 (the public code divides by zero); a row of RsCIN whose kept similarities sum to 0 or less
(only possible with negative similarities) uses them clamped at 0 (the public code divides by that sum).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kano.core.errors import KanoError

from .model import InferenceBatch
from .protocol import MethodDefaults

R_LIST = (1, 3, 5)
INTERVAL = (0.0, 0.3)
RSCIN_K = (1, 2, 3)
# MuSc public code, models/musc.py lines 242-247: k_score by dataset name; every other kind takes the else branch
RSCIN_WINDOWS = {"visa": (1, 8, 9), "mvtec": (1, 2, 3)}
RSCIN_SOURCES = {"visa": "MuSc public code, models/musc.py line 243: k_score = [1, 8, 9] for VisA",
                 "mvtec": "MuSc public code, models/musc.py line 245: k_score = [1, 2, 3] for MVTec AD"}
RSCIN_OTHER_SOURCE = ("MuSc public code, models/musc.py line 247: k_score = [1, 2, 3] for every dataset other than "
                      "VisA and MVTec AD (its else branch, BTAD included)")
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


def rscin_windows(kind: str | None) -> tuple[tuple[int, ...], str]:
    """-> (RsCIN windows, their source) for a dataset kind (KIND of --data KIND:PATH; None: unknown)."""
    if kind in RSCIN_WINDOWS:
        return RSCIN_WINDOWS[kind], RSCIN_SOURCES[kind]
    return RSCIN_K, RSCIN_OTHER_SOURCE


def rscin(scores: torch.Tensor, class_tokens: torch.Tensor, k_list=RSCIN_K, clamp_negative: bool = False) -> torch.Tensor:
    """RsCIN. scores (N,), class_tokens (N, E) -> (N,), in [0, 1] when no similarity is negative (or clamped).

    s = min-max normalised scores; W = cosine similarities of the class tokens (negatives as 0 with
    clamp_negative); for each window k, W_k keeps in each row its k largest entries (the image itself included),
    P_k = W_k row-normalised; result = mean over k of P_k s. k is capped at N."""
    n = scores.shape[0]
    s = scores.double()
    span = s.max() - s.min()
    s = (s - s.min()) / span if span > 0 else torch.zeros_like(s)
    t = F.normalize(class_tokens.double(), dim=-1)
    w = t @ t.T
    if clamp_negative:
        w = w.clamp(min=0)
    out = torch.zeros_like(s)
    for k in k_list:
        k = min(int(k), n)
        idx = w.topk(k, dim=1).indices
        wk = torch.zeros_like(w).scatter(1, idx, w.gather(1, idx))
        den = wk.sum(1, keepdim=True)
        bad = den[:, 0] <= 0
        if bad.any():  # only with negative similarities: these rows as if clamped (the public code divides by it)
            wk[bad] = wk[bad].clamp(min=0)
            den = wk.sum(1, keepdim=True)
        out += (wk / den) @ s
    return (out / len(k_list)).float()


def stage_features(backbone, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """images (N, 3, S, S) normalised -> (class tokens (N, E) = encode_image, [(N, L, W) per stage]): the Q-K
    stream's residual tokens after each of `backbone.stages` (no ln_post, no proj), class token dropped."""
    feats = backbone(images, vv=False, raw=True)
    return feats.global_feature.float(), [t.float() for t in feats.patch_tokens]


class MuSc(nn.Module, MethodDefaults):
    """Full MuSc on a frozen `Backbone`. forward(images (N, 3, S, S), class_names) -> InferenceBatch (stage_maps
    (N, n_stages, g, g); maps in [0, 2 * map_scale], image scores in [0, 1]), where the N
    images are ONE class's whole test set (`transductive`: evaluate_method passes them as one batch).
    The map is map_scale x the mean over stages and degrees of MSM, upsampled (map_scale 1: the public code's
    scale, in [0, 2]); the image score is RsCIN of its max with windows k_list (see `rscin_windows`)."""

    transductive = True
    method = "musc"  # its registry name, for the provenance of its results

    def __init__(self, backbone, r_list=R_LIST, interval=INTERVAL, k_list=RSCIN_K, map_scale: float = 1.0,
                 clamp_negative: bool = False, k_source: str = RSCIN_OTHER_SOURCE):
        super().__init__()
        if not k_list or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in k_list):
            raise KanoError(f"RsCIN windows must be integers >= 1 (e.g. 1,8,9), got {list(k_list)}")
        if not map_scale > 0:
            raise KanoError(f"MuSc map_scale must be > 0, got {map_scale}")
        self.backbone = backbone
        self.r_list, self.interval, self.k_list = tuple(r_list), tuple(interval), tuple(k_list)
        self.map_scale, self.clamp_negative, self.k_source = float(map_scale), bool(clamp_negative), k_source

    def constants(self) -> dict:
        return {"r_list": list(self.r_list), "interval": list(self.interval), "rscin_windows": list(self.k_list),
                "rscin_windows_source": self.k_source, "rscin_clamp_negative": self.clamp_negative,
                "map_scale": self.map_scale, "stages": list(self.backbone.stages), "layer_norm_eps": LAYER_NORM_EPS,
                "pos_resize": self.backbone.pos_resize}

    def forward(self, images: torch.Tensor, class_names: list[str] | None = None) -> InferenceBatch:
        n, _, h, w = images.shape
        if n < 2:
            raise KanoError(f"transductive methods need at least 2 test images per class, got {n}")
        glob, tokens = stage_features(self.backbone, images)
        per_stage = musc_patch_scores(tokens, self.r_list, self.interval) * self.map_scale
        g = math.isqrt(per_stage.shape[-1])
        stage_maps = per_stage.view(n, -1, g, g)
        amap = F.interpolate(stage_maps.mean(1, keepdim=True), size=(h, w), mode="bilinear", align_corners=True)[:, 0]
        score = rscin(amap.flatten(1).amax(1), glob, self.k_list, self.clamp_negative)
        return InferenceBatch(score.to(images.device), amap, stage_maps)


class MutualFusion(nn.Module, MethodDefaults):
    """Kano's own addition, not from a paper: a per-image method fused with MuSc on the same frozen backbone.
    forward(images (N, 3, S, S), class_names) -> InferenceBatch with map = (method map + MuSc map) / 2 and
    image score = (method score + MuSc score) / 2; stage_maps are MuSc's. Transductive, as MuSc."""

    transductive = True

    def __init__(self, model: nn.Module, musc: MuSc):
        super().__init__()
        self.model, self.musc = model, musc
        self.backbone = model.backbone  # images are prepared for the method; MuSc shares its backbone

    def rename_references(self, names: dict[str, str]) -> None:
        self.model.rename_references(names)

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
