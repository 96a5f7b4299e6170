"""The one generator interface and its writer: the MVTec layout, exact masks, one seeded stream per picture,
and every shipped generator meeting the interface."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kano.anomaly_data import load_dataset, synthesize
from kano.anomaly_data.drawing import rng
from kano.anomaly_data.generator import Drawn, Generator, Spec, check_count, check_out, write_class, write_meta
from kano.anomaly_data.photo_defects import PhotoGenerator
from kano.anomaly_data.synth import LEGACY
from kano.anomaly_data.world import WORLD
from kano.core.errors import KanoError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import micro_world  # noqa: E402


class Squares:
    """A toy generator: a grey picture whose level is 10 x the index; a defect is a white 3x3 square at a corner
    drawn from the stream (its mask exactly those 9 pixels)."""

    def draw(self, spec: Spec, r: np.random.Generator) -> Drawn:
        img = np.full((spec.size, spec.size, 3), 10.0 * spec.index)
        if spec.normal:
            return Drawn(img)
        y, x = (int(v) for v in r.integers(0, spec.size - 3, 2))
        img[y:y + 3, x:x + 3] = 255.0
        mask = np.zeros((spec.size, spec.size), bool)
        mask[y:y + 3, x:x + 3] = True
        return Drawn(img, mask, {"at": [x, y]})


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_the_writer_lays_out_mvtec_with_exact_masks_and_records(tmp_path):
    records = write_class(tmp_path, "toy", Squares(), seed=4, size=16, counts={"train": 2, "good": 1, "spot": 2})
    write_meta(tmp_path)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png"))
    assert files == ["toy/ground_truth/spot/000_mask.png", "toy/ground_truth/spot/001_mask.png", "toy/test/good/000.png",
                     "toy/test/spot/000.png", "toy/test/spot/001.png", "toy/train/good/000.png", "toy/train/good/001.png"]
    assert (_png(tmp_path / "toy/train/good/001.png") == 10).all()  # picture 1 of its role: level 10
    for i, rec in enumerate(records):
        # the corner comes from rng(seed, class, role, index): drawn again here, the same square
        y, x = (int(v) for v in rng(4, "toy", "spot", i).integers(0, 13, 2))
        assert rec == {"image": f"test/spot/{i:03d}.png", "mask": f"ground_truth/spot/{i:03d}_mask.png", "at": [x, y]}
        mask = _png(tmp_path / "toy" / rec["mask"])
        assert set(np.unique(mask)) == {0, 255} and (mask > 0).sum() == 9 and (mask[y:y + 3, x:x + 3] == 255).all()
        img = _png(tmp_path / "toy" / rec["image"])
        assert ((img != 10 * i).any(-1) == (mask > 0)).all()  # the mask is exactly the changed pixels
    ds = load_dataset(f"mvtec:{tmp_path}")
    test = ds.samples("test", ["toy"])
    assert sorted((s.defect, s.label) for s in test) == [("good", 0), ("spot", 1), ("spot", 1)]
    assert json.loads((tmp_path / "meta.json").read_text())


def test_a_picture_depends_on_its_own_stream_only(tmp_path):
    write_class(tmp_path / "a", "toy", Squares(), 4, 16, {"spot": 2})
    write_class(tmp_path / "b", "toy", Squares(), 4, 16, {"train": 3, "good": 2, "spot": 2})
    for i in range(2):
        assert (tmp_path / f"a/toy/test/spot/{i:03d}.png").read_bytes() == (tmp_path / f"b/toy/test/spot/{i:03d}.png").read_bytes()
    write_class(tmp_path / "c", "toy", Squares(), 5, 16, {"spot": 2})  # another seed: other corners
    assert any((tmp_path / f"a/toy/test/spot/{i:03d}.png").read_bytes() != (tmp_path / f"c/toy/test/spot/{i:03d}.png").read_bytes()
               for i in range(2))


def test_every_shipped_generator_meets_the_interface_and_synthesize_writes_through_it(tmp_path):
    photo = PhotoGenerator([np.zeros((64, 64, 3), np.uint8)], [np.ones((64, 64), bool)], [tmp_path / "p.png"])
    for gen in (LEGACY, WORLD, photo, micro_world.MICRO, Squares()):
        assert isinstance(gen, Generator)
    # synthesize's files are the writer's own for the same generator, seed and counts
    synthesize(tmp_path / "s", ["disc"], seed=2, size=48, n_train=1, n_good=1, n_per_defect=1, defects=("hole",))
    write_class(tmp_path / "w", "disc", LEGACY, 2, 48, {"train": 1, "good": 1, "hole": 1})
    for rel in ("train/good/000.png", "test/good/000.png", "test/hole/000.png", "ground_truth/hole/000_mask.png"):
        assert (tmp_path / "s/disc" / rel).read_bytes() == (tmp_path / "w/disc" / rel).read_bytes()


def test_the_writers_checks_name_the_value(tmp_path):
    with pytest.raises(KanoError, match=r"size \(--size\) must be an integer >= 32, got 8"):
        check_count("size (--size)", 8, 32)
    with pytest.raises(KanoError, match="must be an integer >= 0, got True"):
        check_count("n", True, 0)
    (tmp_path / "f").write_text("x")
    with pytest.raises(KanoError, match="--out must be a folder, got a file"):
        check_out(tmp_path / "f", force=False)
    with pytest.raises(KanoError, match="--out must be outside the photos' folder"):
        check_out(tmp_path / "sub", force=True, source=tmp_path)
    with pytest.raises(KanoError, match="must be an empty or new folder"):
        check_out(tmp_path, force=False)
    assert check_out(tmp_path, force=True) == tmp_path
