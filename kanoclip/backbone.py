"""Frozen open_clip backbone with the CLIP-VV dual path (eq. 4-8).

The original stream runs every block unchanged (global feature = open_clip `encode_image`). From
block `vv_start` on, a second stream S accumulates `out_proj(softmax(V Vᵀ·scale)·V)` with V taken
from `ln_1` of the ORIGINAL stream and no MLP (eq. 8). Patch tokens for the maps come from S
through `ln_post` and `proj`. Both attentions are computed from one shared qkv projection.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from kano.core.errors import KanoError

from .pos_embed import check_mode, resize_visual

# The paper's backbone and its image size (a 37x37 patch grid).
DEFAULT_SIZES = {"ViT-L-14-336-quickgelu": 518, "ViT-L-14-336": 518}
TINY_SEED = 20240601
# Random-weight open_clip backbones ("ViT-L-14-336-quickgelu" without PRETRAINED) are built under this seed: a run
# stores only its trainable weights, so every load (eval, predict, export) must rebuild the same frozen backbone.
RANDOM_WEIGHTS_SEED = 20240602


class VisualFeatures(NamedTuple):
    """global_feature (N, D) = encode_image; patch_tokens: one (N, L, D) tensor per stage, L = grid²."""

    global_feature: torch.Tensor
    patch_tokens: list[torch.Tensor]


def spread_stages(depth: int, n: int = 4) -> list[int]:
    """Evenly spread 1-based block numbers ending at the last block: 24 -> [6, 12, 18, 24]."""
    n = min(n, depth)
    return sorted({max(1, round(depth * (i + 1) / n)) for i in range(n)})


def spread_layers(depth: int) -> tuple[list[int], int]:
    """-> (stages, vv_start): four stages spread evenly (6/12/18/24 of 24) and the V-V path from the first of them."""
    st = spread_stages(depth)
    return st, st[0]


def _tiny_clip(image_size: int):
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = open_clip.CLIP(
            embed_dim=64,
            vision_cfg=CLIPVisionCfg(layers=4, width=96, head_width=32, patch_size=8, image_size=image_size, mlp_ratio=2.0),
            text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2, mlp_ratio=2.0),
            quick_gelu=True,
        )
    return model


class Backbone(nn.Module):
    """A frozen open_clip model plus the CLIP-VV dual path.

    Attributes: clip (the open_clip model), stages (1-based block numbers), vv_start (first V-V
    block, 1-based), image_size, grid (patches per side), embed_dim, width, spec, pos_resize (how the
    position embeddings were resampled to this grid: kanoclip/pos_embed.py).
    """

    def __init__(self, clip_model: nn.Module, spec: str, stages: list[int] | None = None, vv_start: int | None = None,
                 pos_resize: str = "bicubic-antialias"):
        super().__init__()
        self.clip = clip_model
        v = clip_model.visual
        if getattr(v, "attn_pool", None) is not None or not hasattr(v, "transformer"):
            raise KanoError(f"backbone must be an open_clip VisionTransformer without attentional pooling, got {spec}")
        self.blocks = list(v.transformer.resblocks)
        for b in self.blocks:
            if not isinstance(getattr(b, "attn", None), nn.MultiheadAttention):
                raise KanoError(f"backbone blocks must use nn.MultiheadAttention (open_clip ViT), got {type(b).__name__} in {spec}")
        self.depth = len(self.blocks)
        self.set_layers(stages, vv_start)
        self.spec = spec
        self.pos_resize = pos_resize
        self.activation_set = False  # True when build_backbone replaced the activation (the feature cache keys it)
        size = v.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        patch = v.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
        self.grid = self.image_size // self.patch_size
        self.width = v.transformer.width
        self.embed_dim = int(v.proj.shape[1]) if v.proj is not None else self.width
        pp = getattr(v, "preprocess_cfg", None) or {}
        self.mean = tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self.std = tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711)))
        for p in self.clip.parameters():
            p.requires_grad_(False)
        self.clip.eval()

    def set_layers(self, stages: list[int] | None = None, vv_start: int | None = None) -> None:
        """Which blocks' patch tokens make maps (default: four spread evenly, 6/12/18/24 of 24) and the first
        V-V block (default: the first of those four, block 6 of 24 = AnomalyCLIP's DPAM from block 6, which
        KAnoCLIP adopts), each set on its own: the V-V start does not follow the stages."""
        depth = self.depth
        self.stages = list(stages) if stages else spread_stages(depth)
        if any(not 1 <= s <= depth for s in self.stages) or sorted(set(self.stages)) != self.stages:
            raise KanoError(f"stages must be increasing block numbers in 1..{depth}, got {self.stages}")
        self.vv_start = vv_start if vv_start is not None else spread_stages(depth)[0]
        if not 1 <= self.vv_start <= depth:
            raise KanoError(f"vv_start must be a block number in 1..{depth}, got {self.vv_start}")

    @property
    def activation(self) -> str:
        """The MLP activation the blocks run: "quickgelu" or "gelu"."""
        return activation_of(self.clip)

    def train(self, mode: bool = True):  # the backbone is frozen: always eval
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    @staticmethod
    def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
        n, l, d = t.shape
        return t.view(n, l, h, d // h).transpose(1, 2)

    def forward(self, images: torch.Tensor, vv: bool = True, raw: bool = False) -> VisualFeatures:
        """images (N, 3, S, S) normalised -> VisualFeatures. vv=False takes patch tokens from the Q-K stream.

        raw=True returns each stage's patch tokens as the block wrote them, (N, L, width), without `ln_post` and
        `proj` (April-GAN's linear layers map those to the text space); the global feature is unchanged."""
        v = self.clip.visual
        x = v._embeds(images.to(v.conv1.weight.dtype))
        s = None
        keep: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks, 1):
            attn = blk.attn
            h = attn.num_heads
            y = blk.ln_1(x)
            q, k, val = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
            n, l, d = q.shape
            vh = self._heads(val, h)
            o = F.scaled_dot_product_attention(self._heads(q, h), self._heads(k, h), vh)
            o = attn.out_proj(o.transpose(1, 2).reshape(n, l, d))
            if vv and i >= self.vv_start:
                if s is None:
                    s = x
                ov = F.scaled_dot_product_attention(vh, vh, vh)  # eq. 8: Attention(V, V, V), scale = head_dim^-0.5
                s = s + attn.out_proj(ov.transpose(1, 2).reshape(n, l, d))
            x = x + blk.ls_1(getattr(blk, "ln_attn", nn.Identity())(o))
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
            if i in self.stages:
                keep.append(s if (vv and s is not None) else x)
        pooled, _ = v._pool(x)
        glob = pooled @ v.proj if v.proj is not None else pooled
        if raw:
            return VisualFeatures(glob, [t[:, 1:] for t in keep])
        patches = []
        for t in keep:
            t = v.ln_post(t[:, 1:])
            patches.append(t @ v.proj if v.proj is not None else t)
        return VisualFeatures(glob, patches)


