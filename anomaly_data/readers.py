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

One class instead of a root: mvtec, mpdd, btad and folder also accept a single class folder (train/,
test/, ground_truth/ inside; the class is the folder's name); visa accepts one class folder
(Data/Images/...), reading its split from the parent's split_csv/1cls.csv when there is one.

Masks: an anomalous image without a mask, in a class where other anomalous images have masks, is an
error naming the file (`missing_masks="warn"`, the CLI's --allow-missing-masks, keeps it with an
all-normal mask and a warning).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kano.core.errors import KanoError

from .io import MASK_SUFFIXES, is_image, pair_masks


@dataclass(frozen=True)
class Sample:
    """One image: absolute path, mask path or None, class, defect type ('good' for normal), label 0/1."""

    image_path: str
    mask_path: str | None
    class_name: str
    defect: str
    label: int
    split: str = "test"


MISSING_MASKS = ("error", "warn", "ignore")


class Dataset:
    def __init__(self, kind: str, root: Path, samples: list[Sample], missing_masks: str = "error"):
        self.kind, self.root, self._samples = kind, root, samples
        if missing_masks not in MISSING_MASKS:
            raise ValueError(f"missing_masks must be one of {', '.join(MISSING_MASKS)}, got {missing_masks!r}")
        if not samples:
            raise KanoError(f"{kind}:{root} must contain images in the {kind} layout, got none{_layout_hint(kind, Path(root))}")
        if missing_masks != "ignore":
            self._check_masks(missing_masks == "warn")

    def _check_masks(self, warn: bool) -> None:
        """An anomalous image without a mask where its class has masks would be scored as all-normal pixels."""
        by_class: dict[str, list[Sample]] = {}
        for s in self._samples:
            if s.label == 1:
                by_class.setdefault(s.class_name, []).append(s)
        for cls, anomalous in sorted(by_class.items()):
            with_mask = [s for s in anomalous if s.mask_path]
            missing = [s for s in anomalous if not s.mask_path]
            if not with_mask or not missing:
                continue
            where = Path(with_mask[0].mask_path).parent
            stem = Path(missing[0].image_path).stem
            text = (f"anomalous image {missing[0].image_path} must have a mask (class {cls} has masks for {len(with_mask)} of "
                    f"{len(anomalous)} anomalous images, e.g. in {where}), got none: looked for {stem}.png or "
                    f"{stem}{{{','.join(MASK_SUFFIXES)}}}.png"
                    + (f"; {len(missing) - 1} more image(s) lack one" if len(missing) > 1 else ""))
            if not warn:
                raise KanoError(text + "; pass --allow-missing-masks to use them with all-normal masks")
            from kano.core import ui

            ui.err.print(f"warning: {text}; --allow-missing-masks: they count as having no defect pixels")

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

    def split_classes(self, split: str, classes: list[str] | None = None,
                      warn: Callable[[str], None] | None = None) -> tuple[list[str], list[Sample]]:
        """The classes to use and their `split` samples. A class with no image in that split (its folders there
        empty) is an error when the caller named it in `classes`, and is skipped with a warning otherwise."""
        chosen = list(classes) if classes else self.classes
        samples = self.samples(split, chosen)
        have = {s.class_name for s in samples}
        empty = [c for c in chosen if c not in have]
        if empty and classes and have:
            raise KanoError(f"each class asked for must hold {split} images in {self.kind}:{self.root}, "
                            f"got none for {', '.join(empty)}")
        if empty and have:
            (warn or _stderr_warning)(f"warning: skipping {', '.join(empty)} in {self.kind}:{self.root}: "
                                      f"no {split} images (empty folders)")
            chosen = [c for c in chosen if c in have]
        return chosen, samples

    def renamed(self, names: dict[str, str]) -> "Dataset":
        """The same images with class FOLDER called NAME for each {FOLDER: NAME} (`kano eval --class NAME=FOLDER`):
        the name then picks the prompt word, the calibration and the report's rows."""
        import dataclasses

        from .names import closest

        unknown = [f for f in names if f not in self.classes]
        if unknown:
            meant = closest(unknown[0], self.classes)
            raise KanoError(f"--class NAME=FOLDER: FOLDER must be a class folder of {self.kind}:{self.root} "
                            f"({', '.join(self.classes)}), got {unknown[0]!r}" + (f"; did you mean {meant!r}?" if meant else ""))
        after = [names.get(c, c) for c in self.classes]
        if len(set(after)) != len(after):
            twice = sorted({n for n in after if after.count(n) > 1})
            raise KanoError(f"--class must give each class folder its own name, got {', '.join(twice)} for two folders of "
                            f"{self.kind}:{self.root}")
        samples = [dataclasses.replace(s, class_name=names.get(s.class_name, s.class_name)) for s in self._samples]
        return Dataset(self.kind, self.root, samples, missing_masks="ignore")

    def has_masks(self, class_name: str) -> bool:
        return any(s.mask_path for s in self._samples if s.class_name == class_name and s.label == 1)


def _stderr_warning(text: str) -> None:
    from kano.core import ui

    ui.err.print(text)


def _dirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))


