"""Conv-Adapter (eq. 11): LN -> depthwise-separable bottleneck -> ReLU -> up-projection, residual."""

from __future__ import annotations

import torch
import torch.nn as nn


class ConvAdapter(nn.Module):
    """Î_G = I_G + W_up · ReLU(pointwise(depthwise(LN(I_G)))).

    The global feature (N, D) is read as a one-channel signal of length D: the depthwise convolution
    (kernel 3) mixes neighbouring feature dimensions, the pointwise (1x1, i.e. linear) step reduces
    D -> d_bottle (W_down of eq. 11), W_up maps back to D. The residual keeps CLIP's alignment at the
    start of training (W_up starts small).
    """

    def __init__(self, dim: int, bottleneck: int | None = None, kernel: int = 3):
        super().__init__()
        bottleneck = bottleneck or max(8, dim // 4)
        self.ln = nn.LayerNorm(dim)
        self.depthwise = nn.Conv1d(1, 1, kernel, padding=kernel // 2)
        self.pointwise = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.up.weight, std=1e-3)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, D) -> (N, D)."""
        h = self.depthwise(self.ln(x).unsqueeze(1)).squeeze(1)
        return x + self.up(torch.relu(self.pointwise(h)))
