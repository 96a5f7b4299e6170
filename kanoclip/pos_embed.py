"""Resizing a ViT's learned position embeddings to another patch grid, in the three ways CLIP peers do it.

A pretrained grid (24 x 24 for ViT-L/14@336) must be resampled to run at another image size (37 x 37 at 518 px,
the setting of KAnoCLIP and its peers). The peers' codes resample differently, and every token, hence every map,
depends on the choice (about 2 % of the tokens at 518 px):

- "bicubic-antialias": open_clip's `resize_pos_embed` at model build (bicubic, antialias=True, align_corners=False;
  open_clip/model.py), which April-GAN's vendored open_clip also uses (VAND-APRIL-GAN open_clip/model.py
  `resize_pos_embed`, antialias=True);
- "bilinear": AnomalyCLIP's vision forward pass (AnomalyCLIP_lib/AnomalyCLIP.py line 368,
  `F.interpolate(new_pos, (new_side, new_side), mode='bilinear')`: align_corners False, no antialias);
- "bicubic": MuSc's vendored open_clip (models/backbone/open_clip/model.py `resize_pos_embed` passes no
  antialias: bicubic, align_corners=False, antialias False).

The class token's embedding is kept as it is in every mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kano.core.errors import KanoError

MODES = ("bicubic-antialias", "bilinear", "bicubic")
_ARGS = {"bicubic-antialias": {"mode": "bicubic", "antialias": True},
         "bilinear": {"mode": "bilinear", "antialias": False},
         "bicubic": {"mode": "bicubic", "antialias": False}}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise KanoError(f"position-embedding resize must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def resize(pos: torch.Tensor, grid: int, mode: str) -> torch.Tensor:
    """pos (1 + g*g, D): class token then a g x g grid (row-major) -> (1 + grid*grid, D), class token kept."""
    check_mode(mode)
    g = math.isqrt(pos.shape[0] - 1)
    if g * g != pos.shape[0] - 1:
        raise ValueError(f"position embeddings must be a class token plus a square grid, got {pos.shape[0]} rows")
    if g == grid:
        return pos.clone()
    img = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    # resampled in float32: half-precision bicubic is not implemented on every device
    out = F.interpolate(img.float(), size=(grid, grid), align_corners=False, **_ARGS[mode]).to(pos.dtype)
    return torch.cat([pos[:1], out.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def resize_visual(visual: nn.Module, image_size: int, mode: str) -> None:
    """Set an open_clip VisionTransformer (built at its weights' native size) to `image_size`: its position
    embeddings resampled by `resize`, its image_size and grid_size updated. A no-op at the native size."""
    patch = visual.patch_size
    patch = int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    grid = image_size // patch
    pe = visual.positional_embedding
    visual.positional_embedding = nn.Parameter(resize(pe.detach(), grid, mode), requires_grad=pe.requires_grad)
    visual.image_size = (image_size, image_size)
    visual.grid_size = (grid, grid)
