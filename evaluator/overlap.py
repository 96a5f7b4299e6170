"""Which calibration images a run trained on, by their pixels (never by file bytes).

`kano data synth --from` writes each photo again as PNG, shrunk to its long side at most `--size` (Lanczos),
and a user may copy photos between formats; so a byte comparison misses the very photos a run was trained on.
Here two images are the same when their decoded RGB arrays are equal, either as they are or after the
calibration image is shrunk the way `synth --from` shrinks a photo to a training image's long side.

Cost: each calibration image is decoded once (and shrunk once per distinct long side of the training images);
a training image is decoded only when its size (read from the file header) is one a calibration image can
take, so a training set of other sizes costs one header read per file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image


def pixel_digest(img: Image.Image) -> str:
    """sha256 of the image's size and its decoded 8-bit RGB pixels, whatever file format held them."""
    a = np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))  # (H, W, 3)
    h = hashlib.sha256(f"{a.shape[1]}x{a.shape[0]}\0".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _header_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # unreadable: it cannot match anything, and training already reported it
        return None


def training_overlap(train_files: list[Path], files: list[Path]) -> list[tuple[Path, Path]]:
    """-> [(calibration file, training file with the same pixels)], in the order of `files`.

    The same pixels: the calibration image's decoded RGB equals the training image's, as it is or shrunk to the
    training image's long side the way `kano data synth --from` shrinks photos (anomaly_data.photo_defects)."""
    from kano.anomaly_data import load_image
    from kano.anomaly_data.photo_defects import fit_long_side

    by_size: dict[tuple[int, int], list[Path]] = {}
    for t in train_files:
        if (size := _header_size(Path(t))) is not None:
            by_size.setdefault(size, []).append(Path(t))
    sides = {max(s) for s in by_size}
    wanted: dict[str, Path] = {}
    for f in files:
        try:
            img = load_image(f)
        except Exception:  # an unreadable calibration image is reported (or skipped) by the scoring itself
            continue
        for side in sides:
            fitted = fit_long_side(img, side)
            if fitted.size in by_size:
                wanted.setdefault(pixel_digest(fitted), Path(f))
    if not wanted:
        return []
    sizes = {tuple(int(x) for x in s) for s in by_size}
    hits: list[tuple[Path, Path]] = []
    seen: set[Path] = set()
    for size in sorted(sizes):
        for t in by_size[size]:
            try:
                d = pixel_digest(load_image(t))
            except Exception:
                continue
            if d in wanted and wanted[d] not in seen:
                seen.add(wanted[d])
                hits.append((wanted[d], t))
    order = {Path(f): i for i, f in enumerate(files)}
    return sorted(hits, key=lambda h: order.get(h[0], 0))


def overlap_message(hits: list[tuple[Path, Path]], shown: int = 5) -> str:
    """The refusal: how many calibration images the run trained on, and their names beside the training files'."""
    pairs = ", ".join(f"{f.name} (= {Path(t).parent.name}/{Path(t).name})" for f, t in hits[:shown])
    more = f" and {len(hits) - shown} more" if len(hits) > shown else ""
    return (f"each calibration image must be one the run never trained on, got {len(hits)} with the same pixels as the "
            f"run's training images: {pairs}{more}. Hold normal photos out of training (e.g. keep them out of the "
            f"folder given to `kano data synth --from`) and calibrate on those")
