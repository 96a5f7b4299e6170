"""AnomalyCLIP (Zhou et al., "AnomalyCLIP: Object-agnostic Prompt Learning for Zero-shot Anomaly Detection",
ICLR 2024) as a pure nn.Module.

Choices and where they come from ("paper" = the ICLR paper, "code" = the public repository zqhang/AnomalyCLIP):

- Object-agnostic prompts (paper Sec. 3.2): "[V1]...[V12] object." and "[W1]...[W12] damaged object.", two separate
  learnable contexts of 12 token embeddings (code: `n_ctx` 12, prompt words "object" / "damaged object").
- Learnable tokens inside the text encoder (paper Sec. 3.2, "text prompt tuning"): from the second text block on,
  for `depth - 1` = 8 blocks, the outputs at positions 1..4 (right after the start token) are replaced, before the
  block runs, by 4 fresh learnable embeddings per block, shared by both prompts (code: depth 9, t_n_ctx 4).
- DPAM (paper Sec. 3.3): V-V self-attention in a second path of the vision tower that skips the MLPs, from block 6
  of 24 on (code train.py line 42 and test.py line 71: `DAPM_replace(DPAM_layer=20)` replaces blocks -1..-19, i.e.
  6..24; other depths: the first of four evenly spread blocks). This is Kano's CLIP-VV dual path
  (`Backbone(vv=True)`, eq. 8 of the KAnoCLIP paper, which adopts it). The V-V start is its own setting
  (`--vv-start`), apart from the map stages.
- Map stage: block 24 only, the last block (code train.sh and test.sh: `--features_list 24`; the maintainer's
  answer in zqhang/AnomalyCLIP issue #82: every published result used block 24, the 2024 code's four "stages"
  6/12/18/24 were all the final tokens through a missing clone, and the paper was corrected in arXiv v10). On other
  depths: the last block. `--stages 6,12,18,24` gives the multi-stage variant.
- Maps (code test.py): per stage, softmax(cos(patch, text) / 0.07) over {normal, abnormal}, bilinearly upsampled
  (align_corners False), map_s = (P_abnormal + 1 - P_normal) / 2; summed over the stages (we report the mean: same
  ranking, in [0, 1]; with one stage the two agree), then a Gaussian of σ = 4.
- Image score (code test.py): softmax(cos(global image feature, text) / 0.07)[abnormal]; the map is not used.
- Loss (paper eq. 4-5; code train.py): cross-entropy on the image logits + 4 x the local loss (code train.py line
  50: `lam = 4`, not in the paper), the local loss summed over the stages of focal(P, mask) + dice(P_abnormal,
  mask) + dice(P_normal, 1 - mask): with the published single stage, 4 x block 24's local loss. Masks cut at 0.5
  (train.py lines 64-66); the focal loss with the code's 1e-5 label smoothing (train.py line 47 `FocalLoss()`,
  loss.py line 21 `smooth=1e-5`: `losses.smoothed_focal`, as April-GAN's).
- Position embeddings at another grid than the weights' (518 px on ViT-L/14@336): resampled bilinearly, as the code
  does in its vision forward pass (AnomalyCLIP_lib/AnomalyCLIP.py line 368; kanoclip/pos_embed.py).
- Optimiser (code): Adam, lr 1e-3, betas (0.5, 0.999), batch 8, 15 epochs, image size 518: Kano's trainer defaults.
- Initialisation (code): contexts and deep tokens N(0, 0.02).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from kano.core.errors import KanoError

from .aprilgan import FOCAL_SMOOTH, PeerOutput, TrainablePeer, check_focal_smooth  # the same loss.py (FocalLoss smooth=1e-5)
from .backbone import Backbone, VisualFeatures, grid_hw, spread_layers
from .losses import dice_loss, smoothed_focal
from .model import gaussian_blur
from .prompts import PLACEHOLDER, TextTower, tokenize


@dataclass
class AnomalyCLIPConfig:
    n_ctx: int = 12                 # learnable context tokens per prompt (code: Prompt_length)
    depth: int = 9                  # text blocks carrying learnable tokens, counting the input (code: depth)
    t_n_ctx: int = 4                # learnable tokens per deeper block (code: t_n_ctx)
    normal_word: str = "object"
    abnormal_word: str = "damaged object"
    temperature: float = 0.07       # code: / 0.07 in every similarity
    sigma: float = 4.0              # code: --sigma 4
    lam: float = 4.0                # code train.py line 50: lam = 4 on the local loss
    focal_gamma: float = 2.0
    focal_smooth: float = FOCAL_SMOOTH  # code loss.py line 21 FocalLoss(smooth=1e-5); absent from a run: trained without

    def __post_init__(self):
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {self.n_ctx}")
        if self.depth < 1:
            raise ValueError(f"depth must be >= 1 (1: no learnable tokens inside the text encoder), got {self.depth}")
        if not 1 <= self.t_n_ctx <= self.n_ctx:
            raise ValueError(f"t_n_ctx must be in 1..n_ctx ({self.n_ctx}): the deep tokens replace context positions, got {self.t_n_ctx}")
        if self.temperature <= 0 or self.sigma <= 0 or self.lam < 0:
            raise ValueError(f"temperature and sigma must be > 0 and lam >= 0, got {self.temperature}, {self.sigma}, {self.lam}")
        check_focal_smooth(self.focal_smooth)

    def to_dict(self) -> dict:
        return asdict(self)


class AnomalyCLIP(TrainablePeer):
    """Frozen CLIP with the DPAM (V-V) path + object-agnostic learnable prompts with deep text tokens."""

    method = "anomalyclip"
    pos_resize = "bilinear"  # AnomalyCLIP_lib/AnomalyCLIP.py line 368: F.interpolate(..., mode='bilinear')

    @staticmethod
    def published_layers(depth: int) -> tuple[list[int], int]:
        """-> ([depth], vv_start): maps from the last block only (train.sh / test.sh `--features_list 24`; issue
        #82 of zqhang/AnomalyCLIP), V-V from block 6 of 24 (`DAPM_replace(DPAM_layer=20)`; other depths: the
        first of four evenly spread blocks)."""
        return [depth], spread_layers(depth)[1]
    feature_spec = {"vv": True, "tokens": "projected"}

    def __init__(self, backbone: Backbone, cfg: AnomalyCLIPConfig | None = None):
        super().__init__()
        c = self.cfg = cfg or AnomalyCLIPConfig()
        self.backbone = backbone
        clip = backbone.clip
        self.tower = TextTower(clip)
        # a text encoder shallower than `depth` (the micro and tiny CLIPs) carries tokens in all its blocks
        self.depth = min(c.depth, len(clip.transformer.resblocks))
        width = clip.token_embedding.weight.shape[1]
        self.ctx_normal = nn.Parameter(torch.randn(c.n_ctx, width) * 0.02)
        self.ctx_abnormal = nn.Parameter(torch.randn(c.n_ctx, width) * 0.02)
        self.deep = nn.Parameter(torch.randn(self.depth - 1, c.t_n_ctx, width) * 0.02)
        prefix = " ".join([PLACEHOLDER] * c.n_ctx)
        tokens = tokenize([f"{prefix} {c.normal_word}.", f"{prefix} {c.abnormal_word}."], clip.context_length)
        if (tokens.argmax(-1) >= clip.context_length - 1).any():
            raise KanoError(f"AnomalyCLIP prompts must fit CLIP's {clip.context_length} tokens, got too long with n_ctx={c.n_ctx}")
        self.register_buffer("tokens", tokens, persistent=False)
        self.to(backbone.device)

    @property
    def patch_dim(self) -> int:
        return self.backbone.embed_dim

    def describe(self) -> dict:
        """What the run used where the backbone overrode the config (saved in config.json)."""
        return {"text_depth_used": self.depth, "vv_start": self.backbone.vv_start, "stages": list(self.backbone.stages),
                "pos_resize": self.backbone.pos_resize}

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> VisualFeatures:
        """images (N, 3, S, S) -> global (N, E) and DPAM patch tokens, one (N, L, E) per stage."""
        return self.backbone(images, vv=True)

    def _insert_deep(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Before text block i (1 <= i < depth): positions 1..t_n_ctx take this block's own learnable tokens,
        replacing what the previous block wrote there."""
        if not 1 <= i < self.depth:
            return x
        deep = self.deep[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], deep, x[:, 1 + self.cfg.t_n_ctx:]], dim=1)

    def text_features(self) -> torch.Tensor:
        """(2, E): the normal and abnormal prompt features, normalised (differentiable in the learnable tokens)."""
        with torch.no_grad():
            emb = self.tower.embed(self.tokens)                                              # (2, T, W)
        ctx = torch.stack([self.ctx_normal, self.ctx_abnormal]).to(emb.dtype)
        x = torch.cat([emb[:, :1], ctx, emb[:, 1 + self.cfg.n_ctx:]], dim=1)
        return F.normalize(self.tower(x, self.tokens, before_block=self._insert_deep).float(), dim=-1)

    def _forward_features(self, feats: VisualFeatures, class_names: list[str], out_size: int) -> PeerOutput:
        return self.score_text(feats, self.text_features().to(feats.global_feature.device), out_size)

    @torch.no_grad()
    def text_bank(self, words: list[str]) -> torch.Tensor:
        """(C, 2, E): the class-agnostic prompt features repeated per class word (what kano export stores, so that
        every exported graph has the same inputs)."""
        return self.text_features().float().unsqueeze(0).expand(len(words), -1, -1).contiguous()

    def score_bank(self, images: torch.Tensor, text: torch.Tensor) -> PeerOutput:
        """The exported graph's scoring: the rows (N, 2, E) are all equal; the first is the prompts' (2, E)."""
        return super().score_bank(images, text[0])

    def score_text(self, feats: VisualFeatures, text: torch.Tensor, out_size: int) -> PeerOutput:
        """The image side given the class-agnostic prompt features text (2, E) (kano.deploy exports this)."""
        c = self.cfg
        n = feats.global_feature.shape[0]
        hw = grid_hw(feats.patch_tokens[0].shape[1])
        probs, grids, maps = [], [], []
        for tokens in feats.patch_tokens:
            sim = (F.normalize(tokens, dim=-1) @ text.T / c.temperature).softmax(-1)          # (N, L, 2)
            grid = sim.transpose(1, 2).reshape(n, 2, *hw)
            grids.append(grid[:, 1])
            up = F.interpolate(grid, size=(out_size, out_size), mode="bilinear", align_corners=False)
            probs.append(up)
            maps.append((up[:, 1] + 1 - up[:, 0]) / 2)
        anomaly_map = gaussian_blur(torch.stack(maps, 1).mean(1), c.sigma)
        g_logits = F.normalize(feats.global_feature, dim=-1) @ text.T / c.temperature
        g_prob = g_logits.softmax(-1)[:, 1]
        return PeerOutput(g_prob, anomaly_map, torch.stack(grids, 1), torch.stack(probs, 1), g_logits)

    def _loss(self, out: PeerOutput, masks: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.cfg
        p = out.stage_probs
        t = (masks > 0.5).float()  # train.py lines 64-66: gt cut at 0.5
        local = sum(smoothed_focal(p[:, s], t, c.focal_gamma, c.focal_smooth) + dice_loss(p[:, s, 1], t) + dice_loss(p[:, s, 0], 1 - t)
                    for s in range(p.shape[1]))
        image = F.cross_entropy(out.global_logits, labels.long())
        return {"total": c.lam * local + image, "kd": torch.zeros((), device=masks.device), "global": image, "local": local}
