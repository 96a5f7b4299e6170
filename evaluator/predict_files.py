"""The files of `kano predict` (listed in evaluator.predict's docstring), written from scores and maps alone.

No torch here: the torch predict loop (evaluator.predict) and the exported-model runtime (kano.deploy.runtime)
both write through these functions, so their outputs cannot drift apart.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from kano.anomaly_data.io import image_size, is_image_path, list_images, load_image
from kano.errors import KanoError

from . import outputs, report
from .visualize import map_to_png16, panel, resize_map

# Maps are written at the image's size up to this many pixels on the long side (2048: every benchmark's
# images fit; a float32 map is then at most 16 MB). Larger images get a map downscaled to this size.
MAX_MAP_SIDE = 2048


def collect_images(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += list_images(p)
        elif p.is_file():
            if not is_image_path(p):
                raise KanoError(f"input {p} must be an image file (png, jpg, bmp, tif, webp) or a folder, got another file type")
            files.append(p)
        else:
            raise KanoError(f"input {p} must be an existing image file or folder, got no such path")
    if not files:
        raise KanoError("predict needs at least one image or folder, got none")
    return files


def map_size(w: int, h: int, limit: int = MAX_MAP_SIDE) -> tuple[int, int]:
    """(W, H) of the written map: the image's own, or scaled so that the long side is `limit`."""
    if max(w, h) <= limit:
        return w, h
    f = limit / max(w, h)
    return max(1, round(w * f)), max(1, round(h * f))


def begin(out_dir: Path, files: list[Path], identity: dict, force: bool) -> list[str]:
    """Claim OUT for this prediction (evaluator.outputs), make maps/ and panels/; -> one unique file NAME per input."""
    outputs.claim(out_dir, "predict", identity, force)
    (out_dir / "maps").mkdir(exist_ok=True)
    (out_dir / "panels").mkdir(exist_ok=True)
    return outputs.unique_names([[f.stem, *reversed(f.resolve().parent.parts[-4:])] for f in files])


def write_record(out_dir: Path, f: Path, name: str, class_name: str, threshold: float | None, score: float | None,
                 amap: np.ndarray | None, error: str | None = None, *, word: str | None = None,
                 threshold_source: str | None = None) -> dict:
    """One input's panel and maps; -> its record (with "rel": the written files relative to OUT).
    amap (h, w) on [0, 1] at any size (the model's); score None with `error` for an image that was not scored.
    word: the class word the prompts used; threshold_source: where the threshold came from (both recorded)."""
    rec: dict = {"image": str(f), "name": name, "class": class_name, "class_word": word, "threshold": threshold,
                 "threshold_source": threshold_source}
    try:
        if error is not None:
            raise KanoError(error)
        with warnings.catch_warnings():  # PIL's decompression-bomb warning: the size is what we check here
            warnings.simplefilter("ignore")
            w, h = image_size(f)
        mw, mh = map_size(w, h)
        big = resize_map(amap, (mw, mh))
        rel = {"panel_png": f"panels/{name}.png", "map_npy": f"maps/{name}.npy", "map_png": f"maps/{name}.png"}
        np.save(outputs.inside(out_dir, out_dir / rel["map_npy"]), big)
        map_to_png16(big).save(outputs.inside(out_dir, out_dir / rel["map_png"]))
        pic = panel(load_image(f), amap, name=f"{class_name} / {f.name}", score=score, threshold=threshold,
                    threshold_source=threshold_source)
        pic.save(outputs.inside(out_dir, out_dir / rel["panel_png"]))
        rec.update(score=round(score, 6), anomalous=None if threshold is None else bool(score >= threshold),
                   panel_png=str(out_dir / rel["panel_png"]), map_npy=str(out_dir / rel["map_npy"]),
                   map_png=str(out_dir / rel["map_png"]), image_size=[w, h], map_size=[mw, mh],
                   map_downscaled=(mw, mh) != (w, h), map_max=round(float(big.max()), 6), error=None, rel=rel)
    except KanoError as exc:
        rec.update(score=None, anomalous=None, error=str(exc))
    except MemoryError:
        rec.update(score=None, anomalous=None, error=f"image {f} is too large to draw in memory")
    return rec


def finish(out_dir: Path, records: list[dict], header: dict, identity: dict) -> None:
    """predictions.jsonl, index.html and the manifest; drops the records' "rel" entries."""
    written = [v for r in records for v in r.get("rel", {}).values()]
    with open(out_dir / "predictions.jsonl", "w") as jl:
        for rec in records:
            jl.write(json.dumps({k: v for k, v in rec.items() if k != "rel"}) + "\n")
    (out_dir / "index.html").write_text(report.predict_html(records, header))
    written += ["predictions.jsonl", "index.html"]
    outputs.write_manifest(out_dir, "predict", identity, written)
    for rec in records:
        rec.pop("rel", None)
