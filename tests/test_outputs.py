"""Where eval and predict write: one file per image, names from data made safe,
nothing outside --out, no mixing with old results, huge and unreadable images."""

import json
import shutil

import numpy as np
from PIL import Image


def _photo(hazelnut_root, i: int):
    return sorted((hazelnut_root / "hazelnut" / "test" / "colour").glob("*.jpg"))[i]


def test_same_file_names_in_different_folders_get_their_own_maps(hazelnut_root, tmp_path, cli):
    inputs = []
    for k, folder in enumerate(("a/x", "b/x", "c/x")):
        d = tmp_path / folder
        d.mkdir(parents=True)
        Image.open(_photo(hazelnut_root, k)).save(d / "001.png")
        inputs.append(d)
    code, _, err = cli("predict", *inputs, "--class", "hazelnut", "--backbone", "tiny", "--out", tmp_path / "p")
    assert code == 0, err
    recs = [json.loads(l) for l in (tmp_path / "p" / "predictions.jsonl").read_text().splitlines()]
    assert [r["image"] for r in recs] == [str(d / "001.png") for d in inputs]
    for key in ("map_npy", "map_png", "panel_png"):
        assert len({r[key] for r in recs}) == 3                                   # three records, three files each
    assert sorted(p.name for p in (tmp_path / "p" / "maps").glob("*.npy")) == ["a_x_001.npy", "b_x_001.npy", "c_x_001.npy"]
    maps = [np.load(r["map_npy"]) for r in recs]
    assert not np.array_equal(maps[0], maps[1]) and not np.array_equal(maps[1], maps[2])   # each its own image's map
    for r in recs:                                                                  # the 16-bit PNG is the same map
        png = np.asarray(Image.open(r["map_png"]), dtype=np.float64)
        assert Image.open(r["map_png"]).mode.startswith("I") and png.shape == np.load(r["map_npy"]).shape
        assert np.abs(png / 65535 - np.load(r["map_npy"])).max() <= 0.5 / 65535 + 1e-7


def _meta_dataset(tmp_path, hazelnut_root, cls: str) -> object:
    """A meta.json whose samples share class, defect and stem (two folders), under a hostile class name."""
    root = tmp_path / "d" / "data"
    items = []
    for k, sub in enumerate(("one", "two")):
        (root / sub).mkdir(parents=True)
        Image.open(_photo(hazelnut_root, k)).save(root / sub / "000.png")
        Image.open(hazelnut_root / "hazelnut" / "ground_truth" / "colour" / (_photo(hazelnut_root, k).stem + ".png")).save(root / sub / "000_mask.png")
        items.append({"img_path": f"{sub}/000.png", "mask_path": f"{sub}/000_mask.png", "cls_name": cls, "specie_name": "hole", "anomaly": 1})
    good = sorted((hazelnut_root / "hazelnut" / "test" / "good").glob("*.jpg"))[0]
    Image.open(good).save(root / "good.png")
    items.append({"img_path": "good.png", "mask_path": "", "cls_name": cls, "specie_name": "good", "anomaly": 0})
    (root / "meta.json").write_text(json.dumps({"train": {}, "test": {cls: items}}))
    return root


def test_names_from_meta_json_are_safe_unique_and_stay_under_out(hazelnut_root, tmp_path, cli):
    root = _meta_dataset(tmp_path, hazelnut_root, "../../../x")
    out = tmp_path / "d" / "data" / "deep" / "er" / "out"     # '../../../' from out/overlays/ would land in tmp_path/d/data
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    code, _, err = cli("eval", "--backbone", "tiny", "--data", f"meta:{root}", "--out", out)   # all 3 images in the gallery
    assert code == 0, err
    new = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert new and all(out.resolve() in p.resolve().parents for p in new), sorted(map(str, new - {p for p in new if out in p.parents}))
    overlays = sorted(p.name for p in (out / "overlays").iterdir())
    assert len(overlays) == 3 and len(set(overlays)) == 3                      # two images with class/defect/stem alike: two files
    assert overlays == ["one_x_hole_000.png", "two_x_hole_000.png", "x_good_good.png"]   # parent folder settles the tie


def test_safe_name_and_unique_names():
    from kano.evaluator.outputs import safe_name, unique_names

    assert safe_name("../../../x") == "x" and safe_name("a/b c") == "a_b_c" and safe_name("..") == "item"
    assert safe_name(".hidden") == "hidden" and len(safe_name("y" * 500)) == 80
    assert unique_names([["001", "x", "a"], ["001", "x", "b"], ["002", "x", "a"]]) == ["a_x_001", "b_x_001", "002"]
    assert unique_names([["A"], ["a"], ["a"]]) == ["A", "a-2", "a-3"]             # case-insensitive file systems


