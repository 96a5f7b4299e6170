"""Image and mask loading with clear errors; file listing and stem pairing.

How pixels are read (the same rules for every reader, the trainer, `eval` and `predict`):

- Bit depth. 8-bit files load as they are. Deeper ones (16-bit PNG/TIFF, grey or colour, 32-bit
  integer) are scaled by their real depth, not by their container: a PNG's sBIT chunk gives the
  significant bits when present (values above 2^sBIT-1, or all multiples of 2^(16-sBIT), are the
  spec's left-shifted form and scale by 65535); without sBIT, by the smallest 2^k-1 >= the image's
  maximum for k in 8, 10, 12, 14, 16 (the sensor depths in use). So a 12-bit camera frame stored
  as 16-bit PNG (maximum 2944) scales by 4095 and is not nearly black. A dark true 16-bit image
  without sBIT is brightened by this rule; write sBIT=16 to keep it as it is.
- EXIF orientation is applied (to images and masks alike, each by its own tag): pixels come out as
  a viewer shows them, and masks are compared with the image's size after rotation.
- Pixel limit: images and masks larger than `max_pixels()` (default `MAX_PIXELS_DEFAULT`, 8192 x
  8192; the environment variable KANO_MAX_PIXELS changes it) are refused with a clear error before
  decoding, instead of running out of memory.
- Masks: in a lossless file (PNG, BMP, TIFF, ...) ANY nonzero value is defect (VisA stores 1, MVTec
  255, some tools 100 or instance ids); in a JPEG mask, compression noise is removed by
  thresholding at half range (> 127). Colour masks: a pixel is defect when any colour channel is
  nonzero (and, with alpha, the pixel is not fully transparent).
"""

from __future__ import annotations

import functools
import os
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from kano.core.errors import KanoError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
ImageFile.LOAD_TRUNCATED_IMAGES = False

MAX_PIXELS_DEFAULT = 8192 * 8192  # 67,108,864: every benchmark and 48-MP camera photos fit; 12,000^2 does not
COMMON_BIT_DEPTHS = (8, 10, 12, 14, 16)
LOSSY_FORMATS = ("JPEG", "MPO")  # masks in these are thresholded at half range
_ORIENT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
           5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}


