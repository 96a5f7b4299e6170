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

The scorer is any evaluator.inference.Inferencer: the torch model (evaluator.detector.Detector, `--run`,
`--backbone`, `--method`) or the exported graph (deploy.runtime.ExportedModel, `--model`); this module imports no
torch, so the graph's path stays torch-free.

Several processes (`torchrun` / `accelerate launch`, `dist` given): batch k of the inputs goes to process
k % world (evaluator.stream); each appends its rows to OUT/parts/rankR-of-W.jsonl, and process 0 merges
the parts into predictions.jsonl, the rows a single process writes, in the same order.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kano.core.errors import KanoError

from . import outputs, records
from .inference import Inferencer
from .predict_files import finish as _finish
from .predict_files import row as _row
from .stream import iter_inputs, shard_batches, shard_size

FORMATS = ("jsonl", "parquet")


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
    from .evaluate import gather  # several processes: torch.distributed, so torch is there

    got = gather(dist, failed)
    bad = [f"process {r}: {e}" for r, e in enumerate(got) if e]
    if bad:
        raise KanoError("; ".join(bad))


@dataclass
class Job:
    """What one `kano predict` holds between its steps (predict below): the options, then what each step finds."""

    scorer: Inferencer
    inputs: list[str]
    class_name: str | None
    out_dir: Path
    batch_size: int
    maps: bool
    panels: bool
    fmt: str
    force: bool
    resume: bool
    dist: object
    progress: Callable | None
    same_threshold: bool
    word: str | None = None
    started: float = field(default_factory=time.time)
    world: int = 1
    rank: int = 0
    total: int = 0
    rules: dict = field(default_factory=dict)  # class -> (word, threshold, source, pixel threshold)
    identity: dict = field(default_factory=dict)
    state: str | None = None
    names: list | None = None
    classes: set = field(default_factory=set)  # the classes the inputs name

    @property
    def part(self) -> Path:
        """The file this process appends its rows to."""
        return self.out_dir / (records.RESULT if self.world == 1 else f"parts/rank{self.rank}-of-{self.world}.jsonl")

    def rule(self, cls: str) -> tuple:
        """(word, threshold, source, pixel threshold) of `cls`: the scorer's, once per class; with same_threshold,
        every class decides by the class given on the command line (a run's threshold is set on its class)."""
        if cls not in self.rules:
            word = self.word if cls == self.class_name and self.word else self.scorer.class_word(cls)
            if self.same_threshold and self.class_name is not None and cls != self.class_name:
                decide = self.rule(self.class_name)[1:]
            else:
                decide = (*self.scorer.threshold_for(cls, word), self.scorer.pixel_threshold_for(cls, word)[0])
            self.rules[cls] = (word, *decide)
        return self.rules[cls]


def predict(scorer: Inferencer, inputs: list[str], class_name: str | None, out_dir: Path, *, class_word: str | None = None,
            batch_size: int = 8, progress: Callable | None = None, force: bool = False, maps: bool = True, panels: bool = True,
            fmt: str = "jsonl", resume: bool = False, dist=None, same_threshold: bool = False) -> records.ResultRows:
    """Score images with `scorer`; writes the files listed in the module docstring; returns the rows (read from the
    result file when asked, with `.summary`, the counts). class_name: the class of inputs that name none (a
    manifest's `class` column names its own); class_word: its prompt word (None: the scorer's rule; every other
    class has the rule's); the thresholds are the scorer's for each class (evaluator.inference), or, with
    same_threshold, the given class's for all. dist: the launch's processes (kano.core.distributed.Dist or anything
    with rank, world, gather and broadcast); None: this process alone."""
    job = Job(scorer, list(inputs), class_name, Path(out_dir), batch_size, maps, panels, fmt, force, resume, dist, progress,
              same_threshold, class_word)
    check(job)
    describe(job)
    claim(job)
    name_outputs(job)
    _sync(dist, score_rows(job) if job.state != "done" else None)
    return finish(job)


def check(job: Job) -> None:
    """Options and every input's form checked before anything is written: the count, each input's class."""
    if job.batch_size < 1:
        raise KanoError(f"batch size must be an integer >= 1, got {job.batch_size}")
    if job.fmt not in FORMATS:
        raise KanoError(f"format must be one of {', '.join(FORMATS)}, got {job.fmt!r}")
    job.world, job.rank = (job.dist.world, job.dist.rank) if job.dist is not None else (1, 0)
    if job.class_name is not None:  # its word and thresholds are recorded even when every input names its own class
        job.scorer.check_class(job.class_name)
        job.classes.add(job.class_name)
    for path, cls in iter_inputs(job.inputs):  # one pass: the count, and every input's class
        if cls is None and job.class_name is None:
            raise KanoError(f"input {path} must have a class: give --class, or a 'class' column in its manifest")
        if (cls or job.class_name) not in job.classes:
            job.scorer.check_class(cls or job.class_name)
            job.classes.add(cls or job.class_name)
        job.total += 1
    if job.total == 0:
        raise KanoError("predict needs at least one image or folder, got none")


