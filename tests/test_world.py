"""The synthetic world: disjoint classes, deterministic output, masks where the image changed, defects as named."""

import numpy as np
import pytest

from kano.anomaly_data import world as W
from kano.anomaly_data import synthesize, synthesize_world


def test_class_and_defect_lists_are_disjoint_and_complete():
    assert not set(W.WORLD_AUX) & set(W.WORLD_TARGET)
    assert set(W.WORLD_AUX) | set(W.WORLD_TARGET) == set(W.WORLD_CLASSES)
    assert {c for c in W.WORLD_AUX if c in W.WORLD_OBJECTS} and {c for c in W.WORLD_TARGET if c in W.WORLD_OBJECTS}
    assert set(W.SEEN_DEFECTS) | set(W.HELD_OUT_DEFECTS) == set(W.WORLD_DEFECTS)
    assert not set(W.SEEN_DEFECTS) & set(W.HELD_OUT_DEFECTS)
    for group in W.DEFECT_GROUPS.values():  # every group has kinds seen in training and kinds held out
        assert set(group) & set(W.SEEN_DEFECTS) and set(group) & set(W.HELD_OUT_DEFECTS)
    assert not W.applies("tartan", "part_moved") and not W.applies("pager", "warp") and W.applies("pager", "hue")


@pytest.mark.parametrize("cls", ["tartan", "pager"])
def test_every_kind_changes_the_image_inside_its_mask(cls):
    size = 64
    for kind in [k for k in W.WORLD_DEFECTS if W.applies(cls, k)]:
        normal = W.make_normal(cls, size, W.rng(0, cls, kind, 0))  # same draws as the defective image up to the defect
        img, mask = W.make_defective(cls, kind, size, W.rng(0, cls, kind, 0))
        assert img.shape == (size, size, 3) and mask.dtype == bool and mask.sum() > 12, kind
        diff = np.abs(img - normal).max(-1)
        assert diff[mask].mean() > 10, kind       # the defect is visible where the mask says
        assert diff[~mask].max() <= 12, kind      # outside it at most invisible changes (noise and lighting are shared)


def test_hue_shift_keeps_luminance_and_part_recolour_brings_no_new_colour():
    size = 64
    normal = W.make_normal("tartan", size, W.rng(2, "h"))
    img, mask = W.make_defective("tartan", "hue", size, W.rng(2, "h"))
    lum = lambda a: a[..., 0] * 0.299 + a[..., 1] * 0.587 + a[..., 2] * 0.114
    # constant luminance up to rounding, except where a rotated colour left the RGB cube and was clipped
    assert (np.abs(lum(img) - lum(normal))[mask] < 1.0).mean() > 0.8
    assert np.abs(img - normal)[mask].max() > 20
    # part_recolour: the changed pixels take a colour another part has in the same clean render
    p = W._object_params("pager", size, W.rng(3, "r"))
    bad, place = W._part_defect(p, size, "part_recolour", W.rng(4, "r"))
    colours = {tuple(int(v) for v in q["colour"]) for q in p["parts"]}
    assert {tuple(int(v) for v in q["colour"]) for q, _, _ in place} <= colours


def test_world_sets_are_deterministic_and_split_by_kind(tmp_path):
    kw = dict(size=48, n_good=1, n_per_defect=1, classes=["tartan", "pager"])
    synthesize_world(tmp_path / "a", "target", seed=5, **kw)
    synthesize_world(tmp_path / "b", "target", seed=5, **kw)
    synthesize_world(tmp_path / "c", "target", seed=6, **kw)
    synthesize_world(tmp_path / "aux", "aux", seed=5, **kw)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert any((tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes() for f in files)
    kinds = lambda root, c: {d.name for d in (root / c / "test").iterdir()} - {"good"}
    assert kinds(tmp_path / "a", "pager") == {k for k in W.WORLD_DEFECTS if W.applies("pager", k)}
    assert kinds(tmp_path / "aux", "tartan") == {k for k in W.SEEN_DEFECTS if W.applies("tartan", k)}


def test_legacy_classes_and_names_still_work(tmp_path):
    synthesize(tmp_path / "s", ["disc", "pager"], size=48, n_train=0, n_good=1, n_per_defect=1, defects=("hole", "missing"))
    assert {d.name for d in (tmp_path / "s" / "disc" / "test").iterdir()} == {"good", "hole", "missing"}
    assert {d.name for d in (tmp_path / "s" / "pager" / "test").iterdir()} == {"good", "dark_spot", "part_missing"}


def test_cli_data_synth_checks_values_and_refuses_a_full_folder(tmp_path, cli):
    code, out, err = cli("data", "synth", "--out", tmp_path / "z", "--size", "0")
    assert code == 2 and "got 0" in err and "--size" in err and not (tmp_path / "z").exists()
    code, out, err = cli("data", "synth", "--out", tmp_path / "w", "--world", "target", "--classes", "pager", "--size", "48",
                         "--n-good", "1", "--n-defect", "1")
    assert code == 0, err
    before = sorted(p.name for p in (tmp_path / "w").rglob("*"))
    code, out, err = cli("data", "synth", "--out", tmp_path / "w", "--classes", "disc", "--size", "48")
    assert code == 2 and "--force" in err and sorted(p.name for p in (tmp_path / "w").rglob("*")) == before
    code, out, err = cli("data", "synth", "--out", tmp_path / "w", "--classes", "disc", "--size", "48", "--n-good", "1",
                         "--n-defect", "1", "--defects", "hole", "--force")
    assert code == 0 and (tmp_path / "w" / "disc").is_dir() and (tmp_path / "w" / "pager").is_dir()
    code, out, err = cli("data", "synth", "--out", tmp_path / "v", "--world", "side")
    assert code == 2 and "must be one of aux, target" in err


def test_synth_refuses_a_folder_holding_files_unless_forced(tmp_path, cli):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = cli("data", "synth", "--out", out, "--world", "target", "--size", "32", "--n-good", "1", "--n-defect", "1")
    assert code == 2 and "--out must be an empty or new folder (pass --force" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written
    code, _, err = cli("data", "synth", "--out", out, "--world", "target", "--size", "32", "--n-good", "1", "--n-defect", "1", "--force")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and (out / "meta.json").is_file()
    code, _, err = cli("data", "synth", "--out", tmp_path / "new", "--size", "0")
    assert code == 2 and "must be an integer >= 32, got 0" in err and not (tmp_path / "new").exists()
