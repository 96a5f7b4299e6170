"""One-class methods (kanoclip/one_class.py) and Kano's own `oneclass` (kanoclip/oneclass.py): the numerics against
numpy, real photos with a whole-image and a small defect, a 1024-px photo with a defect of 1 % of its side against a
resize-only control, the run through train / eval / predict / calibrate / export / Detector, --holdout, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from kano.anomaly_data.io import image_to_array, list_images, load_image
from kano.kanoclip.one_class import (FitData, Moments, gaussian, location_scale, mahalanobis_sq, shrinkage_weight,
                                     shrunk_precision, squash)
from kano.kanoclip.oneclass import OneClass, OneClassConfig, auroc

from conftest import DATA

TRAIN = sorted(list_images(DATA / "hazelnut_toy" / "train" / "good"))
GOOD = sorted(list_images(DATA / "hazelnut_toy" / "test" / "good"))


# ------------------------------------------------------------------------------------------ numerics
def test_moments_gaussian_and_mahalanobis_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 3)) @ np.array([[2.0, 0.0, 0.0], [0.5, 1.0, 0.0], [0.0, 0.3, 0.1]]) + [1.0, -2.0, 0.5]
    m = Moments(3)
    for part in np.array_split(x, 7):  # streaming in uneven pieces
        m.add(torch.from_numpy(part))
    assert m.n == 40
    np.testing.assert_allclose(m.mean().numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.covariance().numpy(), np.cov(x.T, ddof=1), rtol=1e-10)
    # a fold's moments are the total minus the held-out samples'
    rest = m - Moments.of(torch.from_numpy(x[:10]))
    np.testing.assert_allclose(rest.covariance().numpy(), np.cov(x[10:].T, ddof=1), rtol=1e-9)
    # shrinkage by hand: (1 - l) S + (l + floor) (tr S / 3) I, l = 3 / (40 + 3)
    lam = 3 / 43
    assert shrinkage_weight(40, 3) == pytest.approx(lam)
    s = np.cov(x.T, ddof=1)
    want = np.linalg.inv((1 - lam) * s + (lam + 1e-6) * np.trace(s) / 3 * np.eye(3))
    mean, prec = gaussian(m)
    np.testing.assert_allclose(prec.numpy(), want, rtol=1e-9)
    # squared Mahalanobis distance, one point worked out as d^T P d
    p = np.array([3.0, 1.0, -1.0])
    d = p - x.mean(0)
    assert float(mahalanobis_sq(torch.from_numpy(p), mean, prec)) == pytest.approx(float(d @ want @ d), rel=1e-10)
    # no shrinkage, a 2-d case by hand: S = diag(4, 1) -> P = diag(1/4, 1) (floor 0); (2, 2) from 0: 4/4 + 4 = 5
    pr = shrunk_precision(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), 0.0, floor=0.0)
    assert float(mahalanobis_sq(torch.tensor([2.0, 2.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64), pr)) == pytest.approx(5.0)


def test_ledoit_wolf_equals_scikit_learn_on_standardised_vectors():
    """The image and photo Gaussians' covariance: scikit-learn's ledoit_wolf (an independent implementation) on the
    standardised vectors, scaled back by the standard deviations."""
    sklearn_cov = pytest.importorskip("sklearn.covariance")
    from kano.kanoclip.one_class import ledoit_wolf

    rng = np.random.default_rng(2)
    x = rng.normal(size=(30, 6)) @ rng.normal(size=(6, 6)) * [1, 10, 0.1, 1, 1, 5]
    sd = x.std(0)
    cov, lam = sklearn_cov.ledoit_wolf((x - x.mean(0)) / sd)
    mean, prec, got = ledoit_wolf(torch.from_numpy(x))
    assert got == pytest.approx(lam, rel=1e-10) and 0.0 < got < 1.0
    want = np.linalg.inv(np.diag(sd) @ (cov + 1e-6 * np.eye(6)) @ np.diag(sd))   # mu = 1 on standardised data
    np.testing.assert_allclose(prec.numpy(), want, rtol=1e-8)
    np.testing.assert_allclose(mean.numpy(), x.mean(0), rtol=1e-12)


def test_standardisation_squash_and_auroc_by_hand():
    # scores 1, 2, 3, 4: mean 2.5, sample sd sqrt(5/3)
    loc, scale = location_scale([1.0, 2.0, 3.0, 4.0])
    assert (loc, scale) == (pytest.approx(2.5), pytest.approx((5 / 3) ** 0.5))
    assert squash(torch.tensor([0.0, 1.0, -1.0, 3.0])).tolist() == pytest.approx([0.5, 0.75, 0.25, 0.875])
    # 2 normal (0.1, 0.4), 2 defects (0.4, 0.9): pairs won 0.5 + 1 + 1 + 1 of 4
    assert auroc(torch.tensor([0.1, 0.4]), torch.tensor([0.4, 0.9])) == pytest.approx(3.5 / 4)
    with pytest.raises(ValueError, match="at least 2"):
        location_scale([1.0])


def test_per_position_residual_covariance_against_numpy():
    """The per-position layout: one mean per cell, one covariance of the residuals, from per-fold sums."""
    rng = np.random.default_rng(1)
    f = rng.normal(size=(6, 2, 2, 3)) + np.arange(4).reshape(1, 2, 2, 1)   # 6 photos, 2x2 cells, D = 3
    model = OneClass(None, OneClassConfig(choose=False, cell=8), 16)
    fold = torch.tensor([0, 1, 0, 1, 0, 1])
    sums = {}
    for i in range(6):
        key = (("v"), int(fold[i]))
        t = torch.from_numpy(f[i])
        if key not in sums:
            sums[key] = [Moments(3), torch.zeros(2, 2, 3, dtype=torch.float64), 0]
        sums[key][0].add(t)
        sums[key][1] += t
        sums[key][2] += 1
    g = {"v": [torch.from_numpy(rng.normal(size=4)) for _ in range(6)]}
    p = [torch.from_numpy(rng.normal(size=4)) for _ in range(6)]
    fits = model._fit_parts("v", "per-position", sums, g, p, 2, fold, held=1)
    kept = f[fold.numpy() == 0]                                           # photos 0, 2, 4
    mu = kept.mean(0)
    res = (kept - mu).reshape(-1, 3)
    cov = res.T @ res / (res.shape[0] - 4)                               # 12 residuals, 4 position means
    np.testing.assert_allclose(fits["patch_mean"].numpy(), mu, rtol=1e-12)
    want = np.linalg.inv(cov + 1e-6 * np.trace(cov) / 3 * np.eye(3))
    np.testing.assert_allclose(fits["patch_precision"].numpy(), want, rtol=1e-8)


# ------------------------------------------------------------------------------------------ real photos
def views(path: Path, side: int) -> list[Image.Image]:
    """The photo and its rotations and mirror images (each one a normal photo of the nut)."""
    im = load_image(path).resize((side, side), Image.BICUBIC)
    return [v for k in range(4) for v in (im.rotate(90 * k), im.rotate(90 * k).transpose(Image.FLIP_LEFT_RIGHT))]


def fit_on(images: list[Image.Image], size: int, cfg: OneClassConfig | None = None, encoder=None) -> OneClass:
    model = OneClass(encoder, cfg or OneClassConfig(choose=False), size)
    bb = model.backbone
    arr = torch.from_numpy(np.stack([image_to_array(im, size, bb.mean, bb.std) for im in images]))

    def good():
        for a in range(0, len(arr), 8):
            yield arr[a:a + 8], torch.arange(a, min(a + 8, len(arr)))
    with torch.no_grad():
        model.fit(FitData(files=[str(i) for i in range(len(arr))], good=good))
    return model.eval()


def score(model: OneClass, images: list[Image.Image]):
    bb = model.backbone
    x = torch.from_numpy(np.stack([image_to_array(im, bb.image_size, bb.mean, bb.std) for im in images]))
    with torch.no_grad():
        r = model(x)
    return r.image_score, r.anomaly_map


@pytest.fixture(scope="module")
def nut_model():
    fit = [v for f in TRAIN[:6] for v in views(f, 256)]                 # 48 normal views, 256 px
    return fit_on(fit, 256)


def dark_spot(im: Image.Image, cx: int, cy: int, d: int) -> tuple[Image.Image, np.ndarray]:
    a = np.asarray(im).astype(np.float32).copy()
    yy, xx = np.ogrid[:a.shape[0], :a.shape[1]]
    m = (abs(yy - cy) <= d // 2) & (abs(xx - cx) <= d // 2)
    a[m] *= 0.3
    return Image.fromarray(a.astype(np.uint8)), m


def rough_spot(im: Image.Image, cx: int, cy: int, d: int) -> Image.Image:
    """A d x d square turned into a fine checkerboard (2-px period, +-35 % brightness): a rough, scratched patch whose
    mean colour is unchanged, so that only a scorer that sees the photo's own pixels can tell."""
    a = np.asarray(im).astype(np.float32).copy()
    yy, xx = np.mgrid[cy - d // 2:cy - d // 2 + d, cx - d // 2:cx - d // 2 + d]
    a[yy, xx] *= np.where((yy + xx) % 2 == 0, 1.35, 0.65)[..., None]
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def test_whole_image_and_small_defects_found_on_real_photos(nut_model):
    from kano.kanoclip.protocol import Method, Preprocessing

    assert isinstance(nut_model, Method) and isinstance(nut_model.backbone, Preprocessing)  # what the evaluator reads
    good = [v for f in GOOD for v in views(f, 256)[:2]]                   # 12 unseen normal photos
    s_good, _ = score(nut_model, good)
    blurred = [g.filter(ImageFilter.GaussianBlur(1.5)) for g in good[:4]]
    s_blur, _ = score(nut_model, blurred)
    assert float(s_blur.min()) > float(s_good.max()), (s_blur, s_good)
    spotted, mask = dark_spot(good[0], 128, 128, 6)                      # 6 px: 2 % of the side, on the nut
    s_spot, amap = score(nut_model, [spotted])
    assert float(s_spot[0]) > float(s_good.max())
    peak = np.unravel_index(int(amap[0].argmax()), amap[0].shape)
    assert abs(peak[0] - 128) <= 12 and abs(peak[1] - 128) <= 12         # the map points at the spot
    assert amap.shape == (1, 256, 256) and 0.0 <= float(amap.min()) and float(amap.max()) <= 1.0


@pytest.mark.slow
def test_1024_px_photo_with_a_defect_of_1_percent_of_its_side_found_and_resize_only_control_misses_it():
    """A 10-px rough spot on a 1024-px photo: scored at the photo's own side (1024) it is found; resized to the
    micro-CLIP's 96-px input first (the resize every other method applies), the same detector misses it."""
    fit = [v for f in TRAIN[:4] for v in views(f, 1024)[:4]]            # 16 normal photos at 1024 px (rotations 0, 90)
    native = fit_on(fit, 1024)
    control = fit_on(fit, 96)
    held = [v for f in TRAIN[:4] for v in views(f, 1024)[4:]]            # 16 unseen views (rotations 180, 270)
    s_control, _ = score(control, held)
    base = int(s_control.argmin())                                        # a photo the control calls the most normal
    spotted = rough_spot(held[base], 500, 470, 10)                        # 10 px = 1 % of the side, on the nut
    s_native, amap = score(native, held + [spotted])
    s_control, _ = score(control, held + [spotted])
    assert float(s_native[-1]) > float(s_native[:-1].max())
    peak = np.unravel_index(int(amap[-1].argmax()), amap[-1].shape)
    assert abs(peak[0] - 470) <= 24 and abs(peak[1] - 500) <= 24
    assert float(s_control[-1]) <= float(s_control[:-1].max())           # resize-only: not above the normal photos


# ------------------------------------------------------------------------------------------ the run, end to end
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """`kano data synth --from` on the real photos: 28 normal photos, two defect kinds, at 128 px."""
    from kano.anomaly_data.photo_defects import synthesize_from_photos

    out = tmp_path_factory.mktemp("synth")
    synthesize_from_photos(DATA / "hazelnut_toy" / "train" / "good", out, "nut", max_side=128, n_per_defect=2,
                           defects=("colour", "scratch"))
    return out


@pytest.mark.slow
def test_run_through_train_eval_predict_calibrate_export_and_detector(synth, tmp_path, cli):
    run = tmp_path / "run"
    code, out, err = cli("train", "--method", "oneclass", "--backbone", "none", "--data", f"mvtec:{synth}", "--out", run)
    assert code == 0, err
    assert "chose cell" in out and "variants" in out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "oneclass" and cfg["kind"] == "one-class" and cfg["image_size"] == 128
    assert len(cfg["fit"]["variants"]) == 9 and sum(v["chosen"] for v in cfg["fit"]["variants"]) == 1
    assert cfg["fit"]["variant"]["cell"] in (8, 16, 32) and cfg["threshold"] is not None
    # eval on the real photos (their own defects: painted colour spots), through the run alone
    code, out, err = cli("eval", "--run", run, "--data", f"mvtec:{DATA / 'hazelnut_toy'}", "--out", tmp_path / "ev")
    assert code == 0, err
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["provenance"]["method"]["kind"] == "one-class"
    # the Python API and predict --run agree; calibrate writes thresholds predict then uses
    from kano.api import Detector

    det = Detector.load(run)
    photos = sorted(list_images(DATA / "hazelnut_toy" / "test" / "colour"))[:3]
    res = det(photos, "nut")
    assert len(res) == 3 and all(r.map.shape == (256, 256) for r in res)
    code, _, err = cli("calibrate", "--run", run, "--normal", f"nut={DATA / 'hazelnut_toy' / 'test' / 'good'}",
                       "--alarm-rate", "0.2")
    assert code == 0, err
    cal = json.loads((run / "calibration.json").read_text())
    good = [r.score for r in det(sorted(list_images(DATA / "hazelnut_toy" / "test" / "good")), "nut")]
    # n = 6, A = 0.2: k = ceil(7 * 0.8) = 6, the largest score; the threshold is the next float above it
    assert cal["classes"]["nut"]["n"] == 6 and cal["classes"]["nut"]["rank"] == 6
    assert cal["classes"]["nut"]["image_threshold"] == pytest.approx(float(np.nextafter(np.float64(max(good)), np.inf)), rel=1e-6)
    # export: the torch-free graph equals torch within 1e-4
    pytest.importorskip("onnxruntime")
    from kano.deploy.runtime import ExportedModel

    code, _, err = cli("export", "--run", run, "--classes", "nut", "--out", tmp_path / "m.onnx")
    assert code == 0, err
    em = ExportedModel(tmp_path / "m.onnx")
    x = np.stack([image_to_array(load_image(p), em.image_size, em.mean, em.std) for p in photos])
    s, m = em.score(x, np.zeros(len(photos), dtype=np.int64))
    with torch.no_grad():
        r = det.model(torch.from_numpy(x))
    np.testing.assert_allclose(s, r.image_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(m, r.anomaly_map.numpy(), atol=1e-4)


@pytest.mark.slow
def test_export_with_the_backbone_bank_equals_torch(tmp_path):
    """The backbone's tiles inside the graph: the micro-CLIP at its own 96 px on a 192-px photo (4 tiles)."""
    pytest.importorskip("onnxruntime")
    from kano.deploy.export import export_model
    from kano.deploy.runtime import ExportedModel
    from kano.kanoclip import build_backbone

    enc = build_backbone("micro")
    fit = [v for f in TRAIN[:2] for v in views(f, 192)]
    model = fit_on(fit, 192, OneClassConfig(choose=False, banks="pixels+backbone", layout="per-position"), enc)
    assert model.banks == "pixels+backbone" and model.enc_proj.shape == (2 * enc.width, 16)
    export_model(model, "oneclass", {"nut": "nut"}, None, tmp_path / "m.onnx")
    em = ExportedModel(tmp_path / "m.onnx")
    x = np.stack([image_to_array(load_image(p), 192, em.mean, em.std) for p in GOOD[:3]])
    s, m = em.score(x, np.zeros(3, dtype=np.int64))
    with torch.no_grad():
        r = model(torch.from_numpy(x))
    np.testing.assert_allclose(s, r.image_score.numpy(), atol=1e-4)
    np.testing.assert_allclose(m, r.anomaly_map.numpy(), atol=1e-4)


def test_holdout_fits_on_the_rest_and_writes_the_split_conformal_calibration(synth, tmp_path, cli):
    run = tmp_path / "run"
    code, out, err = cli("train", "--method", "oneclass", "--backbone", "none", "--data", f"mvtec:{synth}", "--out", run,
                         "--holdout", "0.25", "--alarm-rate", "0.2")
    assert code == 0, err
    cfg = json.loads((run / "config.json").read_text())
    held = cfg["holdout"]["files"]
    assert len(held) == 7 and cfg["n_samples"] == 21                    # floor(28 * 0.25) held back, 21 fitted
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["source"] == "holdout" and cal["classes"]["nut"]["n"] == 7
    from kano.api import Detector

    scores = sorted(r.score for r in Detector.load(run)(held, "nut"))
    k = 7                                                                 # ceil(8 * 0.8) = 7: the largest of 7
    assert cal["classes"]["nut"]["rank"] == k
    assert cal["classes"]["nut"]["image_threshold"] == pytest.approx(float(np.nextafter(np.float64(scores[k - 1]), np.inf)), rel=1e-6)


def test_bad_input_is_refused_with_clear_messages(synth, tmp_path, cli):
    empty = tmp_path / "empty" / "nut" / "test" / "good"
    empty.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(empty / "a.png")
    code, _, err = cli("train", "--method", "oneclass", "--backbone", "none", "--data", f"mvtec:{tmp_path / 'empty'}",
                       "--out", tmp_path / "r1")
    assert code != 0 and "train/good" in err and "Traceback" not in err
    code, _, err = cli("train", "--method", "oneclass", "--backbone", "none", "--data", f"mvtec:{synth}", "--out",
                       tmp_path / "r2", "--holdout", "0.1", "--alarm-rate", "0.05")
    assert code != 0 and "at least 19 photos" in err and "got 2" in err
    code, _, err = cli("train", "--method", "oneclass", "--backbone", "none", "--data", f"mvtec:{synth}", "--out",
                       tmp_path / "r3", "--holdout", "1.5")
    assert code != 0 and "--holdout must be a fraction in (0, 1)" in err
    code, _, err = cli("train", "--method", "aprilgan", "--backbone", "tiny", "--data", f"mvtec:{synth}", "--out",
                       tmp_path / "r4", "--holdout", "0.2")
    assert code != 0 and "--holdout is used by the one-class methods" in err
    code, _, err = cli("eval", "--method", "oneclass", "--data", f"mvtec:{synth}", "--out", tmp_path / "e")
    assert code != 0 and "kano train --method oneclass" in err
