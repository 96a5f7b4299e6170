"""Every scoring mode calibrated with its own calibration (evaluator.calibrate: keyed by method, backbone, weights,
references, K, class word), refused for any other; maps drawn on the calibrated pixel threshold's scale, degenerate
maps said in words, and a defect mask per flagged image. Real photos: tests/data/hazelnut_toy (painted defects)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kano.evaluator import visualize as V

HAZEL = Path(__file__).parent / "data" / "hazelnut_toy"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    """The own-photos split (bench/own_photos.py): the last 10 train/good photos held back for calibration (cal4: the
    last 4 of them, enough for alarm rate 0.2), the first 4 as references; new photos: 2 good and 4 painted."""
    root = tmp_path_factory.mktemp("photos")
    train = sorted((HAZEL / "train" / "good").iterdir())
    out = {}
    for name, files in (("refs", train[:4]), ("cal", train[-10:]), ("cal4", train[-4:]), ("good", sorted((HAZEL / "test" / "good").iterdir())[:2]),
                        ("paint", sorted((HAZEL / "test" / "colour").iterdir())[:4])):
        (root / name).mkdir()
        for f in files:
            shutil.copy2(f, root / name / f.name)
        out[name] = root / name
    return out


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_a_floor_calibrates_into_its_own_file_and_predict_decides_with_it(photos, tmp_path, cli):
    cal = tmp_path / "median.json"
    code, out, err = cli("calibrate", "--method", "median_colour", "--normal", f"hazelnut={photos['cal']}", "--alarm-rate", "0.1",
                         "--calibration", cal)
    assert code == 0, err
    c = json.loads(cal.read_text())
    assert c["mode"]["method"] == "median_colour" and c["mode"]["k_shot"] == 0 and c["mode"]["references_sha256"] is None
    # the same floor's scores of the 10 calibration photos, through predict: n = 10, A = 0.1 -> k = ceil(11 * 0.9) = 10,
    # the largest; the threshold is the next float above it
    code, _, err = cli("predict", photos["cal"], "--class", "hazelnut", "--method", "median_colour", "--out", tmp_path / "scores",
                         "--no-maps", "--no-panels")
    assert code == 0, err
    scores = sorted(r["score"] for r in _rows(tmp_path / "scores"))
    assert c["classes"]["hazelnut"]["image_threshold"] == float(np.nextafter(scores[9], np.inf))
    code, out, err = cli("predict", photos["paint"], photos["good"], "--class", "hazelnut", "--method", "median_colour",
                         "--calibration", cal, "--out", tmp_path / "p", "--no-panels")
    assert code == 0, err
    assert f"decision threshold: {c['classes']['hazelnut']['image_threshold']:.6f} from the calibration" in out
    rows = _rows(tmp_path / "p")
    assert all(r["threshold_source"] == "calibration" and r["pixel_threshold"] == c["classes"]["hazelnut"]["pixel_threshold"]
               for r in rows)
    painted = [r for r in rows if "/paint/" in r["image"]]
    assert sum(r["anomalous"] for r in painted) == 4       # red / blue paint on a hazelnut: the colour floor sees each
    # a mask per flagged image only: 255 where the written map is >= the pixel threshold, 0 elsewhere, on the paint
    masks = sorted(p.name for p in (tmp_path / "p" / "masks").iterdir())
    assert masks == sorted(f"{r['name']}.png" for r in rows if r["anomalous"])
    for r in painted:
        m = np.asarray(Image.open(r["mask_png"]))
        amap = np.load(r["map_npy"])
        assert set(np.unique(m)) <= {0, 255} and np.array_equal(m == 255, amap >= r["pixel_threshold"])
        truth = np.asarray(Image.open(HAZEL / "ground_truth" / "colour" / Path(r["image"]).name.replace(".jpg", ".png"))
                           .convert("L").resize(m.shape[::-1])) > 127
        assert (truth & (m == 255)).any()                     # the mask lies on the paint
    # the floor's calibration for another mode: another floor (the field named)
    code, _, err = cli("predict", photos["paint"], "--class", "hazelnut", "--method", "darkness",
                       "--calibration", cal, "--out", tmp_path / "w", "--no-maps", "--no-panels")
    assert code == 2 and "made for another mode (method 'median_colour' there, 'darkness' here)" in err


def test_winclip_plus_keyed_by_references_and_k(photos, tmp_path, cli):
    cal = tmp_path / "w2.json"
    few = ["--method", "winclip", "--backbone", "micro", "--reference", photos["refs"]]
    code, _, err = cli("calibrate", *few, "--k-shot", "2", "--normal", f"hazelnut={photos['cal4']}", "--alarm-rate", "0.2")
    assert code == 2 and "--calibration FILE must name where to write" in err   # no run folder: the file is named
    code, _, err = cli("calibrate", *few, "--k-shot", "2", "--normal", f"hazelnut={photos['cal4']}", "--alarm-rate", "0.2",
                       "--calibration", cal)
    assert code == 0, err
    mode = json.loads(cal.read_text())["mode"]
    assert (mode["method"], mode["backbone"], mode["k_shot"]) == ("winclip", "micro", 2) and len(mode["weights_sha256"]) == 64
    code, out, err = cli("predict", photos["good"] / "04.jpg", "--class", "hazelnut", *few, "--k-shot", "2", "--calibration", cal,
                         "--out", tmp_path / "ok", "--no-maps", "--no-panels")
    assert code == 0 and "from the calibration" in out, err
    code, _, err = cli("predict", photos["good"], "--class", "hazelnut", *few, "--k-shot", "1", "--calibration", cal,
                       "--out", tmp_path / "no", "--no-maps", "--no-panels")
    assert code == 2 and "references_sha256" in err and "k_shot 2 there, 1 here" in err, err
    # the same detector asked with another class word: refused by name, not reused
    import kano
    from kano.core.errors import KanoError

    det = kano.Detector.zero_shot("winclip", "micro", references=photos["refs"], k_shot=2, calibration=cal)
    assert det.threshold_for("hazelnut")[1] == "calibration"
    with pytest.raises(KanoError, match="class_word 'hazelnut' there, 'nut' here"):
        det.threshold_for("hazelnut", "nut")


def test_the_scale_is_relative_to_the_pixel_threshold_and_the_legend_says_so():
    t = 5.3e-08                                    # a trained micro-CLIP's pixel threshold: far below the 0-1 scale
    scale = V.map_scale(t, 0.36, "calibration")
    assert (scale.top, scale.level, scale.relative) == (2 * t, t, True)
    assert "map / pixel threshold t = 5.3e-08 (calibration)" in scale.title
    amap = np.full((224, 224), t, np.float32)     # a map exactly at t: the middle stop, (186, 54, 85) in _STOPS at 0.50
    pic = np.asarray(V.panel(Image.new("RGB", (224, 224), (90, 90, 90)), amap, score=0.4, threshold=0.36, pixel_threshold=t))
    cell = pic[62 + 18 + 100, 8 + 232 + 100]
    assert np.abs(cell.astype(int) - (186, 54, 85)).max() <= 1
    absolute = np.asarray(V.panel(Image.new("RGB", (224, 224), (90, 90, 90)), amap, score=0.4, threshold=0.36))
    assert "no pixel threshold" in V.map_scale(None, 0.36).title
    assert absolute[62 + 18 + 100, 8 + 232 + 100].tolist() != cell.tolist()   # on 0-1 the same map is near black
    bar = np.asarray(V.colorbar(201, t, None, scale=scale))   # 201 rows from 2t (row 6) down to 0 (row 206)
    assert np.abs(bar[6 + 50, 10].astype(int) - (249, 140, 10)).max() <= 1      # 1.5t: the stop at 0.75


def test_degenerate_maps_and_thresholds_are_said_in_words(tmp_path):
    from kano.evaluator.predict_files import row

    tiny = np.full((32, 32), 1e-9, np.float32)
    img = tmp_path / "x.png"
    Image.new("RGB", (32, 32), (120, 80, 40)).save(img)
    (tmp_path / "panels").mkdir()
    r = row(tmp_path, str(img), "hazelnut", "hazelnut", "x", 0.2, tiny, None, 0.3, "calibration", False, True, 1e-4)
    assert r["map_note"] == "degenerate map: max 1e-09 < 1/1000 of the pixel threshold 0.0001"
    pic = np.asarray(Image.open(r["panel_png"]))
    cell = pic[62 + 18 + 10: 62 + 18 + 200, 8 + 232 + 150]
    assert (cell == 200).all(axis=-1).mean() > 0.9       # a grey cell with words, not a black one
    # 4.9e-324 (a subnormal float64; 0 in float32): not a scale a map can be drawn on
    scale = V.map_scale(5e-324)
    assert not scale.relative and "is not a normal float" in scale.note
    r = row(tmp_path, str(img), "hazelnut", "hazelnut", "y", 0.9, tiny, None, 0.3, "calibration", False, True, 5e-324)
    assert r["anomalous"] and "not a normal float" in r["map_note"] and "mask_png" not in r   # no mask cut at 5e-324


def test_eval_takes_a_floors_calibration_file(photos, tmp_path, cli):
    cal = tmp_path / "median.json"
    # eval names the class by its folder (hazelnut_toy); the calibration is made for that class name
    assert cli("calibrate", "--method", "median_colour", "--normal", f"hazelnut_toy={photos['cal']}", "--alarm-rate", "0.1",
               "--calibration", cal)[0] == 0
    t = json.loads(cal.read_text())["classes"]["hazelnut_toy"]
    code, out, err = cli("eval", "--method", "median_colour", "--data", f"mvtec:{HAZEL}", "--calibration", cal,
                         "--out", tmp_path / "ev", "--n-overlays", "1")
    assert code == 0, err
    assert f"decision threshold: {t['image_threshold']:.6f} from the calibration" in out
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())["classes"]["hazelnut_toy"]
    assert (m["threshold"], m["threshold_source"]) == (t["image_threshold"], "calibration")
    assert "relative to the class's calibrated pixel threshold" in (tmp_path / "ev" / "report.html").read_text()
