"""Anomaly maps as images people can look at: heat-map overlays and input | ground truth | map panels."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

# a compact 'jet'-like colour map: blue (normal) -> cyan -> yellow -> red (anomalous)
_STOPS = np.array([[0.0, 0, 0, 128], [0.25, 0, 128, 255], [0.5, 0, 255, 160], [0.75, 255, 230, 0], [1.0, 220, 0, 0]])


def colorize(m: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8."""
    m = np.clip(np.nan_to_num(m.astype(np.float32)), 0, 1)
    out = np.stack([np.interp(m, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)], -1)
    return out.astype(np.uint8)


def overlay(image: Image.Image, amap: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Heat map (H, W) in [0, 1] blended over the image (resized to the map)."""
    base = np.asarray(image.convert("RGB").resize((amap.shape[1], amap.shape[0]), Image.BILINEAR), dtype=np.float32)
    heat = colorize(amap).astype(np.float32)
    return Image.fromarray((base * (1 - alpha) + heat * alpha).astype(np.uint8))


def panel(image: Image.Image, mask: np.ndarray | None, amap: np.ndarray, title: str, size: int = 256) -> Image.Image:
    """input | ground truth | map overlay, with a caption."""
    img = image.convert("RGB").resize((size, size), Image.BILINEAR)
    gt = Image.fromarray(((mask if mask is not None else np.zeros((size, size))) > 0).astype(np.uint8) * 255).resize((size, size), Image.NEAREST).convert("RGB")
    m = np.asarray(Image.fromarray((np.clip(amap, 0, 1) * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    ov = overlay(img, m)
    canvas = Image.new("RGB", (3 * size, size + 18), (255, 255, 255))
    for k, part in enumerate((img, gt, ov)):
        canvas.paste(part, (k * size, 18))
    ImageDraw.Draw(canvas).text((4, 3), title, fill=(0, 0, 0))
    return canvas
