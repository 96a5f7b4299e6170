"""What every method gives the evaluator (`kano eval`, `kano predict`, the demo and the benchmarks).

The evaluator reads a method through this interface only:

- `backbone`: how images are prepared (`Preprocessing`): side `image_size` in px, per-channel `mean` and
  `std`, the `device` it runs on and a `spec` naming it (None for the zero-parameter detectors). Every
  method gets images resized to a square by squashing (no centre crop), so that masks stay aligned
  (`anomaly_data.SampleDataset`); `RESIZE_MODE` names that choice.
- `transductive`: True when each image's score depends on the other test images of its class; the
  evaluator then passes one class's whole test set as one batch.
- `begin_class(folder_class, prompt_class)`: per-class set-up before that class's images (e.g. WinCLIP+'s
  reference images); a no-op for most methods.
- `set_references(references)`: the normal reference images of each class, {folder class: (k, 3, S, S)}
  normalised as test images, for the methods whose registry entry says `references` (and the K-shot wrapper of
  kanoclip/fewshot.py); the others refuse them. The caller gives them; the model never reads them from elsewhere.
- `__call__(images (N, 3, S, S), class_names [N])` -> an object whose `.inference()` is an `InferenceBatch`
  (`image_score (N,)`, `anomaly_map (N, S, S)`).

`MethodDefaults` supplies the usual answers (per-image, nothing to set up) for a module to inherit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

RESIZE_MODE = "squash"


@runtime_checkable
class Preprocessing(Protocol):
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    spec: str | None


@runtime_checkable
class Method(Protocol):
    backbone: Preprocessing
    transductive: bool

    def begin_class(self, folder_class: str, prompt_class: str) -> None: ...

    def set_references(self, references: "dict[str, torch.Tensor] | None") -> None: ...

    def __call__(self, images: torch.Tensor, class_names: list[str]): ...


@dataclass(frozen=True)
class PixelPreprocessing:
    """The preparation of the zero-parameter detectors that read raw pixels: RGB in [0, 1] (mean 0, std 1) at
    `image_size` px; they have no backbone, so `spec` is None."""

    image_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    spec: str | None = None


class MethodDefaults:
    """Mixed into a method's nn.Module: per-image, no per-class state."""

    transductive = False

    def begin_class(self, folder_class: str, prompt_class: str) -> None:
        """No per-class state."""

    def rename_references(self, names: "dict[str, str]") -> None:
        """No references to rename (see set_references)."""

    def set_references(self, references: "dict[str, torch.Tensor] | None") -> None:
        """Takes no reference images."""
        if references:
            raise ValueError(f"{type(self).__name__} takes no reference images, got them for {', '.join(sorted(references))}")
