"""MVFA-AD (Huang et al., "Adapting Visual-Language Models for Generalizable Anomaly Detection in Medical Images",
CVPR 2024) as a pure nn.Module.

What it is: a frozen CLIP image tower with trainable residual adapters inside its stream. At each of four stages
(after blocks 6/12/18/24 of 24) a segmentation adapter and a detection adapter read the stream; each adapter is
Linear(width -> 768, no bias), LeakyReLU, Linear(768 -> width, no bias), LeakyReLU, and the stream continues as
0.8 x + 0.1 seg_out + 0.1 det_out. The bottleneck activations (the first layer's output) are the tokens each head
compares with a fixed text prompt ensemble. Every choice below is the public code's (github.com/MediaBrain-SJTU/
MVFA-AD, file:line of its newest commit):

- Adapters and the stream: CLIP/adapter.py:14-29 (ClipAdapter, bottleneck 768, bias=False, LeakyReLU after both
  layers), :38-39 (one seg and one det adapter per stage), :67-74 (0.8 / 0.1 / 0.1, the bottleneck activations
  kept); the adapters see every token, the class token included. Stages 6/12/18/24: train_zero.py:51
  (`--features_list`), spread evenly on other depths. The bottleneck (768) is ViT-L/14's text embedding width, so
  on other backbones it is the backbone's embed dim.
- Text: CLIP/utils.py:9-29, the states x templates ensemble (7 x 35 normal and 5 x 35 abnormal sentences, each
  feature normalised, averaged per state, normalised again); the same lists as April-GAN's (kanoclip/aprilgan.py).
- Maps: train_zero.py:139-149 and :205-214: per stage 100 x cos(seg token, text) on the patch grid, bilinearly
  upsampled with align_corners=True, softmax over {normal, abnormal}; the map is the sum of the stages' abnormal
  channels (we report the mean: it ranks pixels identically and stays in [0, 1]). No Gaussian smoothing.
- Image score: train_zero.py:195-199: per stage the mean over patches of softmax(100 x cos(det token, text))
  [abnormal], summed over stages (we report the sum divided by the number of stages, again ranking identically).
- Losses: train_zero.py:124-151: per stage focal(softmax map, mask) + dice(abnormal channel, mask) (loss.py:7-101:
  the focal loss's one-hot labels clamped to [1e-5, 1 - 1e-5] and 1e-5 added to p_t; dice smooth 1) and
  BCEWithLogits(stage image score, label), all summed. BCEWithLogits is applied to a probability (the mean of a
  softmax), as the code does: the sigmoid of a number in [0, 1].
- Optimisers: train_zero.py:69-70: two Adam, one per adapter set, lr 1e-4, betas (0.5, 0.999). Adam is
  per-parameter, so Kano's single Adam over both sets with those settings takes the same steps.
- Pixels: dataset/medical_zero.py:30-33: Resize + ToTensor, no CLIP mean/std (`pixel_norm` "none"; "mean-std" to
  normalise).
- Few-shot (train_few.py:94-96 and :168-179, utils.py:32-37, :79-136; test in train_few.py:215-224): a memory of
  the references' seg tokens per stage, every token of each reference and of its 10 augmented copies (rotations by
  +-pi/8 and +-pi/16, shifts by +-0.1 in both axes, reflection-padded; horizontal and vertical flips); a test
  patch's distance is min over the memory of (1 - cos), upsampled bilinearly with align_corners=True, summed over
  stages (kanoclip/fewshot.py averages them and fuses the result with the map as for every run).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .aprilgan import TrainablePeer, ensemble_text_features
from .backbone import Backbone, VisualFeatures, grid_hw, spread_layers
from .losses import dice_loss, smoothed_focal
from .model import InferenceBatch, backbone_autocast, full_precision
from .prompts import TextTower

PIXEL_NORMS = ("none", "mean-std")
# MVFA-AD's image size for its ViT-L-14-336 runs: train_zero.py:48 / train_few.py:49 `--img_size 240`
PUBLISHED_SIZES = {"ViT-L-14-336": 240, "ViT-L-14-336-quickgelu": 240}


@dataclass
class MVFAConfig:
    """MVFA-AD's constants, each from its public code (file:line in the module docstring)."""

    mix: tuple[float, float, float] = (0.8, 0.1, 0.1)  # CLIP/adapter.py:71: 0.8 x + 0.1 seg_out + 0.1 det_out
    logit_scale: float = 100.0             # train_zero.py:128, :142
    focal_gamma: float = 2.0               # loss.py:21
    focal_smooth: float = 1e-5             # loss.py:21
    pixel_norm: str = "none"               # dataset/medical_zero.py:30-33 (ToTensor only)
    reference_augment: bool = True         # train_few.py:83, :95: the memory holds augment()'s 11 views per reference

    def __post_init__(self):
        self.mix = tuple(float(v) for v in self.mix)
        if len(self.mix) != 3:
            raise ValueError(f"mix must be three weights (stream, seg adapter, det adapter), got {self.mix}")
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}")
        if not 0 <= self.focal_smooth < 0.5:
            raise ValueError(f"focal_smooth must be in [0, 0.5), got {self.focal_smooth}")
        if self.pixel_norm not in PIXEL_NORMS:
            raise ValueError(f"pixel_norm must be one of {', '.join(PIXEL_NORMS)}, got {self.pixel_norm!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mix"] = list(self.mix)
        return d