def describe(job: Job) -> None:
    """The class's word and thresholds, and the identity a rerun must repeat to continue this run."""
    word, threshold, source, pixel = job.rule(job.class_name) if job.class_name else (None, None, None, None)
    job.identity = {"method": job.scorer.describe(), "class": job.class_name, "class_word": word, "threshold": threshold,
                    "threshold_source": source, "pixel_threshold": pixel, "inputs": [str(Path(x).resolve()) for x in job.inputs],
                    "image_size": job.scorer.image_size, "maps": job.maps, "panels": job.panels, "format": job.fmt}
    if job.world > 1:  # the parts' layout depends on both
        job.identity.update(processes=job.world, batch_size=job.batch_size)


def claim(job: Job) -> None:
    """Process 0 claims OUT (new, continue or done: _claim), and every process learns the outcome."""
    state, failed = None, None
    if job.rank == 0:
        try:
            state = _claim(job.out_dir, job.identity, job.force, job.resume)
        except KanoError as exc:
            failed = str(exc)
    state, failed = job.dist.broadcast((state, failed)) if job.world > 1 else (state, failed)
    if failed:
        raise KanoError(failed)
    job.state = state


def name_outputs(job: Job) -> None:
    """The per-image files' folders and unique names (only they need every input's path: held only when maps,
    panels or masks may be written; a mask needs a class with a pixel threshold)."""
    if not (job.maps or job.panels or any(job.rule(c)[3] is not None for c in sorted(job.classes))):
        return
    for sub, wanted in (("maps", job.maps), ("panels", job.panels)):
        if wanted:
            (job.out_dir / sub).mkdir(exist_ok=True)
    job.names = outputs.unique_names([[Path(p).stem, *reversed(Path(p).resolve().parent.parts[-4:])] for p, _ in iter_inputs(job.inputs)])


def score_rows(job: Job) -> str | None:
    """Score this process's batches after the rows already written, a round at a time, and append their rows.
    -> None, or, with several processes, this one's failure (the others learn it in _sync)."""
    part, bs = job.part, job.batch_size
    part.parent.mkdir(parents=True, exist_ok=True)
    # whole batches only: the images of a batch cut short are scored again in the same batch as before, so the
    # rows are the bits an uninterrupted run writes (a batch's composition moves the last bits of its scores)
    done = records.repair(part) // bs * bs
    if part.exists():
        records.keep_rows(part, done)
    todo = shard_size(job.total, bs, job.world, job.rank) - done
    advance, close = job.progress(todo) if job.progress and job.rank == 0 else (lambda k: None, lambda: None)
    try:
        with records.RowWriter(part) as writer:
            batches = _skip_done(shard_batches(iter_inputs(job.inputs), bs, job.world, job.rank), part, done)
            for group in _rounds(batches, job.scorer.batches_per_round(), bs):
                writer.append(score_round(job, [it for b in group for it in b], advance))
    except KanoError as exc:
        if job.world == 1:
            raise
        return str(exc)
    finally:
        close()
    return None


def score_round(job: Job, items: list, advance: Callable[[int], None]) -> list[dict]:
    """One round's images ((global index, (path, class or None)) each) scored -> their rows, in order."""
    classes = [cls or job.class_name for _, (_, cls) in items]
    rules = [job.rule(c) for c in classes]
    errors: dict[int, str] = {}
    scores, maps = job.scorer.score_files([p for _, (p, _) in items], classes, [r[0] for r in rules], job.batch_size, advance, errors)
    return [_row(job.out_dir, p, c, word, job.names[gi] if job.names else None, scores[j], maps[j], errors.get(j), t, src,
                 job.maps, job.panels, pixel)
            for j, ((gi, (p, _)), c, (word, t, src, pixel)) in enumerate(zip(items, classes, rules))]


def finish(job: Job) -> records.ResultRows:
    """Process 0 merges the parts and writes the counts, the page and the manifest; every process gets the rows."""
    summary, failed = None, None
    if job.rank == 0:
        ident = job.identity
        try:
            summary = _finish(job.out_dir, ident, job.world, job.total, job.batch_size, job.fmt, ident["method"], job.scorer.image_size,
                              job.class_name, ident["class_word"], ident["threshold"], ident["threshold_source"], job.started,
                              merge=job.state != "done", pixel_threshold=ident["pixel_threshold"])
        except KanoError as exc:
            failed = str(exc)
    if job.world > 1:
        summary, failed = job.dist.broadcast((summary, failed))
    if failed:
        raise KanoError(failed)
    rows = records.ResultRows(job.out_dir / records.RESULT)
    rows.summary = summary
    return rows
