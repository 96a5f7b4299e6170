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
`max_fit_patches` patches (a seeded uniform subset beyond it, drawn while the images stream in), so that fitting
memory is bounded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from kano.core.errors import KanoError

from .backbone import Backbone, grid_hw, spread_stages
from .model import InferenceBatch, backbone_autocast, full_precision
from .one_class import OneClassModel


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
    max_fit_patches: int = 250_000     # Kano's bound on the patches kept before subsampling (1 GiB at D = 1024)
    stages: tuple[int, ...] | None = None  # None: the middle two of four spread blocks (layer2, layer3's counterpart)
    encoder_side: int | None = None  # the backbone's input side; None: its own (micro 96, ViT-L-14-336 518)
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
        check_peer_encoder(self)

    def to_dict(self) -> dict:
        return peer_config_dict(self)


# ---------------------------------------------------------------- shared by PatchCore and PaDiM

def check_peer_encoder(cfg) -> None:
    """A peer config's `stages` (a tuple of ints, or None) and `encoder_side` (an integer >= 8, or None), checked
    in place (PatchCoreConfig, PadimConfig)."""
    if cfg.stages is not None:
        cfg.stages = tuple(int(v) for v in cfg.stages)
    side = cfg.encoder_side
    if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 8):
        raise ValueError(f"encoder_side must be an integer >= 8 (px) or null for the backbone's own, got {side!r}")


def peer_config_dict(cfg) -> dict:
    """A peer config as JSON: its fields, `stages` as a list."""
    d = asdict(cfg)
    d["stages"] = list(cfg.stages) if cfg.stages is not None else None
    return d


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

