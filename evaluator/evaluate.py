"""`kano eval`: batched inference per class, exact metrics, reports and overlay images."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from kano.anomaly_data import SampleDataset, load_dataset, load_image, raise_batch_errors
from kano.anomaly_data.names import class_word
from kano.core.errors import KanoError

from . import outputs, report
from .metrics import METRIC_KEYS, all_metrics
from .visualize import panel, save_png


def default_workers() -> int:
    """DataLoader processes when --workers is not given: one per usable core but one (the main process runs
    the model), at most 8; none on two cores or fewer, where a decoding process takes a core from the model
    (measured with bench/bench_eval.py: 0.63x of the model alone with one process) and `run_inference` runs
    the batches in parallel streams instead, each decoding its own (0.87x; 0.71x with a prefetch thread)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores - 1)


def _draw(out_dir: Path, threshold, sample, amap, mask, name: str, score: float, path: Path, source: str | None = None,
          pixel_threshold: float | None = None) -> None:
    pic = panel(load_image(sample.image_path), amap, mask=mask, name=name, score=score, threshold=threshold, label=sample.label,
                threshold_source=source, pixel_threshold=pixel_threshold)
    save_png(pic, outputs.inside(out_dir, path))  # fast: the panels are many, the bytes cheap


def _prefetch(batches, depth: int = 2):
    """Iterate `batches` one step ahead in a thread: with --workers 0 the next batch is decoded (PIL and torch
    release the GIL) while the model runs on this one, without a second process competing for the cores."""
    q: queue.Queue = queue.Queue(depth)
    done = object()
    stop = threading.Event()

    def put(item) -> bool:  # False once the consumer is gone: nothing may block on a queue nobody reads
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill():
        try:
            for b in batches:
                if not put(b):
                    return
        except BaseException as exc:  # raised again in the consumer, where it belongs
            put(exc)
            return
        put(done)

    threading.Thread(target=fill, daemon=True).start()
    try:
        while (b := q.get()) is not done:
            if isinstance(b, BaseException):
                raise b
            yield b
    finally:
        stop.set()


def cpu_streams(device: torch.device, workers: int, n_batches: int, model) -> int:
    """Model streams run side by side on the CPU when images are decoded in this process (workers == 0):
    one per intra-op thread, at most 4 and at most one per batch; 1 on a GPU, with worker processes, or for
    a transductive model (one batch per class). Two single-thread streams on two cores beat one two-thread
    forward (about 1.7x from 1 to 2 threads for a ViT here), and each stream decodes its own next batch on
    its own core instead of a third thread stalling the model's thread team (bench/bench_eval.py)."""
    if device.type != "cpu" or workers or n_batches < 2 or model.transductive:
        return 1
    return max(1, min(torch.get_num_threads(), n_batches, 4))


