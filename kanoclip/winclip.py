"""Zero-shot CLIP baselines of the paper's Table 1 as pure nn.Modules: CLIP, CLIP-AC and WinCLIP.

All three share Kano's frozen backbone (`kanoclip.backbone.build_backbone`), take images (N, 3, S, S)
normalised as the backbone expects plus one prompt class name per image, and return an output whose
`inference()` is the evaluator's `InferenceBatch` (image_score (N,), anomaly_map (N, S, S), stage_maps).
No parameters are learned; text features are computed once per class and cached.

CLIP and CLIP-AC (Kano's reading; the KAnoCLIP paper quotes them from AnomalyCLIP's table and does not
define them):
- CLIP: two prompts, "a photo of a normal [class]." and "a photo of an anomalous [class]." (the issue's
  definition); CLIP-AC (WinCLIP paper, §3: a CLIP two-class "anomaly classification" baseline): the states
  "normal [class]" / "anomalous [class]" inside the WinCLIP template list below, embeddings averaged per
  state.
- image score: softmax over (normal, anomalous) of CLIP's own logit scale x cosine similarity between
  `encode_image` and the two text features (CLIP's zero-shot classifier).
- map: the same softmax for each final-layer patch token (through ln_post and proj, the Q-K path),
  bilinearly upsampled to the image size: how CLIP baselines are usually given pixel numbers.

WinCLIP (Jeong et al., CVPR 2023), zero-shot. From the paper:
- compositional prompt ensemble: state words x text templates, the text embeddings of each class
  (normal, anomalous) averaged; a two-way softmax with temperature gives the anomaly probability (eq. 1).
- window-based features: windows of k x k patches slid over the patch grid; each window is encoded on its
  own by the image encoder with every token outside it removed (CLS + the window's patch tokens, their
  positional embeddings kept), its pooled, projected embedding scored like an image.
- harmonic aggregation: a patch's score at one scale is the harmonic mean of the scores of the windows
  that contain it; the multi-scale map is the harmonic mean of the per-scale maps and of the full-image
  score (the largest scale), then upsampled to the image.
From anomalib's `WinClipModel` (2.7.0; its code read for these facts, none copied):
- state words (7 normal incl. the bare class name, 4 anomalous) and the 21 templates, including
  "a jpeg corrupted photo of the {}." listed twice (kept: it weights that template twice, as anomalib does);
- text embeddings averaged UNnormalised per state; temperature 0.07; window sizes (2, 3) patches, stride 1;
- window tokens taken after the positional embedding and before ln_pre; a patch covered by no window scores
  0 (never happens at stride 1).
- one deliberate difference: anomalib 2.7.0 permutes the window batch to sequence-first before calling
  open_clip 3.x's batch-first transformer, so each window's tokens attend across windows instead of
  within their window (the symptom matches anomalib issue #2571: near-identical window embeddings). Kano encodes
  each window as the paper says; tests/test_winclip.py compares against anomalib with only that call made
  batch-first, and everything else is anomalib's own code.
WinCLIP+ (the same paper, few-shot): k normal reference images per class, set with `set_reference(class, images)`.
From the paper: a memory of the references' window embeddings at each scale and of their patch tokens; each test
window / patch scores (1 - its best cosine similarity to that memory) / 2 (eq. 4, visual association); window
scores aggregated harmonically per scale; the few-shot map is the mean of the patch-level map and the per-scale
maps; the final map is the mean of the zero-shot and few-shot maps, the image score the mean of the zero-shot
score and the few-shot map's maximum. From anomalib: the patch tokens are the last block's through ln_post,
WITHOUT proj (open_clip's `output_tokens`); the memory pools every location of every reference image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import Backbone, grid_hw
from .model import InferenceBatch
from .protocol import MethodDefaults
from .prompts import tokenize

WINCLIP_NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                         "{} without damage")
WINCLIP_ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
WINCLIP_TEMPLATES = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.", "a bright photo of a {}.",
    "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.", "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.", "a blurry photo of the {}.", "a blurry photo of a {}.", "a photo of a {}.",
    "a photo of the {}.", "a photo of a small {}.", "a photo of the small {}.", "a photo of a large {}.",
    "a photo of the large {}.", "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)
CLIP_PROMPTS = (("a photo of a normal {}.",), ("a photo of an anomalous {}.",))
CLIP_AC_PROMPTS = (tuple(t.format("normal {}") for t in WINCLIP_TEMPLATES), tuple(t.format("anomalous {}") for t in WINCLIP_TEMPLATES))


def winclip_prompts(class_name: str) -> tuple[list[str], list[str]]:
    """The compositional ensemble: (normal prompts, anomalous prompts), states x templates (147 and 84)."""
    normal = [t.format(s.format(class_name)) for s in WINCLIP_NORMAL_STATES for t in WINCLIP_TEMPLATES]
    anomalous = [t.format(s.format(class_name)) for s in WINCLIP_ANOMALOUS_STATES for t in WINCLIP_TEMPLATES]
    return normal, anomalous


class _TextCache(nn.Module):
    """(normal, anomalous) text features per class: mean of `encode_text` over each prompt list, unnormalised."""

    def __init__(self, backbone: Backbone, prompts):
        super().__init__()
        self.backbone = backbone
        self.prompts = prompts  # class name -> (normal list, anomalous list)
        self._cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def forward(self, class_names: list[str]) -> torch.Tensor:
        """-> (C, 2, E) for the given classes, in order."""
        clip = self.backbone.clip
        for c in class_names:
            if c not in self._cache:
                normal, anomalous = self.prompts(c)
                dev = clip.token_embedding.weight.device
                feats = [clip.encode_text(tokenize(list(p), clip.context_length).to(dev)).float().mean(0) for p in (normal, anomalous)]
                self._cache[c] = torch.stack(feats)
        return torch.stack([self._cache[c] for c in class_names])


def _class_prob(emb: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Anomalous probability: softmax over the two classes of scale x cosine. emb (N, ..., E), text (N, 2, E) -> (N, ...)."""
    e = F.normalize(emb.float(), dim=-1)
    t = F.normalize(text.float(), dim=-1)
    logits = torch.einsum("n...e,nke->n...k", e, t) * scale
    return logits.softmax(-1)[..., 1]


