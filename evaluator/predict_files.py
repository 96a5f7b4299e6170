"""The per-image files of `kano predict` (evaluator.predict's docstring lists them): one row, a map, a panel.

No torch here: the one streaming loop (evaluator.predict) writes each image through `row` whichever scorer
(the torch model or the exported graph, evaluator.inference) scored it, and `finish` ends every run.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from kano.anomaly_data.io import image_size, load_image
from kano.core.errors import KanoError

from . import outputs, records, report
from .stream import batch_sizes
from .visualize import defect_mask, is_normal, map_scale, map_to_png16, panel, resize_map, save_png

# Maps are written at the image's size up to this many pixels on the long side (2048: every benchmark's
# images fit; a float32 map is then at most 16 MB). Larger images get a map downscaled to this size.
MAX_MAP_SIDE = 2048
KEPT_ON_ERROR = ("image", "class", "class_word", "threshold", "threshold_source", "pixel_threshold", "name")
# index.html shows this many rows: a page a browser opens at once (about 1 MB of HTML), however long the run
MAX_PAGE_ROWS = 1000


def map_size(w: int, h: int, limit: int = MAX_MAP_SIDE) -> tuple[int, int]:
    """(W, H) of the written map: the image's own, or scaled so that the long side is `limit`."""
    if max(w, h) <= limit:
        return w, h
    f = limit / max(w, h)
    return max(1, round(w * f)), max(1, round(h * f))


def row(out_dir: Path, path: str, cls: str, word: str, name: str | None, score: float, amap, error: str | None,
        threshold: float | None, source: str | None, maps: bool, panels: bool, pixel_threshold: float | None = None) -> dict:
    """One image's row of predictions.jsonl, and its map (npy, 16-bit png), panel and, for a flagged image with a
    usable pixel threshold, its defect mask under OUT as asked. amap: (h, w) on [0, 1] at the model's size (numpy,
    or a CPU tensor); error: why the image was not scored; pixel_threshold: the calibration's (the panel's colour
    scale and the mask's cut), or None."""
    rec: dict = {"image": path, "class": cls, "class_word": word, "threshold": threshold, "threshold_source": source}
    if pixel_threshold is not None:
        rec["pixel_threshold"] = pixel_threshold
    if name is not None:
        rec["name"] = name
    try:
        if error:
            raise KanoError(error)
        s = float(score)
        rec.update(score=s, anomalous=records.decision(s, threshold), error=None)
        scale = map_scale(pixel_threshold, threshold)
        if (note := scale.note or scale.degenerate(np.asarray(amap))) is not None:
            rec["map_note"] = note
        flagged = rec["anomalous"] and is_normal(pixel_threshold)
        big = None
        if maps or flagged:
            with warnings.catch_warnings():  # PIL's decompression-bomb warning: the size is what we check here
                warnings.simplefilter("ignore")
                w, h = image_size(path)
            mw, mh = map_size(w, h)
            big = resize_map(np.asarray(amap), (mw, mh))
        if flagged:  # the defect mask at the pixel threshold, at the map's size (anomalib's users expect one)
            mp = out_dir / f"masks/{name}.png"
            mp.parent.mkdir(exist_ok=True)
            mask = defect_mask(big, pixel_threshold)
            mask.save(outputs.inside(out_dir, mp))
            rec.update(mask_png=str(mp), mask_pixels=int(np.count_nonzero(np.asarray(mask))))
        if maps:
            npy, png = out_dir / f"maps/{name}.npy", out_dir / f"maps/{name}.png"
            np.save(outputs.inside(out_dir, npy), big)
            map_to_png16(big).save(outputs.inside(out_dir, png))
            rec.update(map_npy=str(npy), map_png=str(png), image_size=[w, h], map_size=[mw, mh],
                       map_downscaled=(mw, mh) != (w, h), map_max=float(big.max()))
        if panels:
            pic = panel(load_image(path), np.asarray(amap), name=f"{cls} / {Path(path).name}", score=s, threshold=threshold,
                        threshold_source=source, pixel_threshold=pixel_threshold)
            pp = out_dir / f"panels/{name}.png"
            save_png(pic, outputs.inside(out_dir, pp))  # fast: a panel per image
            rec["panel_png"] = str(pp)
    except KanoError as exc:
        rec = {k: v for k, v in rec.items() if k in KEPT_ON_ERROR}
        rec.update(score=None, anomalous=None, error=str(exc))
    except MemoryError:
        rec = {k: v for k, v in rec.items() if k in KEPT_ON_ERROR}
        rec.update(score=None, anomalous=None, error=f"image {path} is too large to draw in memory")
    return rec


def finish(out_dir: Path, identity: dict, world: int, total: int, batch_size: int, fmt: str, method: dict, image_size_px: int,
            class_name: str | None, word: str | None, threshold: float | None, source: str | None, started: float, merge: bool,
            pixel_threshold: float | None = None) -> dict:
    """Process 0, every part complete: the one result file, the Parquet copy, the counts, the page, the manifest."""
    result = out_dir / records.RESULT
    parts = [out_dir / "parts" / f"rank{r}-of-{world}.jsonl" for r in range(world)]
    if world > 1 and merge:
        records.merge_parts(parts, batch_sizes(total, batch_size), result)
    summary = records.summarize(records.read_rows(result))
    if summary["images"] != total:
        raise KanoError(f"{result} must hold a row for each of the {total} inputs, got {summary['images']}; run the same command again to resume")
    written = [records.RESULT, "index.html", records.SUMMARY]
    if fmt == "parquet":
        records.to_parquet(result, out_dir / records.PARQUET)
        written.append(records.PARQUET)
    first = records.worst_first(records.read_rows(result), MAX_PAGE_ROWS)  # flagged first, by score
    for row in first:
        row["rel"] = {k: str(Path(row[k]).relative_to(out_dir)) for k in ("map_npy", "map_png", "panel_png", "mask_png") if row.get(k)}
    header = {"class": class_name, "class_word": word, "threshold": threshold, "threshold_source": source, "total": total,
              "map_scale": map_scale(pixel_threshold, threshold, "calibration").title, "pixel_threshold": pixel_threshold,
              "summary": summary, "provenance": {**report.provenance(method, image_size_px, started, None), "class_words": {class_name: word}}}
    (out_dir / "index.html").write_text(report.predict_html(first, header))
    (out_dir / records.SUMMARY).write_text(json.dumps(summary, indent=1))
    outputs.write_manifest(out_dir, "predict", json.loads(json.dumps(identity, default=str)), written)
    if world > 1:  # after the manifest says finished: a kill before this point leaves parts a rerun merges again
        for p in parts:
            p.unlink(missing_ok=True)
        if (out_dir / "parts").is_dir() and not any((out_dir / "parts").iterdir()):
            (out_dir / "parts").rmdir()
    return summary