class ResidualAdapter(nn.Module):
    """Linear(width -> bottleneck, no bias), LeakyReLU, Linear(bottleneck -> width, no bias), LeakyReLU.
    x (..., width) -> (bottleneck activations (..., bottleneck), output (..., width))."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, width, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = F.leaky_relu(self.down(x))
        return mid, F.leaky_relu(self.up(mid))


class MVFAOutput(NamedTuple):
    image_score: torch.Tensor      # (N,) the stages' detection scores averaged, in [0, 1]
    anomaly_map: torch.Tensor      # (N, H, W) the stages' abnormal probabilities averaged
    stage_maps: torch.Tensor       # (N, S, h, w) abnormal probability per stage on the patch grid
    stage_probs: torch.Tensor      # (N, S, 2, H, W) upsampled {normal, abnormal} probabilities (the seg losses')
    det_scores: torch.Tensor       # (N, S) per stage the mean over patches of P(abnormal) (the BCE's input)

    def inference(self) -> InferenceBatch:
        return InferenceBatch(self.image_score, self.anomaly_map, self.stage_maps)


def augment_views(images: torch.Tensor) -> torch.Tensor:
    """MVFA-AD's reference augmentation (utils.py:40-76, :114-131): images (k, 3, S, S) -> (11 k, 3, S, S): the
    images, rotated by -pi/8, -pi/16, pi/16, pi/8, shifted by (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1)
    (affine grids, bilinear, reflection padding), flipped horizontally, flipped vertically; in that order."""
    def warp(m: list[list[float]]) -> torch.Tensor:
        theta = torch.tensor([m], dtype=images.dtype, device=images.device).expand(images.shape[0], 2, 3)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, padding_mode="reflection", align_corners=False)

    views = [images]
    for a in (-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8):
        views.append(warp([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]))
    for a, b in ((0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1)):
        views.append(warp([[1.0, 0.0, a], [0.0, 1.0, b]]))
    views += [images.flip(-1), images.flip(-2)]
    return torch.cat(views)


def mvfa_layers(depth: int) -> tuple[list[int], int]:
    """-> (stages, vv_start): blocks 6/12/18/24 of 24 (train_zero.py:51), spread evenly on other depths; no V-V path."""
    return spread_layers(depth)


class MVFA(TrainablePeer):
    """Frozen CLIP image tower with a seg and a det residual adapter at each stage + the fixed prompt ensemble."""

    method = "mvfa"
    published_layers = staticmethod(mvfa_layers)
    # its vendored open_clip resamples the position embeddings at build: CLIP/model.py resize_pos_embed,
    # interpolation='bicubic', antialias=True (called from CLIP/clip.py:131)
    pos_resize = "bicubic-antialias"
    published_sizes = PUBLISHED_SIZES
    # the adapters change the stream after the first stage: only the blocks before it are frozen features, so
    # the trainer encodes each batch anew (no feature cache)
    cacheable = False
    # 240 px on patch 14 (train_zero.py:48): 17 x 17 patches, the last 2 px rows and columns unseen, as their conv
    partial_patches = True
    feature_spec = {"vv": False, "tokens": "stream"}

    @staticmethod
    def train_recipe(data_kind: str) -> dict:
        """train_zero.py:46-50, :69-70: batch 1, 50 epochs, two Adam lr 1e-4, betas (0.5, 0.999), whatever the data."""
        return {"epochs": 50, "batch_size": 1, "lr": 1e-4, "betas": (0.5, 0.999), "aug_rate": 0.0,
                "source": "MVFA-AD train_zero.py:46-50, :69-70: 50 epochs, batch 1, Adam lr 1e-4, betas (0.5, 0.999)"}

    def __init__(self, backbone: Backbone, cfg: MVFAConfig | None = None):
        super().__init__()
        self.cfg = cfg or MVFAConfig()
        self.backbone = backbone
        if self.cfg.pixel_norm == "none":  # the method's own preparation: pixels in [0, 1] (ToTensor only)
            backbone.mean, backbone.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self.tower = TextTower(backbone.clip)
        # bottleneck: CLIP/adapter.py:38-39 ClipAdapter(1024, bottleneck=768), ViT-L/14's text embedding width;
        # the bottleneck activations are compared with the text features, so it is the backbone's embed dim
        w, b = backbone.width, backbone.embed_dim
        self.seg_adapters = nn.ModuleList(ResidualAdapter(w, b) for _ in backbone.stages)
        self.det_adapters = nn.ModuleList(ResidualAdapter(w, b) for _ in backbone.stages)
        self._text: dict[str, torch.Tensor] = {}
        self.to(backbone.device)

    @property
    def patch_dim(self) -> int:
        return self.backbone.embed_dim

    def describe(self) -> dict:
        """What config.json records beside the config: the stream rule and the optimiser split, in words."""
        a, s, d = self.cfg.mix
        return {"stream": f"{a} x + {s} seg_out + {d} det_out after blocks {self.backbone.stages}",
                "pixels": "[0, 1], no mean/std" if self.cfg.pixel_norm == "none" else "CLIP mean/std"}

    # -- the frozen part and the adapted stream ---------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> VisualFeatures:
        """The frozen part: images (N, 3, S, S) -> the stream after the first stage's block, before its adapters:
        global_feature = its class token (N, width), patch_tokens = [its patch tokens (N, L, width)]."""
        v = self.backbone.clip.visual
        x = v._embeds(images.to(v.conv1.weight.dtype))
        for blk in self.backbone.blocks[:self.backbone.stages[0]]:
            x = blk(x)
        return VisualFeatures(x[:, 0], [x[:, 1:]])

    def adapted_tokens(self, feats: VisualFeatures) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The stream from encode_images through the remaining blocks and the adapters -> (seg, det): per stage the
        bottleneck activations (N, 1 + L, bottleneck), class token first."""
        a, ws, wd = self.cfg.mix
        x = torch.cat([feats.global_feature[:, None], feats.patch_tokens[0]], 1)
        stages = self.backbone.stages
        seg, det = [], []
        for k, s in enumerate(stages):
            if k:
                for blk in self.backbone.blocks[stages[k - 1]:s]:
                    x = blk(x)
            s_mid, s_out = self.seg_adapters[k](x)
            d_mid, d_out = self.det_adapters[k](x)
            x = a * x + ws * s_out + wd * d_out
            seg.append(s_mid)
            det.append(d_mid)
        return seg, det

    def text_bank(self, words: list[str]) -> torch.Tensor:
        """(C, 2, E): each class word's text features as forward computes them (what kano export stores)."""
        return self.text_features(words).float()

    @torch.no_grad()
    def text_features(self, class_names: list[str]) -> torch.Tensor:
        """(C, 2, E): per class the normalised mean of the normalised sentence features, normal then abnormal."""
        return ensemble_text_features(self.tower, self._text, class_names)

    # -- forward ----------------------------------------------------------------------------------------------
    def forward_features(self, feats: VisualFeatures, class_names: list[str], out_size: int | None = None) -> MVFAOutput:
        classes = sorted(set(class_names))
        dev = feats.global_feature.device
        idx = torch.tensor([classes.index(c) for c in class_names], device=dev)
        text = self.text_features(classes).to(dev)[idx]
        return self.score_text(feats, text, out_size or self.backbone.image_size)

    def score_text(self, feats: VisualFeatures, text: torch.Tensor, out_size: int) -> MVFAOutput:
        """feats from encode_images, text (N, 2, E) normalised -> MVFAOutput. The blocks and adapters run in the
        backbone's precision (`backbone_autocast`, as the authors' autocast), the heads in float32."""
        dev = feats.global_feature.device
        with backbone_autocast(dev):
            seg, det = self.adapted_tokens(feats)
        with full_precision(dev):
            return self._heads([t[:, 1:].float() for t in seg], [t[:, 1:].float() for t in det], text.float(), out_size)

    def _heads(self, seg: list[torch.Tensor], det: list[torch.Tensor], text: torch.Tensor, out_size: int) -> MVFAOutput:
        n = text.shape[0]
        hw = grid_hw(seg[0].shape[1])
        scale = self.cfg.logit_scale
        probs, grids, dets = [], [], []
        for s_tok, d_tok in zip(seg, det):
            logits = scale * torch.einsum("nld,nkd->nkl", F.normalize(s_tok, dim=-1), text).reshape(n, 2, *hw)
            grids.append(logits.softmax(1)[:, 1])
            up = F.interpolate(logits, size=(out_size, out_size), mode="bilinear", align_corners=True)
            probs.append(up.softmax(1))
            d = scale * torch.einsum("nld,nkd->nlk", F.normalize(d_tok, dim=-1), text)
            dets.append(d.softmax(-1)[..., 1].mean(1))
        stage_probs = torch.stack(probs, 1)                                                    # (N, S, 2, H, W)
        det_scores = torch.stack(dets, 1)                                                      # (N, S)
        return MVFAOutput(det_scores.mean(1), stage_probs[:, :, 1].mean(1), torch.stack(grids, 1), stage_probs, det_scores)

    def forward(self, images: torch.Tensor, class_names: list[str]) -> MVFAOutput:
        """images (N, 3, S, S), one class name per image -> MVFAOutput."""
        with backbone_autocast(images.device):
            feats = self.encode_images(images)
        return self.forward_features(feats, class_names, images.shape[-1])

    # -- the few-shot memory (kanoclip/fewshot.py reads these) ------------------------------------------------
    @torch.no_grad()
    def reference_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Normal references (k, 3, S, S) -> per stage the memory (M, bottleneck), unit rows: every token (class
        token included) of every reference and, with reference_augment, of its 10 augmented views."""
        if self.cfg.reference_augment:
            images = augment_views(images)
        with backbone_autocast(images.device):
            seg, _ = self.adapted_tokens(self.encode_images(images))
        return [F.normalize(t.float().flatten(0, 1), dim=-1) for t in seg]

    @torch.no_grad()
    def query_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Test images (N, 3, S, S) -> per stage (N, L, bottleneck) unit seg tokens of the patches."""
        with backbone_autocast(images.device):
            seg, _ = self.adapted_tokens(self.encode_images(images))
        return [F.normalize(t[:, 1:].float(), dim=-1) for t in seg]

    # -- loss -------------------------------------------------------------------------------------------------
    def _loss(self, out: MVFAOutput, masks: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.cfg
        target = (masks > 0.5).float()
        seg = sum(smoothed_focal(out.stage_probs[:, s], target, c.focal_gamma, c.focal_smooth)
                  + dice_loss(out.stage_probs[:, s, 1], target) for s in range(out.stage_probs.shape[1]))
        det = sum(F.binary_cross_entropy_with_logits(out.det_scores[:, s], labels) for s in range(out.det_scores.shape[1]))
        zero = torch.zeros((), device=masks.device)
        return {"total": seg + det, "kd": zero, "global": det, "local": seg}
