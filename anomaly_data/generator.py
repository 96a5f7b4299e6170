"""The one interface every synthetic image generator meets, and the one writer of their datasets.

A generator draws one picture for a `Spec` (class, role, index, side) from a generator of random numbers the
caller seeds; `write_class` seeds one per picture, rng(seed, class, role, index) (anomaly_data/drawing.py), so
a picture depends on nothing drawn before it and every dataset is byte-identical for the same arguments.

Generators: the legacy classes (anomaly_data/synth.py `LEGACY`), the world's textures and part-objects
(anomaly_data/world.py `WORLD`), defects on a user's own photos (anomaly_data/photo_defects.py `PhotoGenerator`)
and the micro-CLIP's captioned pretraining world (bench/micro_world.py `MICRO`, whose `sample` picks the class
and kind from its own stream before drawing).

The writer lays a class out as MVTec AD does:

    OUT/CLASS/train/good/NNN.png            role "train": normal training images
    OUT/CLASS/test/good/NNN.png             role "good": normal test images
    OUT/CLASS/test/KIND/NNN.png             role KIND: one defect of that kind
    OUT/CLASS/ground_truth/KIND/NNN_mask.png

and `write_meta` writes OUT/meta.json (anomaly_data.readers) once every class is there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from kano.core.errors import KanoError

from .drawing import rng

NORMAL_ROLES = ("train", "good")  # roles whose picture is a normal image: train/good and test/good


@dataclass(frozen=True)
class Spec:
    """What to draw: a class, a role ("train" or "good" for a normal image, else a defect kind), the picture's
    index within its role and the image side in pixels (a photo generator keeps its photos' own sizes)."""

    cls: str
    role: str
    index: int
    size: int

    @property
    def normal(self) -> bool:
        return self.role in NORMAL_ROLES


@dataclass
class Drawn:
    """One picture: image (H, W, 3) in [0, 255] (float, rounded when saved, or uint8), the defect's mask (H, W)
    bool (None for a normal image), and what else the generator knows of it (`record`: written beside the
    dataset by a generator that keeps one, e.g. the photo a defect was drawn on)."""

    image: np.ndarray
    mask: np.ndarray | None = None
    record: dict = field(default_factory=dict)


@runtime_checkable
class Generator(Protocol):
    def draw(self, spec: Spec, r: np.random.Generator) -> Drawn:
        """The picture `spec` asks for, every random choice taken from `r`, in a fixed order."""
        ...


def check_count(name: str, value: int, low: int) -> None:
    """A count or side a writer takes: an integer >= low, else KanoError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise KanoError(f"{name} must be an integer >= {low}, got {value}")


def check_out(out, force: bool, source: Path | None = None) -> Path:
    """The folder a dataset is written into: not a file, not inside `source` (the photos read), and empty or new
    unless `force`. -> it as a Path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KanoError(f"--out must be a folder, got a file: {out}")
    if source is not None and (out.resolve() == Path(source).resolve() or Path(source).resolve() in out.resolve().parents):
        raise KanoError(f"--out must be outside the photos' folder --from {source}, got {out}")
    if not force and out.is_dir() and any(out.iterdir()):
        raise KanoError(f"--out must be an empty or new folder (pass --force to write into it anyway), got {out} holding files")
    return out


def save_png(arr: np.ndarray, path: Path) -> None:
    """An image (H, W, 3) or mask (H, W) in [0, 255], rounded to 8 bits, as a lossless PNG (parents made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(arr).astype(np.uint8)).save(path)


def write_class(out: Path, cls: str, gen: Generator, seed: int, size: int, counts: dict[str, int]) -> list[dict]:
    """Draw and save class `cls` under `out` in MVTec layout (module docstring): counts {role: n}, in the order
    given, picture i of a role drawn from rng(seed, cls, role, i). -> one record per defect image, in order:
    {"image": "test/KIND/NNN.png", "mask": "ground_truth/KIND/NNN_mask.png", **the generator's record}."""
    base = Path(out) / cls
    records = []
    for role, n in counts.items():
        for i in range(n):
            spec = Spec(cls, role, i, size)
            d = gen.draw(spec, rng(seed, cls, role, i))
            if spec.normal:
                save_png(d.image, base / ("train" if role == "train" else "test") / "good" / f"{i:03d}.png")
                continue
            image, mask = f"test/{role}/{i:03d}.png", f"ground_truth/{role}/{i:03d}_mask.png"
            save_png(d.image, base / image)
            save_png(d.mask.astype(np.uint8) * 255, base / mask)
            records.append({"image": image, "mask": mask, **d.record})
    return records


def write_meta(out: Path) -> None:
    """OUT/meta.json for the dataset written under `out` (anomaly_data.readers.write_meta)."""
    from .readers import Dataset, read_mvtec, write_meta as write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write(Dataset("mvtec", out, read_mvtec(out)), out / "meta.json")
