"""Bi-CMCI (eq. 9): per stage one BiCA block, or a linear head when the module is ablated."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class DeformableSelfAttention(nn.Module):
    """Deformable self-attention (Xia et al. 2022): every query attends to keys/values sampled at a
    reference grid (stride `stride`) shifted by offsets predicted from the queries; sampling by grid_sample."""

    def __init__(self, dim: int, heads: int = 4, stride: int = 2, offset_range: float = 2.0, kernel: int = 5):
        super().__init__()
        self.heads, self.stride, self.offset_range = heads, stride, offset_range
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.offset_net = nn.Sequential(
            nn.Conv2d(dim, dim, kernel, stride=stride, padding=kernel // 2, groups=dim), nn.GELU(),
            nn.Conv2d(dim, 2, 1, bias=False))
        nn.init.normal_(self.offset_net[2].weight, std=0.01)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """x (N, L, d) with L = H*W -> (N, L, d)."""
        n, l, d = x.shape
        h, w = hw
        q = self.q(x)
        offsets = self.offset_net(q.transpose(1, 2).reshape(n, d, h, w))  # (N, 2, Hk, Wk)
        hk, wk = offsets.shape[-2:]
        ys = torch.linspace(-1, 1, hk, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, wk, device=x.device, dtype=x.dtype)
        ref = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (Hk, Wk, 2) as (x, y)
        # offsets bounded to `offset_range` key-grid cells, in normalised [-1, 1] units
        scale = torch.tensor([2.0 / max(wk - 1, 1), 2.0 / max(hk - 1, 1)], device=x.device, dtype=x.dtype)
        pos = ref + torch.tanh(offsets.permute(0, 2, 3, 1)) * self.offset_range * scale
        sampled = F.grid_sample(x.transpose(1, 2).reshape(n, d, h, w), pos.clamp(-1, 1), mode="bilinear", align_corners=True)
        k, v = self.kv(sampled.flatten(2).transpose(1, 2)).chunk(2, dim=-1)
        split = lambda t: t.view(n, -1, self.heads, d // self.heads).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.out(o.transpose(1, 2).reshape(n, l, d))


class _Attn(nn.Module):
    """Pre-norm multi-head attention (query from x, keys/values from ctx)."""

    def __init__(self, dim: int, heads: int, cross: bool = False):
        super().__init__()
        self.ln_q = nn.LayerNorm(dim)
        self.ln_kv = nn.LayerNorm(dim) if cross else None
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        q = self.ln_q(x)
        kv = q if self.ln_kv is None else self.ln_kv(ctx)
        return self.attn(q, kv, kv, need_weights=False)[0]


class BiCA(nn.Module):
    """One Bi-Directional Cross-Attention block (Fig. 3) at one stage.

    Works in a `dim`-wide bottleneck and adds its result back to the CLIP-space tokens, so an untrained
    block starts near plain CLIP patch-text similarity. Order: self-attention in each modality,
    deformable self-attention over the visual tokens, text->visual then visual->text cross-attention.
    """

    def __init__(self, clip_dim: int, dim: int = 128, heads: int = 4, deform_stride: int = 2, deform_range: float = 2.0):
        super().__init__()
        self.ln_v, self.ln_t = nn.LayerNorm(clip_dim), nn.LayerNorm(clip_dim)
        self.down_v, self.down_t = nn.Linear(clip_dim, dim), nn.Linear(clip_dim, dim)
        self.sa_v, self.sa_t = _Attn(dim, heads), _Attn(dim, heads)
        self.ln_d = nn.LayerNorm(dim)
        self.dsa = DeformableSelfAttention(dim, heads, deform_stride, deform_range)
        self.t2v, self.v2t = _Attn(dim, heads, cross=True), _Attn(dim, heads, cross=True)
        self.up_v, self.up_t = nn.Linear(dim, clip_dim), nn.Linear(dim, clip_dim)
        for m in (self.up_v, self.up_t):
            nn.init.normal_(m.weight, std=1e-3)
            nn.init.zeros_(m.bias)

    def forward(self, patches: torch.Tensor, text: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """patches (N, L, C), text (N, 2, C) -> refined (N, L, C), (N, 2, C)."""
        p = self.down_v(self.ln_v(patches))
        t = self.down_t(self.ln_t(text))
        p = p + self.sa_v(p)
        t = t + self.sa_t(t)
        p = p + self.dsa(self.ln_d(p), hw)
        p = p + self.t2v(p, t)   # text-to-visual: visual parts gather the text they match
        t = t + self.v2t(t, p)   # visual-to-text: text refined by local visual features
        return patches + self.up_v(p), text + self.up_t(t)


class LinearHead(nn.Module):
    """Bi-CMCI off: April-GAN style linear projection of patch tokens, text unchanged."""

    def __init__(self, clip_dim: int):
        super().__init__()
        self.proj = nn.Linear(clip_dim, clip_dim)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(clip_dim) + torch.randn(clip_dim, clip_dim) * 1e-3)
            self.proj.bias.zero_()

    def forward(self, patches: torch.Tensor, text: torch.Tensor, hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(patches), text
