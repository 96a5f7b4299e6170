"""`--device` for every command that runs a model."""

from __future__ import annotations

import torch

from kano.core.errors import KanoError


def resolve_device(device: str | None) -> torch.device:
    """--device: cpu, cuda or cuda:N (default cuda when available)."""
    if device:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise KanoError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
        if dev.type not in ("cpu", "cuda"):
            raise KanoError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise KanoError(f"--device must be available, got {device} on a machine without CUDA")
        if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
            raise KanoError(f"--device must name one of the {torch.cuda.device_count()} CUDA devices, got {device}")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