class CLIPZeroShot(nn.Module, MethodDefaults):
    """CLIP (two prompts) or CLIP-AC (state in the template ensemble); see the module docstring."""

    def __init__(self, backbone: Backbone, variant: str = "clip"):
        super().__init__()
        if variant not in ("clip", "clip-ac"):
            raise ValueError(f"variant must be one of clip, clip-ac, got {variant!r}")
        self.variant = variant
        self.backbone = backbone
        table = CLIP_PROMPTS if variant == "clip" else CLIP_AC_PROMPTS
        self.text = _TextCache(backbone, lambda c: ([p.format(c) for p in table[0]], [p.format(c) for p in table[1]]))
        self.scale = float(backbone.clip.logit_scale.detach().exp().clamp(max=100.0))

    def describe(self) -> dict:
        """Its prompts and map, for the provenance of its results."""
        if self.variant == "clip":
            prompts = {"normal": CLIP_PROMPTS[0][0].format("[class]"), "anomalous": CLIP_PROMPTS[1][0].format("[class]")}
        else:
            prompts = {"normal": "normal [class]", "anomalous": "anomalous [class]", "templates": len(WINCLIP_TEMPLATES),
                       "ensemble": "text features averaged per state"}
        return {"prompts": prompts, "logit_scale": round(self.scale, 4),
                "map": "last block's patch tokens (ln_post, proj) scored like the image, bilinear upsampling"}

    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: list[str]) -> InferenceBatch:
        """images (N, 3, S, S) -> InferenceBatch: image_score (N,) anomalous probability of the whole image,
        anomaly_map (N, S, S) from the last block's patch tokens, stage_maps (N, 1, h, w)."""
        classes = sorted(set(class_names))
        text = self.text(classes)[[classes.index(c) for c in class_names]]           # (N, 2, E)
        feats = self.backbone(images, vv=False)
        image_score = _class_prob(feats.global_feature, text, self.scale)
        h, w = grid_hw(feats.patch_tokens[-1].shape[1])
        grid = _class_prob(feats.patch_tokens[-1], text, self.scale).view(-1, 1, h, w)
        amap = F.interpolate(grid, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return InferenceBatch(image_score, amap, grid)


@dataclass
class WinCLIPConfig:
    """WinCLIP's zero-shot hyper-parameters (sources in the module docstring)."""

    scales: tuple[int, ...] = (2, 3)   # window side in patches (anomalib's default)
    stride: int = 1                    # window step in patches (anomalib's)
    temperature: float = 0.07          # CLIP's, as WinCLIP eq. 1 uses it (anomalib's TEMPERATURE)
    window_batch: int = 1024           # windows encoded per transformer call: bounds memory, not results

    def __post_init__(self):
        self.scales = tuple(int(s) for s in self.scales)
        if not self.scales or min(self.scales) < 1:
            raise ValueError(f"scales must be window sides >= 1 patch, got {self.scales}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


def window_indices(h: int, w: int, k: int, stride: int = 1) -> torch.Tensor:
    """Patch indices (row-major on the h x w grid) of every k x k window -> (n_windows, k*k), windows row-major."""
    if k > min(h, w):
        raise ValueError(f"window side must be <= the patch grid {h}x{w}, got {k}")
    grid = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w)
    return F.unfold(grid, kernel_size=k, stride=stride)[0].T.round().long()


def harmonic_aggregate(window_scores: torch.Tensor, windows: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows covering it (0 where none, or where a
    covering window scores 0). window_scores (N, W), windows (W, k*k) -> (N, n_patches)."""
    n = window_scores.shape[0]
    inv = (1.0 / window_scores).unsqueeze(-1).expand(-1, -1, windows.shape[1]).reshape(n, -1)
    sums = torch.zeros(n, n_patches, dtype=inv.dtype, device=inv.device).index_add_(1, windows.reshape(-1).to(inv.device), inv)
    counts = torch.bincount(windows.reshape(-1), minlength=n_patches).to(inv)
    return (counts / sums).nan_to_num(nan=0.0, posinf=0.0)


class WinCLIP(nn.Module, MethodDefaults):
    """Zero-shot WinCLIP on a Kano backbone (ViT with CLS-token pooling)."""

    def __init__(self, backbone: Backbone, cfg: WinCLIPConfig | None = None):
        super().__init__()
        self.cfg = cfg or WinCLIPConfig()
        self.backbone = backbone
        self.text = _TextCache(backbone, winclip_prompts)
        g = backbone.grid
        largest = max(self.cfg.scales)
        if g < largest:
            raise ValueError(f"must give a patch grid of at least {largest} x {largest} (its largest window), i.e. >= "
                             f"{largest * backbone.patch_size} px with {backbone.patch_size} px patches; got "
                             f"{backbone.image_size} px -> {g} x {g}")
        self._windows = [window_indices(g, g, k, self.cfg.stride) for k in self.cfg.scales]

        self._refs: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self._reference_images: dict[str, torch.Tensor] | None = None

    def describe(self) -> dict:
        """Its prompts, windows and map, for the provenance of its results."""
        return {"prompts": {"normal_states": len(WINCLIP_NORMAL_STATES), "anomalous_states": len(WINCLIP_ANOMALOUS_STATES),
                            "templates": len(WINCLIP_TEMPLATES),
                            "ensemble": "states x templates, text features averaged per state"},
                "window_scales": list(self.cfg.scales), "window_stride": self.cfg.stride, "temperature": self.cfg.temperature,
                "map": "harmonic mean of the window scales' harmonic window aggregates and the image score, bilinear upsampling"}

    @staticmethod
    def describe_references(k_shot: int, where: str) -> dict:
        """The provenance of WinCLIP+ (k normal reference images per class, the first k of `where`)."""
        return {"name": "winclip+", "source": "Jeong et al., WinCLIP (CVPR 2023): WinCLIP+ with k normal reference images "
                f"per class (the first k of {where}, sorted by path); memory rules as anomalib 2.7.0 WinClipModel",
                "parameters": "frozen backbone, no training; a memory of k normal images per class"}

    def rename_references(self, names: dict[str, str]) -> None:
        """The references' classes renamed (old -> new; others kept), e.g. a folder to the class it holds."""
        if self._reference_images:
            self.set_references({names.get(c, c): v for c, v in self._reference_images.items()})

    def set_references(self, references: dict[str, torch.Tensor] | None) -> None:
        """WinCLIP+: folder class -> its k normal reference images (k, 3, S, S), normalised as test images; each
        class's memory is built when that class begins (begin_class). None: zero-shot again."""
        self._reference_images = dict(references) if references is not None else None
        self._refs = {}

    def text_bank(self, words: list[str]) -> torch.Tensor:
        """(C, 2, E): each class word's text features as forward computes them (what kano export stores)."""
        return self.text(words).float()

    def score_bank(self, images: torch.Tensor, text: torch.Tensor) -> InferenceBatch:
        """The exported graph's scoring: images (N, 3, S, S) with each image's rows of the text bank (N, 2, E)."""
        return self.score_text(images, text)

    def _encode(self, images: torch.Tensor):
        """images (N, 3, S, S) -> (tokens after the positional embedding (N, 1+L, W), global embedding (N, E),
        last-block patch tokens through ln_post (N, L, W))."""
        v = self.backbone.clip.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)                                               # (N, L, W)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, x], 1) + v.positional_embedding.to(x.dtype)          # (N, 1+L, W)
        full = v.transformer(v.ln_pre(tokens))
        pooled, _ = v._pool(full)
        glob = pooled @ v.proj if v.proj is not None else pooled
        return tokens, glob, v.ln_post(full[:, 1:])

    @torch.no_grad()
    def set_reference(self, class_name: str, images: torch.Tensor) -> None:
        """WinCLIP+: the k normal reference images (k, 3, S, S) of one prompt class; the memory holds their patch
        tokens (k*L, W) and, per scale, their window embeddings (k*n_windows, E), unit-normalised."""
        tokens, _, patches = self._encode(images)
        windows = [F.normalize(self._encode_windows(tokens, w).flatten(0, 1), dim=-1) for w in self._windows]
        self._refs[class_name] = (F.normalize(patches.flatten(0, 1), dim=-1), windows)

    def begin_class(self, folder_class: str, prompt_class: str) -> None:
        """The evaluator's per-class hook: WinCLIP+ swaps in that class's references (set_references; folders sharing
        a prompt word keep their own references)."""
        refs = self._reference_images
        if refs is None:
            return
        if folder_class not in refs:
            raise ValueError(f"WinCLIP+ needs reference images for class {folder_class}, got them for {', '.join(sorted(refs))}")
        self._refs = {}
        self.set_reference(prompt_class, refs[folder_class].to(self.backbone.device))

    @staticmethod
    def association(emb: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """WinCLIP eq. 4: (1 - max cosine similarity to the memory) / 2. emb (M, D), memory (R, D) unit -> (M,)."""
        return (1 - F.normalize(emb, dim=-1) @ memory.T).amin(-1) / 2

    def _encode_windows(self, tokens: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """tokens (N, 1+L, W) after the positional embedding -> window embeddings (N, n_windows, E)."""
        v = self.backbone.clip.visual
        n, _, width = tokens.shape
        idx = windows.to(tokens.device) + 1                                            # skip CLS
        out = []
        for a in range(0, idx.shape[0], self.cfg.window_batch):
            part = idx[a:a + self.cfg.window_batch]                                    # (w, k*k)
            x = tokens[:, part]                                                        # (N, w, k*k, W)
            cls = tokens[:, :1].unsqueeze(1).expand(-1, part.shape[0], -1, -1)         # (N, w, 1, W)
            x = torch.cat([cls, x], 2).reshape(-1, 1 + part.shape[1], width)
            x = v.transformer(v.ln_pre(x))
            pooled, _ = v._pool(x)
            emb = pooled @ v.proj if v.proj is not None else pooled
            out.append(emb.view(n, part.shape[0], -1))
        return torch.cat(out, 1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, class_names: list[str]) -> InferenceBatch:
        """images (N, 3, S, S) -> InferenceBatch; stage_maps (N, 1 + #scales, g, g): image scale, then each window scale."""
        classes = sorted(set(class_names))
        text = self.text(classes)[[classes.index(c) for c in class_names]]            # (N, 2, E)
        return self.score_text(images, text, class_names)

    def score_text(self, images: torch.Tensor, text: torch.Tensor, class_names: list[str] | None = None) -> InferenceBatch:
        """The image side given each image's text features text (N, 2, E). class_names: only WinCLIP+ (reference
        images set) reads them; the zero-shot path is what kano.deploy exports."""
        classes = sorted(set(class_names or []))
        scale = 1.0 / self.cfg.temperature
        tokens, glob, patches = self._encode(images)
        image_score = _class_prob(glob, text, scale)                                  # (N,)
        g = self.backbone.grid
        maps = [image_score.view(-1, 1).expand(-1, g * g)]
        window_embs = [self._encode_windows(tokens, windows) for windows in self._windows]
        for windows, emb in zip(self._windows, window_embs):
            probs = _class_prob(emb, text, scale)                                      # (N, n_windows)
            maps.append(harmonic_aggregate(probs, windows, g * g))
        stack = torch.stack(maps, 1)                                                   # (N, K, g*g)
        fused = len(maps) / (1.0 / stack).sum(1)                                       # harmonic mean over scales
        if self._refs:  # WinCLIP+: every image of the batch needs its class's references
            missing = sorted(set(class_names or ["(no class given)"]) - set(self._refs))
            if missing:
                raise ValueError(f"WinCLIP+ needs reference images for every class, got none for {', '.join(missing)}")
            few = torch.zeros_like(fused)
            for c in classes:
                i = torch.tensor([j for j, name in enumerate(class_names) if name == c], device=fused.device)
                mem_patches, mem_windows = self._refs[c]
                parts = [self.association(patches[i].flatten(0, 1), mem_patches).view(len(i), -1)]
                for windows, emb, mem in zip(self._windows, window_embs, mem_windows):
                    vas = self.association(emb[i].flatten(0, 1), mem).view(len(i), -1)
                    parts.append(harmonic_aggregate(vas, windows, g * g))
                few[i] = torch.stack(parts, 1).mean(1)
            fused = (fused + few) / 2
            image_score = (image_score + few.amax(1)) / 2
        amap = F.interpolate(fused.view(-1, 1, g, g), size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        return InferenceBatch(image_score, amap, stack.view(-1, len(maps), g, g))


def build_zero_shot(method: str, backbone: Backbone) -> nn.Module:
    """A zero-shot method of this module by its registry name, on a backbone, in eval mode."""
    built = {"clip": lambda: CLIPZeroShot(backbone, "clip"), "clip-ac": lambda: CLIPZeroShot(backbone, "clip-ac"),
             "winclip": lambda: WinCLIP(backbone)}
    if method not in built:
        raise ValueError(f"zero-shot method must be one of {', '.join(built)}, got {method!r}")
    return built[method]().eval()
