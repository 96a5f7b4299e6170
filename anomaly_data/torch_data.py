"""Samples as tensors: squash-resize (no centre crop, so masks stay aligned) and CLIP normalisation."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset as TorchDataset

from kano.core.errors import KanoError

from .io import image_to_array, load_image, load_mask
from .readers import Sample

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_to_tensor(img: Image.Image, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """(3, size, size) float tensor, bicubic squash resize, normalised (io.image_to_array, which the torch-free
    runtime shares)."""
    return torch.from_numpy(image_to_array(img, size, mean, std))


def mask_to_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """(size, size) float tensor in {0, 1}, nearest resize."""
    if not mask.any():  # a normal image: nothing to resize
        return torch.zeros(size, size)
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    return torch.from_numpy((np.asarray(m) > 127).astype(np.float32))


class SampleDataset(TorchDataset):
    """Yields dict(image (3,S,S), mask (S,S), label, index, error). Errors travel as text so that the
    main process can report them cleanly (DataLoader workers would otherwise wrap them in tracebacks)."""

    def __init__(self, samples: list[Sample], image_size: int, mean=CLIP_MEAN, std=CLIP_STD, mask_size: int | None = None):
        self.samples, self.size, self.mean, self.std = samples, image_size, mean, std
        self.mask_size = mask_size or image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        s = self.samples[i]
        try:
            img = load_image(s.image_path)
            mask = load_mask(s.mask_path, img.size)
            return {"image": image_to_tensor(img, self.size, self.mean, self.std), "mask": mask_to_tensor(mask, self.mask_size),
                    "label": s.label, "index": i, "error": ""}
        except KanoError as exc:
            return {"image": torch.zeros(3, self.size, self.size), "mask": torch.zeros(self.mask_size, self.mask_size),
                    "label": s.label, "index": i, "error": str(exc)}


def raise_batch_errors(batch: dict) -> None:
    errors = [e for e in batch["error"] if e]
    if errors:
        raise KanoError(errors[0])
