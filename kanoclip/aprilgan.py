"""April-GAN (VAND 2023 challenge winner; Chen et al., "A Zero-/Few-Shot Anomaly Classification and Segmentation
Method for CVPR 2023 VAND Workshop Challenge Tracks 1&2", arXiv 2305.17382) as a pure nn.Module.

What it is: a frozen CLIP whose patch tokens of four stages are each mapped into the joint space by one trainable
linear layer, compared with a fixed, class-specific text prompt ensemble. Trained on the auxiliary set with focal +
dice on the maps. Choices and where they come from:

- Patch tokens: the raw residual stream of blocks 6/12/18/24 of ViT-L/14 (the public code's `features_list` in
  train.sh), class token dropped, WITHOUT `ln_post` and `proj` (public code: `LinearLayer` is
  `nn.Linear(vision width, embed dim)` on the block outputs). Q-K attention throughout (no V-V path): paper and code.
- Text: states x templates, each sentence's feature normalised, averaged per state, normalised again (public code
  `prompt_ensemble.py`; the lists below are verbatim). No learnable text part.
- Map per stage: 100 * cos(patch, text) logits, bilinearly upsampled with align_corners=True, then a softmax over
  {normal, abnormal} (public code, train.py / test.py); the map is the sum of the stages' abnormal channels (we
  report the mean, which ranks pixels identically and stays in [0, 1]). No Gaussian smoothing (public code).
- Image score (zero-shot): softmax(100 * cos(global image feature, text))[abnormal] (public code test.py); the map is
  not used for it.
- Loss: per stage, focal(softmax map, mask) + dice(abnormal channel, mask), summed over stages (public code
  train.py:133-137, masks cut at 0.5), the focal loss with its 1e-5 label smoothing (loss.py:21, :72-75:
  `losses.smoothed_focal`). No image-level loss: the global branch is not trained.
- Optimiser and schedule (public code train.py, train.sh): Adam, lr 1e-3, betas (0.5, 0.999), batch 8; 3 epochs with
  MVTec-AD as the auxiliary set and a fifth of the samples made 2 x 2 mosaics of four images of the class with
  their masks (`--aug_rate 0.2`, dataset.py:98-144), 15 without mosaics with VisA (`train_recipe`: MVTec-layout
  data, and every other kind; the mosaic is the trainer's `aug_rate`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import Backbone, VisualFeatures, grid_hw, spread_layers
from .losses import dice_loss, smoothed_focal
from .model import FrozenBackboneModel, InferenceBatch, backbone_autocast, full_precision
from .prompts import TextTower

APRILGAN_NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                          "{} without damage")
APRILGAN_ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
APRILGAN_TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a photo of one {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "a low resolution photo of a {}.", "a photo of a large {}.", "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a photo of the small {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "a dark photo of a {}.", "a photo of a cool {}.", "a photo of a small {}.",
    "there is a {} in the scene.", "there is the {} in the scene.", "this is a {} in the scene.",
    "this is the {} in the scene.", "this is one {} in the scene.",
)


# the focal loss's label smoothing: loss.py:21 FocalLoss(smooth=1e-5), as train.py:95 builds it
FOCAL_SMOOTH = 1e-5


def check_focal_smooth(v: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 0.5:
        raise ValueError(f"focal_smooth must be a number in [0, 0.5), got {v!r}")


def aprilgan_prompts(class_name: str) -> tuple[list[str], list[str]]:
    """(normal sentences, abnormal sentences) for one class: states x templates (7 x 35 and 5 x 35)."""
    normal = [t.format(s.format(class_name)) for s in APRILGAN_NORMAL_STATES for t in APRILGAN_TEMPLATES]
    abnormal = [t.format(s.format(class_name)) for s in APRILGAN_ABNORMAL_STATES for t in APRILGAN_TEMPLATES]
    return normal, abnormal


def ensemble_text_features(tower, cache: dict[str, torch.Tensor], class_names: list[str]) -> torch.Tensor:
    """(C, 2, E): per class the normalised mean of the normalised features of its aprilgan_prompts sentences, normal
    then abnormal (April-GAN's and MVFA-AD's text side); each class encoded once into `cache`."""
    for c in class_names:
        if c not in cache:
            normal, abnormal = aprilgan_prompts(c)
            f = F.normalize(tower.encode(normal + abnormal).float(), dim=-1)
            cache[c] = F.normalize(torch.stack([f[:len(normal)].mean(0), f[len(normal):].mean(0)]), dim=-1)
    return torch.stack([cache[c] for c in class_names])


@dataclass
class AprilGANConfig:
    """April-GAN's constants (public code): the logit scale of its similarities and the focal loss's gamma and label
    smoothing. A run's config.json without `focal_smooth` was trained without the smoothing."""

    logit_scale: float = 100.0
    focal_gamma: float = 2.0
    focal_smooth: float = FOCAL_SMOOTH   # loss.py:21 FocalLoss(smooth=1e-5), as train.py:95 builds it

    def __post_init__(self):
        if self.logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0, got {self.logit_scale}")
        check_focal_smooth(self.focal_smooth)

    def to_dict(self) -> dict:
        return asdict(self)


