"""What a new user met on real photos: overlays that agree with the decision, the gallery's slots, the
`folder:` spec one level too high, a misspelt class in `kano kb build`, `predict --help`."""

import shutil

import numpy as np
from PIL import Image

from kano.evaluator import report
from kano.evaluator import visualize as V
from conftest import DATA


def _overlay_cell(p: Image.Image) -> np.ndarray:
    a = np.asarray(p, dtype=int)
    top, label_h, gap, size = 62, 18, 8, 224                       # title band: name, decision, colour scale
    x = gap + 2 * (size + gap)                                     # the third cell: map over image (no ground truth)
    return a[top + label_h: top + label_h + size, x: x + size]


def test_overlay_level_is_the_threshold_in_use():
    grey = Image.new("RGB", (224, 224), (120, 120, 120))
    amap = np.full((224, 224), 0.3, np.float32)                  # every pixel 0.3: above a 0.2 threshold, below 0.5
    coloured = lambda p: (np.ptp(_overlay_cell(p), axis=-1) > 20).mean()
    assert coloured(V.panel(grey, amap, score=0.4, threshold=0.2)) > 0.9          # ANOMALOUS, and the map shows it
    assert coloured(V.panel(grey, amap, score=0.4, threshold=None)) == 0.0        # no threshold: the fixed 0.5 level
    assert coloured(V.panel(grey, amap, score=0.4, threshold=0.2, level=0.5)) == 0.0


def test_panel_says_why_nothing_is_shown():
    amap = np.full((50, 50), 0.1, np.float32)
    low = V.panel(Image.new("RGB", (64, 64)), amap, score=0.4, threshold=0.2)
    high = V.panel(Image.new("RGB", (64, 64)), np.full((50, 50), 0.9, np.float32), score=0.4, threshold=0.2)
    cap = lambda p: np.asarray(p.convert("L"))[62:80, 8 + 2 * 232: 8 + 3 * 232]   # the overlay's caption
    assert (cap(low) < 128).sum() != (cap(high) < 128).sum()       # "nothing >= 0.20 (map max 0.10)" vs "map >= 0.20 ..."


def test_gallery_names_no_slot_twice():
    labels = [1] * 6 + [0] * 6
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.1, 0.2, 0.3, 0.35, 0.4, 0.05]
    reasons = [r for _, r in report.select_gallery(labels, scores, 0.5, 12)]
    assert len(reasons) == len(set(reasons)) == 12
    assert reasons.count("most confident anomaly") == 1 and "2nd most confident anomaly" in reasons


def test_folder_spec_one_level_too_high_names_the_folder_to_pass(tmp_path, cli):
    shutil.copytree(DATA / "hazelnut_toy", tmp_path / "photos" / "hazelnut")
    code, out, err = cli("eval", "--method", "median_colour", "--data", f"folder:{tmp_path / 'photos'}", "--out", tmp_path / "o")
    msg = " ".join(err.split())
    assert code == 2 and f"pass the folder itself, e.g. folder:{tmp_path / 'photos' / 'hazelnut'}" in msg, msg


def test_kb_build_warns_about_a_misspelt_class(tmp_path, cli):
    code, out, err = cli("kb", "build", "--classes", "hazlenut", "--kb", tmp_path / "kb.duckdb")
    msg = " ".join(err.split())
    assert code == 0 and "class 'hazlenut'" in msg and "did you mean 'hazelnut'" in msg, msg
    code, out, err = cli("kb", "build", "--classes", "hazelnut", "--kb", tmp_path / "kb2.duckdb")
    assert code == 0 and "did you mean" not in err


def test_predict_help_names_micro(cli):
    code, out, err = cli("predict", "--help")
    assert code == 0 and "micro" in out and "--reference" in out and "--class-word" in out
