"""`kano predict`: score new images as a stream. Per image: a decision, and on request a labelled panel and the raw map.

Inputs (evaluator.stream): image files, folders, glob patterns, text files of paths, CSV/Parquet manifests
with a `path` column (and optionally `class`), read as they go. Images are scored in batches and each
batch's rows are appended to the result file at once, flushed and fsync'ed (evaluator.records), so memory
stays flat however many images there are, and a kill loses at most the batches in flight (one per CPU
stream). Running the same command again (or with --resume) continues after the last whole batch: the rows
already written are checked against the inputs (same images, same order), the rows of a batch cut short are
dropped and scored again with it, so none is scored twice or skipped and the rows are those of a run that was
never interrupted.

Files in OUT (see evaluator.outputs for when an existing OUT is accepted):
- predictions.jsonl: one row per input image, in input order (an unreadable or missing image gets a row
  with "error" and no score; the others go on);
- predictions.parquet (format "parquet"): the same rows' main columns (records.PARQUET_COLUMNS);
- summary.json: counts (images, scored, errors, anomalous, normal);
- panels/NAME.png (panels on): image | map | map over image, colour bar, score, threshold and decision, and the
  colour scale in words (relative to the calibration's pixel threshold; evaluator.visualize);
- masks/NAME.png: for each flagged image when the calibration gives a pixel threshold (a normal float), the
  binary defect mask (255 where the map is >= the pixel threshold, else 0) at the map's size (below);
- maps/NAME.npy (float32) and maps/NAME.png (16-bit grey, 65535 = 1.0) (maps on): the map at the image's
  own size, or, for images larger than MAX_MAP_SIDE on their long side, downscaled to MAX_MAP_SIDE (the
  row says so: "map_downscaled": true, "map_size" vs "image_size");
- index.html: a page of the first MAX_PAGE_ROWS rows and the counts.
NAME is the file's stem, sanitised; inputs with the same stem get their parent folders' names too
(a/x/001.png -> a_x_001 beside b/x/001.png -> b_x_001), so no two rows share a file. Making names unique
needs every input's path, so with maps or panels the paths (only they) are held in memory.

Several processes (`torchrun` / `accelerate launch`, `dist` given): batch k of the inputs goes to process
k % world (evaluator.stream); each appends its rows to OUT/parts/rankR-of-W.jsonl, and process 0 merges
the parts into predictions.jsonl, the rows a single process writes, in the same order.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from kano.anomaly_data import Sample
from kano.anomaly_data.names import class_word
from kano.core.errors import KanoError

from . import outputs, records
from .evaluate import cpu_streams, gather, run_inference
from .predict_files import finish as _finish
from .predict_files import row as _row
from .stream import iter_inputs, shard_batches, shard_size

FORMATS = ("jsonl", "parquet")
# batches per write on a GPU or with DataLoader workers: enough to keep the loader's prefetch busy and to
# amortise its start; on the CPU in-process a write holds one batch per stream (evaluate.cpu_streams)
GPU_ROUND = 8


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _claim(out_dir: Path, identity: dict, force: bool, resume: bool) -> str:
    """'new' (OUT claimed, empty), 'continue' (an interrupted run of this identity) or 'done' (a finished one)."""
    ident = json.loads(json.dumps(identity, default=str))
    old = outputs.read_manifest(out_dir)
    same = old is not None and old.get("command") == "predict" and old.get("identity") == ident
    if same and not force:
        return "done" if old.get("finished") else "continue"
    if resume and not force:
        if not old:
            raise KanoError(f"--resume needs --out {out_dir} to hold an interrupted kano predict, got "
                            f"{'no such folder' if not out_dir.exists() else 'no record of one'}")
        if old.get("command") != "predict":
            raise KanoError(f"--resume needs --out {out_dir} to hold an interrupted kano predict, got the results of kano {old.get('command')}")
        raise KanoError(f"--resume must repeat the options of the run in {out_dir}, got different: "
                        f"{', '.join(_differences(old.get('identity') or {}, ident))}; give them as before, or --force to start over")
    outputs.claim(out_dir, "predict", identity, force)
    return "new"


def _skip_done(batches, part: Path, done: int):
    """The batches left after the `done` rows already in `part`, checking that those rows are these inputs."""
    rows = records.read_rows(part) if done else iter(())
    checked = 0
    for batch in batches:
        if checked < done:
            keep = []
            for gi, (path, cls) in batch:
                if checked < done:
                    row = next(rows)
                    if row.get("image") != path:
                        raise KanoError(f"the inputs must be the ones of the interrupted run in {part.parent}, got another image at "
                                        f"row {checked + 1} ({path}, was {row.get('image')}); pass --force to start over")
                    checked += 1
                else:
                    keep.append((gi, (path, cls)))
            if keep:
                yield keep
        else:
            yield batch


def _rounds(batches, per_round: int, batch_size: int):
    """Groups of batches scored and written together; a short batch (after a resume, or the last) ends its group
    so that run_inference cuts the group into the same batches."""
    group: list = []
    for b in batches:
        if group and len(group[0]) != batch_size:
            yield group
            group = []
        group.append(b)
        if len(group) == per_round or len(b) != batch_size:
            yield group
            group = []
    if group:
        yield group


def _sync(dist, failed: str | None) -> None:
    """Every process's outcome to all; a process that died or failed fails the job, its finished rows kept."""
    if dist is None or dist.world == 1:
        if failed:
            raise KanoError(failed)
        return
    got = gather(dist, failed)
    bad = [f"process {r}: {e}" for r, e in enumerate(got) if e]
    if bad:
        raise KanoError("; ".join(bad))


