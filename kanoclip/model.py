"""The full KAnoCLIP model as a pure nn.Module: no file I/O, no dataset loops."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter import ConvAdapter
from .backbone import Backbone, VisualFeatures, grid_hw, spread_layers
from .bicmci import BiCA, LinearHead
from .losses import global_loss, local_loss
from .protocol import MethodDefaults
from .prompts import FixedPrompts, FreeTextVectors, PromptLearner, TextTower, kd_loss


@dataclass
class ModelConfig:
    """Model hyper-parameters. The paper gives K=12 and α=β=γ=1; σ=4 is AnomalyCLIP's; the BiCA and adapter
    widths are ours (the paper gives none)."""

    n_ctx: int = 12                                   # K, learnable prefix length (§3.1)
    prompt_class: str | None = None                   # None: the class name fills [class] (eq. 1); a word such as
                                                      # "object" makes the prompts class-agnostic (AnomalyCLIP style)
    normal_words: tuple[str, ...] = ("normal", "perfect")
    abnormal_words: tuple[str, ...] = ("abnormal", "defective")
    sigma: float = 4.0                                # G_σ of eq. 10, in output pixels (AnomalyCLIP's value)
    bica_dim: int = 128
    bica_heads: int = 4
    deform_stride: int = 2
    deform_range: float = 2.0
    adapter_bottleneck: int | None = None             # default D // 4
    use_knpl: bool = True                             # ablations of Table 3
    use_vv: bool = True
    use_bicmci: bool = True
    use_adapter: bool = True
    text_free: bool = False                           # control: two freely learned vectors instead of text prompts
    alpha: float = 1.0                                # eq. 13 weights, all 1 in the paper
    beta: float = 1.0
    gamma: float = 1.0
    focal_gamma: float = 2.0

    def __post_init__(self):
        self.normal_words, self.abnormal_words = tuple(self.normal_words), tuple(self.abnormal_words)
        if self.n_ctx < 1:
            raise ValueError(f"n_ctx must be >= 1, got {self.n_ctx}")
        if not self.normal_words or not self.abnormal_words:
            raise ValueError("normal_words and abnormal_words must each hold at least one word, got an empty list")
        if set(self.normal_words) & set(self.abnormal_words):
            raise ValueError(f"normal_words and abnormal_words must not overlap, got {sorted(set(self.normal_words) & set(self.abnormal_words))}")
        if self.text_free and self.use_knpl:
            raise ValueError("text_free replaces the prompts with two learned vectors: use_knpl must be False with it, got True")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.bica_dim % self.bica_heads:
            raise ValueError(f"bica_dim must be divisible by bica_heads, got {self.bica_dim} and {self.bica_heads}")
        if min(self.alpha, self.beta, self.gamma) < 0:
            raise ValueError(f"loss weights must be >= 0, got alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}")

    def to_dict(self) -> dict:
        return asdict(self)


class InferenceBatch(NamedTuple):
    """The one typed result passed from model to evaluator.

    image_score (N,) in [0, 1]; anomaly_map (N, H, W) in [0, 1]; stage_maps (N, S, h, w): per-stage
    abnormal probability on the patch grid, for inspection.
    """

    image_score: torch.Tensor
    anomaly_map: torch.Tensor
    stage_maps: torch.Tensor

    def inference(self) -> "InferenceBatch":
        """Every model's output answers `.inference()`; a method whose output is the contract returns this."""
        return self


class ModelOutput(NamedTuple):
    image_score: torch.Tensor      # (N,)  (p_global + max M) / 2
    anomaly_map: torch.Tensor      # (N, H, W)  M of eq. 10
    stage_maps: torch.Tensor       # (N, S, h, w)
    global_prob: torch.Tensor      # (N,)  softmax(Î_G · F_textᵀ)[abnormal], what the BCE of eq. 14 sees
    map_abnormal: torch.Tensor     # (N, H, W)  Mᵃ of eq. 9
    map_normal: torch.Tensor       # (N, H, W)  Mⁿ of eq. 9
    text_normal: torch.Tensor      # (C, E)  w̄ⁿ per class of the batch (unique, in `classes` order)
    text_abnormal: torch.Tensor    # (C, E)  w̄ᵃ
    classes: list

    def inference(self) -> InferenceBatch:
        return InferenceBatch(self.image_score, self.anomaly_map, self.stage_maps)


