"""bench/oneclass.py: its evaluation sets (the bench's own defects, exact masks, disjoint fit and test photos,
seeded) and its rank AUROC; one end-to-end run of the runner through the CLI (slow)."""

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_oneclass", ROOT / "bench" / "oneclass.py")
oc = importlib.util.module_from_spec(_spec)
sys.modules["bench_oneclass"] = oc  # dataclasses look their module up
_spec.loader.exec_module(oc)
HAZEL = ROOT / "tests" / "data" / "hazelnut_toy"


def _rgb(p) -> np.ndarray:
    return np.asarray(Image.open(p).convert("RGB")).astype(np.int64)


def test_auroc_by_hand():
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 0.35 beats 0.1 only, 0.8 beats both -> 3 of 4 pairs
    assert oc.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    # a tie counts half: positive 0.5 against negatives 0.5 and 0.2 -> (0.5 + 1) / 2
    assert oc.auroc([0, 1, 0], [0.5, 0.5, 0.2]) == 0.75
    assert oc.auroc([1, 1], [0.1, 0.2]) is None


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    hz = oc.SetSpec("hazelnut", "hazelnut", 96, 5, 4, 1, 1, n_painted=3)
    tex = oc.SetSpec("brick", "brick", 64, 4, 3, 1, 1)
    big = oc.SetSpec("big", "hazelnut", 512, 4, 2, 2, 0, tiny=True)
    return {s.name: (s, oc.build_set(s, 3, root / s.name, HAZEL), root / s.name) for s in (hz, tex, big)}


def test_masks_groups_and_sources(small_sets):
    for spec, labels, _ in small_sets.values():
        groups = [r["group"] for r in labels["images"]]
        assert groups.count("good") == spec.n_good
        n_small = len(oc.TINY if spec.tiny else oc.SMALL) * spec.n_small + spec.n_painted
        assert groups.count("small") == n_small and groups.count("whole") == (len(oc.WHOLE) * spec.n_whole)
        for r in labels["images"]:
            img = _rgb(r["image"])
            assert img.shape == (spec.side, spec.side, 3)
            if r["group"] == "good" or r["kind"] == "painted":
                continue
            mask = np.asarray(Image.open(r["mask"])) > 0
            changed = np.any(img != _rgb(r["source"]), axis=2)
            if r["group"] == "small":  # exactly the changed pixels, and small
                assert np.array_equal(mask, changed) and 0 < mask.mean() < 0.1, r["image"]
            else:  # the whole photo, much of it changed (a slight blur leaves the flat paper of a small photo as it was)
                assert mask.all() and changed.mean() > (0.02 if r["kind"] == "defocus" else 0.2), (r["image"], changed.mean())
    # the 1024-class analogue: defects of about 1 % of the side, 0.01-0.015 of 512 px = 5-8 px across
    spec, labels, _ = small_sets["big"]
    for r in (r for r in labels["images"] if r["group"] == "small"):
        ys, xs = np.nonzero(np.asarray(Image.open(r["mask"])) > 0)
        assert 3 <= np.ptp(ys) + 1 <= 10 and 3 <= np.ptp(xs) + 1 <= 10, r["image"]


def test_fit_and_test_photos_are_disjoint(small_sets):
    for name in ("hazelnut", "big"):
        _, labels, root = small_sets[name]
        fit = {hashlib.sha256(_rgb(p).tobytes()).hexdigest() for p in sorted((root / "fit").iterdir())}
        good = {hashlib.sha256(_rgb(r["image"]).tobytes()).hexdigest() for r in labels["images"] if r["group"] == "good"}
        assert len(fit) == len(list((root / "fit").iterdir())) and not fit & good
    # the texture: fit crops from the upper half, test crops from the lower half; the lower half's rows are
    # not found among the fit crops' rows
    _, labels, root = small_sets["brick"]
    tex = np.asarray(Image.open(oc.TEXTURES / "brick.png").convert("RGB"))
    upper = {tex[y].tobytes() for y in range(tex.shape[0] // 2)}
    for p in (root / "fit").iterdir():
        rows = _rgb(p).astype(np.uint8)
        assert any(rows[0].tobytes() in u for u in upper)
    for r in (r for r in labels["images"] if r["group"] == "good"):
        rows = _rgb(r["image"]).astype(np.uint8)
        assert not any(rows[0].tobytes() in u for u in upper)


def test_same_seed_same_set(small_sets, tmp_path):
    spec, labels, root = small_sets["brick"]
    again = oc.build_set(spec, 3, tmp_path / "again", HAZEL)
    other = oc.build_set(spec, 4, tmp_path / "other", HAZEL)
    for a, b, c in zip(labels["images"], again["images"], other["images"]):
        assert np.array_equal(_rgb(a["image"]), _rgb(b["image"]))
    assert not all(np.array_equal(_rgb(a["image"]), _rgb(c["image"])) for a, c in zip(labels["images"], other["images"]))


@pytest.mark.slow
def test_runner_end_to_end(tmp_path):
    """The script itself on a small texture set with one floor: results.json holds the three groups' AUROCs,
    the table is printed, and a method this Kano lacks would be reported, never scored."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "oneclass.py"), "--out", str(out), "--seeds", "0",
                           "--sets", "brick", "--methods", "median_colour", "--scale", "0.25"],
                          capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 1 and rows[0]["method"] == "median_colour"
    m = rows[0]["metrics"]
    assert m["small"]["n_defect"] == 3 and m["whole"]["n_defect"] == 6 and m["all"]["n_defect"] == 9
    for g in ("small", "whole", "all"):
        assert 0 <= m[g]["image_auroc"] <= 1 and 0 <= m[g]["pixel_auroc"] <= 1
    assert "| median_colour |" in proc.stdout and (out / "table.md").is_file()