def test_reusing_out_keeps_only_the_same_runs_results(hazelnut_root, tmp_path, cli):
    out = tmp_path / "e"
    args = ["eval", "--backbone", "tiny", "--data", f"mvtec:{hazelnut_root}", "--out", out]
    code, _, err = cli(*args, "--n-overlays", "3")
    assert code == 0, err
    first = json.loads((out / "metrics.json").read_text())
    (out / "mine.txt").write_text("the user's own file")
    code, _, err = cli(*args, "--n-overlays", "1")                             # the same run again: accepted, replaced
    assert code == 0, err
    assert len(list((out / "overlays").glob("*.png"))) == 1                     # no old overlay mixed in
    assert json.loads((out / "metrics.json").read_text())["classes"] == first["classes"]   # same numbers: reproducible
    code, _, err = cli(*args, "--image-size", "160")                           # another run: refused, nothing touched
    assert code == 2 and "must be a new folder or hold the results of this same eval" in err and "image_size" in err, err
    assert len(list((out / "overlays").glob("*.png"))) == 1
    code, _, err = cli("predict", hazelnut_root / "hazelnut" / "test" / "good", "--class", "hazelnut", "--backbone", "tiny", "--out", out)
    assert code == 2 and "kano eval" in err                                     # another command's folder
    code, _, err = cli(*args, "--image-size", "160", "--force", "--n-overlays", "2")
    assert code == 0, err
    assert len(list((out / "overlays").glob("*.png"))) == 2 and (out / "mine.txt").read_text() == "the user's own file"
    assert json.loads((out / "metrics.json").read_text())["provenance"]["image_size"] == 160


def test_predict_into_a_used_folder_never_mixes_inputs(hazelnut_root, tmp_path, cli):
    out = tmp_path / "p"
    good = hazelnut_root / "hazelnut" / "test" / "good"
    code, _, err = cli("predict", good, "--class", "hazelnut", "--backbone", "tiny", "--out", out)
    assert code == 0, err
    code, _, err = cli("predict", _photo(hazelnut_root, 0), "--class", "hazelnut", "--backbone", "tiny", "--out", out)
    assert code == 2 and "differs in: inputs" in err, err
    code, _, err = cli("predict", _photo(hazelnut_root, 0), "--class", "hazelnut", "--backbone", "tiny", "--out", out, "--force")
    assert code == 0, err
    assert [p.name for p in (out / "maps").glob("*.npy")] == [_photo(hazelnut_root, 0).stem + ".npy"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 1
    (tmp_path / "file").write_text("x")
    code, _, err = cli("predict", good, "--class", "hazelnut", "--backbone", "tiny", "--out", tmp_path / "file")
    assert code == 2 and "--out must be a folder, got an existing file" in err


def test_huge_and_unreadable_images_are_reported_and_the_rest_go_on(hazelnut_root, tmp_path, cli):
    d = tmp_path / "in"
    d.mkdir()
    Image.new("L", (12000, 12000), 120).save(d / "a_huge.png")                 # 144 Mpx, a small file
    Image.new("RGB", (3000, 2000), (200, 180, 40)).save(d / "b_wide.png")
    (d / "c_corrupt.png").write_bytes(Image.open(_photo(hazelnut_root, 0)).tobytes()[:500])
    Image.open(_photo(hazelnut_root, 1)).save(d / "d_ok.png")
    code, out, err = cli("predict", d, "--class", "hazelnut", "--backbone", "tiny", "--out", tmp_path / "p")
    assert "Traceback" not in err and "MemoryError" not in err
    assert code == 1, err                                                       # something unreadable: exit 1, said why
    recs = {r["name"]: r for r in map(json.loads, (tmp_path / "p" / "predictions.jsonl").read_text().splitlines())}
    assert list(recs) == ["a_huge", "b_wide", "c_corrupt", "d_ok"]
    huge = recs["a_huge"]
    if huge["error"] is None:                                                   # read: its map is downscaled, and says so
        assert huge["map_downscaled"] and huge["image_size"] == [12000, 12000] and huge["map_size"] == [2048, 2048]
    else:                                                                       # or refused by a pixel limit, by name
        assert "a_huge.png" in huge["error"]
    npys = list((tmp_path / "p" / "maps").glob("*.npy"))
    assert max(p.stat().st_size for p in npys) <= 2048 * 2048 * 4 + 1024        # never a 576 MB map
    wide = recs["b_wide"]
    assert wide["error"] is None and wide["map_downscaled"] and wide["map_size"] == [2048, 1365]
    assert np.load(wide["map_npy"]).shape == (1365, 2048) and Image.open(wide["map_png"]).size == (2048, 1365)
    assert recs["c_corrupt"]["score"] is None and "c_corrupt.png" in recs["c_corrupt"]["error"]
    ok = recs["d_ok"]
    assert ok["error"] is None and not ok["map_downscaled"] and ok["map_size"] == [256, 256] and 0 <= ok["score"] <= 1
    assert "c_corrupt.png" in err