def predict(model, inputs: list[str], class_name: str | None, out_dir: Path, threshold: float | None, batch_size: int = 8,
            device: torch.device | None = None, prompt: str | None = None, progress: Callable | None = None, *,
            method: dict | None = None, force: bool = False, workers: int = 0, maps: bool = True, panels: bool = True,
            fmt: str = "jsonl", resume: bool = False, dist=None, prompts: dict | None = None,
            threshold_source: str | None = None, pixel_threshold: float | None = None) -> records.ResultRows:
    """Score images; writes the files listed in the module docstring; returns the rows (read from the result
    file when asked, with `.summary`, the counts). class_name: the class of inputs that name none (a
    manifest's `class` column names its own); prompt: its class word (None: anomaly_data.names.class_word's
    rule); prompts: class -> class word for a manifest's other classes (the rule fills the rest); their
    decisions use `threshold` too. threshold_source: where `threshold` came from ("command line",
    "calibration", "run"), recorded beside it; pixel_threshold: the calibration's, the panels' colour scale
    and the masks' cut (None: absolute scale, no masks). dist: the launch's processes (kano.core.distributed.Dist or
    anything with rank, world, gather and broadcast); None: this process alone."""
    started = time.time()
    device = device or model.backbone.device
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise KanoError(f"threshold must be in [0, 1], got {threshold}")
    if fmt not in FORMATS:
        raise KanoError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    world, rank = (dist.world, dist.rank) if dist is not None else (1, 0)
    out_dir = Path(out_dir)
    total = 0
    for path, cls in iter_inputs(inputs):  # one pass: the count, and every input's form checked before anything is written
        if cls is None and class_name is None:
            raise KanoError(f"input {path} must have a class: give --class, or a 'class' column in its manifest")
        total += 1
    if total == 0:
        raise KanoError("predict needs at least one image or folder, got none")
    method = method or {"kind": "model", "name": type(model).__name__, "backbone": model.backbone.spec}
    word = prompt or (class_word(class_name, None, prompts) if class_name else None)
    identity = {"method": method, "class": class_name, "class_word": word, "threshold": threshold, "threshold_source": threshold_source,
                "pixel_threshold": pixel_threshold,
                "inputs": [str(Path(x).resolve()) for x in inputs],
                "image_size": model.backbone.image_size, "maps": maps, "panels": panels, "format": fmt}
    if world > 1:  # the parts' layout depends on both
        identity.update(processes=world, batch_size=batch_size)
    state, failed = None, None
    if rank == 0:
        try:
            state = _claim(out_dir, identity, force, resume)
        except KanoError as exc:
            failed = str(exc)
    state, failed = dist.broadcast((state, failed)) if world > 1 else (state, failed)
    if failed:
        raise KanoError(failed)
    result = out_dir / records.RESULT
    part = result if world == 1 else out_dir / "parts" / f"rank{rank}-of-{world}.jsonl"
    names = None
    if maps or panels:
        for sub, wanted in (("maps", maps), ("panels", panels)):
            if wanted:
                (out_dir / sub).mkdir(exist_ok=True)
        names = outputs.unique_names([[Path(p).stem, *reversed(Path(p).resolve().parent.parts[-4:])] for p, _ in iter_inputs(inputs)])
    failed = None
    if state != "done":
        part.parent.mkdir(parents=True, exist_ok=True)
        # whole batches only: the images of a batch cut short are scored again in the same batch as before, so the
        # rows are the bits an uninterrupted run writes (a batch's composition moves the last bits of its scores)
        done = records.repair(part) // batch_size * batch_size
        if part.exists():
            records.keep_rows(part, done)
        todo = shard_size(total, batch_size, world, rank) - done
        streams = cpu_streams(device, workers, 4, model)
        per_round = GPU_ROUND if (device.type != "cpu" or workers) else streams
        advance, close = progress(todo) if progress and rank == 0 else (lambda k: None, lambda: None)
        try:
            with records.RowWriter(part) as writer:
                batches = _skip_done(shard_batches(iter_inputs(inputs), batch_size, world, rank), part, done)
                for group in _rounds(batches, per_round, batch_size):
                    items = [it for b in group for it in b]
                    classes = [cls or class_name for _, (_, cls) in items]
                    samples = [Sample(str(Path(p).resolve()), None, c, "unknown", 0) for (_, (p, _)), c in zip(items, classes)]
                    words = [word if c == class_name else class_word(c, None, prompts) for c in classes]
                    errors: dict[int, str] = {}
                    scores, amaps, _ = run_inference(model, samples, words, batch_size, device, workers, advance, errors=errors)
                    writer.append(_row(out_dir, p, c, w, names[gi] if names else None, scores[j], amaps[j], errors.get(j), threshold,
                                       threshold_source, maps, panels, pixel_threshold)
                                  for j, ((gi, (p, _)), c, w) in enumerate(zip(items, classes, words)))
        except KanoError as exc:
            if world == 1:
                raise
            failed = str(exc)
        finally:
            close()
    _sync(dist, failed)
    summary, failed = None, None
    if rank == 0:
        try:
            summary = _finish(out_dir, identity, world, total, batch_size, fmt, method, model.backbone.image_size, class_name,
                              word, threshold, threshold_source, started, merge=state != "done", pixel_threshold=pixel_threshold)
        except KanoError as exc:
            failed = str(exc)
    if world > 1:
        summary, failed = dist.broadcast((summary, failed))
    if failed:
        raise KanoError(failed)
    rows = records.ResultRows(result)
    rows.summary = summary
    return rows
