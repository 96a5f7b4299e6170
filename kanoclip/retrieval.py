"""Retrieval: the simplest learned floor (in the spirit of MRAD-TF, 2026): no training, a memory.

A memory of the auxiliary set's labelled features on the frozen backbone: per stage, the patch tokens of
patches that lie in a defect mask (share >= `defect_share`) and of patches of normal images; and the global
features of normal and of anomalous images. A target patch is scored by how much closer it is to its
nearest anomalous memories than to its nearest normal ones:

    s_a = mean of the k largest cos(p, m), m in the anomalous patch memory of that stage
    s_n = the same over the normal patch memory
    P(abnormal | p) = softmax(T * [s_n, s_a])[1]

averaged over the stages, bilinearly upsampled to the image and smoothed by a Gaussian of σ pixels (as
KAnoCLIP's maps). The image score is the mean of the image-level retrieval probability (the same rule on
the global feature against the image memories) and the map's maximum, as eq. 12 halves KAnoCLIP's.
A method that cannot beat this lookup of what it was trained on has not generalised beyond it.

Kano's choices (the MRAD-TF paper's exact aggregation is not reproduced here): k = 5, T = 1/0.07 (CLIP's
initial temperature, the one Kano's maps use), σ = 4, defect_share = 0.2, at most 20,000 normal patches per
stage kept (a seeded random subset) so that scoring stays a matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import Backbone, grid_hw
from .model import InferenceBatch, gaussian_blur
from .protocol import MethodDefaults


@dataclass
class RetrievalConfig:
    k: int = 5
    temperature: float = 0.07
    sigma: float = 4.0
    defect_share: float = 0.2
    max_normal_patches: int = 20_000
    seed: int = 0

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k}")
        if not 0 < self.temperature:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.defect_share <= 1:
            raise ValueError(f"defect_share must be in (0, 1], got {self.defect_share}")


def retrieval_probability(queries: torch.Tensor, normal: torch.Tensor, abnormal: torch.Tensor, k: int,
                          temperature: float) -> torch.Tensor:
    """queries (Q, D), memories (Mn, D) and (Ma, D), any scale -> P(abnormal) (Q,) from the top-k mean cosines."""
    q = F.normalize(queries.float(), dim=-1)
    s_n = (q @ F.normalize(normal.float(), dim=-1).t()).topk(min(k, normal.shape[0]), dim=-1).values.mean(-1)
    s_a = (q @ F.normalize(abnormal.float(), dim=-1).t()).topk(min(k, abnormal.shape[0]), dim=-1).values.mean(-1)
    return torch.stack([s_n, s_a], -1).div(temperature).softmax(-1)[..., 1]


class PatchRetrieval(nn.Module, MethodDefaults):
    """Frozen backbone + labelled feature memories (buffers, not parameters). forward(images (N, 3, S, S),
    class names) -> InferenceBatch (stage_maps: per-stage P(abnormal) on the patch grid); class names are accepted for the evaluator's interface and unused."""

    def __init__(self, backbone: Backbone, normal_patches: list[torch.Tensor], abnormal_patches: list[torch.Tensor],
                 normal_images: torch.Tensor, abnormal_images: torch.Tensor, cfg: RetrievalConfig | None = None):
        super().__init__()
        self.backbone, self.cfg = backbone, cfg or RetrievalConfig()
        if len(normal_patches) != len(abnormal_patches) or not normal_patches:
            raise ValueError(f"one normal and one abnormal patch memory per stage, got {len(normal_patches)} and {len(abnormal_patches)}")
        for i, (n, a) in enumerate(zip(normal_patches, abnormal_patches)):
            if n.shape[0] == 0 or a.shape[0] == 0:
                raise ValueError(f"stage {i}: both patch memories must be non-empty, got {n.shape[0]} normal and {a.shape[0]} abnormal")
            self.register_buffer(f"normal_{i}", n.float())     # retrieval_probability compares by cosine
            self.register_buffer(f"abnormal_{i}", a.float())
        if normal_images.shape[0] == 0 or abnormal_images.shape[0] == 0:
            raise ValueError(f"both image memories must be non-empty, got {normal_images.shape[0]} normal and {abnormal_images.shape[0]} abnormal")
        self.register_buffer("normal_images", normal_images.float())
        self.register_buffer("abnormal_images", abnormal_images.float())
        self.n_stages = len(normal_patches)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: list[str] | None = None) -> InferenceBatch:
        c = self.cfg
        feats = self.backbone(images)
        n, size = images.shape[0], images.shape[-1]
        hw = grid_hw(feats.patch_tokens[0].shape[1])
        probs = []
        for i, tokens in enumerate(feats.patch_tokens):
            p = retrieval_probability(tokens.reshape(-1, tokens.shape[-1]), getattr(self, f"normal_{i}"),
                                      getattr(self, f"abnormal_{i}"), c.k, c.temperature)
            probs.append(p.view(n, 1, *hw))
        stages = torch.cat(probs, 1)                                                     # (N, stages, h, w)
        grid = stages.mean(1, keepdim=True)
        up = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        amap = gaussian_blur(up, c.sigma)
        g = retrieval_probability(feats.global_feature, self.normal_images, self.abnormal_images, c.k, c.temperature)
        return InferenceBatch((g + amap.flatten(1).amax(1)) / 2, amap, stages)


@torch.no_grad()
def build_memory(backbone: Backbone, loader, cfg: RetrievalConfig) -> dict:
    """From batches {"image" (N, 3, S, S), "mask" (N, S, S), "label" (N,)} -> the memories PatchRetrieval takes."""
    normal, abnormal = None, None
    img_n, img_a = [], []
    for batch in loader:
        feats = backbone(batch["image"].to(backbone.device))
        hw = grid_hw(feats.patch_tokens[0].shape[1])
        share = F.adaptive_avg_pool2d(batch["mask"].float()[:, None], hw).flatten(1).to(backbone.device)   # (N, L)
        labels = batch["label"].to(backbone.device).bool()
        good = ~labels[:, None].expand_as(share)
        bad = share >= cfg.defect_share
        if normal is None:
            normal, abnormal = [[] for _ in feats.patch_tokens], [[] for _ in feats.patch_tokens]
        for i, t in enumerate(feats.patch_tokens):
            normal[i].append(t[good].float().cpu())
            abnormal[i].append(t[bad].float().cpu())
        img_n.append(feats.global_feature[~labels].float().cpu())
        img_a.append(feats.global_feature[labels].float().cpu())
    if normal is None:
        raise ValueError("the auxiliary data must hold images, got none")
    gen = torch.Generator().manual_seed(cfg.seed)
    out_n = []
    for parts in normal:
        t = torch.cat(parts)
        if t.shape[0] > cfg.max_normal_patches:
            t = t[torch.randperm(t.shape[0], generator=gen)[:cfg.max_normal_patches]]
        out_n.append(t)
    return {"normal_patches": out_n, "abnormal_patches": [torch.cat(p) for p in abnormal],
            "normal_images": torch.cat(img_n), "abnormal_images": torch.cat(img_a)}