def in_streams(items: list, streams: int, fn: Callable):
    """Yield fn(item) for `items` in order, `streams` of them at once in threads, under inference mode, each
    thread with its share of torch's intra-op threads (the count is restored afterwards)."""
    threads = torch.get_num_threads()

    def job(item):
        with torch.inference_mode():  # thread-local, like grad mode: each stream enters its own
            return fn(item)

    torch.set_num_threads(max(1, threads // streams))
    pool = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="kano-stream")
    try:
        futures = [pool.submit(job, item) for item in items]  # FIFO: the streams take items 0, 1, then 2, 3, ...
        for f in futures:
            yield f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C or an error: at most the running items finish
        torch.set_num_threads(threads)


def run_inference(model, samples, names: list[str], batch_size: int, device: torch.device, workers: int | None = None,
                  advance: Callable[[int], None] = lambda k: None,
                  errors: dict[int, str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> image scores (N,), maps (N, S, S) float32, masks (N, S, S) uint8, S = the model's image size.

    An unreadable image raises KanoError, unless `errors` is given: then its message is stored there under
    the sample's index, its score is NaN and its map zeros, and the others go on. Images are decoded and
    resized in `workers` processes (None: default_workers()); with 0, on the CPU, in the model's own
    streams (cpu_streams), or, with one stream, one batch ahead in a thread; pinned memory on CUDA."""
    bb = model.backbone
    ds = SampleDataset(samples, bb.image_size, bb.mean, bb.std)
    workers = default_workers() if workers is None else workers
    if workers < 0:
        raise KanoError(f"workers must be >= 0, got {workers}")
    n_batches = -(-len(ds) // batch_size)
    workers = min(workers, n_batches)  # no more processes than batches

    def step(batch: dict) -> tuple:
        if errors is None:
            raise_batch_errors(batch)
        res = model(batch["image"].to(device, non_blocking=True), [names[i] for i in batch["index"].tolist()]).inference()
        # float32 already (the heads run in full precision); the image tensor is dropped here, not carried along
        return batch["index"].tolist(), batch["error"], batch["mask"].to(torch.uint8), res.image_score.float().cpu(), res.anomaly_map.float().cpu()

    streams = cpu_streams(device, workers, n_batches, model)
    if streams > 1:
        chunks = [range(i, min(i + batch_size, len(ds))) for i in range(0, len(ds), batch_size)]
        outs = in_streams(chunks, streams, lambda ix: step(default_collate([ds[i] for i in ix])))  # each stream decodes its own
    else:
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=device.type == "cuda",
                            persistent_workers=False)
        outs = (step(b) for b in (loader if workers else _prefetch(loader)))
    scores, maps, masks = [], [], []
    # KAnoCLIP.forward runs the backbone in `backbone_autocast` (the precision the training cache used) and
    # everything after it in float32, so no autocast here
    with torch.inference_mode(), contextlib.closing(outs):
        for index, errs, mk, sc, mp in outs:
            if errors is not None:
                for j, (i, e) in enumerate(zip(index, errs)):
                    if e:
                        errors[i] = e
                        sc[j] = float("nan")
                        mp[j] = 0.0
            scores.append(sc)
            maps.append(mp)
            masks.append(mk)
            advance(len(index))
    return torch.cat(scores), torch.cat(maps), torch.cat(masks)


def gather(dist, obj) -> list:
    """[obj of process 0, obj of process 1, ...] on every process of `dist`; a process that died fails the job
    with a KanoError instead of the backend's error."""
    try:
        return dist.gather(obj)
    except RuntimeError as exc:  # gloo/NCCL: a peer's connection closed (killed, out of memory)
        raise KanoError(f"a process of this {dist.world}-process job stopped before finishing its share ({exc}); "
                        "run the same launch again (kano predict continues where its rows end)") from None


def sharded_inference(dist, model, samples, names: list[str], batch_size: int, device: torch.device, workers: int | None,
                      advance: Callable[[int], None] = lambda k: None,
                      errors: dict[int, str] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """run_inference over several processes: batch k of `samples` runs on process k % world, so each batch holds
    the same images as in one process (the same bits on the CPU at the same thread count); every process gets
    all results, in the order of `samples`: scores (N,), maps (N, S, S), masks (N, S, S). errors: as run_inference's,
    under the indices of `samples`, gathered from every process."""
    starts = list(range(0, len(samples), batch_size))
    mine = [i for k, s0 in enumerate(starts) if k % dist.world == dist.rank for i in range(s0, min(s0 + batch_size, len(samples)))]
    local: dict[int, str] | None = None if errors is None else {}
    if mine:
        part = run_inference(model, [samples[i] for i in mine], [names[i] for i in mine], batch_size, device, workers, advance,
                             errors=local)
    else:
        size = model.backbone.image_size
        part = (torch.empty(0), torch.empty(0, size, size), torch.empty(0, size, size, dtype=torch.uint8))
    parts = gather(dist, (*part, {mine[j]: e for j, e in (local or {}).items()}))
    if errors is not None:
        for p in parts:
            errors.update(p[3])
    offset = [0] * dist.world
    pieces: list[list[torch.Tensor]] = [[], [], []]
    for k, s0 in enumerate(starts):
        r, n = k % dist.world, min(batch_size, len(samples) - s0)
        for j in range(3):
            pieces[j].append(parts[r][j][offset[r]:offset[r] + n])
        offset[r] += n
    return tuple(torch.cat(p) for p in pieces)


@dataclass
class Evaluation:
    """What one evaluation holds between its steps (evaluate's orchestration, below)."""

    scorer: object  # an evaluator.inference.Inferencer: the torch model's Detector or an exported graph
    data: str
    out_dir: Path
    device: torch.device
    dataset: object
    classes: list[str]
    samples: list
    names_map: dict[str, str]  # class -> the word its prompts use
    thresholds: dict[str, tuple]  # class -> (threshold or None, source)
    pixel_thresholds: dict[str, float | None]
    identity: dict  # what the output folder is claimed for (evaluator.outputs)
    dist: object = None
    started: float = 0.0
    method: dict = field(default_factory=dict)
    overlay_names: dict[int, str] = field(default_factory=dict)  # id(sample) -> its unique overlay file stem
    per_class: dict[str, dict] = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    unreadable: list[dict] = field(default_factory=list)
    written: list[str] = field(default_factory=list)

    @property
    def world(self) -> int:
        return self.dist.world if self.dist is not None else 1

    @property
    def main(self) -> bool:
        return self.world == 1 or self.dist.rank == 0

    @property
    def image_size(self) -> int:
        return self.scorer.image_size


def evaluate(model, data: str, out_dir: Path, classes: list[str] | None = None, batch_size: int = 8, workers: int | None = None,
             device: torch.device | None = None, prompt_names: dict | None = None, n_overlays: int = 6,
             progress: Callable | None = None, *, method: dict | None = None, threshold: float | None = None,
             force: bool = False, allow_missing_masks: bool = False, threshold_source: str | None = None,
             threshold_for: Callable[[str], tuple] | None = None, class_words: dict[str, str] | None = None,
             strict: bool = False, dist=None, scored: dict | None = None,
             pixel_threshold_for: Callable[[str], float | None] | None = None, class_names: dict[str, str] | None = None) -> dict:
    """Evaluate `model` on KIND:PATH; writes metrics.json/.csv/.md, scores.csv, report.html and overlays/ into out_dir
    (see evaluator.outputs for when an existing out_dir is accepted). Returns the metrics dict.

    method: the method description recorded in the provenance (evaluator.report); default: the model's
    backbone as an unnamed model. threshold: the decision threshold shown in titles and histograms (None: no
    decision), recorded with `threshold_source` ("command line", "calibration", "run"); threshold_for: class ->
    (threshold, source), when thresholds differ per class (calibration); pixel_threshold_for: class -> the
    calibration's pixel threshold or None (the gallery's colour scale, evaluator.visualize). class_words: explicit prompt words
    {class: word} (anomaly_data.names.class_word's rule fills the rest from prompt_names). strict: an
    unreadable image is an error; otherwise it is recorded, counted and left out of the metrics.
    n_overlays: gallery images per class. A model with `transductive = True` gets each class's
    whole test set as one batch. allow_missing_masks: an anomalous image without a mask (its
    class having masks) warns instead of failing. dist: the launch's processes (kano.core.distributed.Dist or
    anything with rank, world, gather and broadcast): each scores its share of every class's batches
    (sharded_inference), process 0 computes the metrics on all of them and writes the files; every process
    returns the metrics. scored: a dict that receives {class: (samples, image scores (N,), maps (N, S, S), masks
    (N, S, S))}, as evaluator.compare.score_classes gives them, so that a caller comparing methods need not score
    this one again. class_names: {FOLDER: NAME} for class folders evaluated under another name (`--class`).

    model: a torch model (scored through evaluator.detector.Detector: run_inference's loaders, streams and
    sharding) or any evaluator.inference.Inferencer, e.g. an exported graph (deploy.runtime.ExportedModel: one
    process, its own classes only, each refused by name before anything is written)."""
    started = time.time()
    ev = _prepare(_scorer(model, method, device, workers), data, out_dir, classes, prompt_names, n_overlays, method, threshold,
                  allow_missing_masks, threshold_source, threshold_for, class_words, dist, pixel_threshold_for, class_names)
    ev.started = started
    _claim(ev, force)
    advance, close = progress(len(ev.samples)) if progress and ev.main else (lambda k: None, lambda: None)
    pool = ThreadPoolExecutor(max_workers=2)  # two panels at once: PIL, zlib and numpy release the GIL
    drawing: list = []
    try:
        for cls in ev.classes:
            scored_class = _score_class(ev, cls, batch_size, strict, advance)
            if scored_class is None:
                continue
            if scored is not None:
                scored[cls] = scored_class
            drawing += _draw_gallery(ev, cls, *scored_class, n_overlays, pool)
            _class_metrics(ev, cls, *scored_class)
        for f in drawing:
            f.result()  # an error drawing a panel is raised here
    finally:
        pool.shutdown(wait=True)
        close()
    if not ev.main:
        return dist.broadcast(None)
    result = _result(ev)
    ev.written += report.write_reports(result, ev.out_dir, ev.details)
    outputs.write_manifest(ev.out_dir, "eval", ev.identity, ev.written)
    return dist.broadcast(result) if ev.world > 1 else result


def _scorer(model, method: dict | None, device, workers: int | None):
    """`model` as the Inferencer eval asks for scores: an Inferencer as it is, a torch model in a Detector that
    scores with run_inference on `device` with `workers` loader processes (None: default_workers())."""
    if hasattr(model, "score_samples"):
        return model
    from .detector import Detector

    det = Detector(model, method or {"kind": "model", "name": type(model).__name__, "backbone": model.backbone.spec},
                   device=device or model.backbone.device)
    det.workers = workers
    return det


def _prepare(scorer, data, out_dir, classes, prompt_names, n_overlays, method, threshold, allow_missing_masks,
             threshold_source, threshold_for, class_words, dist, pixel_threshold_for, class_names) -> Evaluation:
    """Check the arguments, read the data, and settle each class's prompt word and thresholds and the identity the
    output folder is claimed for: everything that can be refused is refused here, before a file is written."""
    device = getattr(scorer, "device", None) or torch.device("cpu")  # an exported graph runs on the CPU
    if n_overlays < 0:
        raise KanoError(f"n_overlays must be >= 0, got {n_overlays}")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise KanoError(f"threshold must be in [0, 1], got {threshold}")
    method = method or scorer.describe()
    dataset = load_dataset(data, missing_masks="warn" if allow_missing_masks else "error")
    if class_names:
        dataset = dataset.renamed(class_names)
    classes, samples = dataset.split_classes("test", classes)
    if not samples:
        raise KanoError(f"{data} must hold test images for {', '.join(classes)}, got none")
    for c in classes:  # an exported graph scores the classes it was exported for only
        try:
            scorer.check_class(c)
        except KanoError as exc:
            raise KanoError(f"{data} holds class {c!r}, which this model cannot score: {exc}") from None
    if scorer.transductive:  # checked before anything is written: each image is scored against the others
        counts = {c: sum(s.class_name == c for s in samples) for c in classes}
        few = {c: k for c, k in counts.items() if k < 2}
        if few:
            raise KanoError("each class must hold at least 2 test images for a transductive method (it scores every test image "
                            f"against the others), got {', '.join(f'{k} in {c}' for c, k in few.items())}")
    unknown = sorted(set(class_words or {}) - set(classes))
    if unknown:
        raise KanoError(f"--class-word names must be evaluated classes ({', '.join(classes)}), got {', '.join(unknown)}")
    names_map = {c: class_word(c, (class_words or {}).get(c), prompt_names) for c in classes}
    thresholds = {c: threshold_for(c) if threshold_for else (threshold, None if threshold is None else threshold_source)
                  for c in classes}
    pixel_thresholds = {c: pixel_threshold_for(c) if pixel_threshold_for else None for c in classes}
    identity = {"method": method, "data": f"{dataset.kind}:{Path(dataset.root).resolve() if dataset.kind != 'hf' else dataset.root}",
                "classes": list(classes), "image_size": scorer.image_size, "class_words": names_map,
                "thresholds": {c: {"threshold": t, "source": src} for c, (t, src) in thresholds.items()}}
    return Evaluation(scorer, data, Path(out_dir), device, dataset, classes, samples, names_map, thresholds, pixel_thresholds,
                      identity, dist, method=method,
                      details={"threshold": threshold, "threshold_source": threshold_source, "classes": {}, "gallery": []})


def _claim(ev: Evaluation, force: bool) -> None:
    """Process 0 claims the output folder (evaluator.outputs); a refusal stops every process with the same message.
    Overlay names from data (class, defect, stem) are sanitised and made unique over the whole run, so that no
    file lands outside out_dir and no two images share one overlay."""
    failed = None
    if ev.main:
        try:
            outputs.claim(ev.out_dir, "eval", ev.identity, force)
            (ev.out_dir / "overlays").mkdir(exist_ok=True)
        except KanoError as exc:
            failed = str(exc)
    if ev.world > 1:
        failed = ev.dist.broadcast(failed)
    if failed:
        raise KanoError(failed)
    ev.overlay_names = dict(zip((id(s) for s in ev.samples), outputs.unique_names(
        [[f"{s.class_name}_{s.defect}_{Path(s.image_path).stem}", *reversed(Path(s.image_path).parent.parts[-3:])]
         for s in ev.samples])))


def _score_class(ev: Evaluation, cls: str, batch_size: int, strict: bool, advance: Callable):
    """Score one class's test images (over every process when sharded) -> (samples, image scores (N,), maps
    (N, S, S), masks (N, S, S)) on process 0, its unreadable images recorded and left out; None on the other
    processes, or when no image of the class could be read."""
    scorer = ev.scorer
    cs = [s for s in ev.samples if s.class_name == cls]
    bs = max(1, len(cs)) if scorer.transductive else batch_size
    scorer.begin_class(cls, ev.names_map[cls])  # per-class state, e.g. WinCLIP+'s reference images
    errors: dict[int, str] = {}
    words = [ev.names_map[cls]] * len(cs)
    if ev.main or (ev.world > 1 and not scorer.transductive):  # a transductive method scores a class as one batch: process 0 alone
        scored = scorer.score_samples(cs, words, bs, advance, None if strict else errors,
                                      dist=ev.dist if ev.world > 1 and not scorer.transductive else None)
        scores, maps, masks = (torch.as_tensor(x) for x in scored)  # a graph's numpy arrays: the metrics take tensors
    if not ev.main:
        return None
    if errors:  # recorded and counted, left out of the metrics: one bad file does not stop the evaluation
        ev.unreadable += [{"class": cls, "image": cs[i].image_path, "error": e} for i, e in sorted(errors.items())]
        keep = [i for i in range(len(cs)) if i not in errors]
        cs, scores, maps, masks = [cs[i] for i in keep], scores[keep], maps[keep], masks[keep]
        if not cs:
            return None
    return cs, scores, maps, masks


def _draw_gallery(ev: Evaluation, cls: str, cs: list, scores: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor,
                  n_overlays: int, pool: ThreadPoolExecutor) -> list:
    """Submit the class's gallery panels to `pool` (drawn while the metrics are computed: PIL, zlib and numpy's
    sort release the GIL; the panels need only the scores) and record them. -> the futures."""
    thr, src = ev.thresholds[cls]
    with_masks = ev.dataset.has_masks(cls)
    labels = [s.label for s in cs]
    futures = []
    for i, reason in report.select_gallery(labels, scores.tolist(), thr, n_overlays):
        s = cs[i]
        rel = f"overlays/{ev.overlay_names[id(s)]}.png"
        futures.append(pool.submit(_draw, ev.out_dir, thr, s, maps[i].numpy().copy(), masks[i].numpy().copy() if with_masks else None,
                                   f"{cls} / {s.defect} / {Path(s.image_path).name}", float(scores[i]), ev.out_dir / rel, src,
                                   ev.pixel_thresholds.get(cls)))
        ev.written.append(rel)
        ev.details["gallery"].append({"class": cls, "file": rel, "reason": reason, "image": Path(s.image_path).name,
                                      "score": float(scores[i]), "label": s.label})
    return futures


def _class_metrics(ev: Evaluation, cls: str, cs: list, scores: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor) -> None:
    """The class's metrics (on the GPU when there is one) and its row of the report's details."""
    thr, src = ev.thresholds[cls]
    labels = torch.tensor([s.label for s in cs])
    with_masks = ev.dataset.has_masks(cls)
    mdev = ev.device if ev.device.type == "cuda" else torch.device("cpu")
    m = ev.per_class[cls] = all_metrics(labels, scores, masks.to(mdev) if with_masks else None, maps.to(mdev) if with_masks else None)
    m["n_images"] = len(cs)
    m["n_anomalous"] = int(labels.sum())
    m.update(class_word=ev.names_map[cls], threshold=thr, threshold_source=src)
    ev.details["classes"][cls] = {"threshold": thr, "threshold_source": src, "class_word": ev.names_map[cls], "labels": labels.tolist(),
                                  "scores": scores.tolist(), "defects": [s.defect for s in cs], "images": [s.image_path for s in cs]}


def _result(ev: Evaluation) -> dict:
    """The metrics dict evaluate returns and the reports hold: per class, their means, the unreadable images, provenance."""
    mean = {}
    for k in METRIC_KEYS:
        vals = [m[k] for m in ev.per_class.values() if m[k] is not None]
        mean[k] = float(np.mean(vals)) if vals else None
    if not ev.per_class:
        raise KanoError(f"{ev.data} must hold readable test images, got none readable: {ev.unreadable[0]['error']}")
    ev.details["unreadable"] = ev.unreadable
    return {"dataset": ev.data, "classes": ev.per_class, "mean": mean, "unreadable": ev.unreadable,
            "provenance": {**report.provenance(ev.method, ev.image_size, ev.started, ev.data),
                           "class_words": ev.names_map}}


write_reports = report.write_reports
table_rows = report.table_rows
