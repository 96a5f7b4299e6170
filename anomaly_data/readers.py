"""Dataset readers behind one `KIND:PATH` spec, each producing `Sample` records.

Layouts (as published):
- mvtec, mpdd:  CLASS/train/good/*, CLASS/test/{good,DEFECT}/*, CLASS/ground_truth/DEFECT/STEM[_mask].png
- btad:         CLASS/train/ok/*, CLASS/test/{ok,ko}/*, CLASS/ground_truth/ko/STEM.png
- visa:         split_csv/1cls.csv (object,split,label,image,mask) with paths relative to the root
- sdd:          kosNN/PartN.jpg + kosNN/PartN_label.bmp (KolektorSDD; label = mask not empty)
- dagm:         ClassN/{Train,Test}/NNNN.PNG + Label/NNNN_label.PNG (DAGM 2007)
- brainmri, liverct, resc:  BMAD: {train/good, valid|test/{good,Ungood}/{img,anomaly_mask|label}};
                brainmri also in its Kaggle form (yes/, no/) - image level only
- br35h:        yes/*, no/* (image level)
- covid:        COVID[/images]/*, Normal[/images]/* (COVID-19 Radiography Database, image level)
- headct:       head_ct/*.png + labels.csv (id, hemorrhage) (image level)
- meta:         a peers' meta.json (root or file)
- folder:       good/*, DEFECT/*, optional ground_truth/DEFECT/ or masks/DEFECT/ (one class: the folder name)
- hf:           a Hugging Face dataset (load_from_disk folder or hub name) with image/mask/label columns
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kano.errors import KanoError

from .io import is_image, pair_masks


@dataclass(frozen=True)
class Sample:
    """One image: absolute path, mask path or None, class, defect type ('good' for normal), label 0/1."""

    image_path: str
    mask_path: str | None
    class_name: str
    defect: str
    label: int
    split: str = "test"


class Dataset:
    def __init__(self, kind: str, root: Path, samples: list[Sample]):
        self.kind, self.root, self._samples = kind, root, samples
        if not samples:
            raise KanoError(f"{kind}:{root} must contain images in the {kind} layout, got none")

    @property
    def classes(self) -> list[str]:
        return sorted({s.class_name for s in self._samples})

    def samples(self, split: str | None = "test", classes: list[str] | None = None) -> list[Sample]:
        out = [s for s in self._samples if (split is None or s.split == split)]
        if classes is not None:
            unknown = sorted(set(classes) - set(self.classes))
            if unknown:
                raise KanoError(f"class must be one of {', '.join(self.classes)} in {self.kind}:{self.root}, got {', '.join(unknown)}")
            out = [s for s in out if s.class_name in classes]
        return out

    def has_masks(self, class_name: str) -> bool:
        return any(s.mask_path for s in self._samples if s.class_name == class_name and s.label == 1)


def _dirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def _mvtec_like(root: Path, good: str = "good") -> list[Sample]:
    samples: list[Sample] = []
    for cdir in _dirs(root):
        if not (cdir / "test").is_dir():
            continue
        cls = cdir.name
        train_good = cdir / "train" / good
        if train_good.is_dir():
            samples += [Sample(str(p.resolve()), None, cls, "good", 0, "train") for p in sorted(train_good.iterdir()) if is_image(p)]
        for ddir in _dirs(cdir / "test"):
            imgs = sorted(p for p in ddir.iterdir() if is_image(p))
            is_good = ddir.name == good
            pairs = pair_masks(imgs, None if is_good else cdir / "ground_truth" / ddir.name)
            for img, mask in pairs.items():
                samples.append(Sample(str(img.resolve()), str(mask.resolve()) if mask else None, cls,
                                      "good" if is_good else ddir.name, 0 if is_good else 1, "test"))
    return samples


def read_mvtec(root: Path) -> list[Sample]:
    return _mvtec_like(root, "good")


def read_btad(root: Path) -> list[Sample]:
    return _mvtec_like(root, "ok")


def read_visa(root: Path) -> list[Sample]:
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise KanoError(f"visa:{root} must contain split_csv/1cls.csv, got no such file")
    samples = []
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                label = {"normal": 0, "anomaly": 1}[row["label"].strip()]
                img = (root / row["image"].strip()).resolve()
                mask = row.get("mask", "").strip()
            except KeyError as exc:
                raise KanoError(f"{csv_path} must have columns object,split,label,image,mask with label normal|anomaly, got {exc}") from None
            samples.append(Sample(str(img), str((root / mask).resolve()) if mask and label else None, row["object"].strip(),
                                  "good" if label == 0 else "bad", label, row["split"].strip()))
    return samples


def read_sdd(root: Path) -> list[Sample]:
    from PIL import Image

    samples = []
    for kdir in _dirs(root):
        for img in sorted(p for p in kdir.iterdir() if is_image(p) and "_label" not in p.stem):
            mask = next((m for m in kdir.iterdir() if m.stem == img.stem + "_label"), None)
            label = 0
            if mask is not None:
                with Image.open(mask) as m:
                    label = int(np.asarray(m.convert("L")).max() > 0)
            samples.append(Sample(str(img.resolve()), str(mask.resolve()) if (mask and label) else None, "sdd",
                                  "defect" if label else "good", label, "test"))
    return samples


def read_dagm(root: Path) -> list[Sample]:
    samples = []
    for cdir in _dirs(root):
        for split_dir, split in (("Train", "train"), ("Test", "test")):
            d = cdir / split_dir
            if not d.is_dir():
                continue
            imgs = sorted(p for p in d.iterdir() if is_image(p))
            pairs = pair_masks(imgs, d / "Label")
            for img, mask in pairs.items():
                label = int(mask is not None)
                samples.append(Sample(str(img.resolve()), str(mask.resolve()) if mask else None, cdir.name,
                                      "defect" if label else "good", label, split))
    return samples


def _read_bmad(root: Path, cls: str) -> list[Sample]:
    samples = []
    train_good = root / "train" / "good"
    if train_good.is_dir():
        folder = train_good / "img" if (train_good / "img").is_dir() else train_good
        samples += [Sample(str(p.resolve()), None, cls, "good", 0, "train") for p in sorted(folder.iterdir()) if is_image(p)]
    for split in ("valid", "test"):
        for sub, label in (("good", 0), ("Ungood", 1)):
            d = root / split / sub
            if not d.is_dir():
                continue
            img_dir = d / "img" if (d / "img").is_dir() else d
            mask_dir = next((d / m for m in ("anomaly_mask", "label", "mask") if (d / m).is_dir()), None)
            imgs = sorted(p for p in img_dir.iterdir() if is_image(p))
            for img, mask in pair_masks(imgs, mask_dir if label else None).items():
                samples.append(Sample(str(img.resolve()), str(mask.resolve()) if mask else None, cls,
                                      "good" if label == 0 else "ungood", label, split))
    return samples


def _read_yes_no(root: Path, cls: str, yes: tuple[str, ...] = ("yes",), no: tuple[str, ...] = ("no",)) -> list[Sample]:
    samples = []
    for names, label in ((no, 0), (yes, 1)):
        d = next((root / n for n in names if (root / n).is_dir()), None)
        if d is None:
            raise KanoError(f"{cls}:{root} must contain the folders {' and '.join(yes[0:1] + no[0:1])}, got {', '.join(p.name for p in _dirs(root)) or 'none'}")
        if (d / "images").is_dir():
            d = d / "images"
        samples += [Sample(str(p.resolve()), None, cls, "good" if label == 0 else "abnormal", label, "test")
                    for p in sorted(d.iterdir()) if is_image(p)]
    return samples


def read_brainmri(root: Path) -> list[Sample]:
    if (root / "yes").is_dir() and (root / "no").is_dir():
        return _read_yes_no(root, "brainmri")
    return _read_bmad(root, "brainmri")


def read_liverct(root: Path) -> list[Sample]:
    return _read_bmad(root, "liverct")


def read_resc(root: Path) -> list[Sample]:
    return _read_bmad(root, "resc")


def read_br35h(root: Path) -> list[Sample]:
    return _read_yes_no(root, "br35h")


def read_covid(root: Path) -> list[Sample]:
    return _read_yes_no(root, "covid", yes=("COVID",), no=("Normal",))


def read_headct(root: Path) -> list[Sample]:
    labels_csv = root / "labels.csv"
    if not labels_csv.is_file():
        raise KanoError(f"headct:{root} must contain labels.csv (id, hemorrhage), got no such file")
    img_dir = root / "head_ct" / "head_ct" if (root / "head_ct" / "head_ct").is_dir() else (root / "head_ct" if (root / "head_ct").is_dir() else root)
    files = {p.stem: p for p in img_dir.iterdir() if is_image(p)}
    samples = []
    with open(labels_csv, newline="") as f:
        for row in csv.DictReader(f, skipinitialspace=True):
            key = {k.strip(): v for k, v in row.items()}
            ident = key.get("id", "").strip()
            img = files.get(ident) or files.get(ident.zfill(3))
            if img is None:
                raise KanoError(f"{labels_csv} lists id {ident} but {img_dir} must hold {ident.zfill(3)}.png, got no such file")
            label = int(key.get("hemorrhage", "0").strip())
            samples.append(Sample(str(img.resolve()), None, "headct", "hemorrhage" if label else "good", label, "test"))
    return samples


def read_meta(root: Path) -> list[Sample]:
    meta_path = root if root.is_file() else root / "meta.json"
    if not meta_path.is_file():
        raise KanoError(f"meta:{root} must be a meta.json file or a folder holding one, got none")
    base = meta_path.parent
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise KanoError(f"{meta_path} must be valid JSON, got {exc}") from None
    samples = []
    for split in ("train", "test"):
        for cls, items in (meta.get(split) or {}).items():
            for it in items:
                try:
                    mask = it.get("mask_path") or ""
                    samples.append(Sample(str((base / it["img_path"]).resolve()), str((base / mask).resolve()) if mask else None,
                                          it.get("cls_name", cls), it.get("specie_name", "good"), int(it["anomaly"]), split))
                except (KeyError, TypeError, ValueError):
                    raise KanoError(f"{meta_path}: each sample must have img_path, mask_path, cls_name, specie_name, anomaly; got {it!r}") from None
    return samples


def read_folder(root: Path) -> list[Sample]:
    if not (root / "good").is_dir():
        raise KanoError(f"folder:{root} must contain a good/ subfolder of normal images, got {', '.join(p.name for p in _dirs(root)) or 'no subfolders'}")
    mask_root = next((root / m for m in ("ground_truth", "masks") if (root / m).is_dir()), None)
    samples = []
    for d in _dirs(root):
        if d == mask_root:
            continue
        imgs = sorted(p for p in d.iterdir() if is_image(p))
        label = 0 if d.name == "good" else 1
        pairs = pair_masks(imgs, (mask_root / d.name) if (mask_root and label) else None)
        samples += [Sample(str(i.resolve()), str(m.resolve()) if m else None, root.resolve().name, d.name, label, "test")
                    for i, m in pairs.items()]
    return samples


def read_hf(root: Path | str) -> list[Sample]:
    """A Hugging Face dataset with columns image, label (0/1), optional mask, class/cls_name, split.

    Images are written once as PNG under <dataset>/.kano_images (or ~/.cache/kano/hf) so that every
    other part of Kano reads plain files.
    """
    import datasets

    src = str(root)
    try:
        ds = datasets.load_from_disk(src) if Path(src).is_dir() else datasets.load_dataset(src)
    except Exception as exc:
        raise KanoError(f"hf:{src} must be a dataset saved with save_to_disk or a loadable dataset name, got {type(exc).__name__}: {exc}") from None
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [("test", ds)]
    cache = (Path(src) / ".kano_images") if Path(src).is_dir() else Path.home() / ".cache" / "kano" / "hf" / hashlib.sha1(src.encode()).hexdigest()[:16]
    samples = []
    for split, part in splits:
        cols = set(part.column_names)
        if "image" not in cols or "label" not in cols:
            raise KanoError(f"hf:{src} split {split} must have columns image and label, got {', '.join(sorted(cols))}")
        cls_col = next((c for c in ("cls_name", "class_name", "class", "category") if c in cols), None)
        out_dir = cache / split
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(part):
            img_p = out_dir / f"{i:06d}.png"
            if not img_p.exists():
                row["image"].convert("RGB").save(img_p)
            mask_p = None
            if row.get("mask") is not None and int(row["label"]) == 1:
                mask_p = out_dir / f"{i:06d}_mask.png"
                if not mask_p.exists():
                    row["mask"].convert("L").save(mask_p)
            cls = str(row[cls_col]) if cls_col else Path(src).name
            samples.append(Sample(str(img_p), str(mask_p) if mask_p else None, cls, "good" if int(row["label"]) == 0 else "defect",
                                  int(row["label"]), "train" if split == "train" else "test"))
    return samples


READERS: dict[str, Callable[[Path], list[Sample]]] = {
    "mvtec": read_mvtec, "visa": read_visa, "mpdd": read_mvtec, "btad": read_btad, "sdd": read_sdd, "dagm": read_dagm,
    "brainmri": read_brainmri, "liverct": read_liverct, "resc": read_resc, "br35h": read_br35h, "covid": read_covid,
    "headct": read_headct, "meta": read_meta, "folder": read_folder, "hf": read_hf,
}


def parse_data_spec(spec: str) -> tuple[str, str]:
    kind, sep, path = (spec or "").partition(":")
    if not sep or not path or kind not in READERS:
        raise KanoError(f"dataset must be KIND:PATH with KIND one of {', '.join(READERS)}, got {spec!r}")
    return kind, path


def load_dataset(spec: str) -> Dataset:
    """Read a dataset from `KIND:PATH` (e.g. mvtec:/data/mvtec_anomaly_detection)."""
    kind, path = parse_data_spec(spec)
    root = Path(path).expanduser()
    if kind != "hf" and not root.exists():
        raise KanoError(f"dataset path {root} must exist, got no such file or folder")
    if kind not in ("hf", "meta") and not root.is_dir():
        raise KanoError(f"dataset path {root} must be a folder, got a file")
    return Dataset(kind, root, READERS[kind](root if kind != "hf" else path))


def write_meta(dataset: Dataset, out: Path | None = None) -> Path:
    """Write the peers' meta.json for a dataset (paths relative to the meta file's folder)."""
    out = Path(out) if out else (dataset.root if dataset.root.is_dir() else dataset.root.parent) / "meta.json"
    base = out.parent.resolve()
    meta: dict = {"train": {}, "test": {}}
    for s in dataset.samples(split=None):
        split = "train" if s.split == "train" else "test"
        rel = lambda p: str(Path(p).resolve().relative_to(base)) if Path(p).resolve().is_relative_to(base) else str(Path(p).resolve())
        meta[split].setdefault(s.class_name, []).append({
            "img_path": rel(s.image_path), "mask_path": rel(s.mask_path) if s.mask_path else "",
            "cls_name": s.class_name, "specie_name": s.defect, "anomaly": s.label})
    out.write_text(json.dumps(meta, indent=1))
    return out