def adaptive_mean(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """x (..., n_in) -> (..., n_out): adaptive average pooling over the last axis, bin i = [floor(i n_in / n_out),
    ceil((i + 1) n_in / n_out)) (the authors' `MeanMapper` and `Aggregator`; it exports to ONNX for any sizes)."""
    n_in = x.shape[-1]
    if n_in == n_out:
        return x
    lead = x.shape[:-1]
    return F.adaptive_avg_pool1d(x.reshape(-1, 1, n_in), n_out).reshape(*lead, n_out)


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


def nearest_other(bank: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """bank (M, D), M >= 2 -> (M,): each entry's distance to its nearest other entry (chunked: memory chunk x M)."""
    out = []
    for i in range(0, bank.shape[0], chunk):
        d = euclidean(bank[i: i + chunk], bank)
        rows = torch.arange(d.shape[0])
        d[rows, rows + i] = float("inf")
        out.append(d.amin(1))
    return torch.cat(out)


class PatchReservoir:
    """A seeded uniform sample of at most `cap` patches from a stream of batches (each patch gets a random key; the
    `cap` largest keys are kept), in arrival order: memory cap x D whatever the number of images, and every patch
    kept while the stream holds at most `cap`."""

    def __init__(self, cap: int, seed: int):
        self.cap, self.seen = cap, 0
        self.gen = torch.Generator().manual_seed(seed)
        self.store: torch.Tensor | None = None
        self.keys: torch.Tensor | None = None
        self.order: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        keys = torch.rand(x.shape[0], generator=self.gen)
        order = torch.arange(self.seen, self.seen + x.shape[0])
        self.seen += x.shape[0]
        if self.store is None:
            self.store, self.keys, self.order = x, keys, order
        else:
            self.store = torch.cat([self.store, x])
            self.keys, self.order = torch.cat([self.keys, keys]), torch.cat([self.order, order])
        if self.store.shape[0] > self.cap:
            top = self.keys.topk(self.cap).indices
            top = top[self.order[top].argsort()]
            self.store, self.keys, self.order = self.store[top], self.keys[top], self.order[top]

    def bank(self) -> torch.Tensor:
        return self.store


# ---------------------------------------------------------------- scoring and the method

def patchcore_scores(embedding: torch.Tensor, bank: torch.Tensor, support: torch.Tensor,
                     num_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """embedding (N, L, D), bank (M, D), support (M, b) -> (patch distances (N, L), image scores (N,)): the nearest
    memory entry's distance per patch (a matrix product and a minimum), and the paper's eq. 7 on the worst patch."""
    n = embedding.shape[0]
    dist = euclidean(embedding, bank)                                    # (N, L, M)
    scores, nearest = dist.min(-1)                                       # (N, L)
    if num_neighbors == 1:
        return scores, scores.amax(1)
    worst = scores.argmax(1)                                             # m^test,* per image
    rows = torch.arange(n, device=embedding.device)
    s_star = scores[rows, worst]
    m_star = nearest[rows, worst]
    feat = embedding[rows, worst].unsqueeze(1)                           # (N, 1, D)
    neigh = bank[support[m_star]]                                        # (N, b, D), m* first
    w = 1 - torch.softmax(euclidean(feat, neigh)[:, 0], dim=-1)[:, 0]
    return scores, w * s_star


def unit(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A distance x >= 0 -> x / (x + scale) in [0, 1), increasing (ranks and AUROC unchanged); x = scale is 0.5."""
    return x / (x + scale)


def to_encoder_side(images: torch.Tensor, side: int) -> torch.Tensor:
    """images (N, 3, S, S) -> (N, 3, side, side): bilinear with antialiasing (the authors resize with PIL's
    antialiased bilinear), unchanged when S is already the encoder's side."""
    if images.shape[-1] == side and images.shape[-2] == side:
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def peer_stages(encoder: Backbone, published: list[int], given: tuple[int, ...] | None) -> list[int]:
    """The stages a one-class peer reads: `given` (its config), else those the encoder was built with when they are
    not the default spread (`--stages`, or a run's recorded stages), else the published choice."""
    if given:
        return list(given)
    if list(encoder.stages) != spread_stages(encoder.depth):
        return list(encoder.stages)
    return published


class BackbonePeer(OneClassModel):
    """What PatchCore and PaDiM share: a frozen backbone read at `published_stages` (or the configured ones), the
    encoder's side from `cfg.encoder_side`, and forward = `unit` of the raw distances on `output_scale()`.

    A subclass gives `published_stages(depth)`, `embed(images) -> (embedding (N, L, D), (g, g))`,
    `score_embedding(embedding, grid, size) -> InferenceBatch` of raw distances, `fit_batches(batches)` and
    `output_scale()`."""

    def __init__(self, encoder: Backbone, cfg, image_size: int):
        super().__init__(encoder, cfg, image_size)
        if encoder is None:
            raise KanoError(f"{self.method} reads a backbone's patch features: --backbone must name one (tiny, micro, "
                            "ViT-B-16-quickgelu:openai, ...), got none")
        encoder.set_layers(peer_stages(encoder, self.published_stages(encoder.depth), self.cfg.stages), encoder.depth)

    @staticmethod
    def published_stages(depth: int) -> list[int]:  # pragma: no cover - each peer implements it
        raise NotImplementedError

    @classmethod
    def encoder_image_size(cls, cfg) -> int | None:
        return cfg.encoder_side

    def describe(self) -> dict:
        return {**super().describe(), "stages": list(self.encoder.stages), "encoder_side": self.encoder.image_size}

    def stage_grids(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (N, 3, S, S) -> per stage (N, C, g, g) float32 at the encoder's side."""
        return stage_grids(self.encoder, to_encoder_side(images, self.encoder.image_size))

    @torch.no_grad()
    def fit(self, data) -> dict:
        """data: a one_class.FitData (its good() batches of normal images) or an iterable of image batches."""
        batches = data.good() if hasattr(data, "good") else ((x, None) for x in data)
        dev = self.backbone.device
        return self.fit_batches(images.to(dev) for images, _ in batches)

    @torch.no_grad()
    def raw(self, images: torch.Tensor) -> InferenceBatch:
        """The distances, as anomalib reports them: image_score (N,), anomaly_map (N, S, S) smoothed, stage_maps
        (N, 1, g, g) the patch distances."""
        emb, grid = self.embed(images)
        with full_precision(images.device):
            return self.score_embedding(emb.float(), grid, tuple(images.shape[-2:]))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: list[str] | None = None) -> InferenceBatch:
        r = self.raw(images)
        scale = self.output_scale()
        return InferenceBatch(unit(r.image_score, scale), unit(r.anomaly_map, scale), r.stage_maps)


class PatchCore(BackbonePeer):
    """PatchCore (module docstring) on a frozen backbone. forward(images (N, 3, S, S) normalised with the
    backbone's mean and std, class_names ignored) -> InferenceBatch: image_score (N,) and anomaly_map (N, S, S) in
    [0, 1) (`unit` of the reweighted distance and of the smoothed distance map), stage_maps (N, 1, g, g) (the raw
    patch distances). `raw(images)` gives the distances themselves, as anomalib reports them.

    Fitted tensors (buffers: saved in the run, graph constants in the export): memory_bank (M, D), support (M, b),
    score_scale () = the median distance from a memory entry to its nearest other entry."""

    method = "patchcore"
    default_image_size = 256   # authors: bin/run_patchcore.py --resize 256 (then a 224 centre crop; Kano squashes)

    def __init__(self, encoder: Backbone, cfg: PatchCoreConfig | None = None, image_size: int = 256):
        super().__init__(encoder, cfg or PatchCoreConfig(), image_size)

    published_stages = staticmethod(middle_stages)

    def fitted_names(self) -> tuple[str, ...]:
        return ("memory_bank", "support", "score_scale")

    def describe(self) -> dict:
        bank = getattr(self, "memory_bank", None)
        return {**super().describe(), "memory_bank": None if bank is None else list(bank.shape)}

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images (N, 3, S, S) -> (embedding (N, g * g, target_embed_dim), (g, g)) at the encoder's side."""
        grids = self.stage_grids(images)
        with full_precision(images.device):
            return locally_aware(grids, self.cfg), tuple(grids[0].shape[-2:])

    def fit_batches(self, batches) -> dict:
        """batches: normal images (N, 3, S, S) on the model's device. The patches are kept up to `max_fit_patches`
        (a seeded uniform subset beyond it, drawn as they stream in)."""
        sampler = PatchReservoir(self.cfg.max_fit_patches, self.cfg.seed)
        for images in batches:
            emb, _ = self.embed(images)
            sampler.add(emb.flatten(0, 1).cpu())
        if sampler.seen == 0:
            raise ValueError("patchcore needs at least one normal image to fit, got none")
        return self.fit_embeddings(sampler.bank(), sampler.seen)

    @torch.no_grad()
    def fit_embeddings(self, bank: torch.Tensor, seen: int | None = None, projection: torch.Tensor | None = None) -> dict:
        """bank (N, D) of normal patch features -> memory bank by coreset (the capped, seeded subset first)."""
        if seen is None:
            sampler = PatchReservoir(self.cfg.max_fit_patches, self.cfg.seed)
            sampler.add(bank)
            bank, seen = sampler.bank(), sampler.seen
        keep = coreset_indices(bank, self.cfg, projection)
        memory = bank[keep].float().contiguous()
        support = support_sets(memory, self.cfg.num_neighbors)
        scale = nearest_other(memory).median().clamp_min(1e-6) if memory.shape[0] > 1 else torch.tensor(1.0)
        dev = self.backbone.device
        self.register_fitted("memory_bank", memory.to(dev))
        self.register_fitted("support", support.to(dev))
        self.register_fitted("score_scale", scale.float().to(dev))
        return {"patches_seen": seen, "patches_subsampled": int(bank.shape[0]), "memory_bank": int(keep.numel()),
                "score_scale": float(scale)}

    def score_embedding(self, emb: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> InferenceBatch:
        """embedding (N, L, D) on grid (g, g) -> raw InferenceBatch (distances) at `size`."""
        if not self.fitted:
            raise ValueError("patchcore's memory bank is empty: fit it on normal images first")
        scores, image = patchcore_scores(emb, self.memory_bank, self.support, self.cfg.num_neighbors)
        patch = scores.view(-1, 1, *grid)
        if self.cfg.upsample == "bilinear":
            up = F.interpolate(patch, size=size, mode="bilinear", align_corners=False)
        else:
            up = F.interpolate(patch, size=size, mode="nearest")
        return InferenceBatch(image, smooth(up[:, 0], self.cfg.sigma), patch)

    def output_scale(self) -> torch.Tensor:
        """The median distance from a memory entry to its nearest other entry (a fitted buffer)."""
        return self.score_scale
