"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) on a frozen Kano
backbone, as a pure nn.Module fitted on normal images only.

What it is: a memory bank of locally aware patch features of normal images, subsampled by greedy k-center
coreset selection; a test patch's score is its Euclidean distance to the nearest memory entry, the map is those
distances upsampled and smoothed, and the image score is the largest patch distance reweighted by how isolated
its nearest memory entry is (the paper's eq. 7).

Steps and where each comes from (authors' code: github.com/amazon-science/patchcore-inspection, src/patchcore;
anomalib 2.7.0: anomalib/models/image/patchcore and anomalib/models/components; docs/peers.md lists every
default with its file and line):

- stages: the authors take WideResNet-50's layer2 and layer3, the middle two of its four stages. Kano's backbones
  are ViTs; their four stages are the blocks spread evenly (6/12/18/24 of 24, `backbone.spread_stages`), so
  PatchCore takes the second and third of those (12 and 18 of ViT-L/14's 24 blocks). Tokens are the residual
  stream as the block wrote it (no `ln_post`, no projection, the Q-K path): the counterpart of a CNN's
  intermediate activation. Every stage of a ViT has the same grid, so the authors' bilinear resampling of
  layer3 onto layer2's grid is the identity here;
- locally aware features (authors' patchcore.py `PatchMaker.patchify` and common.py `Preprocessing`,
  `Aggregator`): each position's 3 x 3 neighbourhood (zero padding), flattened channel-major (C x 3 x 3),
  adaptive-average-pooled to `pretrain_embed_dim` per stage; the stages stacked and adaptive-average-pooled to
  `target_embed_dim`. With `pretrain_embed_dim` = C the first pooling is the mean of each channel over the
  neighbourhood, anomalib's `AvgPool2d(3, 1, 1)`, and with `target_embed_dim` = 2 C the second is the identity,
  anomalib's concatenation: the equivalence test uses that setting;
- coreset: the features are projected to `projection_dim` dimensions by a dense random matrix (authors'
  sampler.py `GreedyCoresetSampler._reduce_features`, a bias-free `nn.Linear` with its default initialisation),
  then greedy k-center selection from one seeded random start, anomalib's `KCenterGreedy` loop; it keeps
  int(N * coreset_ratio) of the N training patches;
- patch score: the Euclidean distance to the nearest memory entry, as a matrix product and a minimum
  (|x|² - 2 x·m + |m|², clamped at 0, square root: anomalib's `euclidean_dist`);
- image score (paper eq. 7, anomalib's `compute_anomaly_score`): the patch with the largest distance s*, its
  nearest memory entry m*, the `num_neighbors` entries nearest to m* (m* first); s = (1 - softmax(distances of
  the patch to them))[m*] * s*. Those neighbour lists depend only on the memory bank, so they are computed once
  at fit time (a buffer) rather than at every image;
- map: the patch distances upsampled bilinearly (authors' common.py `RescaleSegmentor`) and smoothed by a
  Gaussian of σ = 4 px, kernel 2 * int(4σ + 0.5) + 1, reflected borders (authors' σ and truncation; anomalib's
  `GaussianBlur2d`).

Departures (docs/peers.md says why): the backbone (ViT blocks, above); the authors' approximate greedy starts
from the mean distance to 10 random points, anomalib's exact greedy from one random point, which Kano follows so
that both steps can be checked against anomalib; features are projected only when they have more than
`projection_dim` dimensions (the authors also project up); the memory before subsampling is capped at
`max_fit_patches` patches (a seeded uniform subset beyond it), so that fitting memory is bounded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import Backbone, grid_hw, spread_stages
from .model import InferenceBatch, backbone_autocast, full_precision
from .protocol import MethodDefaults


@dataclass
class PatchCoreConfig:
    """PatchCore's settings, each default the authors' or anomalib's (docs/peers.md names file and line)."""

    pretrain_embed_dim: int = 1024     # authors: bin/run_patchcore.py --pretrain_embed_dimension, sample_training.sh
    target_embed_dim: int = 1024       # authors: bin/run_patchcore.py --target_embed_dimension, sample_training.sh
    patch_size: int = 3                # authors: --patchsize 3; anomalib: AvgPool2d(3, 1, 1)
    coreset_ratio: float = 0.1         # authors: sampler -p 0.1 (IM224 baseline); anomalib coreset_sampling_ratio
    projection_dim: int = 128          # authors: sampler.py dimension_to_project_features_to
    num_neighbors: int = 9             # anomalib: num_neighbors (b of the paper's eq. 7)
    sigma: float = 4.0                 # authors: common.py RescaleSegmentor.smoothing; anomalib sigma
    upsample: str = "bilinear"         # authors: RescaleSegmentor (anomalib's PatchCore map: "nearest")
    max_fit_patches: int = 1_000_000   # Kano's bound on the memory before subsampling
    seed: int = 0                      # authors: run_patchcore.py --seed 0

    def __post_init__(self):
        for name in ("pretrain_embed_dim", "target_embed_dim", "projection_dim", "num_neighbors", "max_fit_patches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ValueError(f"patch_size must be an odd integer >= 1, got {self.patch_size}")
        if not 0 < self.coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0 (0: no smoothing), got {self.sigma}")
        if self.upsample not in ("bilinear", "nearest"):
            raise ValueError(f"upsample must be one of bilinear, nearest, got {self.upsample!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- shared by PatchCore and PaDiM

def middle_stages(depth: int) -> list[int]:
    """PatchCore's stages: the 2nd and 3rd of the four evenly spread blocks (WideResNet-50's layer2, layer3)."""
    st = spread_stages(depth)
    return st[1:3] if len(st) >= 3 else st[-2:]


@torch.no_grad()
def stage_grids(backbone: Backbone, images: torch.Tensor) -> list[torch.Tensor]:
    """images (N, 3, S, S) normalised -> per backbone stage (N, C, g, g) float32: the residual stream as the
    block wrote it (Q-K path, no ln_post / proj), on the patch grid."""
    with backbone_autocast(images.device):
        feats = backbone(images, vv=False, raw=True)
    out = []
    for t in feats.patch_tokens:
        h, w = grid_hw(t.shape[1])
        out.append(t.float().transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w))
    return out


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """maps (N, H, W) -> (N, H, W) smoothed by a normalised Gaussian of σ px, kernel 2 * int(4σ + 0.5) + 1
    (scipy's truncate 4, anomalib's compute_kernel_size), reflected borders (torch 'reflect', as anomalib pads).
    Maps narrower than the kernel's radius are padded by as much as reflection allows (the kernel is cut)."""
    if sigma <= 0:
        return maps
    radius = int(4.0 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device)
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    k = k / k.sum()
    y = maps.unsqueeze(1)
    ph, pw = min(radius, maps.shape[-2] - 1), min(radius, maps.shape[-1] - 1)
    if pw:
        y = F.pad(y, (pw, pw, 0, 0), mode="reflect")
    kw = k[radius - pw: radius + pw + 1]
    y = F.conv2d(y, (kw / kw.sum()).view(1, 1, 1, -1))
    if ph:
        y = F.pad(y, (0, 0, ph, ph), mode="reflect")
    kh = k[radius - ph: radius + ph + 1]
    y = F.conv2d(y, (kh / kh.sum()).view(1, 1, -1, 1))
    return y.squeeze(1)


def euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (..., n, D), y (..., m, D) -> (..., n, m) Euclidean distances as a matrix product: sqrt(max(0,
    |x|² - 2 x·y + |y|²)) (exports as MatMul; anomalib computes them the same way)."""
    xx = x.pow(2).sum(-1, keepdim=True)
    yy = y.pow(2).sum(-1, keepdim=True).transpose(-2, -1)
    return (xx - 2 * (x @ y.transpose(-2, -1)) + yy).clamp_min(0).sqrt()


# ---------------------------------------------------------------- locally aware patch features

def adaptive_bins(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bins of torch's adaptive average pooling from n_in to n_out, as gather indices (n_out, w) and weights
    (n_out, w) (1 / bin length inside the bin, 0 in the padding): bin i is [floor(i n_in / n_out),
    ceil((i + 1) n_in / n_out))."""
    starts = [(i * n_in) // n_out for i in range(n_out)]
    ends = [-((-(i + 1) * n_in) // n_out) for i in range(n_out)]
    width = max(e - s for s, e in zip(starts, ends))
    idx = torch.zeros(n_out, width, dtype=torch.long)
    wts = torch.zeros(n_out, width)
    for i, (s, e) in enumerate(zip(starts, ends)):
        idx[i, : e - s] = torch.arange(s, e)
        idx[i, e - s:] = s
        wts[i, : e - s] = 1.0 / (e - s)
    return idx, wts


def adaptive_mean(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """x (..., n_in) -> (..., n_out): adaptive average pooling over the last axis (the authors' `MeanMapper`
    and `Aggregator`), written as a gather and a weighted sum so that it exports for any sizes."""
    n_in = x.shape[-1]
    if n_in == n_out:
        return x
    idx, wts = adaptive_bins(n_in, n_out)
    g = x[..., idx.to(x.device)]                                     # (..., n_out, w)
    return (g * wts.to(x.device, x.dtype)).sum(-1)


def neighbourhoods(grid: torch.Tensor, size: int) -> torch.Tensor:
    """grid (N, C, h, w) -> (N, h * w, C * size²): each position's size x size neighbourhood (zero padding),
    flattened channel-major, the layout of the authors' `Unfold` patches (C, size, size); by padding and slicing."""
    n, c, h, w = grid.shape
    p = size // 2
    padded = F.pad(grid, (p, p, p, p))
    parts = [padded[:, :, dy: dy + h, dx: dx + w] for dy in range(size) for dx in range(size)]
    stacked = torch.stack(parts, 2)                                  # (N, C, size², h, w)
    return stacked.permute(0, 3, 4, 1, 2).reshape(n, h * w, c * size * size)


def locally_aware(grids: list[torch.Tensor], cfg: PatchCoreConfig) -> torch.Tensor:
    """Per stage (N, C_s, g, g) -> (N, g * g, target_embed_dim): 3 x 3 neighbourhoods, pooled to
    `pretrain_embed_dim` per stage, stacked, pooled to `target_embed_dim` (authors' `_embed`)."""
    size = grids[0].shape[-2:]
    per_stage = []
    for g in grids:
        if g.shape[-2:] != size:  # a CNN's later stage: bilinear onto the first stage's grid (authors' _embed)
            g = F.interpolate(g, size=size, mode="bilinear", align_corners=False)
        per_stage.append(adaptive_mean(neighbourhoods(g, cfg.patch_size), cfg.pretrain_embed_dim))
    return adaptive_mean(torch.cat(per_stage, -1), cfg.target_embed_dim)


# ---------------------------------------------------------------- coreset

def random_projection(d_in: int, d_out: int, seed: int) -> torch.Tensor:
    """(d_out, d_in): the authors' projection, a bias-free nn.Linear's default initialisation (Kaiming uniform,
    a = sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in))), drawn from a generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(d_out, d_in, generator=g) * 2 - 1) * bound


def coreset_start(n: int, seed: int) -> int:
    """The first coreset index: one uniform draw in [0, n) from a generator seeded with `seed` (anomalib draws
    `torch.randint(high=n, size=(1,))` from the global generator, which `torch.manual_seed(seed)` makes equal)."""
    return int(torch.randint(high=n, size=(1,), generator=torch.Generator().manual_seed(seed)).item())


def kcenter_greedy(features: torch.Tensor, k: int, start: int) -> torch.Tensor:
    """Greedy k-center selection. features (N, d), k <= N, start in [0, N) -> (k,) long indices, start first;
    each next index is the point farthest (Euclidean) from every point chosen so far. Memory O(N): one distance
    column per step, never the N x N matrix."""
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"coreset size must be in 1..{n}, got {k}")
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = start
    nearest = None
    idx = torch.tensor(start)
    for i in range(1, k):
        d = torch.linalg.vector_norm(features - features[idx], dim=1)
        nearest = d if nearest is None else torch.minimum(nearest, d)
        idx = torch.argmax(nearest)
        nearest[idx] = 0.0
        chosen[i] = idx
    return chosen


def coreset_indices(bank: torch.Tensor, cfg: PatchCoreConfig, projection: torch.Tensor | None = None) -> torch.Tensor:
    """bank (N, D) -> the kept indices (int(N * coreset_ratio), at least 1): projected (when D > projection_dim)
    and k-center greedy from the seeded start. `projection` (d, D) replaces the seeded random matrix."""
    n, dim = bank.shape
    k = max(1, int(n * cfg.coreset_ratio))
    if k >= n:
        return torch.arange(n)
    if projection is None and dim > cfg.projection_dim:
        projection = random_projection(dim, cfg.projection_dim, cfg.seed).to(bank.device)
    feats = bank @ projection.T if projection is not None else bank
    return kcenter_greedy(feats, k, coreset_start(n, cfg.seed))


def support_sets(bank: torch.Tensor, b: int, chunk: int = 1024) -> torch.Tensor:
    """bank (M, D) -> (M, min(b, M)) long: for each entry its b nearest entries, nearest first (itself, distance
    0 up to round-off), by `euclidean` and topk as anomalib finds N_b(m*) of eq. 7."""
    b = min(b, bank.shape[0])
    out = [euclidean(bank[i: i + chunk], bank).topk(b, dim=1, largest=False).indices for i in range(0, bank.shape[0], chunk)]
    return torch.cat(out)


# ---------------------------------------------------------------- the scorer and the method

class PatchCoreScorer(nn.Module):
    """The fitted part: `memory_bank` (M, D) and `support` (M, b), both buffers (saved as safetensors, exported
    as graph constants). forward(embedding (N, L, D)) -> (patch distances (N, L), image scores (N,))."""

    def __init__(self, dim: int, num_neighbors: int):
        super().__init__()
        self.num_neighbors = num_neighbors
        self.register_buffer("memory_bank", torch.zeros(0, dim))
        self.register_buffer("support", torch.zeros(0, num_neighbors, dtype=torch.long))

    @torch.no_grad()
    def set_memory(self, bank: torch.Tensor) -> None:
        self.memory_bank = bank.float().contiguous()
        self.support = support_sets(self.memory_bank, self.num_neighbors)

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.memory_bank.shape[0] == 0:
            raise ValueError("PatchCore's memory bank is empty: fit it on normal images first")
        n, l, _ = embedding.shape
        dist = euclidean(embedding, self.memory_bank)                   # (N, L, M)
        scores, nearest = dist.min(-1)                                   # (N, L)
        if self.num_neighbors == 1:
            return scores, scores.amax(1)
        worst = scores.argmax(1)                                         # m^test,* per image
        rows = torch.arange(n, device=embedding.device)
        s_star = scores[rows, worst]
        m_star = nearest[rows, worst]
        feat = embedding[rows, worst].unsqueeze(1)                       # (N, 1, D)
        neigh = self.memory_bank[self.support[m_star]]                   # (N, b, D), m* first
        w = 1 - torch.softmax(euclidean(feat, neigh)[:, 0], dim=-1)[:, 0]
        return scores, w * s_star


class PatchCore(nn.Module, MethodDefaults):
    """PatchCore on a frozen backbone whose `stages` are the two PatchCore stages (`middle_stages`).

    forward(images (N, 3, S, S) normalised, class_names [N]) -> InferenceBatch: image_score (N,) (the
    reweighted distance, unbounded), anomaly_map (N, S, S) (smoothed distances), stage_maps (N, 1, g, g) (the patch
    distances). Fit with `fit(batches)` on normal images."""

    feature_spec = {"vv": False, "raw": True}

    def __init__(self, backbone: Backbone, cfg: PatchCoreConfig | None = None):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg or PatchCoreConfig()
        self.scorer = PatchCoreScorer(self.cfg.target_embed_dim, self.cfg.num_neighbors)

    @staticmethod
    def published_layers(depth: int) -> tuple[list[int], int]:
        """(stages, vv_start): the middle two of four spread stages; no V-V path (vv_start = depth)."""
        return middle_stages(depth), depth

    def train(self, mode: bool = True):  # nothing trains by gradient; the backbone stays frozen
        return super().train(False)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images -> (embedding (N, g * g, target_embed_dim), (g, g))."""
        grids = stage_grids(self.backbone, images)
        with full_precision(images.device):
            return locally_aware(grids, self.cfg), tuple(grids[0].shape[-2:])

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor]) -> dict:
        """batches of normal images (n, 3, S, S) -> fills the memory bank; returns what was fitted."""
        store, seen = [], 0
        for images in batches:
            emb, _ = self.embed(images.to(self.backbone.device))
            store.append(emb.flatten(0, 1).cpu())
            seen += store[-1].shape[0]
        if not store:
            raise ValueError("PatchCore needs at least one normal image to fit, got none")
        bank = torch.cat(store)
        return self.fit_embeddings(bank, seen)

    @torch.no_grad()
    def fit_embeddings(self, bank: torch.Tensor, seen: int | None = None, projection: torch.Tensor | None = None) -> dict:
        """bank (N, D) of normal patch features -> memory bank by coreset (the capped, seeded subset first)."""
        seen = bank.shape[0] if seen is None else seen
        if bank.shape[0] > self.cfg.max_fit_patches:
            g = torch.Generator().manual_seed(self.cfg.seed)
            bank = bank[torch.randperm(bank.shape[0], generator=g)[: self.cfg.max_fit_patches]]
        keep = coreset_indices(bank, self.cfg, projection)
        self.scorer.set_memory(bank[keep].to(self.backbone.device))
        return {"patches_seen": seen, "patches_subsampled": int(bank.shape[0]), "memory_bank": int(keep.numel())}

    def score_embedding(self, emb: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> InferenceBatch:
        """embedding (N, L, D) on grid (g, g) -> InferenceBatch at `size`."""
        scores, image = self.scorer(emb)
        patch = scores.view(-1, 1, *grid)
        if self.cfg.upsample == "bilinear":
            up = F.interpolate(patch, size=size, mode="bilinear", align_corners=False)
        else:
            up = F.interpolate(patch, size=size, mode="nearest")
        return InferenceBatch(image, smooth(up[:, 0], self.cfg.sigma), patch)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: list[str] | None = None) -> InferenceBatch:
        emb, grid = self.embed(images)
        with full_precision(images.device):
            return self.score_embedding(emb, grid, tuple(images.shape[-2:]))
