"""Pixels as a person sees them: bit depth, EXIF orientation, mask values, the pixel limit.

Every file here is written by hand (PIL, numpy, or raw PNG chunks) into a tmp dir; expectations are computed
from the source arrays, not by the loader's own rules.
"""

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kano.anomaly_data import load_image, load_mask
from kano.anomaly_data.io import MAX_PIXELS_DEFAULT, image_size, max_pixels
from kano.core.errors import KanoError

PHOTO = Path(__file__).parent / "data" / "hazelnut_toy" / "test" / "colour" / "00.jpg"
MASK = Path(__file__).parent / "data" / "hazelnut_toy" / "ground_truth" / "colour" / "00.png"


def write_png16(path: Path, arr: np.ndarray, sbit: tuple[int, ...] | None = None) -> None:
    """A 16-bit PNG (grey, RGB or RGBA) written chunk by chunk, optionally with an sBIT chunk."""
    arr = np.asarray(arr).astype(">u2")
    h, w = arr.shape[:2]
    colour_type = 0 if arr.ndim == 2 else {3: 2, 4: 6}[arr.shape[2]]
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
    if sbit:
        data += chunk(b"sBIT", bytes(sbit))
    path.write_bytes(data + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def twelve_bit_frame() -> np.ndarray:
    """The hazelnut photo as a 12-bit camera frame with the issue's figures: maximum 2944, mean 147 on 8 bits."""
    g = np.asarray(Image.open(PHOTO).convert("L"), dtype=np.float64)
    a = (2944 - 147 * 4095 / 255) / (g.max() - g.mean())
    v = np.clip(np.round(a * (g - g.mean()) + 147 * 4095 / 255), 0, 4095).astype(np.uint16)
    assert v.max() == 2944 and abs(v.mean() * 255 / 4095 - 147) < 0.5
    return v


def test_twelve_bit_grey_png_is_not_black(tmp_path):
    v = twelve_bit_frame()
    Image.fromarray(v).save(tmp_path / "g12.png")  # PIL writes 16-bit grey PNG, no sBIT
    got = np.asarray(load_image(tmp_path / "g12.png"), dtype=np.float64)
    assert got.shape == (256, 256, 3)
    assert abs(got.mean() - 147) < 1.0  # old loader: / 257 -> mean 9
    expected = v.astype(np.float64) * 255 / 4095  # by hand: 12 bits -> 8 bits
    assert np.abs(got[..., 0] - expected).max() <= 0.51


def test_twelve_bit_colour_png_keeps_its_low_byte(tmp_path):
    rgb = np.asarray(Image.open(PHOTO).convert("RGB"), dtype=np.float64)
    v = np.round(rgb * 2944 / rgb.max()).astype(np.uint16)  # 12-bit colour, max 2944
    write_png16(tmp_path / "rgb12.png", v)
    got = np.asarray(load_image(tmp_path / "rgb12.png"), dtype=np.float64)
    assert np.abs(got - v.astype(np.float64) * 255 / 4095).max() <= 0.51  # PIL alone keeps the high byte: at most 11


def test_sbit_chunk_decides_the_depth(tmp_path):
    v = twelve_bit_frame()
    write_png16(tmp_path / "shifted.png", v.astype(np.uint32) << 4, sbit=(12,))  # the PNG spec's form of 12 bits
    assert abs(np.asarray(load_image(tmp_path / "shifted.png"), dtype=np.float64).mean() - 147) < 1.0
    write_png16(tmp_path / "true16.png", v, sbit=(16,))  # a genuinely dark 16-bit image stays dark
    assert abs(np.asarray(load_image(tmp_path / "true16.png"), dtype=np.float64).mean() - v.mean() * 255 / 65535) < 0.6
    write_png16(tmp_path / "rgba.png", np.dstack([v, v, v, np.full_like(v, 65535)]))  # opaque 16-bit alpha
    assert abs(np.asarray(load_image(tmp_path / "rgba.png"), dtype=np.float64).mean() - 147) < 1.0


def test_exif_orientation_applied_to_images_and_masks(tmp_path):
    photo = np.asarray(Image.open(PHOTO).convert("RGB"))[:, :200]  # 200 wide, 256 high: a rotation shows
    mask = np.asarray(Image.open(MASK))[:, :200]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(photo).save(tmp_path / "p.png", exif=exif.tobytes())
    Image.fromarray(mask).save(tmp_path / "m.png", exif=exif.tobytes())
    Image.fromarray(photo).save(tmp_path / "p.jpg", exif=exif.tobytes(), quality=95)
    clockwise = np.rot90(photo, k=-1)
    got = load_image(tmp_path / "p.png")
    assert got.size == (256, 200) and np.array_equal(np.asarray(got), clockwise)
    assert image_size(tmp_path / "p.png") == (256, 200) and image_size(tmp_path / "p.jpg") == (256, 200)
    assert load_image(tmp_path / "p.jpg").size == (256, 200)
    m = load_mask(tmp_path / "m.png", got.size)
    assert np.array_equal(m, (np.rot90(mask, k=-1) > 0).astype(np.uint8))


def test_any_nonzero_value_in_a_lossless_mask_is_defect(tmp_path):
    a = np.zeros((32, 32), np.uint8)
    a[4:10, 4:12] = 100  # 48 defect pixels of value 100 (the old loader: > 127 -> empty)
    a[20, 20] = 1  # VisA-style 1
    Image.fromarray(a).save(tmp_path / "m100.png")
    Image.fromarray(a).save(tmp_path / "m100.bmp")
    for f in ("m100.png", "m100.bmp"):
        assert load_mask(tmp_path / f, (32, 32)).sum() == 49
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[0:3, 0:3] = (1, 0, 0)  # a dark red annotation: grey conversion would round it to 0
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert load_mask(tmp_path / "rgb.png", (32, 32)).sum() == 9
    Image.fromarray(a.astype(np.uint16) * 600).save(tmp_path / "m16.png")  # 16-bit mask
    assert load_mask(tmp_path / "m16.png", (32, 32)).sum() == 49


def test_jpeg_mask_thresholded_at_half_range(tmp_path):
    a = np.asarray(Image.open(MASK))  # the real hazelnut mask, 0/255
    Image.fromarray(a).save(tmp_path / "m.jpg", quality=60)
    noisy = np.asarray(Image.open(tmp_path / "m.jpg"))
    assert ((noisy > 0) & (a == 0)).sum() > 50  # the compression noise the threshold must remove
    got = load_mask(tmp_path / "m.jpg", (256, 256))
    assert (got != (a > 0)).sum() < 0.02 * (a > 0).sum()


def test_pixel_limit_is_a_clear_error(tmp_path, monkeypatch):
    Image.new("1", (12000, 12000)).save(tmp_path / "huge.png")  # 144 Mpx in a few KB
    assert (tmp_path / "huge.png").stat().st_size < 100_000
    assert max_pixels() == MAX_PIXELS_DEFAULT == 8192 * 8192
    with pytest.raises(KanoError, match=r"huge.png must have at most 67,108,864 pixels .*KANO_MAX_PIXELS.*got 12000x12000 = 144,000,000"):
        load_image(tmp_path / "huge.png")
    with pytest.raises(KanoError, match="mask .*huge.png must have at most"):
        load_mask(tmp_path / "huge.png", (12000, 12000))
    Image.new("RGB", (40, 30)).save(tmp_path / "small.png")
    monkeypatch.setenv("KANO_MAX_PIXELS", "1000")
    with pytest.raises(KanoError, match=r"at most 1,000 pixels .*got 40x30 = 1,200"):
        load_image(tmp_path / "small.png")
    monkeypatch.setenv("KANO_MAX_PIXELS", "2e9x")
    with pytest.raises(KanoError, match="KANO_MAX_PIXELS must be a positive whole number of pixels .*got '2e9x'"):
        load_image(tmp_path / "small.png")
    monkeypatch.setenv("KANO_MAX_PIXELS", "200000000")  # above PIL's own bomb limit: ours decides
    assert load_image(tmp_path / "small.png").size == (40, 30)


def test_image_to_tensor_is_the_clip_normalisation_by_hand():
    from kano.anomaly_data import image_to_tensor, mask_to_tensor

    img = Image.fromarray(np.array([[[0, 128, 255], [10, 20, 30]], [[255, 255, 255], [1, 2, 3]]], np.uint8))
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.25, 2.0)
    t = image_to_tensor(img, 2, mean, std)                 # 2 -> 2: the resize keeps every pixel
    assert t.shape == (3, 2, 2) and t.dtype == torch.float32
    # channel 0 at (0, 0): (0/255 - 0.5)/0.5 = -1; channel 1 at (0, 0): (128/255 - 0.25)/0.25; channel 2 at (1, 0): (255/255 - 0.125)/2
    assert t[0, 0, 0].item() == -1.0
    assert t[1, 0, 0].item() == pytest.approx((128 / 255 - 0.25) / 0.25, abs=1e-6)
    assert t[2, 1, 0].item() == pytest.approx((1 - 0.125) / 2, abs=1e-6)
    assert t[0, 0, 1].item() == pytest.approx((10 / 255 - 0.5) / 0.5, abs=1e-6)
    assert torch.equal(mask_to_tensor(np.zeros((5, 7), np.uint8), 4), torch.zeros(4, 4))
    m = mask_to_tensor(np.eye(4, dtype=np.uint8), 4)
    assert torch.equal(m, torch.eye(4))