class PeerOutput(NamedTuple):
    """What a trained peer method (April-GAN, AnomalyCLIP) returns; `inference()` gives the evaluator's contract."""

    image_score: torch.Tensor      # (N,) in [0, 1]
    anomaly_map: torch.Tensor      # (N, H, W) in [0, 1]
    stage_maps: torch.Tensor       # (N, S, h, w) abnormal probability per stage on the patch grid
    stage_probs: torch.Tensor      # (N, S, 2, H, W) upsampled {normal, abnormal} probabilities, what the losses see
    global_logits: torch.Tensor    # (N, 2) image-level logits; image_score is their softmax's abnormal entry

    def inference(self) -> InferenceBatch:
        return InferenceBatch(self.image_score, self.anomaly_map, self.stage_maps)


class TrainablePeer(FrozenBackboneModel):
    """What the trainer needs of any trained method beside KAnoCLIP: frozen backbone, trainable state, forward."""

    method = ""

    def forward_features(self, feats: VisualFeatures, class_names: list[str], out_size: int | None = None) -> PeerOutput:
        """From (cached) visual features to maps and scores, in float32 whatever the caller's autocast."""
        with full_precision(feats.global_feature.device):
            feats = VisualFeatures(feats.global_feature.float(), [t.float() for t in feats.patch_tokens])
            return self._forward_features(feats, class_names, out_size or self.backbone.image_size)

    def forward(self, images: torch.Tensor, class_names: list[str]) -> PeerOutput:
        """images (N, 3, S, S), one class name per image -> PeerOutput (backbone in `backbone_autocast`)."""
        with backbone_autocast(images.device):
            feats = self.encode_images(images)
        return self.forward_features(feats, class_names, images.shape[-1])

    def loss(self, out: PeerOutput, masks: torch.Tensor, labels: torch.Tensor, knowledge=None) -> dict[str, torch.Tensor]:
        """masks (N, H, W) at the map size, labels (N,) -> {"total", "kd", "global", "local"} (kd is 0: no knowledge)."""
        with full_precision(masks.device):
            return self._loss(out, masks.float(), labels.float())


