"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection and
Localization", ICPR 2020) on a frozen Kano backbone, as a pure nn.Module fitted on normal images only.

What it is: at every position of the patch grid, a multivariate Gaussian over the concatenated features of
three stages (a fixed random subset of their channels); a test patch's score is its Mahalanobis distance to its
position's Gaussian; the map is those distances upsampled and smoothed, the image score the map's maximum.

Steps and where each comes from (anomalib 2.7.0: anomalib/models/image/padim and
anomalib/models/components/stats; the paper; docs/peers.md lists file and line of every default):

- stages: the paper takes ResNet's layer1, layer2 and layer3, the first three of its four stages; Kano's ViT
  stages are the four blocks spread evenly (6/12/18/24 of 24), so PaDiM takes the first three (6, 12, 18).
  Tokens are the residual stream as the block wrote it (no `ln_post`, no projection, the Q-K path). Every ViT
  stage has the same grid, so anomalib's nearest resampling of later stages onto the first stage's grid is the
  identity;
- channels: `n_features` of the concatenated channels, drawn once by a seeded random permutation (anomalib's
  `torch.randperm(n)[:n_features]`; the paper's random dimensionality reduction); 100 by default, the paper's
  and anomalib's number for ResNet-18, the smaller of its two backbones: memory grows with n_features² per position;
- Gaussian per position: the mean and the unbiased covariance (N - 1) of the training images' features at that
  position, plus 0.01 I (the paper's ε, anomalib's regulariser) and 1e-5 I (anomalib's stabiliser before the
  inverse); the inverse is kept. Kano accumulates the first and second moments in float64 batch by batch
  (memory independent of the number of images) where anomalib stacks every embedding and centres in float32;
- score: Mahalanobis distance sqrt(max(0, δᵀ Σ⁻¹ δ)); map: upsampled bilinearly (align_corners=False) to the
  image and smoothed by a Gaussian of σ = 4 px (kernel 2 * int(4σ + 0.5) + 1, reflected borders); image score:
  the maximum of the smoothed map (anomalib's `PadimModel.forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F

from .backbone import Backbone, spread_stages
from .model import InferenceBatch
from .patchcore import BackbonePeer, check_peer_encoder, peer_config_dict, smooth


@dataclass
class PadimConfig:
    """PaDiM's settings, each default the paper's or anomalib's (docs/peers.md names file and line)."""

    n_features: int = 100          # anomalib _N_FEATURES_DEFAULTS["resnet18"]; the paper's d for ResNet-18
    regularizer: float = 0.01      # anomalib MultiVariateGaussian: + 0.01 * identity (the paper's ε I)
    stabilizer: float = 1e-5       # anomalib MultiVariateGaussian: + 1e-5 * identity before the inverse
    sigma: float = 4.0             # anomalib padim AnomalyMapGenerator sigma
    stages: tuple[int, ...] | None = None  # None: the first three of four spread blocks (layer1-3's counterpart)
    encoder_side: int | None = None  # the backbone's input side; None: its own (micro 96, ViT-L-14-336 518)
    seed: int = 0                  # Kano's: seeds the channel subset (anomalib draws from the global generator)

    def __post_init__(self):
        if isinstance(self.n_features, bool) or not isinstance(self.n_features, int) or self.n_features < 1:
            raise ValueError(f"n_features must be an integer >= 1, got {self.n_features!r}")
        if self.regularizer < 0 or self.stabilizer < 0 or self.regularizer + self.stabilizer <= 0:
            raise ValueError(f"regularizer and stabilizer must be >= 0 with a positive sum (the covariance must be "
                             f"invertible), got {self.regularizer} and {self.stabilizer}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0 (0: no smoothing), got {self.sigma}")
        check_peer_encoder(self)

    def to_dict(self) -> dict:
        return peer_config_dict(self)


def first_stages(depth: int) -> list[int]:
    """PaDiM's stages: the first three of the four evenly spread blocks (ResNet's layer1, layer2, layer3)."""
    st = spread_stages(depth)
    return st[:3]


def channel_subset(n_total: int, n_features: int, seed: int) -> torch.Tensor:
    """(n_features,) long: the first n_features of a random permutation of n_total channels, seeded."""
    if not 1 <= n_features <= n_total:
        raise ValueError(f"n_features must be in 1..{n_total} (the stages' concatenated channels), got {n_features}")
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n_features]


class GaussianMoments:
    """Running first and second moments per position in float64 (a shifted sum, so that no precision is lost to
    a large mean): add(x (N, L, d)) batch by batch, then `gaussian(regularizer, stabilizer)` -> (mean (L, d),
    inverse covariance (L, d, d)) float32."""

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        if self.shift is None:
            self.shift = x[0].clone()
            self.s1 = torch.zeros_like(self.shift)
            self.s2 = torch.zeros(*self.shift.shape, self.shift.shape[-1], dtype=torch.float64, device=x.device)
        y = x - self.shift                                              # (N, L, d)
        self.s1 += y.sum(0)
        self.s2 += torch.einsum("nld,nle->lde", y, y)
        self.n += x.shape[0]

    def gaussian(self, regularizer: float, stabilizer: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n < 2:
            raise ValueError(f"PaDiM needs at least 2 normal images to fit a covariance, got {self.n}")
        m = self.s1 / self.n                                            # mean of the shifted features
        cov = (self.s2 - self.n * m.unsqueeze(-1) * m.unsqueeze(-2)) / (self.n - 1)
        eye = torch.eye(cov.shape[-1], dtype=torch.float64, device=cov.device)
        inv = torch.linalg.inv(cov + (regularizer + stabilizer) * eye)
        return (m + self.shift).float(), inv.float()


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor) -> torch.Tensor:
    """x (N, L, d), mean (L, d), inv_cov (L, d, d) -> (N, L): sqrt(max(0, δᵀ Σ⁻¹ δ)) per position."""
    delta = x - mean
    q = (torch.einsum("nld,lde->nle", delta, inv_cov) * delta).sum(-1)
    return q.clamp_min(0).sqrt()


class Padim(BackbonePeer):
    """PaDiM (module docstring) on a frozen backbone. forward(images (N, 3, S, S) normalised with the backbone's
    mean and std, class_names ignored) -> InferenceBatch: anomaly_map (N, S, S) in [0, 1) (`unit` of the smoothed
    Mahalanobis map, scale sqrt(d): a normal feature's expected distance), image_score (N,) its maximum,
    stage_maps (N, 1, g, g) (the raw distances). `raw(images)` gives the distances, as anomalib reports them.

    Fitted tensors (buffers: saved in the run, graph constants in the export): channels (d,), mean (L, d),
    inv_cov (L, d, d)."""

    method = "padim"
    default_image_size = 256   # anomalib's and the authors' resize side (Kano squashes instead of centre-cropping)

    def __init__(self, encoder: Backbone, cfg: PadimConfig | None = None, image_size: int = 256):
        super().__init__(encoder, cfg or PadimConfig(), image_size)
        n_total = encoder.width * len(encoder.stages)
        self.register_fitted("channels", channel_subset(n_total, min(self.cfg.n_features, n_total), self.cfg.seed))

    published_stages = staticmethod(first_stages)

    def fitted_names(self) -> tuple[str, ...]:
        return ("channels", "mean", "inv_cov")

    def describe(self) -> dict:
        return {**super().describe(), "n_features": int(self.channels.numel())}

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """images (N, 3, S, S) -> (the chosen channels of the concatenated stages (N, g * g, d), (g, g))."""
        grids = self.stage_grids(images)
        return self.select(grids), tuple(grids[0].shape[-2:])

    def select(self, grids: list[torch.Tensor]) -> torch.Tensor:
        """Per stage (N, C_s, h_s, w_s) -> (N, h * w, d): stages concatenated on the first one's grid (nearest, as
        anomalib), the seeded channel subset kept."""
        size = grids[0].shape[-2:]
        cat = torch.cat([g if g.shape[-2:] == size else F.interpolate(g, size=size, mode="nearest") for g in grids], 1)
        return cat.index_select(1, self.channels).flatten(2).transpose(1, 2)

    def fit_batches(self, batches) -> dict:
        """batches: normal images (N, 3, S, S) on the model's device."""
        moments = GaussianMoments()
        for images in batches:
            emb, _ = self.embed(images)
            moments.add(emb)
        return self.fit_moments(moments)

    @torch.no_grad()
    def fit_moments(self, moments: GaussianMoments) -> dict:
        if moments.n == 0:
            raise ValueError("padim needs at least 2 normal images to fit, got none")
        mean, inv_cov = moments.gaussian(self.cfg.regularizer, self.cfg.stabilizer)
        self.register_fitted("mean", mean.to(self.backbone.device))
        self.register_fitted("inv_cov", inv_cov.to(self.backbone.device))
        return {"images": moments.n, "positions": int(mean.shape[0]), "n_features": int(mean.shape[1])}

    def score_embedding(self, emb: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> InferenceBatch:
        """embedding (N, L, d) on grid (g, g) -> raw InferenceBatch (distances) at `size`."""
        if getattr(self, "mean", None) is None:
            raise ValueError("padim's Gaussians are not fitted: fit it on normal images first")
        if emb.shape[1] != self.mean.shape[0]:
            raise ValueError(f"padim was fitted on a grid of {self.mean.shape[0]} positions, got {emb.shape[1]}")
        dist = mahalanobis(emb, self.mean, self.inv_cov).view(-1, 1, *grid)
        up = F.interpolate(dist, size=size, mode="bilinear", align_corners=False)[:, 0]
        amap = smooth(up, self.cfg.sigma)
        return InferenceBatch(amap.flatten(1).amax(1), amap, dist)

    def output_scale(self) -> float:
        """sqrt(d): a normal feature's expected Mahalanobis distance over d channels."""
        return float(self.channels.numel()) ** 0.5
