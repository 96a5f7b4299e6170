"""Samples as tensors: squash-resize (no centre crop, so masks stay aligned) and CLIP normalisation."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset as TorchDataset

from kano.core.errors import KanoError

from .io import image_to_array, load_image, load_mask, mask_to_array
from .readers import Sample

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_to_tensor(img: Image.Image, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """(3, size, size) float tensor, bicubic squash resize, normalised (io.image_to_array, which the torch-free
    runtime shares)."""
    return torch.from_numpy(image_to_array(img, size, mean, std))


def mask_to_tensor(mask: np.ndarray, size: int) -> torch.Tensor:
    """(size, size) float tensor in {0, 1}, nearest resize (io.mask_to_array)."""
    return torch.from_numpy(mask_to_array(mask, size))


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


def mosaic_sample(samples: list[Sample], size: int, mean=CLIP_MEAN, std=CLIP_STD) -> tuple[torch.Tensor, torch.Tensor, int]:
    """April-GAN's 2 x 2 mosaic (VAND-APRIL-GAN dataset.py:98-136): four images pasted at their own resolution into
    one of twice the first's width and height (row-major: top left, top right, bottom left, bottom right), their
    masks likewise, then resized like any sample. -> (image (3, size, size), mask (size, size) in {0, 1}, label:
    1 if any of the four is anomalous). An image of another size than the first is resized to it first."""
    if len(samples) != 4:
        raise ValueError(f"a mosaic takes 4 samples, got {len(samples)}")
    imgs = [load_image(s.image_path) for s in samples]
    w, h = imgs[0].size
    canvas = Image.new("RGB", (2 * w, 2 * h))
    mcanvas = np.zeros((2 * h, 2 * w), dtype=bool)
    for k, (s, img) in enumerate(zip(samples, imgs)):
        mask = load_mask(s.mask_path, img.size)
        if img.size != (w, h):
            img = img.resize((w, h), Image.BICUBIC)
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127
        x, y = (k % 2) * w, (k // 2) * h
        canvas.paste(img.convert("RGB"), (x, y))
        mcanvas[y:y + h, x:x + w] = mask
    return (image_to_tensor(canvas, size, mean, std), mask_to_tensor(mcanvas, size),
            int(any(s.label for s in samples)))


def raise_batch_errors(batch: dict) -> None:
    errors = [e for e in batch["error"] if e]
    if errors:
        raise KanoError(errors[0])