class AprilGAN(TrainablePeer):
    """Frozen CLIP (Q-K, raw block outputs) + one linear layer per stage + the fixed prompt ensemble."""

    method = "aprilgan"
    # blocks 6/12/18/24: train.sh / test.sh `--features_list 6 12 18 24` (spread evenly on other depths); the V-V
    # start is unused (April-GAN has no V-V path)
    published_layers = staticmethod(spread_layers)
    # its vendored open_clip resamples at build with antialias (VAND-APRIL-GAN open_clip/model.py resize_pos_embed,
    # interpolation='bicubic', antialias=True)
    pos_resize = "bicubic-antialias"

    def __init__(self, backbone: Backbone, cfg: AprilGANConfig | None = None):
        super().__init__()
        self.cfg = cfg or AprilGANConfig()
        self.backbone = backbone
        self.tower = TextTower(backbone.clip)
        self.linear = nn.ModuleList(nn.Linear(backbone.width, backbone.embed_dim) for _ in backbone.stages)
        self._text: dict[str, torch.Tensor] = {}
        self.to(backbone.device)

    @staticmethod
    def train_recipe(data_kind: str) -> dict:
        """train.sh of VAND-APRIL-GAN: batch 8, Adam lr 1e-3 betas (0.5, 0.999) (train.py); on MVTec-AD as the
        auxiliary set 3 epochs with the 2 x 2 mosaic at rate 0.2 (`--aug_rate 0.2`, dataset.py:98-144), on VisA 15
        epochs without (Kano: MVTec-layout data, and every other kind)."""
        mvtec = data_kind == "mvtec"
        return {"epochs": 3 if mvtec else 15, "batch_size": 8, "lr": 1e-3, "betas": (0.5, 0.999),
                "aug_rate": 0.2 if mvtec else 0.0,
                "source": f"April-GAN train.sh ({'MVTec-AD' if mvtec else 'VisA'} line): {3 if mvtec else 15} epochs, "
                          f"batch 8, {'mosaic rate 0.2' if mvtec else 'no mosaic'}, Adam lr 1e-3, betas (0.5, 0.999)"}

    # what the feature cache stores for this method: raw Q-K block outputs, width-dimensional
    feature_spec = {"vv": False, "tokens": "raw"}

    @property
    def patch_dim(self) -> int:
        return self.backbone.width

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> VisualFeatures:
        """images (N, 3, S, S) -> global (N, E) and raw patch tokens, one (N, L, width) per stage."""
        return self.backbone(images, vv=False, raw=True)

    def text_bank(self, words: list[str]) -> torch.Tensor:
        """(C, 2, E): each class word's text features as forward computes them (what kano export stores)."""
        return self.text_features(words).float()

    @torch.no_grad()
    def text_features(self, class_names: list[str]) -> torch.Tensor:
        """(C, 2, E): per class the normalised mean of the normalised sentence features, normal then abnormal."""
        return ensemble_text_features(self.tower, self._text, class_names)

    def _forward_features(self, feats: VisualFeatures, class_names: list[str], out_size: int) -> PeerOutput:
        classes = sorted(set(class_names))
        idx = torch.tensor([classes.index(c) for c in class_names], device=feats.global_feature.device)
        text = self.text_features(classes).to(feats.global_feature.device)[idx]              # (N, 2, E)
        return self.score_text(feats, text, out_size)

    def score_text(self, feats: VisualFeatures, text: torch.Tensor, out_size: int) -> PeerOutput:
        """The image side given each image's normalised text features text (N, 2, E) (kano.deploy exports this)."""
        n = feats.global_feature.shape[0]
        hw = grid_hw(feats.patch_tokens[0].shape[1])
        scale = self.cfg.logit_scale
        probs, grids = [], []
        for lin, tokens in zip(self.linear, feats.patch_tokens):
            p = F.normalize(lin(tokens), dim=-1)
            logits = scale * torch.einsum("nld,nkd->nkl", p, text).reshape(n, 2, *hw)      # (N, 2, h, w)
            grids.append(logits.softmax(1)[:, 1])
            up = F.interpolate(logits, size=(out_size, out_size), mode="bilinear", align_corners=True)
            probs.append(up.softmax(1))
        stage_probs = torch.stack(probs, 1)                                                  # (N, S, 2, H, W)
        anomaly_map = stage_probs[:, :, 1].mean(1)
        g_logits = scale * torch.einsum("nd,nkd->nk", F.normalize(feats.global_feature, dim=-1), text)
        g_prob = g_logits.softmax(-1)[:, 1]
        return PeerOutput(g_prob, anomaly_map, torch.stack(grids, 1), stage_probs, g_logits)

    def _loss(self, out: PeerOutput, masks: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        target = (masks > 0.5).float()  # train.py:133: gt cut at 0.5
        local = sum(smoothed_focal(out.stage_probs[:, s], target, self.cfg.focal_gamma, self.cfg.focal_smooth)
                    + dice_loss(out.stage_probs[:, s, 1], target) for s in range(out.stage_probs.shape[1]))
        zero = torch.zeros((), device=masks.device)
        return {"total": local, "kd": zero, "global": zero, "local": local}
