"""One inference interface under `kano predict` (its one streaming loop, evaluator.predict), `kano serve` and
`kano.Detector`: load, preprocess, score a batch, postprocess (the steps of anomalib's Inferencer).

Two scorers implement it: the torch model (evaluator.detector.Detector: a run, the untrained model or a per-image
method) and the exported graph (deploy.runtime.ExportedModel: ONNX or OpenVINO, no torch). The front ends ask
only what is declared here, so a result does not depend on which front end asked for it.

No torch here (the exported graph's path imports none: tests/test_runtime.py): numpy, Pillow and the image
reader.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from kano.core.errors import KanoError

from .records import decision

# batches scored per written round of `kano predict` when the scorer does not say otherwise: enough to keep a
# decoder thread or a loader's prefetch busy; a kill loses at most one round
ROUND = 8


@dataclass(frozen=True)
class Result:
    """One image's verdict.

    score: the image-level anomaly score in [0, 1].
    map: float32 numpy array (H, W) at the input image's own size, values in [0, 1].
    anomalous: score >= threshold; None when there is no threshold.
    threshold, threshold_source: the threshold used and where it came from ("command line", "calibration",
        "run"), both None when there is none.
    class_word: the word that stood for [class] in the prompts.
    image: the input's path, or None for an in-memory image.
    """

    score: float
    map: np.ndarray = field(repr=False)
    anomalous: bool | None
    threshold: float | None
    threshold_source: str | None
    class_word: str
    image: str | None = None


@runtime_checkable
class Inferencer(Protocol):
    """What a scorer offers every front end. S = image_size; N = images in a batch.

    load: each implementation's own constructor (Detector.load / Detector.zero_shot, ExportedModel(path)).
    threshold_for / pixel_threshold_for follow kano.core.thresholds' order."""

    @property
    def image_size(self) -> int: ...

    def describe(self) -> dict:
        """The method as results record it (evaluator.report's provenance)."""
        ...

    def check_class(self, class_name: str) -> None:
        """Raise KanoError when the scorer cannot score `class_name` (an exported graph knows its classes only)."""
        ...

    def class_word(self, class_name: str) -> str:
        """The word that stands for [class] in the prompts for `class_name`."""
        ...

    def threshold_for(self, class_name: str, word: str | None = None) -> tuple[float | None, str | None]:
        """-> (decision threshold, where it came from), or (None, None)."""
        ...

    def pixel_threshold_for(self, class_name: str, word: str | None = None) -> tuple[float | None, str | None]:
        """-> (the calibration's pixel threshold: the maps' colour scale and the masks' cut, its source), or (None, None)."""
        ...

    def preprocess(self, image) -> np.ndarray:
        """A PIL RGB image -> (3, S, S) float32, normalised as the model was trained."""
        ...

    def score(self, images: np.ndarray, classes: Sequence[str], words: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """images (N, 3, S, S) float32, their classes (and prompt words, None: the rule's) -> image scores (N,)
        and anomaly maps (N, S, S), float32 numpy."""
        ...

    def score_files(self, paths: Sequence[str], classes: Sequence[str], words: Sequence[str], batch_size: int,
                    advance: Callable[[int], None], errors: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
        """Decode, preprocess and score image files in batches of `batch_size` (the last may be short) -> scores
        (N,) and maps (N, S, S); an unreadable file's message goes to errors[its position], its score is NaN and
        its map zeros. `advance(k)` after each batch."""
        ...

    def batches_per_round(self) -> int:
        """How many batches `kano predict` scores before it writes their rows."""
        ...

    @property
    def transductive(self) -> bool:
        """Whether an image is scored against the others of its batch (`kano eval` then gives a class as one batch)."""
        ...

    def begin_class(self, class_name: str, word: str) -> None:
        """Per-class set-up before a class's images are scored (e.g. WinCLIP+'s references)."""
        ...

    def score_samples(self, samples: Sequence, words: Sequence[str], batch_size: int, advance: Callable[[int], None],
                      errors: dict[int, str] | None, dist=None) -> tuple:
        """`kano eval`'s step: labelled samples (anomaly_data.Sample) in batches of `batch_size` -> image scores
        (N,), maps (N, S, S) float32 and their masks (N, S, S) uint8 in {0, 1} at S (numpy arrays, or torch tensors
        from the torch scorer). errors: as score_files' (None: the first unreadable image or mask raises KanoError).
        dist: the launch's processes, each scoring its share (None: this process scores all)."""
        ...


class FileScoring:
    """score_files, batches_per_round and postprocess over preprocess and score, for a scorer that decodes in
    its own process: the next batch is decoded in a thread while the model scores this one (both release the GIL)."""

    def score_files(self, paths, classes, words, batch_size, advance, errors):
        from kano.anomaly_data.io import load_image

        def prepare(a: int):
            arrays, ok = [], []
            for j in range(a, min(a + batch_size, len(paths))):
                try:
                    arrays.append(self.preprocess(load_image(paths[j])))
                    ok.append(j)
                except KanoError as exc:
                    errors[j] = str(exc)
            return arrays, ok

        n, size = len(paths), self.image_size
        scores = np.full(n, np.nan, dtype=np.float32)
        maps = np.zeros((n, size, size), dtype=np.float32)
        for arrays, ok in _prepared_ahead(n, batch_size, prepare, advance):
            if ok:
                s, m = self.score(np.stack(arrays), [classes[j] for j in ok], [words[j] for j in ok])
                scores[ok], maps[ok] = s, m
        return scores, maps

    def batches_per_round(self) -> int:
        return ROUND

    transductive = False  # each image is scored on its own

    def begin_class(self, class_name: str, word: str) -> None:
        """Nothing to set up: the graph holds every class."""

    def score_samples(self, samples, words, batch_size, advance, errors, dist=None):
        """Inferencer.score_samples over preprocess and score: each image decoded once (the next batch in a
        thread while this one is scored), its mask read at the image's own size and resized as the torch
        loaders do (anomaly_data.io.mask_to_array). One process: a launch's processes are refused."""
        from kano.anomaly_data.io import load_image, load_mask, mask_to_array

        if dist is not None and dist.world > 1:
            raise KanoError(f"{type(self).__name__} scores in one process, got a launch of {dist.world}")
        n, size = len(samples), self.image_size

        def prepare(a: int):
            arrays, masks, ok = [], [], []
            for j in range(a, min(a + batch_size, n)):
                try:
                    img = load_image(samples[j].image_path)
                    masks.append(mask_to_array(load_mask(samples[j].mask_path, img.size), size).astype(np.uint8))
                    arrays.append(self.preprocess(img))
                    ok.append(j)
                except KanoError as exc:
                    if errors is None:
                        raise
                    errors[j] = str(exc)
            return arrays, masks, ok

        scores = np.full(n, np.nan, dtype=np.float32)
        maps = np.zeros((n, size, size), dtype=np.float32)
        masks = np.zeros((n, size, size), dtype=np.uint8)
        for arrays, mk, ok in _prepared_ahead(n, batch_size, prepare, advance):
            if ok:
                s, m = self.score(np.stack(arrays), [samples[j].class_name for j in ok], [words[j] for j in ok])
                scores[ok], maps[ok], masks[ok] = s, m, np.stack(mk)
        return scores, maps, masks


def _prepared_ahead(n: int, batch_size: int, prepare: Callable[[int], tuple], advance: Callable[[int], None]):
    """Yield prepare(a) for each batch start a = 0, batch_size, ... < n, in order, the next batch prepared in a
    thread while the caller scores this one; advance(k) once the caller is done with a batch of k items."""
    starts = list(range(0, n, batch_size))
    with ThreadPoolExecutor(1) as pool:
        ahead = pool.submit(prepare, 0) if starts else None
        for k, a in enumerate(starts):
            got = ahead.result()
            if k + 1 < len(starts):
                ahead = pool.submit(prepare, starts[k + 1])
            yield got
            advance(min(batch_size, n - a))


def postprocess(score: float, amap: np.ndarray, size: tuple[int, int], threshold: float | None, source: str | None,
                word: str, path: str | None = None) -> Result:
    """One image's score and (S, S) map -> its Result: the map resized to the image's (W, H) `size`, the decision."""
    from kano.evaluator.visualize import resize_map

    return Result(score=float(score), map=resize_map(amap, size).astype(np.float32), anomalous=decision(float(score), threshold),
                  threshold=threshold, threshold_source=source, class_word=word, image=path)


__all__ = ["Inferencer", "FileScoring", "Result", "postprocess", "ROUND"]