def max_pixels() -> int:
    """The largest W*H Kano decodes: $KANO_MAX_PIXELS if set, else MAX_PIXELS_DEFAULT."""
    raw = os.environ.get("KANO_MAX_PIXELS", "").strip()
    if not raw:
        return MAX_PIXELS_DEFAULT
    try:
        value = int(raw.replace("_", "").replace(",", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise KanoError(f"KANO_MAX_PIXELS must be a positive whole number of pixels (e.g. {MAX_PIXELS_DEFAULT}), got {raw!r}")
    return value


def check_pixels(path, size: tuple[int, int], limit: int | None = None, what: str = "image") -> None:
    """KanoError when size (W, H) exceeds the pixel limit."""
    limit = max_pixels() if limit is None else limit
    if size[0] * size[1] > limit:
        raise KanoError(f"{what} {path} must have at most {limit:,} pixels (set KANO_MAX_PIXELS to raise the limit, "
                        f"or downscale the file), got {size[0]}x{size[1]} = {size[0] * size[1]:,}")


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


MASK_SUFFIXES = ("_mask", "_label", "_gt", "-mask", ".mask")


def mask_stem(p: Path) -> str:
    """Stem a mask pairs on: '000_mask.png', '000.mask.png' and '000.png' all give '000'."""
    stem = p.stem
    for suffix in MASK_SUFFIXES:
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


def _png_chunks(path: Path, want: tuple[bytes, ...] = (b"sBIT", b"eXIf")) -> dict[bytes, bytes]:
    """The wanted ancillary chunks of a PNG, found by seeking over chunk headers (no pixel data read)."""
    found: dict[bytes, bytes] = {}
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return found
            while True:
                head = f.read(8)
                if len(head) < 8:
                    break
                length, ctype = struct.unpack(">I4s", head)
                if ctype == b"IEND":
                    break
                if ctype in want and length < (1 << 24):
                    found[ctype] = f.read(length)
                    f.seek(4, os.SEEK_CUR)
                else:
                    f.seek(length + 4, os.SEEK_CUR)
    except OSError:
        pass
    return found


def _orientation(im: Image.Image, path: Path, chunks: dict[bytes, bytes]) -> int:
    """EXIF orientation 1-8 read from the header (PNG: its eXIf chunk wherever it is), 1 when absent or unreadable."""
    try:
        if im.format == "PNG":
            if b"eXIf" not in chunks:
                return 1
            exif = Image.Exif()
            exif.load(chunks[b"eXIf"])
        else:
            exif = im.getexif()
        value = int(exif.get(0x0112, 1))
    except Exception:  # a damaged EXIF block must not make the pixels unreadable
        return 1
    return value if value in _ORIENT else 1


def _open(path: Path, what: str, limit: int | None):
    """Open (header only) with the pixel limit checked first; returns (image, png chunks)."""
    limit = max_pixels() if limit is None else limit
    if Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS < limit:
        Image.MAX_IMAGE_PIXELS = limit  # our limit is the one that speaks; PIL's bomb check would refuse first
    try:
        im = Image.open(path)
    except Image.DecompressionBombError:
        raise KanoError(f"{what} {path} must have at most {limit:,} pixels (set KANO_MAX_PIXELS to raise the limit), got more") from None
    try:
        check_pixels(path, im.size, limit, what)
    except KanoError:
        im.close()
        raise
    return im, (_png_chunks(path) if im.format == "PNG" else {})


def _raw_array(im: Image.Image) -> tuple[np.ndarray, str]:
    """Decode to an integer array with every stored bit: (H, W) or (H, W, C), and the mode it stands for.

    PIL reads 16-bit colour PNGs by keeping only the high byte of each sample; decoding the same data a
    second time as little-endian yields the low bytes, and together they give the full 16-bit values.
    """
    tile = im.tile[0] if len(im.tile) == 1 else None
    rawmode = tile.args if tile is not None and isinstance(tile.args, str) else None
    if im.format == "PNG" and im.mode in ("RGB", "RGBA") and rawmode in ("RGB;16B", "RGBA;16B"):
        path = im.filename
        im.load()
        hi = np.asarray(im).astype(np.uint16)
        with Image.open(path) as again:
            again.tile = [again.tile[0]._replace(args=rawmode.replace("16B", "16L"))]
            again.load()
            lo = np.asarray(again).astype(np.uint16)
        return (hi << 8) | lo, im.mode
    im.load()
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return np.asarray(im).astype(np.int64), "L"
    return np.asarray(im), im.mode


def _depth_max(arr: np.ndarray, chunks: dict[bytes, bytes]) -> int:
    """2^bits - 1 for an integer array deeper than 8 bits (see the module docstring)."""
    top = int(arr.max()) if arr.size else 0
    sbit = chunks.get(b"sBIT")
    if sbit and 1 <= max(sbit) <= 16:
        s = max(sbit)
        if top > (1 << s) - 1 or (top > 0 and s < 16 and not np.any(arr % (1 << (16 - s)))):
            return 65535  # the spec's form: significant bits shifted to the top
        return (1 << s) - 1
    for k in COMMON_BIT_DEPTHS:
        if top <= (1 << k) - 1:
            return (1 << k) - 1
    return (1 << top.bit_length()) - 1


def _to_uint8_array(arr: np.ndarray, chunks: dict[bytes, bytes], alpha: bool = False) -> np.ndarray:
    """8-bit pixels; with alpha (last channel), colour and alpha are scaled each by its own depth (an opaque
    16-bit alpha of 65535 must not decide the colours' depth)."""
    if alpha and arr.ndim == 3 and arr.dtype != np.uint8:
        sbit = chunks.get(b"sBIT", b"")
        colour = _to_uint8_array(arr[..., :-1], {b"sBIT": sbit[:-1]} if sbit else {})
        opacity = _to_uint8_array(arr[..., -1:], {b"sBIT": sbit[-1:]} if sbit else {})
        return np.concatenate([colour, opacity], axis=2)
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.nan_to_num(arr.astype(np.float64))
        lo, hi = float(arr.min()), float(arr.max())
        return ((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)
    arr = np.clip(arr.astype(np.int64), 0, None)
    if int(arr.max() if arr.size else 0) <= 255 and not chunks.get(b"sBIT"):
        return arr.astype(np.uint8)
    scale = 255.0 / _depth_max(arr, chunks)
    return np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)


def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """RGB image (W, H as displayed) from any common format (grey, RGBA, palette, 16-bit), scaled by its
    real bit depth, EXIF orientation applied. KanoError names the file if unreadable or over the pixel limit."""
    path = Path(path)
    if not path.is_file():
        raise KanoError(f"image {path} must exist, got no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im, chunks = _open(path, "image", max_pixels)
            with im:
                orient = _orientation(im, path, chunks)
                mode = im.mode
                if mode in ("P", "PA", "1", "CMYK", "YCbCr", "LAB", "HSV", "La", "RGBa", "RGBX"):
                    im.load()
                    out = im.convert("RGBA" if mode in ("P", "PA") else "RGB")
                else:
                    arr, mode = _raw_array(im)
                    out = Image.fromarray(_to_uint8_array(arr, chunks, alpha=mode in ("RGBA", "LA")))
                    if mode == "LA" and out.mode != "LA":
                        out = out.convert("LA")
                if out.mode in ("RGBA", "LA"):
                    rgba = out.convert("RGBA")
                    out = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
                out = out.convert("RGB")
                return out.transpose(_ORIENT[orient]) if orient != 1 else out
    except KanoError:
        raise
    except MemoryError:
        raise KanoError(f"image {path} must fit in memory, got too large an image (lower KANO_MAX_PIXELS)") from None
    except Exception as exc:
        raise KanoError(f"image {path} must be a readable image file, got a corrupt or truncated file ({exc})") from None


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(W, H) as displayed (EXIF orientation applied) from the file header alone, without decoding the pixels."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                w, h = im.size
                orient = _orientation(im, path, _png_chunks(path) if im.format == "PNG" else {})
                return (h, w) if orient in (5, 6, 7, 8) else (w, h)
    except FileNotFoundError:
        raise KanoError(f"image {path} must exist, got no such file") from None
    except Exception as exc:
        raise KanoError(f"image {path} must be a readable image file, got a corrupt or truncated file ({exc})") from None


def load_mask(path: str | os.PathLike | None, size: tuple[int, int], max_pixels: int | None = None) -> np.ndarray:
    """Binary mask (H, W) uint8 in {0, 1}; zeros when path is None. `size` is the image's (W, H) as loaded.

    Lossless files: any nonzero value is defect; JPEG: > half range (see the module docstring)."""
    if path is None or path == "":
        return np.zeros((size[1], size[0]), dtype=np.uint8)
    path = Path(path)
    if not path.is_file():
        raise KanoError(f"mask {path} must exist, got no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im, chunks = _open(path, "mask", max_pixels)
            with im:
                orient = _orientation(im, path, chunks)
                lossy = im.format in LOSSY_FORMATS
                if im.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
                    im.load()
                    im = im.convert("RGBA" if im.mode in ("P", "PA") else "RGB")
                arr, mode = _raw_array(im)
    except KanoError:
        raise
    except Exception as exc:
        raise KanoError(f"mask {path} must be a readable image file, got a corrupt file ({exc})") from None
    if arr.ndim == 3:
        alpha = arr.shape[2] in (2, 4)
        colour = arr[..., : arr.shape[2] - 1] if alpha else arr
        if lossy:
            on = colour.max(axis=2) > 127
        else:
            on = np.any(colour != 0, axis=2)
        if alpha:
            on &= arr[..., -1] != 0
    elif lossy:
        on = arr > 127
    else:
        on = arr != 0
    m = Image.fromarray(on.astype(np.uint8))
    if orient != 1:
        m = m.transpose(_ORIENT[orient])
    if m.size != tuple(size):
        raise KanoError(f"mask {path} must have the size of its image, {size[0]}x{size[1]}, got {m.size[0]}x{m.size[1]}")
    return np.asarray(m).astype(np.uint8)


def is_image_path(p: Path) -> bool:
    return Path(p).suffix.lower() in IMAGE_EXTS


@functools.lru_cache(maxsize=8)
def _lut(mean: tuple, std: tuple) -> np.ndarray:
    """(3, 256) float32: channel c's normalised value of each 8-bit level, by the same float32 operations
    ((v / 255 - mean) / std) that the formula applies to every pixel, so the lookup is bitwise the same."""
    v = np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)
    return (v - np.asarray(mean, dtype=np.float32)[:, None]) / np.asarray(std, dtype=np.float32)[:, None]


def mask_to_array(mask: np.ndarray, size: int) -> np.ndarray:
    """A mask (H, W) -> (size, size) float32 in {0, 1}, nearest resize (the torch loaders' and the exported
    graph's evaluation share it)."""
    if not mask.any():  # a normal image: nothing to resize
        return np.zeros((size, size), dtype=np.float32)
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    return (np.asarray(m) > 127).astype(np.float32)


def image_to_array(img: Image.Image, size: int, mean, std) -> np.ndarray:
    """(3, size, size) float32, bicubic squash resize (no crop), normalised: (v / 255 - mean) / std per channel."""
    arr = np.asarray(img.resize((size, size), Image.BICUBIC))  # (size, size, 3) uint8
    # one table lookup per channel into a channel-first array: a single pass instead of four float passes
    # over the channel-last image and a transposing copy, on the decoding thread beside the model
    lut = _lut(tuple(float(m) for m in mean), tuple(float(s) for s in std))
    out = np.empty((3, size, size), dtype=np.float32)
    for c in range(3):
        np.take(lut[c], arr[:, :, c], out=out[c])
    return out