def build_backbone(spec: str = "tiny", image_size: int | None = None, device: str | torch.device | None = None,
                   stages: list[int] | None = None, vv_start: int | None = None, pos_resize: str | None = None,
                   partial_patches: bool = False, activation: str | None = None) -> Backbone:
    """Build a frozen backbone from "MODEL[:PRETRAINED]" or "tiny".

    - "ViT-L-14-336-quickgelu:openai" (the paper's; image size 518 -> 37x37 grid by default)
    - "ViT-B-16-quickgelu:/path/weights.safetensors" (local file), "ViT-B-16-quickgelu" (random weights, seeded by
      RANDOM_WEIGHTS_SEED: the same weights on every build, so a run trained on them reloads with its own backbone)
    - "tiny": an embedded, seeded random-weight ViT (4 blocks, width 96, patch 8) for tests
    - "micro": the shipped micro-CLIP (open_clip config kano-micro, 96 px, patch 8), pretrained by
      bench/pretrain_micro.py on a captioned synthetic world; "micro:/path/micro_clip.safetensors" loads
      another file written by that script. Offline: the weights are package data.

    pos_resize: how pretrained position embeddings are resampled to the image size's grid (kanoclip/pos_embed.py
    MODES); None keeps each loader's own (open_clip: bicubic-antialias at build; micro: bicubic), which runs without
    a recorded pos_resize were made with. Random weights (tiny, no PRETRAINED) have no grid to resample.
    partial_patches: allow an image size that is not a multiple of the patch size (the patch convolution then
    never sees the last rows and columns; MVFA-AD's 240 px on ViT-L/14 is such a size).
    activation: "gelu" or "quickgelu" replaces the MLP activation of every block of both towers (`set_activation`);
    None keeps what the spec builds.
    """
    spec = (spec or "").strip()
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise KanoError(f"image_size must be a positive integer (leave it unset for the backbone's default), got {image_size!r}")
    if pos_resize is not None:
        check_mode(pos_resize)
    if spec == "micro" or spec.startswith("micro:"):
        from . import micro_clip

        model = micro_clip.build(spec.partition(":")[2] or None, image_size, pos_resize)
        pos_resize = pos_resize or "bicubic"
    elif spec.startswith("tiny"):
        if spec not in ("tiny",):
            raise KanoError(f"backbone 'tiny' takes no pretrained tag, got {spec!r}")
        model = _tiny_clip(image_size or 224)
    else:
        name, _, pretrained = spec.partition(":")
        size = image_size or DEFAULT_SIZES.get(name)
        from .pretrained import create_clip

        if pretrained and pos_resize not in (None, "bicubic-antialias"):
            # open_clip resamples at build (bicubic-antialias): build at the weights' own size, then resample here
            model = create_clip(name, pretrained, None)
            if size:
                resize_visual(model.visual, size, pos_resize)
        elif pretrained:
            model = create_clip(name, pretrained, size)
        else:
            with torch.random.fork_rng(devices=[]):  # the caller's random stream is left as it was
                torch.manual_seed(RANDOM_WEIGHTS_SEED)
                model = create_clip(name, None, size)
    if activation is not None:
        set_activation(model, activation)
    bb = Backbone(model, spec, stages=stages, vv_start=vv_start, pos_resize=pos_resize or "bicubic-antialias")
    bb.activation_set = activation is not None
    if bb.image_size % bb.patch_size and not partial_patches:
        raise KanoError(f"image size must be a multiple of the patch size {bb.patch_size}, got {bb.image_size}")
    return bb.to(device or "cpu")


