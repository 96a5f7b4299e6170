"""Each reader on a miniature that reproduces the real dataset's folder and file names."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kano.anomaly_data import load_dataset, load_image, load_mask, prompt_name, synthesize, write_meta
from kano.core.errors import KanoError


def img(path: Path, size=(32, 32), mode="RGB", value=128, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], value * 256, np.uint16)).save(path)
    else:
        Image.new(mode, size, value if mode in ("L", "1") else (value,) * len(mode)).save(path, format=fmt)


def mask(path: Path, size=(32, 32), on=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros(size[::-1], np.uint8)
    if on:
        a[4:10, 4:10] = 255
    Image.fromarray(a).save(path)


def summary(ds, split="test"):
    return sorted((s.class_name, s.defect, s.label, Path(s.image_path).name, Path(s.mask_path).name if s.mask_path else None)
                  for s in ds.samples(split))


def test_mvtec(tmp_path):
    img(tmp_path / "bottle/train/good/000.png")
    img(tmp_path / "bottle/test/good/000.png")
    img(tmp_path / "bottle/test/broken_large/000.png")
    mask(tmp_path / "bottle/ground_truth/broken_large/000_mask.png")
    (tmp_path / "license.txt").write_text("cc")
    ds = load_dataset(f"mvtec:{tmp_path}")
    assert ds.classes == ["bottle"]
    assert summary(ds) == [("bottle", "broken_large", 1, "000.png", "000_mask.png"), ("bottle", "good", 0, "000.png", None)]
    assert len(ds.samples("train")) == 1


def test_mvtec_hazelnut_toy_masks_without_suffix(hazelnut_root):
    ds = load_dataset(f"mvtec:{hazelnut_root}")
    test = ds.samples("test")
    assert len(test) == 23 and sum(s.label for s in test) == 17
    assert all(Path(s.mask_path).stem == Path(s.image_path).stem for s in test if s.label)


def test_visa(tmp_path):
    img(tmp_path / "candle/Data/Images/Normal/0000.JPG", fmt="JPEG")
    img(tmp_path / "candle/Data/Images/Anomaly/000.JPG", fmt="JPEG")
    mask(tmp_path / "candle/Data/Masks/Anomaly/000.png")
    img(tmp_path / "pcb1/Data/Images/Normal/0001.JPG", fmt="JPEG")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv/1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
        "pcb1,test,normal,pcb1/Data/Images/Normal/0001.JPG,\n")
    ds = load_dataset(f"visa:{tmp_path}")
    assert ds.classes == ["candle", "pcb1"]
    assert summary(ds) == [("candle", "bad", 1, "000.JPG", "000.png"), ("pcb1", "good", 0, "0001.JPG", None)]
    assert prompt_name("pcb1") == "printed circuit board"


def test_mpdd(tmp_path):
    img(tmp_path / "bracket_black/train/good/000.png")
    img(tmp_path / "bracket_black/test/hole/000.png")
    mask(tmp_path / "bracket_black/ground_truth/hole/000_mask.png")
    ds = load_dataset(f"mpdd:{tmp_path}")
    assert summary(ds) == [("bracket_black", "hole", 1, "000.png", "000_mask.png")]
    assert prompt_name("bracket_black") == "black bracket"


def test_btad(tmp_path):
    img(tmp_path / "01/train/ok/0000.bmp")
    img(tmp_path / "01/test/ok/0000.bmp")
    img(tmp_path / "01/test/ko/0000.bmp")
    mask(tmp_path / "01/ground_truth/ko/0000.png")
    img(tmp_path / "03/test/ko/0000.bmp")
    mask(tmp_path / "03/ground_truth/ko/0000.bmp")
    ds = load_dataset(f"btad:{tmp_path}")
    assert summary(ds) == [("01", "good", 0, "0000.bmp", None), ("01", "ko", 1, "0000.bmp", "0000.png"),
                           ("03", "ko", 1, "0000.bmp", "0000.bmp")]


def test_sdd(tmp_path):
    img(tmp_path / "kos01/Part0.jpg", fmt="JPEG")
    mask(tmp_path / "kos01/Part0_label.bmp", on=False)
    img(tmp_path / "kos02/Part5.jpg", fmt="JPEG")
    mask(tmp_path / "kos02/Part5_label.bmp")
    ds = load_dataset(f"sdd:{tmp_path}")
    assert summary(ds) == [("sdd", "defect", 1, "Part5.jpg", "Part5_label.bmp"), ("sdd", "good", 0, "Part0.jpg", None)]


def test_dagm(tmp_path):
    img(tmp_path / "Class1/Train/0576.PNG", mode="L")
    (tmp_path / "Class1/Train/Label").mkdir(parents=True)
    (tmp_path / "Class1/Train/Label/Labels.txt").write_text("1\n")
    img(tmp_path / "Class1/Test/0001.PNG", mode="L")
    img(tmp_path / "Class1/Test/0002.PNG", mode="L")
    mask(tmp_path / "Class1/Test/Label/0002_label.PNG")
    ds = load_dataset(f"dagm:{tmp_path}")
    assert summary(ds) == [("Class1", "defect", 1, "0002.PNG", "0002_label.PNG"), ("Class1", "good", 0, "0001.PNG", None)]


@pytest.mark.parametrize("kind,mask_dir", [("brainmri", "label"), ("liverct", "label"), ("resc", "anomaly_mask")])
def test_bmad_layouts(tmp_path, kind, mask_dir):
    img(tmp_path / "train/good/00000.png", mode="L")
    for split in ("valid", "test"):
        img(tmp_path / f"{split}/good/img/00001.png", mode="L")
        img(tmp_path / f"{split}/Ungood/img/00002.png", mode="L")
        mask(tmp_path / f"{split}/Ungood/{mask_dir}/00002.png")
    ds = load_dataset(f"{kind}:{tmp_path}")
    assert summary(ds) == [(kind, "good", 0, "00001.png", None), (kind, "ungood", 1, "00002.png", "00002.png")]
    assert len(ds.samples("valid")) == 2 and len(ds.samples("train")) == 1


@pytest.mark.parametrize("kind,yes,no,names", [
    ("br35h", "yes", "no", ("y0.jpg", "no0.jpg")),
    ("brainmri", "yes", "no", ("Y1.jpg", "1 no.jpeg")),
    ("covid", "COVID/images", "Normal/images", ("COVID-1.png", "Normal-1.png")),
])
def test_image_level_sets(tmp_path, kind, yes, no, names):
    img(tmp_path / yes / names[0], fmt="PNG")
    img(tmp_path / no / names[1], fmt="PNG")
    if kind == "covid":
        img(tmp_path / "Lung_Opacity/images/Lung_Opacity-1.png")
    ds = load_dataset(f"{kind}:{tmp_path}")
    labels = {Path(s.image_path).name: s.label for s in ds.samples()}
    assert labels == {names[0]: 1, names[1]: 0}
    assert not ds.has_masks(kind)


def test_headct(tmp_path):
    img(tmp_path / "head_ct/head_ct/000.png", mode="L")
    img(tmp_path / "head_ct/head_ct/100.png", mode="L")
    (tmp_path / "labels.csv").write_text("id, hemorrhage\n0,1\n100,0\n")
    ds = load_dataset(f"headct:{tmp_path}")
    assert summary(ds) == [("headct", "good", 0, "100.png", None), ("headct", "hemorrhage", 1, "000.png", None)]


def test_folder_with_optional_masks(tmp_path):
    root = tmp_path / "widget"
    img(root / "good/a.png")
    img(root / "scratch/b.png")
    img(root / "dent/c.png")
    mask(root / "ground_truth/scratch/b_mask.png")
    with pytest.raises(KanoError, match=r"anomalous image .*dent/c.png must have a mask \(class widget has masks for 1 of 2"):
        load_dataset(f"folder:{root}")  # a class with masks: the unmasked one would score as all-normal pixels
    ds = load_dataset(f"folder:{root}", missing_masks="warn")
    assert summary(ds) == [("widget", "dent", 1, "c.png", None), ("widget", "good", 0, "a.png", None),
                           ("widget", "scratch", 1, "b.png", "b_mask.png")]
    (root / "ground_truth").rename(root / "no_masks_here")
    (root / "no_masks_here").rename(tmp_path / "elsewhere")
    assert summary(load_dataset(f"folder:{root}")) == [("widget", "dent", 1, "c.png", None), ("widget", "good", 0, "a.png", None),
                                                       ("widget", "scratch", 1, "b.png", None)]  # no masks at all: image level


def test_meta_roundtrip(tmp_path):
    synthesize(tmp_path / "s", ["disc"], size=64, n_train=1, n_good=1, n_per_defect=1, defects=("hole",))
    meta = json.loads((tmp_path / "s/meta.json").read_text())
    sample = meta["test"]["disc"][1]
    assert set(sample) == {"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}
    assert sample["img_path"] == "disc/test/hole/000.png" and sample["mask_path"] == "disc/ground_truth/hole/000_mask.png"
    a, b = load_dataset(f"mvtec:{tmp_path / 's'}"), load_dataset(f"meta:{tmp_path / 's'}")
    assert summary(a) == summary(b) and summary(a, "train") == summary(b, "train")
    out = write_meta(b, tmp_path / "s" / "again.json")
    assert json.loads(out.read_text()) == meta


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    m = np.zeros((16, 16), np.uint8)
    m[2:6, 2:6] = 255
    ds = datasets.Dataset.from_dict({
        "image": [Image.new("RGB", (16, 16), (10, 20, 30)), Image.new("RGB", (16, 16), (200, 20, 30))],
        "mask": [Image.fromarray(np.zeros((16, 16), np.uint8)), Image.fromarray(m)],
        "label": [0, 1], "cls_name": ["tile", "tile"]})
    ds.save_to_disk(str(tmp_path / "hfds"))
    got = load_dataset(f"hf:{tmp_path / 'hfds'}")
    assert got.classes == ["tile"]
    s = got.samples()
    assert [x.label for x in s] == [0, 1] and s[1].mask_path and load_mask(s[1].mask_path, (16, 16)).sum() == 16


def test_image_modes(tmp_path):
    for mode in ("L", "RGBA", "P", "I;16"):
        img(tmp_path / f"x_{mode.replace(';', '')}.png", mode=mode)
        im = load_image(tmp_path / f"x_{mode.replace(';', '')}.png")
        assert im.mode == "RGB" and im.size == (32, 32)
    im16 = np.asarray(load_image(tmp_path / "x_I16.png"))
    assert im16.max() == 128  # 16-bit scaled down, not clipped
    img(tmp_path / "x.tif", fmt="TIFF")
    assert load_image(tmp_path / "x.tif").size == (32, 32)


@pytest.mark.parametrize("spec,message", [
    ("nosuchkind:/tmp", "KIND one of"),
    ("mvtec", "KIND:PATH"),
    ("mvtec:/nonexistent/dir", "must exist"),
])
def test_bad_specs(spec, message):
    with pytest.raises(KanoError, match=message):
        load_dataset(spec)


def test_empty_and_wrong_layouts(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KanoError, match="got none"):
        load_dataset(f"mvtec:{tmp_path / 'empty'}")
    with pytest.raises(KanoError, match="split_csv/1cls.csv"):
        load_dataset(f"visa:{tmp_path / 'empty'}")
    with pytest.raises(KanoError, match="good/"):
        load_dataset(f"folder:{tmp_path / 'empty'}")


def test_mask_errors(tmp_path):
    mask(tmp_path / "m.png", size=(20, 20))
    with pytest.raises(KanoError, match="must have the size of its image, 32x32, got 20x20"):
        load_mask(tmp_path / "m.png", (32, 32))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(KanoError, match="bad.png must be a readable image"):
        load_image(tmp_path / "bad.png")


def test_synthetic_generator_is_deterministic_with_exact_masks(tmp_path):
    import hashlib

    def digest(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.png"))}

    kw = dict(size=96, n_train=1, n_good=1, n_per_defect=1, defects=("hole", "scratch", "stain", "crack", "missing", "colour"))
    synthesize(tmp_path / "a", ["weave", "ring"], seed=5, **kw)
    synthesize(tmp_path / "b", ["weave", "ring"], seed=5, **kw)
    synthesize(tmp_path / "c", ["weave", "ring"], seed=6, **kw)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    ds = load_dataset(f"mvtec:{tmp_path / 'a'}")
    for s in ds.samples():
        if s.label:
            m = load_mask(s.mask_path, (96, 96))
            assert m.sum() > 30
            good = np.asarray(load_image(s.image_path), dtype=int)
            assert good.shape == (96, 96, 3)
    assert {s.defect for s in ds.samples() if s.class_name == "ring"} == {"good", "hole", "scratch", "stain", "crack", "missing", "colour"}
    assert "missing" not in {s.defect for s in ds.samples() if s.class_name == "weave"}


# ---- one class folder; mask values; bad input as `error: ...`

HAZELNUT = Path(__file__).parent / "data" / "hazelnut_toy"


@pytest.mark.parametrize("kind", ["mvtec", "mpdd", "folder"])
def test_single_class_folder(kind):
    ds = load_dataset(f"{kind}:{HAZELNUT}")
    assert ds.classes == ["hazelnut_toy"]
    test = ds.samples("test")
    assert len(test) == 23 and sum(s.label for s in test) == 17 and len(ds.samples("train")) == 28
    assert all(Path(s.mask_path).name == Path(s.image_path).stem + ".png" for s in test if s.label)


def test_single_class_btad_and_visa(tmp_path):
    img(tmp_path / "btad/01/train/ok/0000.bmp")
    img(tmp_path / "btad/01/test/ko/0001.bmp")
    mask(tmp_path / "btad/01/ground_truth/ko/0001.png")
    assert summary(load_dataset(f"btad:{tmp_path / 'btad/01'}")) == [("01", "ko", 1, "0001.bmp", "0001.png")]
    v = tmp_path / "visa"
    img(v / "candle/Data/Images/Normal/0000.JPG", fmt="JPEG")
    img(v / "candle/Data/Images/Normal/0001.JPG", fmt="JPEG")
    img(v / "candle/Data/Images/Anomaly/000.JPG", fmt="JPEG")
    mask(v / "candle/Data/Masks/Anomaly/000.png")
    img(v / "pcb1/Data/Images/Normal/0000.JPG", fmt="JPEG")
    # a class folder without the split file: every image is a test image
    assert summary(load_dataset(f"visa:{v / 'candle'}")) == [("candle", "bad", 1, "000.JPG", "000.png"),
                                                            ("candle", "good", 0, "0000.JPG", None), ("candle", "good", 0, "0001.JPG", None)]
    (v / "split_csv").mkdir()
    (v / "split_csv/1cls.csv").write_text(
        "object,split,label,image,mask\n"
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,\n"
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png\n"
        "pcb1,test,normal,pcb1/Data/Images/Normal/0000.JPG,\n")
    ds = load_dataset(f"visa:{v / 'candle'}")  # with the root's split file: its split, this class only
    assert ds.classes == ["candle"] and len(ds.samples("train")) == 1
    assert summary(ds) == [("candle", "bad", 1, "000.JPG", "000.png"), ("candle", "good", 0, "0001.JPG", None)]


def test_single_class_dagm_and_sdd(tmp_path):
    img(tmp_path / "Class1/Test/0001.PNG", mode="L")
    img(tmp_path / "Class1/Test/0002.PNG", mode="L")
    mask(tmp_path / "Class1/Test/Label/0002_label.PNG")
    assert summary(load_dataset(f"dagm:{tmp_path / 'Class1'}")) == [("Class1", "defect", 1, "0002.PNG", "0002_label.PNG"),
                                                                   ("Class1", "good", 0, "0001.PNG", None)]
    img(tmp_path / "kos02/Part5.jpg", fmt="JPEG")
    mask(tmp_path / "kos02/Part5_label.bmp")
    assert summary(load_dataset(f"sdd:{tmp_path / 'kos02'}")) == [("sdd", "defect", 1, "Part5.jpg", "Part5_label.bmp")]


def test_wrong_level_says_which_folder_to_pass(tmp_path):
    with pytest.raises(KanoError, match=f"pass mvtec:{HAZELNUT} for that one class, or mvtec:{HAZELNUT.parent} for all"):
        load_dataset(f"mvtec:{HAZELNUT / 'test'}")
    (tmp_path / "downloads" / "mvtec").mkdir(parents=True)
    import shutil

    shutil.copytree(HAZELNUT, tmp_path / "downloads" / "mvtec" / "hazelnut")
    with pytest.raises(KanoError, match=f"one level down: pass mvtec:{tmp_path / 'downloads' / 'mvtec'}"):
        load_dataset(f"mvtec:{tmp_path / 'downloads'}")


def test_cli_eval_and_data_meta_on_one_class_folder(tmp_path, cli):
    (tmp_path / "m").mkdir()
    code, out, err = cli("data", "meta", f"mvtec:{HAZELNUT}", "--out", tmp_path / "m")  # --out: an existing folder is fine
    assert code == 0, err
    meta = json.loads((tmp_path / "m" / "meta.json").read_text())
    assert set(meta["test"]) == {"hazelnut_toy"} and len(meta["test"]["hazelnut_toy"]) == 23
    code, out, err = cli("eval", "--backbone", "tiny", "--data", f"mvtec:{HAZELNUT}", "--out", tmp_path / "e")
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["classes"]["hazelnut_toy"]["n_images"] == 23


def test_mask_value_100_counts_in_pixel_metrics(tmp_path, cli):
    """Masks stored as 0/100 must not read as empty masks: every defect pixel reaches the metrics."""
    import shutil

    root = tmp_path / "mvtec" / "hazelnut"
    shutil.copytree(HAZELNUT, root)
    for m in (root / "ground_truth" / "colour").glob("*.png"):
        a = np.asarray(Image.open(m))
        Image.fromarray(np.where(a > 0, 100, 0).astype(np.uint8)).save(m)
    ds = load_dataset(f"mvtec:{root.parent}")
    total = sum(int(load_mask(s.mask_path, (256, 256)).sum()) for s in ds.samples() if s.label)
    expected = sum(int((np.asarray(Image.open(m)) > 0).sum()) for m in (HAZELNUT / "ground_truth" / "colour").glob("*.png"))
    assert total == expected > 1000


def test_missing_mask_is_an_error_naming_the_file(tmp_path, cli):
    import shutil

    root = tmp_path / "mvtec" / "hazelnut"
    shutil.copytree(HAZELNUT, root)
    gt = root / "ground_truth" / "colour"
    (gt / "03.png").rename(gt / "03.mask.png")  # the name: pairs now
    (gt / "07.png").rename(gt / "07_defect.png")  # a name nothing pairs with
    ds = load_dataset(f"mvtec:{root.parent}", missing_masks="warn")
    assert [Path(s.image_path).name for s in ds.samples() if s.label and not s.mask_path] == ["07.jpg"]
    code, out, err = cli("eval", "--backbone", "tiny", "--data", f"mvtec:{root.parent}", "--out", tmp_path / "e")
    assert code == 2 and "Traceback" not in err
    assert f"anomalous image {root.resolve() / 'test' / 'colour' / '07.jpg'} must have a mask" in " ".join(err.split())
    assert "--allow-missing-masks" in err and not (tmp_path / "e" / "metrics.json").exists()
    code, out, err = cli("eval", "--backbone", "tiny", "--data", f"mvtec:{root.parent}", "--out", tmp_path / "e", "--allow-missing-masks")
    assert code == 0, err
    assert "warning" in err and "07.jpg" in err and (tmp_path / "e" / "metrics.json").is_file()


def test_hf_dataset_saved_again_in_place_is_read_afresh(tmp_path):
    import datasets

    path = tmp_path / "hfds"

    def save(colours):
        datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8), c) for c in colours], "label": [0] * len(colours),
                                    "cls_name": ["tile"] * len(colours)}).save_to_disk(str(path))

    save([(200, 0, 0), (200, 0, 0)])
    first = load_dataset(f"hf:{path}").samples()
    assert [tuple(load_image(s.image_path).getpixel((0, 0))) for s in first] == [(200, 0, 0)] * 2
    save([(0, 0, 200), (0, 200, 0), (9, 9, 9)])  # the same folder, new images
    again = load_dataset(f"hf:{path}").samples()
    assert [tuple(load_image(s.image_path).getpixel((0, 0))) for s in again] == [(0, 0, 200), (0, 200, 0), (9, 9, 9)]
    assert len(list((path / ".kano_images").glob("test-*"))) == 1  # the old copy is gone
    assert load_dataset(f"hf:{path}").samples() == again  # unchanged dataset: the same copy


@pytest.mark.parametrize("layout,message", [
    ({"meta.json": "[1, 2]"}, r"meta.json must hold \{\"train\""),
    ({"meta.json": '{"test": {"a": [{"img_path": "x.png", "anomaly": 2}]}}'}, "anomaly 0 or 1"),
    ({"meta.json": '{"test": ["x.png"]}'}, '"test" must map each class to a list'),
    ({"meta.json": b"\xff\xfe{}"}, "must be UTF-8 text"),
    ({"split_csv/1cls.csv": "object,split,label\ncandle,test,normal\n"}, "line 2 must have columns object,split,label,image,mask"),
    ({"split_csv/1cls.csv": "object,split,label,image,mask\ncandle,test,bad,a.png,\n"}, "label must be normal or anomaly, got 'bad'"),
    ({"labels.csv": "id, hemorrhage\n0,yes\n", "head_ct/000.png": None}, "hemorrhage must be 0 or 1, got 'yes'"),
])
def test_bad_files_in_readers_are_clear_errors(tmp_path, cli, layout, message):
    for rel, text in layout.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            img(p)
        elif isinstance(text, bytes):
            p.write_bytes(text)
        else:
            p.write_text(text)
    kind = {"meta.json": "meta", "split_csv/1cls.csv": "visa", "labels.csv": "headct"}[next(iter(layout))]
    code, out, err = cli("data", "meta", f"{kind}:{tmp_path}", "--out", tmp_path / "out.json")
    assert code == 2 and "Traceback" not in err and err.startswith("error:")
    assert __import__("re").search(message, " ".join(err.split())), err


def test_hf_bad_label_is_a_clear_error(tmp_path, cli):
    import datasets

    datasets.Dataset.from_dict({"image": [Image.new("RGB", (8, 8))], "label": ["good"]}).save_to_disk(str(tmp_path / "d"))
    code, out, err = cli("data", "meta", f"hf:{tmp_path / 'd'}", "--out", tmp_path / "m.json")
    assert code == 2 and "label must be 0 (normal) or 1 (anomalous), got 'good'" in err


def test_train_refuses_a_missing_mask_unless_allowed(synth_root, tmp_path, cli):
    import shutil

    from kano.kb_builder import BuildConfig, build_knowledge_base
    from kano.knowledge_store import KnowledgeStore

    root = tmp_path / "synth"
    shutil.copytree(synth_root, root)
    (root / "disc" / "ground_truth" / "hole" / "001_mask.png").unlink()
    kb = tmp_path / "kb.duckdb"
    build_knowledge_base(KnowledgeStore(kb), BuildConfig(classes=["disc"]), None, None)
    args = ["train", "--kb", kb, "--data", f"mvtec:{root}", "--classes", "disc", "--backbone", "tiny", "--epochs", "1",
            "--batch-size", "4", "--image-size", "64", "--cache", "memory"]
    code, out, err = cli(*args, "--out", tmp_path / "r1")
    assert code == 2 and "disc/test/hole/001.png must have a mask" in " ".join(err.split()) and "Traceback" not in err
    code, out, err = cli(*args, "--out", tmp_path / "r2", "--allow-missing-masks")
    assert code == 0, err
    assert "warning" in err and (tmp_path / "r2" / "weights.safetensors").is_file()
