"""Maps a person reads at a glance: one colour scale with its bar, labelled panels, the
decision in the title, and an overlay that shows only the high part of the map."""

import numpy as np
from PIL import Image

from kano.evaluator import visualize as V

SIZE, GAP, TOP, LABEL_H = 224, 8, 62, 18   # the panel layout: cell size, gap, title band (name, decision, scale), caption band


def _paint(w=224, h=224):
    """A photo with strong red and blue paint: the colours the old blended overlay passed off as heat."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (220, 20, 20)
    a[:, w // 2:] = (20, 20, 220)
    return Image.fromarray(a)


def test_overlay_is_transparent_below_the_level_and_grey_there():
    amap = np.full((224, 224), 0.2, np.float32)
    amap[:, 112:] = 0.9                        # the right half is anomalous, the left half well below 0.5
    ov = np.asarray(V.overlay(_paint(), amap), dtype=int)
    left, right = ov[:, :100], ov[:, 124:]
    assert (left.max(-1) - left.min(-1)).max() <= 1          # left: the photo in grey, no colour at all
    grey_blue = np.asarray(_paint().convert("L"))[0, 200]     # right: the map's colour blended over the grey photo
    assert (right.max(-1) - right.min(-1)).min() > 60 and abs(int(right[..., 0].mean()) - int(grey_blue)) > 60


def test_one_fixed_scale_the_bar_matches_the_map():
    """A value gets the same colour whatever else is in the map, and the bar shows that colour at that value."""
    def map_cell(amap):
        p = np.asarray(V.panel(_paint(), amap, score=0.5, threshold=0.4), dtype=int)
        return p, p[TOP + LABEL_H + 100, GAP + (SIZE + GAP) + 100]     # centre of the second cell ("anomaly map")
    flat = np.full((224, 224), 0.75, np.float32)
    wide = np.linspace(0, 1, 224 * 224, dtype=np.float32).reshape(224, 224)
    wide[90:130, 90:130] = 0.75
    p1, c1 = map_cell(flat)
    _, c2 = map_cell(wide)
    assert np.abs(c1 - c2).max() <= 1                          # no per-image normalisation
    bar_x = GAP + 3 * (SIZE + GAP) + 2 + 8                    # the bar's middle column, right of the last cell
    top_row = TOP + LABEL_H                                    # value 1.0 at the top, 0.0 at the bottom
    row_075 = top_row + round(0.25 * (SIZE - 1))
    assert np.abs(p1[row_075, bar_x] - c1).max() <= 12, (p1[row_075, bar_x], c1)
    luminance = p1[top_row:top_row + SIZE, bar_x] @ np.array([0.299, 0.587, 0.114])
    level_row = round(0.6 * (SIZE - 1))                        # the overlay's level is the threshold, 0.4: a white tick there
    assert luminance[level_row] > 250
    inner = np.r_[luminance[1:level_row - 1], luminance[level_row + 2:-1]]   # without the black frame and the tick
    assert inner[0] > 200 and inner[-1] < 10 and (np.diff(inner) <= 1).all()   # bright = high, monotone


def test_panels_are_labelled_and_ground_truth_is_one_more_panel():
    amap = np.zeros((50, 50), np.float32)
    mask = np.zeros((50, 50), np.uint8)
    mask[10:20, 10:20] = 1
    with_gt = V.panel(_paint(), amap, mask=mask, name="bottle / hole / 000.png", score=0.7, threshold=0.5, label=1)
    without = V.panel(_paint(), amap, name="x.png", score=0.7, threshold=0.5)
    assert with_gt.width - without.width == SIZE + GAP
    caption = np.asarray(with_gt.convert("L"))[TOP:TOP + LABEL_H]
    for k in range(4):                                          # some caption text above each of the four cells
        cell = caption[:, GAP + k * (SIZE + GAP): GAP + k * (SIZE + GAP) + SIZE]
        assert (cell < 200).sum() > 20
    wide = V.panel(Image.new("RGB", (400, 200)), amap)            # aspect ratio kept: 224 x 112 cells
    assert wide.height == TOP + LABEL_H + 112 + 16


def test_title_states_score_threshold_and_decision():
    assert V.decision(0.356, 0.303)[0] == "score 0.356 >= threshold 0.303: ANOMALOUS"
    assert V.decision(0.210, 0.303)[0] == "score 0.210 < threshold 0.303: normal"
    assert V.decision(0.356, 0.303, label=0)[0].endswith("truth: normal (FALSE ALARM)")
    assert V.decision(0.210, 0.303, label=1)[0].endswith("truth: anomalous (MISSED)")
    assert V.decision(0.356, None)[0] == "score 0.356 (no threshold: no decision)"
    assert V.decision(0.356, 0.303)[1] != V.decision(0.210, 0.303)[1]          # red vs green
    assert V.OVERLAY_LEVEL == 0.5


def test_save_png_is_lossless_and_a_valid_png(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)   # odd sizes: no row padding
    V.save_png(Image.fromarray(a), tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as im:
        im.verify()                                        # chunk CRCs and structure
    with Image.open(tmp_path / "p.png") as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (53, 37)
        assert np.array_equal(np.asarray(im), a)
    V.save_png(Image.fromarray(a[..., 0]), tmp_path / "g.png")                  # grey input is written as RGB
    assert np.array_equal(np.asarray(Image.open(tmp_path / "g.png"))[..., 1], a[..., 0])


def test_colorize_is_the_stops_interpolated_by_hand():
    # the 'inferno'-like stops written out here, interpolated per channel in float64: the table lookup must
    # stay within one 8-bit level of it everywhere, hit the end stops exactly and clip outside the scale
    stops = [(0.00, (0, 0, 4)), (0.13, (31, 12, 72)), (0.25, (85, 15, 109)), (0.38, (136, 34, 106)), (0.50, (186, 54, 85)),
             (0.63, (227, 89, 51)), (0.75, (249, 140, 10)), (0.88, (249, 201, 50)), (1.00, (252, 255, 164))]

    def by_hand(x):
        x = min(max(x, 0.0), 1.0)
        for (x0, c0), (x1, c1) in zip(stops, stops[1:]):
            if x <= x1:
                f = (x - x0) / (x1 - x0)
                return [a + f * (b - a) for a, b in zip(c0, c1)]

    xs = np.concatenate([np.random.default_rng(1).random(3000), [s for s, _ in stops], [-0.5, 1.5]]).astype(np.float32)
    got = V.colorize(xs.reshape(1, -1))[0].astype(int)
    want = np.array([by_hand(float(x)) for x in xs])
    assert np.abs(got - want).max() <= 1.0 + 1e-9
    assert got[3000].tolist() == [0, 0, 4] and got[3008].tolist() == [252, 255, 164]
    assert got[-2].tolist() == [0, 0, 4] and got[-1].tolist() == [252, 255, 164]
    assert V.colorize(np.array([[np.nan]]))[0, 0].tolist() == [0, 0, 4]
    assert V.colorize(np.zeros((5, 7))).shape == (5, 7, 3)
