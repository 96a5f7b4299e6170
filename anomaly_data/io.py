"""Image and mask loading with clear errors; file listing and stem pairing."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from kano.errors import KanoError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
ImageFile.LOAD_TRUNCATED_IMAGES = False


def is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def list_images(folder: Path, recursive: bool = False) -> list[Path]:
    """Sorted image files of a folder; a clear error if it is missing or has none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KanoError(f"{folder} must be an existing folder of images, got {'a file' if folder.exists() else 'no such folder'}")
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if is_image(p))
    if not files:
        raise KanoError(f"{folder} must contain images ({', '.join(IMAGE_EXTS)}), got none")
    return files


def mask_stem(p: Path) -> str:
    """Stem a mask pairs on: '000_mask.png' and '000.png' both give '000'."""
    stem = p.stem
    for suffix in ("_mask", "_label", "_gt", "-mask"):
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def pair_masks(images: list[Path], mask_dir: Path | None) -> dict[Path, Path | None]:
    """Map each image to the mask in mask_dir with the same stem (with or without '_mask'), or None."""
    masks: dict[str, Path] = {}
    if mask_dir is not None and mask_dir.is_dir():
        for m in mask_dir.iterdir():
            if is_image(m):
                masks[mask_stem(m)] = m
    return {img: masks.get(img.stem) for img in images}


def _to_uint8(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        if arr.size and arr.max() > 255:  # 16-bit range: 65535 -> 255
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8))
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        return Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8))
    return im


def load_image(path: str | os.PathLike) -> Image.Image:
    """RGB image from any common format (grayscale, RGBA, palette, 16-bit). KanoError names the file if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise KanoError(f"image {path} must exist, got no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                im.load()
                im = _to_uint8(im)
                if im.mode in ("RGBA", "LA", "P"):
                    im = im.convert("RGBA")
                    bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
                    im = Image.alpha_composite(bg, im)
                return im.convert("RGB")
    except KanoError:
        raise
    except Exception as exc:
        raise KanoError(f"image {path} must be a readable image file, got a corrupt or truncated file ({exc})") from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(W, H) from the file header alone, without decoding the pixels."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise KanoError(f"image {path} must exist, got no such file") from None
    except Exception as exc:
        raise KanoError(f"image {path} must be a readable image file, got a corrupt or truncated file ({exc})") from None


def load_mask(path: str | os.PathLike | None, size: tuple[int, int]) -> np.ndarray:
    """Binary mask (H, W) uint8 in {0, 1}; zeros when path is None. `size` is the image's (W, H)."""
    if path is None or path == "":
        return np.zeros((size[1], size[0]), dtype=np.uint8)
    path = Path(path)
    if not path.is_file():
        raise KanoError(f"mask {path} must exist, got no such file")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(_to_uint8(im).convert("L"))
    except Exception as exc:
        raise KanoError(f"mask {path} must be a readable image file, got a corrupt file ({exc})") from None
    if (arr.shape[1], arr.shape[0]) != tuple(size):
        raise KanoError(f"mask {path} must have the size of its image, {size[0]}x{size[1]}, got {arr.shape[1]}x{arr.shape[0]}")
    return (arr > 127).astype(np.uint8) if arr.max() > 1 else (arr > 0).astype(np.uint8)


def is_image_path(p: Path) -> bool:
    return Path(p).suffix.lower() in IMAGE_EXTS