def _is_class_folder(d: Path) -> bool:
    """One MVTec-style class: test/ with subfolders, and train/ or ground_truth/ beside it."""
    return (d / "test").is_dir() and bool(_dirs(d / "test")) and ((d / "train").is_dir() or (d / "ground_truth").is_dir())


def _mvtec_like(root: Path, good: str = "good") -> list[Sample]:
    samples: list[Sample] = []
    class_dirs = [root] if _is_class_folder(root) else _dirs(root)
    for cdir in class_dirs:
        if not (cdir / "test").is_dir():
            continue
        cls = cdir.resolve().name
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


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise KanoError(f"{path} must be UTF-8 text, got invalid bytes at position {exc.start}") from None
    except OSError as exc:
        raise KanoError(f"{path} must be a readable file, got {exc.strerror or exc}") from None


def _visa_class(cdir: Path) -> list[Sample]:
    """One VisA class folder without the split file: Data/Images/{Normal,Anomaly}, Data/Masks/Anomaly; all test."""
    samples = []
    for sub, label in (("Normal", 0), ("Anomaly", 1)):
        d = cdir / "Data" / "Images" / sub
        if not d.is_dir():
            continue
        imgs = sorted(p for p in d.iterdir() if is_image(p))
        for img, mask in pair_masks(imgs, cdir / "Data" / "Masks" / sub if label else None).items():
            samples.append(Sample(str(img.resolve()), str(mask.resolve()) if mask else None, cdir.resolve().name,
                                  "good" if label == 0 else "bad", label, "test"))
    return samples


def read_visa(root: Path) -> list[Sample]:
    csv_path, only = root / "split_csv" / "1cls.csv", None
    if not csv_path.is_file() and (root / "Data" / "Images").is_dir():
        # one class folder: the split from the VisA root above it when there is one, else every image as test
        if (root.parent / "split_csv" / "1cls.csv").is_file():
            csv_path, only, root = root.parent / "split_csv" / "1cls.csv", root.resolve().name, root.parent
        else:
            return _visa_class(root)
    if not csv_path.is_file():
        classes = [d for d in _dirs(root) if (d / "Data" / "Images").is_dir()]
        if classes:  # the class folders without the split file: every image as test
            return [s for d in classes for s in _visa_class(d)]
        raise KanoError(f"visa:{root} must contain split_csv/1cls.csv (the VisA root) or Data/Images/ (one VisA class), "
                        f"got {', '.join(p.name for p in _dirs(root)) or 'no subfolders'}")
    samples = []
    need = ("object", "split", "label", "image")
    rows = list(csv.DictReader(_read_text(csv_path).splitlines()))
    for n, row in enumerate(rows, start=2):
        if any(not isinstance(row.get(k), str) for k in need):
            raise KanoError(f"{csv_path} line {n} must have columns object,split,label,image,mask, got {dict(row)!r}")
        label = {"normal": 0, "anomaly": 1}.get(row["label"].strip().lower())
        if label is None:
            raise KanoError(f"{csv_path} line {n}: label must be normal or anomaly, got {row['label']!r}")
        if only is not None and row["object"].strip() != only:
            continue
        img = (root / row["image"].strip()).resolve()
        mask = (row.get("mask") or "").strip()
        samples.append(Sample(str(img), str((root / mask).resolve()) if mask and label else None, row["object"].strip(),
                              "good" if label == 0 else "bad", label, row["split"].strip()))
    return samples


