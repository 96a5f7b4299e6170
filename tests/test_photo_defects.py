"""Defects synthesised on real normal photos (anomaly_data.photo_defects, `kano data synth --from`)."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kano.anomaly_data import load_dataset
from kano.anomaly_data.photo_defects import LOCAL_DEFECTS, PHOTO_DEFECTS, WHOLE_DEFECTS, synthesize_from_photos, whole_change
from kano.core.errors import KanoError

from conftest import DATA

HAZEL = DATA / "hazelnut_toy"


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int64)


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hazel_synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("photos") / "out"
    synthesize_from_photos(HAZEL, out, "hazelnut", seed=5, n_per_defect=2)
    return out


def test_every_mask_is_exactly_the_changed_pixels_and_on_the_nut(hazel_synth):
    base = hazel_synth / "hazelnut"
    records = json.loads((base / "defects.json").read_text())["defects"]
    assert sorted({r["kind"] for r in records}) == sorted(PHOTO_DEFECTS) and len(records) == 2 * len(PHOTO_DEFECTS)
    assert len(PHOTO_DEFECTS) == 14 and {r["scope"] for r in records if r["kind"] in WHOLE_DEFECTS} == {"whole"}
    for r in (r for r in records if r["scope"] == "local"):
        img, src = _rgb(base / r["image"]), _rgb(base / r["source"])
        mask = np.asarray(Image.open(base / r["mask"])) > 0
        changed = np.any(img != src, axis=2)
        assert mask.any(), r["image"]
        assert np.array_equal(mask, changed), r["image"]
        # On the nut, not the yellow paper: the source's pixels under the mask are far from the border colour.
        # Measured on these photos: 97 % of the paper lies within 30 of its median colour (about (210, 200, 70)),
        # the nut's pixels all lie farther (pale brown to white).
        frame = np.concatenate([src[:8].reshape(-1, 3), src[-8:].reshape(-1, 3)])
        paper = np.median(frame, axis=0)
        far = np.linalg.norm(src[mask] - paper, axis=1) > 30
        assert far.mean() > 0.97, (r["image"], far.mean())


def test_layout_meta_and_sources_are_normal_photos(hazel_synth):
    ds = load_dataset(f"mvtec:{hazel_synth}")
    test = ds.samples("test")
    assert len([s for s in test if s.label == 0]) == 28 and len([s for s in test if s.label == 1]) == 28
    assert all(s.mask_path for s in test if s.label == 1)
    meta = json.loads((hazel_synth / "meta.json").read_text())
    assert len(meta["train"]["hazelnut"]) == 28 and len(meta["test"]["hazelnut"]) == 56
    # test/good/NNN.png is the NNN-th training photo (sorted), unchanged apart from the PNG container
    first = sorted((HAZEL / "train" / "good").iterdir())[0]
    assert np.array_equal(_rgb(hazel_synth / "hazelnut" / "test" / "good" / "000.png"), np.asarray(Image.open(first).convert("RGB")))


def test_same_seed_same_bytes_other_seed_other_defects(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 1), (b, 1), (c, 2)):
        synthesize_from_photos(HAZEL, out, "nut", seed=seed, n_per_defect=1, max_side=96,
                               defects=("cutpaste", "texture", "missing", "noise", "rescale", "colour_cast"))
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert da == db
    for kind in ("cutpaste", "noise", "rescale", "colour_cast"):
        assert da[f"nut/test/{kind}/000.png"] != dc[f"nut/test/{kind}/000.png"], kind


def test_mask_folder_confines_defects(tmp_path):
    """--foreground DIR: a hand-made disc per photo; every mask must lie inside it."""
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir(), masks.mkdir()
    yy, xx = np.mgrid[0:128, 0:128]
    disc = ((yy - 70) ** 2 + (xx - 50) ** 2) < 30 ** 2
    for i, f in enumerate(sorted((HAZEL / "train" / "good").iterdir())[:4]):
        Image.open(f).convert("RGB").resize((128, 128)).save(photos / f"p{i}.png")
        Image.fromarray(disc.astype(np.uint8) * 255).save(masks / f"p{i}_mask.png")
    out = tmp_path / "out"
    synthesize_from_photos(photos, out, "nut", n_per_defect=2, foreground=masks)
    for m in (out / "nut" / "ground_truth").rglob("*_mask.png"):
        mask = np.asarray(Image.open(m)) > 0
        assert mask.any() and not (mask & ~disc).any(), m


def test_mixed_sizes_grey_16bit_exif(tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    files = sorted((HAZEL / "train" / "good").iterdir())
    nut = Image.open(files[0]).convert("RGB")
    nut.resize((200, 150)).save(src / "a_wide.png")
    Image.open(files[1]).convert("L").save(src / "b_grey.png")
    grey16 = (np.asarray(Image.open(files[2]).convert("L")).astype(np.uint16) * 257)
    Image.fromarray(grey16).save(src / "c_16bit.png")  # mode I;16, values up to 65535
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    Image.open(files[3]).convert("RGB").resize((120, 90)).save(src / "d_exif.jpg", exif=exif)
    out = tmp_path / "out"
    synthesize_from_photos(src, out, "nut", n_per_defect=2, max_side=256)
    good = out / "nut" / "test" / "good"
    sizes = [Image.open(good / f"{i:03d}.png").size for i in range(4)]
    assert sizes == [(200, 150), (256, 256), (256, 256), (90, 120)]
    c16 = np.asarray(Image.open(good / "002.png").convert("L")).astype(np.int64)
    assert abs(c16.mean() - np.asarray(Image.open(files[2]).convert("L")).mean()) < 1.0  # scaled by 65535, not clipped
    for r in json.loads((out / "nut" / "defects.json").read_text())["defects"]:
        img, src_img = _rgb(out / "nut" / r["image"]), _rgb(out / "nut" / r["source"])
        mask, changed = np.asarray(Image.open(out / "nut" / r["mask"])) > 0, np.any(img != src_img, axis=2)
        # local kinds: exactly the changed pixels; whole-image kinds: a region holding every changed pixel
        assert np.array_equal(mask, changed) if r["scope"] == "local" else not (changed & ~mask).any()


def test_bad_input(tmp_path, cli):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KanoError, match="must contain normal photos.*got an empty folder"):
        synthesize_from_photos(empty, tmp_path / "o1")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("x")
    (notes / "data.csv").write_text("x")
    code, _, err = cli("data", "synth", "--from", notes, "--out", tmp_path / "o2")
    assert code == 2 and "must contain normal photos" in err and "2 other files (data.csv, readme.txt)" in err
    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (300, 40), (10, 200, 30)).save(small / "tiny.png")
    code, _, err = cli("data", "synth", "--from", small, "--out", tmp_path / "o3")
    assert code == 2 and "tiny.png must be at least 64 px on its short side" in err and "got 256x34" in err
    code, _, err = cli("data", "synth", "--from", HAZEL / "test" / "good", "--out", tmp_path / "o4")
    assert code == 2 and "never a dataset's test or ground_truth images" in err
    code, _, err = cli("data", "synth", "--from", HAZEL, "--out", tmp_path / "o5", "--defects", "hole")
    assert code == 2 and "must be one of cutpaste, cutpaste_scar" in err
    assert not (tmp_path / "o5").exists()


def test_cli_from_class_folder(tmp_path, cli):
    src = tmp_path / "bolt"
    shutil.copytree(HAZEL / "train", src / "train")  # a class folder: its train/good is read
    code, out, err = cli("data", "synth", "--from", src, "--out", tmp_path / "out", "--n-defect", "1", "--size", "96",
                         "--defects", "colour,scratch")
    assert code == 0, err
    assert "class bolt, 28 normal photos" in out
    assert sorted(p.name for p in (tmp_path / "out" / "bolt" / "test").iterdir()) == ["colour", "good", "scratch"]


def test_texture_photos_fall_back_to_the_whole_photo(tmp_path, cli):
    """Noise filling the frame has no object against its border: the whole photo is the foreground, and the
    command says so."""
    src = tmp_path / "cloth"
    src.mkdir()
    r = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(r.integers(90, 110, (80, 80, 3), dtype=np.uint8)).save(src / f"{i}.png")
    code, out, err = cli("data", "synth", "--from", src, "--out", tmp_path / "out", "--defects", "colour", "--n-defect", "3")
    assert code == 0, err
    assert "no object found against the border colour in 2 photo(s) (0.png, 1.png)" in out


# ---------------------------------------------------------------- whole-image defects

def _grad_energy(a: np.ndarray, axis: int = 1) -> float:
    """Sum of squared neighbour differences along `axis`."""
    return float((np.diff(a.astype(np.float64), axis=axis) ** 2).sum())


def test_contrast_lightness_cast_by_hand():
    # contrast: channels 50 | 150 in halves: mean 100, std 50; factor 0.6 -> 70 | 130, std 30
    img = np.full((8, 8, 3), 50, np.uint8)
    img[:, 4:] = 150
    out = whole_change("contrast", img, np.ones((8, 8), bool), {"factor": 0.6})
    assert np.allclose(out[:, :4], 70) and np.allclose(out[:, 4:], 130) and abs(out.std() - 30) < 1e-9
    # the mean is the region's: only the left half (all 50) -> the image is its own mean there, nothing changes
    left = np.zeros((8, 8), bool)
    left[:, :4] = True
    assert np.allclose(whole_change("contrast", img, left, {"factor": 0.6})[:, :4], 50)
    # lightness: V (the largest channel) + 0.1 of 255 = 25.5 levels, hue and saturation kept
    px = np.array([[[100, 100, 100], [200, 100, 50], [0, 0, 0]]], np.uint8)
    out = whole_change("lightness", px, np.ones((1, 3), bool), {"shift": 0.1})
    assert np.allclose(out[0, 0], 125.5)                        # grey: 100 + 25.5
    assert np.allclose(out[0, 1], [225.5, 112.75, 56.375])      # 200 -> 225.5, every channel x 225.5 / 200
    assert np.allclose(out[0, 2], 25.5)                         # black: grey at V = 0.1
    assert np.allclose(whole_change("lightness", px, np.ones((1, 3), bool), {"shift": -0.5})[0, 0], 0)  # 100/255 - 0.5 < 0: clipped
    # colour cast: grey 100 with gains (1.1, 0.95, 0.95) -> mean colour (110, 95, 95)
    grey = np.full((4, 4, 3), 100, np.uint8)
    out = whole_change("colour_cast", grey, np.ones((4, 4), bool), {"gains": [1.1, 0.95, 0.95]})
    assert np.allclose(out.mean(axis=(0, 1)), [110, 95, 95])


def test_blur_noise_by_hand():
    # blur: a step of 200 across columns; a Gaussian of sigma s turns each row's one jump of 200 into a ramp whose
    # squared differences sum to about 200^2 / (2 sqrt(pi) s) (the integral of the squared Gaussian), so s = 2
    # keeps 1 / (4 sqrt(pi)) = 0.141 of the gradient energy
    step = np.zeros((32, 64, 3), np.uint8)
    step[:, 32:] = 200
    out = whole_change("blur", step, np.ones((32, 64), bool), {"sigma_px": 2.0})
    ratio = _grad_energy(out) / _grad_energy(step)
    assert abs(ratio - 1 / (4 * np.sqrt(np.pi))) < 0.01, ratio
    # noise: on a flat 100 the std is sigma, and neighbour differences of independent noise have mean square 2 sigma^2
    flat = np.full((64, 64, 3), 100, np.uint8)
    out = whole_change("noise", flat, np.ones((64, 64), bool), {"sigma": 8.0, "noise_seed": 3})
    assert abs(out.std() - 8.0) < 0.2
    hf = _grad_energy(out) / (64 * 63 * 3)
    assert abs(hf - 128.0) < 6.0, hf


def test_rescale_and_rotate_by_hand():
    # vertical stripes of period 8 (a cosine across columns)
    x = np.arange(64)
    stripes = np.broadcast_to((128 + 100 * np.cos(2 * np.pi * x / 8))[None, :, None], (64, 64, 3)).astype(np.float64)
    full = np.ones((64, 64), bool)
    # magnified by 2 about the centre: period 16, so the spectrum's peak moves from 64/8 = 8 to 64/16 = 4 cycles
    out = whole_change("rescale", stripes, full, {"factor": 2.0})
    peak = lambda row: int(np.argmax(np.abs(np.fft.rfft(row - row.mean()))))
    assert peak(stripes[32, :, 0]) == 8 and peak(out[32, :, 0]) == 4
    # turned by 90 degrees about the centre (31.5, 31.5): the grid maps onto itself, so the stripes run across
    # rows exactly: constant along each row, and no energy left across columns
    out = whole_change("rotate", stripes, full, {"degrees": 90.0})
    assert np.allclose(out, out[:, :1]) and _grad_energy(stripes, 1) > 0 and _grad_energy(out, 1) < 1e-9
    assert abs(_grad_energy(out, 0) - _grad_energy(stripes, 1)) < 1e-6 * _grad_energy(stripes, 1)


def test_whole_kinds_on_the_photos(hazel_synth):
    """On the real photos: the mask is the whole photo or the whole nut, holds every changed pixel, and each kind
    moves its own statistic the way it says (measured over the mask)."""
    base = hazel_synth / "hazelnut"
    records = [r for r in json.loads((base / "defects.json").read_text())["defects"] if r["scope"] == "whole"]
    assert sorted({r["kind"] for r in records}) == sorted(WHOLE_DEFECTS)
    regions = set()
    for r in records:
        img, src = _rgb(base / r["image"]), _rgb(base / r["source"])
        mask = np.asarray(Image.open(base / r["mask"])) > 0
        changed = np.any(img != src, axis=2)
        assert not (changed & ~mask).any(), r["image"]
        regions.add(r["region"])
        if r["region"] == "photo":
            assert mask.all()
        else:  # the nut: most of it is far from the yellow paper, and it is one part of 10-60 % of the photo
            assert 0.1 < mask.mean() < 0.6, (r["image"], mask.mean())
        assert changed[mask].mean() > 0.3 and r["changed_pixels"] == int(changed.sum()), r["image"]
        a, b = img[mask].astype(np.float64), src[mask].astype(np.float64)
        p = r["params"]
        if r["kind"] == "contrast":
            assert abs(a.std(axis=0) / b.std(axis=0) - p["factor"]).max() < 0.05, r["image"]
        if r["kind"] == "colour_cast":
            assert np.abs(a.mean(axis=0) / b.mean(axis=0) - np.array(p["gains"])).max() < 0.03, r["image"]
        if r["kind"] == "lightness":
            assert np.sign(a.max(axis=1).mean() - b.max(axis=1).mean()) == np.sign(p["shift"])
        if r["kind"] == "blur":
            assert _grad_energy(img) < 0.7 * _grad_energy(src), r["image"]
        if r["kind"] == "noise":
            assert _grad_energy(img) > 1.5 * _grad_energy(src), r["image"]
    assert regions == {"photo", "foreground"}


def test_cli_picks_a_half(tmp_path, cli):
    code, out, err = cli("data", "synth", "--from", HAZEL, "--out", tmp_path / "w", "--n-defect", "1", "--size", "96",
                         "--defects", "whole")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "w" / "hazelnut_toy" / "test").iterdir()) == sorted(("good",) + WHOLE_DEFECTS)
    code, out, err = cli("data", "synth", "--from", HAZEL, "--out", tmp_path / "l", "--n-defect", "1", "--size", "96",
                         "--defects", "local,blur")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "l" / "hazelnut_toy" / "test").iterdir()) == sorted(("good", "blur") + LOCAL_DEFECTS)