def _mlps(clip_model: nn.Module) -> list[nn.Module]:
    towers = [clip_model.visual.transformer, getattr(clip_model, "transformer", None)]
    return [blk.mlp for t in towers if t is not None for blk in t.resblocks if hasattr(blk, "mlp")]


def activation_of(clip_model: nn.Module) -> str:
    """"quickgelu" or "gelu": the MLP activation of the image tower's first block."""
    from open_clip.transformer import QuickGELU

    act = getattr(_mlps(clip_model)[0], "gelu", None)
    return "quickgelu" if isinstance(act, QuickGELU) else "gelu" if isinstance(act, nn.GELU) else type(act).__name__


def set_activation(clip_model: nn.Module, name: str) -> None:
    """Every block's MLP activation, both towers: "quickgelu" (x sigmoid(1.702 x), what OpenAI's CLIP was trained
    with) or "gelu" (exact GELU, what April-GAN's and MVFA-AD's code run on those weights at other image sizes)."""
    from open_clip.transformer import QuickGELU

    if name not in ("gelu", "quickgelu"):
        raise KanoError(f"activation must be one of gelu, quickgelu, got {name!r}")
    for mlp in _mlps(clip_model):
        mlp.gelu = QuickGELU() if name == "quickgelu" else nn.GELU()


def grid_hw(n_tokens: int) -> tuple[int, int]:
    side = int(math.isqrt(n_tokens))
    if side * side != n_tokens:
        raise ValueError(f"patch tokens must form a square grid, got {n_tokens}")
    return side, side