def backbone_autocast(device: torch.device | str):
    """The one reduced precision of the frozen backbone, wherever it runs (feature cache, training
    without cache, evaluation, prediction): fp16 autocast on CUDA, none on CPU. The feature cache
    stores fp16, so fp16 here loses nothing more than the cache does, and the threshold calibrated
    on cached features meets scores of the same precision at evaluation time.

    KANO_BACKBONE_AUTOCAST=bf16|fp16|off overrides it (e.g. bf16 on CPU, to check that reduced
    precision stays inside the backbone). Everything after the backbone runs in float32 whatever
    the caller's autocast: see `full_precision`.
    """
    dev = torch.device(device)
    choice = os.environ.get("KANO_BACKBONE_AUTOCAST", "").strip().lower()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if choice and choice not in (*dtypes, "off"):
        raise ValueError(f"KANO_BACKBONE_AUTOCAST must be one of bf16, fp16, off, got {choice!r}")
    if choice == "off" or (not choice and dev.type != "cuda"):
        return torch.autocast(dev.type, enabled=False)
    return torch.autocast(dev.type, dtype=dtypes.get(choice, torch.float16))


def full_precision(device: torch.device | str):
    """Autocast disabled: heads, similarities, softmax, upsampling, Gaussian, scores and losses in float32.

    Half precision there ties scores (measured on a CPU bf16 run: 8,188 distinct map values fell to
    355, image scores from 64 to 19; logits at scale 100 step by 0.125), and the BCE, the decision
    threshold and the reported metrics all read those scores.
    """
    return torch.autocast(torch.device(device).type, enabled=False)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian filter G_σ in torch (runs where x lives). x (N, H, W) -> (N, H, W)."""
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    k = torch.exp(-(t ** 2) / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.dtype)
    y = x.unsqueeze(1)
    pad_h, pad_w = min(radius, x.shape[-2] - 1), min(radius, x.shape[-1] - 1)
    y = F.pad(y, (pad_w, pad_w, 0, 0), mode="reflect") if pad_w > 0 else y
    y = F.conv2d(y, k[radius - pad_w: radius + pad_w + 1].view(1, 1, 1, -1))
    y = F.pad(y, (0, 0, pad_h, pad_h), mode="reflect") if pad_h > 0 else y
    y = F.conv2d(y, k[radius - pad_h: radius + pad_h + 1].view(1, 1, -1, 1))
    return y.squeeze(1)


class FrozenBackboneModel(nn.Module, MethodDefaults):
    """What every trained method shares (KAnoCLIP and the peers): a frozen `self.backbone`, always in eval mode,
    and a state that is only the trainable parameters (what a run's weights.safetensors holds)."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: p.detach() for k, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        expected = {k for k, p in own.items() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"checkpoint must hold exactly the trainable parameters; missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for k, v in state.items():
                if own[k].shape != v.shape:
                    raise ValueError(f"parameter {k} must have shape {tuple(own[k].shape)}, got {tuple(v.shape)}")
                own[k].copy_(v)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.train(False)
        return self

    def score_bank(self, images: torch.Tensor, text: torch.Tensor):
        """What `kano export` writes as the graph: images (N, 3, S, S) scored against each image's rows of the
        method's text bank (N, 2, E) (text_bank), the text side already computed. -> the method's output."""
        return self.score_text(self.encode_images(images), text, images.shape[-1])


class KAnoCLIP(FrozenBackboneModel):
    """Frozen CLIP-VV backbone + KnPL prompts + Bi-CMCI + Conv-Adapter.

    Image score: eq. 12 adds a probability to a map maximum; we report their mean,
    (p_global + max M) / 2, which ranks images exactly as eq. 12 and stays in [0, 1]. The BCE of
    eq. 14 sees p_global alone (a probability), and the map term is trained by eq. 15.
    """

    def __init__(self, backbone: Backbone, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg or ModelConfig()
        self.backbone = backbone
        tower = TextTower(backbone.clip)
        c = self.cfg
        if c.text_free:
            self.prompts = FreeTextVectors(tower, backbone.embed_dim)
        else:
            self.prompts = (PromptLearner(tower, c.n_ctx, c.normal_words, c.abnormal_words) if c.use_knpl else FixedPrompts(tower))
        dim = backbone.embed_dim
        n_stages = len(backbone.stages)
        if c.use_bicmci:
            self.heads = nn.ModuleList(BiCA(dim, c.bica_dim, c.bica_heads, c.deform_stride, c.deform_range) for _ in range(n_stages))
        else:
            self.heads = nn.ModuleList(LinearHead(dim) for _ in range(n_stages))
        self.adapter = ConvAdapter(dim, c.adapter_bottleneck) if c.use_adapter else None
        # temperature of the patch-text similarity: CLIP's 1/0.07, fixed (a learned one saturates the softmax)
        self.register_buffer("map_logit_scale", torch.tensor(1 / 0.07), persistent=False)
        self.register_buffer("global_logit_scale", backbone.clip.logit_scale.detach().exp().clamp(max=100.0).clone(), persistent=False)
        self.to(backbone.device)

    method = "kanoclip"
    # stages 6/12/18/24 and V-V from block 6: AnomalyCLIP's paper and April-GAN's train.sh (the KAnoCLIP paper
    # names neither), spread evenly on other depths
    published_layers = staticmethod(spread_layers)
    # Kano's reading: the KAnoCLIP paper does not say; it builds on AnomalyCLIP's code, which resamples bilinearly
    # in its forward pass (AnomalyCLIP_lib/AnomalyCLIP.py line 368)
    pos_resize = "bilinear"

    @property
    def feature_spec(self) -> dict:
        """What the feature cache stores for this model: CLIP-VV (or Q-K) tokens through ln_post and proj."""
        return {"vv": self.cfg.use_vv, "tokens": "projected"}

    @property
    def patch_dim(self) -> int:
        return self.backbone.embed_dim

    # -- forward ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> VisualFeatures:
        """The frozen part: images (N, 3, S, S) -> VisualFeatures (cacheable across epochs)."""
        return self.backbone(images, vv=self.cfg.use_vv)

    def text_features(self, class_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(w̄ⁿ, w̄ᵃ) per class, each (C, E), not normalised."""
        return self.prompts(class_names)

    @torch.no_grad()
    def text_bank(self, words: list[str]) -> torch.Tensor:
        """(C, 2, E): each class word's (w̄ⁿ, w̄ᵃ) as forward computes them (what kano export stores)."""
        if self.cfg.prompt_class:
            words = [self.cfg.prompt_class] * len(words)
        w_n, w_a = self.text_features(words)
        return torch.stack([w_n, w_a], 1).float()

    def forward_features(self, feats: VisualFeatures, class_names: list[str], out_size: int | None = None) -> ModelOutput:
        """From (cached) visual features and one prompt class name per image to maps and scores.

        Always float32 (autocast disabled, features upcast): fp16 cached features or a caller's
        autocast never reach the heads, similarities, softmax, upsampling or Gaussian.
        """
        with full_precision(feats.global_feature.device):
            feats = VisualFeatures(feats.global_feature.float(), [t.float() for t in feats.patch_tokens])
            return self._forward_features(feats, class_names, out_size)

    def _forward_features(self, feats: VisualFeatures, class_names: list[str], out_size: int | None) -> ModelOutput:
        out_size = out_size or self.backbone.image_size
        if self.cfg.prompt_class:
            class_names = [self.cfg.prompt_class] * len(class_names)
        classes = sorted(set(class_names))
        idx = torch.tensor([classes.index(c) for c in class_names], device=feats.global_feature.device)
        w_n, w_a = self.text_features(classes)
        text = torch.stack([w_n, w_a], dim=1)[idx].to(feats.global_feature.dtype)   # (N, 2, E)
        return self.score_text(feats, text, out_size)._replace(text_normal=w_n, text_abnormal=w_a, classes=classes)

    def score_text(self, feats: VisualFeatures, text: torch.Tensor, out_size: int) -> ModelOutput:
        """The image side given each image's text features: text (N, 2, E) (w̄ⁿ, w̄ᵃ) -> ModelOutput without the
        per-class text fields (None). An exported graph runs this with the text as a constant (kano.deploy)."""
        n = feats.global_feature.shape[0]
        hw = grid_hw(feats.patch_tokens[0].shape[1])
        scale = self.map_logit_scale
        stage_probs = []
        for head, tokens in zip(self.heads, feats.patch_tokens):
            p, t = head(tokens, text, hw)
            logits = scale * torch.einsum("nld,nkd->nlk", F.normalize(p, dim=-1), F.normalize(t, dim=-1))
            stage_probs.append(logits.float().softmax(-1))                          # (N, L, 2)
        probs = torch.stack(stage_probs, 1)                                          # (N, S, L, 2)
        grid = probs.view(n, len(stage_probs), hw[0], hw[1], 2)
        # eq. 9: sum over stages, normalised to [0, 1] (divided by the number of stages)
        summed = grid.mean(1).permute(0, 3, 1, 2)                                    # (N, 2, h, w)
        up = F.interpolate(summed, size=(out_size, out_size), mode="bilinear", align_corners=False)
        m_normal, m_abnormal = up[:, 0], up[:, 1]
        # eq. 10's 1 − Mⁿ is taken as the stages' mean of 1 − pⁿ = pᵃ (exact for the two-way softmax), not subtracted
        # from 1: in float32, Mᵃ + 1 − Mⁿ rounds away everything below 6e-8 (half float32's epsilon), so a confident
        # trained head's map (Mᵃ of 1e-6 and below on normal pixels) came out as rounding steps and exact zeros
        not_normal = m_abnormal
        anomaly_map = gaussian_blur(m_abnormal + not_normal, self.cfg.sigma) / 2     # eq. 10
        glob = feats.global_feature.float()
        if self.adapter is not None:
            glob = self.adapter(glob)                                                # eq. 11
        g_logits = self.global_logit_scale * torch.einsum("nd,nkd->nk", F.normalize(glob, dim=-1), F.normalize(text.float(), dim=-1))
        global_prob = g_logits.softmax(-1)[:, 1]
        image_score = (global_prob + anomaly_map.flatten(1).amax(1)) / 2           # eq. 12, halved
        return ModelOutput(image_score, anomaly_map, grid[..., 1], global_prob, m_abnormal, m_normal, None, None, [])

    def forward(self, images: torch.Tensor, class_names: list[str]) -> ModelOutput:
        """images (N, 3, S, S), one prompt class name per image -> ModelOutput.

        The backbone runs in `backbone_autocast` (whatever autocast the caller set is replaced by
        it, so evaluation and the threshold's calibration share one precision); the rest in float32.
        """
        with backbone_autocast(images.device):
            feats = self.encode_images(images)
        return self.forward_features(feats, class_names, images.shape[-1])

    # -- loss -------------------------------------------------------------------------------
    def loss(self, out: ModelOutput, masks: torch.Tensor, labels: torch.Tensor,
             knowledge: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Eq. 13. masks (N, H, W) at the map size, labels (N,), knowledge: class -> w̄ᵏ (E,)."""
        with full_precision(masks.device):
            return self._loss(out, masks, labels, knowledge)

    def _loss(self, out: ModelOutput, masks: torch.Tensor, labels: torch.Tensor,
              knowledge: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        c = self.cfg
        terms = {"global": global_loss(out.global_prob, labels), "local": local_loss(out.map_abnormal, out.map_normal, masks, c.focal_gamma)}
        if c.use_knpl and knowledge is not None:
            w_k = torch.stack([knowledge[k].to(out.text_normal.device) for k in out.classes])
            terms["kd"] = kd_loss(w_k, out.text_normal, out.text_abnormal)
        else:
            terms["kd"] = torch.zeros((), device=masks.device)
        terms["total"] = c.alpha * terms["kd"] + c.beta * terms["global"] + c.gamma * terms["local"]
        return terms