def read_sdd(root: Path) -> list[Sample]:
    from PIL import Image

    samples = []
    one = any(is_image(p) for p in root.iterdir())  # one kosNN folder instead of the root
    for kdir in [root] if one else _dirs(root):
        for img in sorted(p for p in kdir.iterdir() if is_image(p) and "_label" not in p.stem):
            mask = next((m for m in kdir.iterdir() if m.stem == img.stem + "_label"), None)
            label = 0
            if mask is not None:
                try:
                    with Image.open(mask) as m:
                        label = int(np.asarray(m.convert("L")).max() > 0)
                except Exception as exc:
                    raise KanoError(f"mask {mask} must be a readable image file, got a corrupt file ({exc})") from None
            samples.append(Sample(str(img.resolve()), str(mask.resolve()) if (mask and label) else None, "sdd",
                                  "defect" if label else "good", label, "test"))
    return samples


def read_dagm(root: Path) -> list[Sample]:
    samples = []
    one = (root / "Train").is_dir() or (root / "Test").is_dir()  # one ClassN folder instead of the root
    for cdir in [root] if one else _dirs(root):
        for split_dir, split in (("Train", "train"), ("Test", "test")):
            d = cdir / split_dir
            if not d.is_dir():
                continue
            imgs = sorted(p for p in d.iterdir() if is_image(p))
            pairs = pair_masks(imgs, d / "Label")
            for img, mask in pairs.items():
                label = int(mask is not None)
                samples.append(Sample(str(img.resolve()), str(mask.resolve()) if mask else None, cdir.resolve().name,
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
    for n, row in enumerate(csv.DictReader(_read_text(labels_csv).splitlines(), skipinitialspace=True), start=2):
        key = {(k or "").strip(): (v if isinstance(v, str) else "") for k, v in row.items()}
        ident = key.get("id", "").strip()
        img = files.get(ident) or files.get(ident.zfill(3))
        if img is None:
            raise KanoError(f"{labels_csv} lists id {ident} but {img_dir} must hold {ident.zfill(3)}.png, got no such file")
        label = {"0": 0, "1": 1}.get(key.get("hemorrhage", "").strip())
        if label is None:
            raise KanoError(f"{labels_csv} line {n}: hemorrhage must be 0 or 1, got {key.get('hemorrhage', '')!r}")
        samples.append(Sample(str(img.resolve()), None, "headct", "hemorrhage" if label else "good", label, "test"))
    return samples


def read_meta(root: Path) -> list[Sample]:
    meta_path = root if root.is_file() else root / "meta.json"
    if not meta_path.is_file():
        raise KanoError(f"meta:{root} must be a meta.json file or a folder holding one, got none")
    base = meta_path.parent
    try:
        meta = json.loads(_read_text(meta_path))
    except json.JSONDecodeError as exc:
        raise KanoError(f"{meta_path} must be valid JSON, got {exc}") from None
    if not isinstance(meta, dict):
        raise KanoError(f'{meta_path} must hold {{"train": {{CLASS: [sample, ...]}}, "test": {{...}}}}, got a {type(meta).__name__}')
    samples = []
    for split in ("train", "test"):
        part = meta.get(split) or {}
        if not isinstance(part, dict) or not all(isinstance(v, list) for v in part.values()):
            raise KanoError(f'{meta_path}: "{split}" must map each class to a list of samples, got {json.dumps(part)[:80]}')
        for cls, items in part.items():
            for it in items:
                try:
                    mask = it.get("mask_path") or ""
                    label = it["anomaly"]
                    if label not in (0, 1) or isinstance(label, float) and not label.is_integer():
                        raise ValueError
                    samples.append(Sample(str((base / str(it["img_path"])).resolve()), str((base / str(mask)).resolve()) if mask else None,
                                          str(it.get("cls_name", cls)), str(it.get("specie_name", "good")), int(label), split))
                except (KeyError, TypeError, ValueError, AttributeError):
                    raise KanoError(f"{meta_path}: each sample must have img_path, mask_path, cls_name, specie_name and anomaly 0 or 1, "
                                    f"got {it!r}") from None
    return samples


def read_folder(root: Path) -> list[Sample]:
    if not (root / "good").is_dir() and _is_class_folder(root):
        return _mvtec_like(root, "good")  # one MVTec-style class folder (train/, test/, ground_truth/)
    if not (root / "good").is_dir():
        inner = [d for d in _dirs(root) if (d / "good").is_dir() or _is_class_folder(d)]  # one level too high?
        hint = f"; pass the folder itself, e.g. folder:{inner[0]}" if inner else ""
        raise KanoError(f"folder:{root} must contain a good/ subfolder of normal images, got "
                        f"{', '.join(p.name for p in _dirs(root)) or 'no subfolders'}{hint}")
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


def _hf_label(value, src: str, split: str, i: int) -> int:
    if isinstance(value, bool) or value in (0, 1) or value in ("0", "1"):
        return int(value)
    raise KanoError(f"hf:{src} split {split} row {i}: label must be 0 (normal) or 1 (anomalous), got {value!r}")


def _hf_fingerprint(part) -> str:
    """What identifies this split's content: the datasets fingerprint plus each backing file's size and mtime,
    so a dataset saved again in place (same folder, new images) gets a new cache."""
    files = []
    for f in getattr(part, "cache_files", None) or []:
        try:
            st = os.stat(f["filename"])
            files.append((os.path.basename(f["filename"]), st.st_size, st.st_mtime_ns))
        except (OSError, KeyError, TypeError):
            files.append((str(f), 0, 0))
    return hashlib.sha1(json.dumps([getattr(part, "_fingerprint", ""), len(part), sorted(files)]).encode()).hexdigest()[:16]


def _hf_save(im, path: Path, what: str, src: str, split: str, i: int, mask: bool = False) -> None:
    from PIL import Image, ImageOps

    if not isinstance(im, Image.Image):
        raise KanoError(f"hf:{src} split {split} row {i}: {what} must be an image (a datasets.Image column), got {type(im).__name__}")
    im = ImageOps.exif_transpose(im)  # the PNG written here carries no EXIF: bake the orientation in
    if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"):
        im = im.convert("L" if mask else "RGB")
    im.save(path, format="PNG")  # deep images keep their bits; load_image scales them by their depth


def read_hf(root: Path | str) -> list[Sample]:
    """A Hugging Face dataset with columns image, label (0/1), optional mask, class/cls_name, split.

    Images are written once as PNG under <dataset>/.kano_images/<split>-<fingerprint> (or under
    ~/.cache/kano/hf when the dataset is a hub name or its folder is read-only) so that every other part of
    Kano reads plain files. The folder name holds the dataset's fingerprint and the sizes and mtimes of its
    files: a dataset saved again in place is written afresh, never read from an old copy. Each copy is
    written in a private folder and renamed into place, so an interrupted run leaves no half copy behind.
    """
    try:
        import datasets
    except ImportError:
        raise KanoError("hf: datasets need the Hugging Face datasets library, got it missing: pip install datasets") from None

    src = str(root)
    try:
        ds = datasets.load_from_disk(src) if Path(src).is_dir() else datasets.load_dataset(src)
    except Exception as exc:
        raise KanoError(f"hf:{src} must be a dataset saved with save_to_disk or a loadable dataset name, got {type(exc).__name__}: {exc}") from None
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [("test", ds)]
    home_cache = Path.home() / ".cache" / "kano" / "hf" / hashlib.sha1(str(Path(src).resolve() if Path(src).is_dir() else src).encode()).hexdigest()[:16]
    cache = (Path(src) / ".kano_images") if Path(src).is_dir() else home_cache
    samples = []
    for split, part in splits:
        cols = set(part.column_names)
        if "image" not in cols or "label" not in cols:
            raise KanoError(f"hf:{src} split {split} must have columns image and label, got {', '.join(sorted(cols))}")
        cls_col = next((c for c in ("cls_name", "class_name", "class", "category") if c in cols), None)
        key = f"{split}-{_hf_fingerprint(part)}"
        out_dir = cache / key
        if not (out_dir / "manifest.json").is_file() and cache != home_cache:
            try:
                cache.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryFile(dir=cache).close()
            except OSError:
                cache, out_dir = home_cache, home_cache / key
        if not (out_dir / "manifest.json").is_file():
            _hf_write(part, split, src, cache, out_dir, cls_col)
        try:
            manifest = json.loads((out_dir / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            raise KanoError(f"{out_dir}/manifest.json must be Kano's readable copy of hf:{src}, got {exc}; delete {out_dir}") from None
        for rec in manifest:
            samples.append(Sample(str(out_dir / rec["image"]), str(out_dir / rec["mask"]) if rec["mask"] else None, rec["class"],
                                  "good" if rec["label"] == 0 else "defect", rec["label"], "train" if split == "train" else "test"))
    return samples


def _hf_write(part, split: str, src: str, cache: Path, out_dir: Path, cls_col: str | None) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{split}-", dir=cache))
    try:
        manifest = []
        for i, row in enumerate(part):
            label = _hf_label(row["label"], src, split, i)
            _hf_save(row["image"], tmp / f"{i:06d}.png", "image", src, split, i)
            mask = ""
            if row.get("mask") is not None and label == 1:
                mask = f"{i:06d}_mask.png"
                _hf_save(row["mask"], tmp / mask, "mask", src, split, i, mask=True)
            manifest.append({"image": f"{i:06d}.png", "mask": mask, "label": label,
                             "class": str(row[cls_col]) if cls_col else Path(src).name})
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "manifest.json").is_file():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in cache.glob(f"{split}-*"):  # copies of earlier versions of this dataset
        if old != out_dir and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


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


def _layout_hint(kind: str, root: Path) -> str:
    """Which folder to pass instead, when a reader found no images (e.g. a split folder inside one class)."""
    try:
        for up in (root, root.parent, root.parent.parent):
            if up != root and _is_class_folder(up):
                return f" (pass {kind}:{up} for that one class, or {kind}:{up.parent} for all classes beside it)"
        if kind in ("mvtec", "mpdd", "btad", "folder"):
            for d in _dirs(root):
                if any(_is_class_folder(c) for c in _dirs(d)):
                    return f" (the class folders are one level down: pass {kind}:{d})"
        contents = ", ".join(p.name for p in _dirs(root)[:8])
        held = f" (it holds {contents})" if contents else ""
        if kind in ("mvtec", "mpdd"):
            # the commonest case: a folder of one's own photos, with no defects and no masks yet
            photos = sum(1 for p in root.iterdir() if is_image(p))
            return (f"{held}{f', {photos} loose photos' if photos and held else f' ({photos} loose photos)' if photos else ''}. "
                    f"The {kind} layout is ROOT/CLASS/train/good/*.png (normal), ROOT/CLASS/test/good/*.png and "
                    f"ROOT/CLASS/test/DEFECT/*.png, ROOT/CLASS/ground_truth/DEFECT/*_mask.png (masks); from a folder of your "
                    f"own normal photos, make it with: kano data synth --from {root} --classes NAME --out data/synth, then "
                    f"pass {kind}:data/synth")
        return held
    except OSError:
        return ""


def load_dataset(spec: str, missing_masks: str = "error") -> Dataset:
    """Read a dataset from `KIND:PATH` (e.g. mvtec:/data/mvtec_anomaly_detection, or one class folder).

    missing_masks: "error" (an anomalous image without a mask in a class that has masks is an error
    naming the file), "warn" (the CLI's --allow-missing-masks: kept as all-normal pixels, with a
    warning), or "ignore" (callers that do not read masks)."""
    kind, path = parse_data_spec(spec)
    root = Path(path).expanduser()
    if kind != "hf" and not root.exists():
        raise KanoError(f"dataset path {root} must exist, got no such file or folder")
    if kind not in ("hf", "meta") and not root.is_dir():
        raise KanoError(f"dataset path {root} must be a folder, got a file")
    try:
        samples = READERS[kind](root if kind != "hf" else path)
    except PermissionError as exc:
        raise KanoError(f"dataset {spec} must be readable, got permission denied on {exc.filename}") from None
    except OSError as exc:
        raise KanoError(f"dataset {spec} must be readable, got {exc.strerror or exc} ({exc.filename})") from None
    return Dataset(kind, root, samples, missing_masks)


def write_meta(dataset: Dataset, out: Path | None = None) -> Path:
    """Write the peers' meta.json for a dataset (paths relative to the meta file's folder). `out` may be a
    file or an existing folder (meta.json inside it); missing parent folders are created."""
    out = Path(out) if out else (dataset.root if dataset.root.is_dir() else dataset.root.parent) / "meta.json"
    if out.is_dir():
        out = out / "meta.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KanoError(f"--out {out} must be in a folder that can be created, got {exc.strerror or exc}") from None
    base = out.parent.resolve()
    meta: dict = {"train": {}, "test": {}}
    for s in dataset.samples(split=None):
        split = "train" if s.split == "train" else "test"
        rel = lambda p: str(Path(p).resolve().relative_to(base)) if Path(p).resolve().is_relative_to(base) else str(Path(p).resolve())
        meta[split].setdefault(s.class_name, []).append({
            "img_path": rel(s.image_path), "mask_path": rel(s.mask_path) if s.mask_path else "",
            "cls_name": s.class_name, "specie_name": s.defect, "anomaly": s.label})
    try:
        out.write_text(json.dumps(meta, indent=1))
    except OSError as exc:
        raise KanoError(f"--out {out} must be a writable file, got {exc.strerror or exc}") from None
    return out

