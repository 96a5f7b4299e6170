"""The detector behind the Python API (kano.Detector, kano.Result: kano.api re-exports them) and `kano predict`:
a loaded torch model with its class-word rule, its threshold rule (`resolve_threshold`: kano.core.thresholds'
order, the calibration found here), its calibration and its references. It is the torch side of the one inference
interface (evaluator.inference.Inferencer; the exported graph is the other: deploy.runtime.ExportedModel), so
`kano predict`, `kano serve --run` and the API score through the same steps. It lives in the evaluator, below the
API, so that no stage package imports kano.api (tests/test_layers.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
from PIL import Image

from kano.core import thresholds
from kano.core.errors import KanoError

from .inference import ROUND, Result, postprocess

THRESHOLD_SOURCES = thresholds.SOURCES

ImageInput = Union[str, Path, Image.Image, np.ndarray]


def weights_sha256(config: dict | None) -> str | None:
    """The weights' digest `kano train` recorded in a run's config.json (None for runs without one)."""
    ranks = (config or {}).get("ranks")
    first = ranks[0] if isinstance(ranks, list) and ranks else None
    return first.get("weights_sha256") if isinstance(first, dict) else None


def resolve_threshold(given: float | None, run_dir: str | Path | None, class_name: str, run_threshold: float | None,
                      weights_sha256: str | None = None, *, calibration: dict | None = None) -> tuple[float | None, str | None]:
    """-> (threshold, source): command line > the calibration's entry for the class (`calibration`, already
    checked against the mode: Detector.calibration_entry), else RUN/calibration.json (evaluator.calibrate; a class
    missing from an existing calibration is an error) > the run's > (None, None)."""
    if given is not None:
        return thresholds.pick(given)
    if calibration is not None:
        return thresholds.pick(None, float(calibration["image_threshold"]))
    calibrated = None
    if run_dir is not None:
        from kano.evaluator.calibrate import calibrated_threshold

        calibrated = calibrated_threshold(run_dir, class_name, weights_sha256, required=True)
    return thresholds.pick(None, calibrated, run_threshold)


def _to_pil(item: ImageInput) -> tuple[Image.Image, str | None]:
    from kano.anomaly_data import load_image

    if isinstance(item, (str, Path)):
        return load_image(item), str(item)
    if isinstance(item, Image.Image):
        return item.convert("RGB"), None
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise KanoError(f"an image array must be H x W x 3 uint8 (RGB), got shape {item.shape} dtype {item.dtype}")
        return Image.fromarray(item), None
    raise KanoError(f"an image must be a path, a PIL image or an H x W x 3 uint8 array, got {type(item).__name__}")


def _as_list(images) -> tuple[list, bool]:
    """-> (items, single): a list/tuple or an (N, H, W, 3) array is a batch, anything else one image."""
    if isinstance(images, (list, tuple)):
        return list(images), False
    if isinstance(images, np.ndarray) and images.ndim == 4:
        if images.shape[3] != 3 or images.dtype != np.uint8:
            raise KanoError(f"an image batch must be N x H x W x 3 uint8 (RGB), got shape {images.shape} dtype {images.dtype}")
        return list(images), False
    return [images], True


class Detector:
    """A loaded model with what it needs to decide: the class word rule, the threshold rule, the references.

    Build it with `Detector.load(run)` or `Detector.zero_shot(...)`; call it on images."""

    def __init__(self, model, method: dict, *, run_dir: str | Path | None = None, run_threshold: float | None = None,
                 run_words: dict[str, str] | None = None, weights_sha256: str | None = None, threshold: float | None = None,
                 references: "tuple | None" = None, device=None, batch_size: int = 8,
                 calibration: str | Path | None = None):
        self.model = model
        self.calibration = Path(calibration) if calibration else None  # a calibration file (`kano calibrate --calibration`)
        self._mode = None
        self._cal = None
        self.method = method
        self.run_dir = Path(run_dir) if run_dir else None
        self.run_threshold = run_threshold
        self.run_words = dict(run_words or {})
        self.folder_words = False  # Detector.load sets it from the run's class-word rule
        self.weights_sha256 = weights_sha256
        self.threshold = threshold
        self.references = references  # ((k, 3, S, S) tensor, [paths]) shared by every class, or None
        self.device = device if device is not None else model.backbone.device
        self.batch_size = batch_size
        self.workers = 0  # DataLoader processes that decode for score_files (kano predict --workers)
        if threshold is not None:
            resolve_threshold(threshold, None, "", None)  # checked once, here

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def load(cls, run: str | Path, *, threshold: float | None = None, device: str | None = None, batch_size: int = 8,
             references: str | Path | None = None, k_shot: int = 0, calibration: str | Path | None = None,
             style: str = "api") -> "Detector":
        """A trained run (`kano train --out RUN`): KAnoCLIP, April-GAN or AnomalyCLIP. With `references` (a folder
        of normal images) and `k_shot` K: April-GAN's few-shot memory of the folder's first K images, sorted by
        path (kanoclip/fewshot.py); the run's own threshold (of its scores without references) is then not used.
        calibration: a calibration file of this mode (default: RUN/calibration.json, refused if of another mode).
        style: how errors name the options ("api": these arguments; "cli": kano predict's flags)."""
        from kano.core.device import resolve_device as _device
        from kano.evaluator.loading import load_model
        from kano.evaluator.report import trained_method

        model, info = load_model(str(run), None, None, _device(device))
        cfg = info["config"]
        det = cls.with_references(model, trained_method(run, cfg), references, k_shot, threshold=threshold, batch_size=batch_size,
                                  calibration=calibration, style=style)
        # the run's own threshold was set on its scores without references: another scale with them
        det.run_dir, det.run_words = Path(run), dict(info["prompt_names"])
        det.run_threshold = info["threshold"] if det.references is None else None
        det.folder_words = (info.get("config") or {}).get("class_words") == "folder"
        det.weights_sha256 = weights_sha256(cfg)
        return det

    @classmethod
    def with_references(cls, model, method: dict, references: str | Path | None, k_shot: int, style: str = "api",
                        **kw) -> "Detector":
        """`model` as it is, or, with references and k_shot, wrapped in April-GAN's few-shot patch memory."""
        if not references and not k_shot:
            return cls(model, method, **kw)
        if not references or k_shot < 1:
            raise KanoError(f"references (a folder of normal images) and k_shot >= 1 go together, got references={references} "
                            f"and k_shot={k_shot}")
        from kano.evaluator.methods import reference_folder, with_patch_memory

        refs = reference_folder(references, k_shot, model.backbone, style)
        wrapped, described = with_patch_memory(model, method, k_shot, references=references)
        described["references"] = refs[1]
        return cls(wrapped, described, references=refs, **kw)

    @classmethod
    def zero_shot(cls, method: str, backbone: str | None = None, *, references: str | Path | None = None,
                  k_shot: int = 0, image_size: int | None = None, threshold: float | None = None, device: str | None = None,
                  batch_size: int = 8, style: str = "api", calibration: str | Path | None = None) -> "Detector":
        """A method that needs no training and scores one image at a time (kano.core.registry.methods_with(per_image=True):
        the zero-shot CLIP methods and the zero-parameter floors), on a frozen backbone when it takes one (default: the
        shipped micro-CLIP, "micro"; a method without one refuses a backbone). With
        `references` (a folder of normal images) and `k_shot` K, for the methods that take references: the first K
        images of the folder, sorted by path, as every class's references (WinCLIP+). style: how errors name the
        options ("api": these arguments; "cli": kano predict's flags). calibration: a calibration file of this mode
        (`kano calibrate --calibration FILE`)."""
        from kano.core.device import resolve_device as _device
        from kano.evaluator.methods import load_method, reference_folder
        from kano.core.registry import methods_with, method_spec, option_name

        spec = method_spec(method, option_name("method", style))
        if not spec.per_image:
            why = ("is trained: load its run with Detector.load(RUN_DIR)" if spec.trained else
                   "is transductive (it scores each image against the rest of a test set): use `kano eval --method` on a dataset"
                   if spec.transductive else "builds its memory from a labelled dataset: use `kano eval --method` with --aux")
            raise KanoError(f"{option_name('method', style)} must be a method that scores one image at a time (one of "
                            f"{', '.join(methods_with(per_image=True))}), got {method!r}, which {why}")
        if k_shot and not references:
            raise KanoError(f"{option_name('k_shot', style)} {k_shot} needs {option_name('references', style)} (a folder of "
                            "normal images), got none")
        if backbone is None and "backbone" in spec.needs:
            backbone = "micro"
        model, info = load_method(method, None, backbone, image_size, _device(device), k_shot=0, references=None, style=style)
        described = info["method"]
        refs = None
        if references:
            from kano.core.registry import check_given

            check_given(method, {"backbone": backbone, "references": references}, style)
            refs = reference_folder(references, k_shot, model.backbone, style)
            described = {**described, **model.describe_references(k_shot, str(references)), "setting": "few-shot",
                         "k_shot": k_shot, "references": refs[1]}
        return cls(model, described, threshold=threshold, references=refs, batch_size=batch_size, calibration=calibration)

    # ------------------------------------------------------------------------------------------ rules
    def class_word(self, class_name: str, word: str | None = None) -> str:
        """The prompt word for `class_name` (anomaly_data.names.class_word's rule)."""
        from kano.anomaly_data.names import class_word

        if word is None and self.folder_words:  # a run trained with class_words "folder": the name as it is
            return class_name
        return class_word(class_name, word, self.run_words)

    def word_warning(self, word: str) -> str | None:
        """A warning when `word` is neither a class the run was trained with nor one of the built-in pack."""
        from kano.anomaly_data.names import known_words, unknown_word_warning

        from kano.evaluator.command import uses_prompts

        if not uses_prompts(self.method):  # the floors use no prompts
            return None
        return unknown_word_warning(word, known_words(self.run_words))

    def mode(self) -> dict:
        """The scoring mode a calibration is keyed by (evaluator.calibrate.scoring_mode)."""
        if self._mode is None:
            from kano.evaluator.calibrate import scoring_mode

            self._mode = scoring_mode(self.method, self.model, self.weights_sha256)
        return self._mode

    def calibration_entry(self, class_name: str, word: str | None = None) -> dict | None:
        """The class's calibration (image_threshold, pixel_threshold, n, rank, class_word), checked against this
        detector's mode and the class word: `calibration` given, else RUN/calibration.json, else None. A
        calibration of another mode is refused, a class it lacks is an error."""
        from kano.evaluator import calibrate as C

        path = self.calibration or (self.run_dir / C.CALIBRATION_FILE if self.run_dir is not None else None)
        if path is None or (self.calibration is None and not path.is_file()):
            return None
        if self._cal is None:
            self._cal = C.load_calibration(self.run_dir) if self.calibration is None else C.read_calibration(path)
        return C.calibration_entry(path, self._cal, self.mode(), class_name, self.class_word(class_name, word))

    def threshold_for(self, class_name: str, word: str | None = None) -> tuple[float | None, str | None]:
        """-> (threshold, source) for `class_name` (the module docstring's order); word: the class word in use
        when it is not the rule's (checked against the calibration's)."""
        if self.threshold is not None:
            return resolve_threshold(self.threshold, None, class_name, None)
        entry = self.calibration_entry(class_name, word)
        return resolve_threshold(None, None, class_name, self.run_threshold, calibration=entry)

    def pixel_threshold_for(self, class_name: str, word: str | None = None) -> tuple[float | None, str | None]:
        """-> (the calibration's pixel threshold for the class, "calibration"), or (None, None) without one: the
        level the maps are drawn relative to and the masks are cut at (evaluator.visualize.MapScale)."""
        if self.threshold is not None and self.calibration is None:  # --threshold alone: the run's file is not consulted
            return None, None
        entry = self.calibration_entry(class_name, word)
        return (None, None) if entry is None else (float(entry["pixel_threshold"]), "calibration")

    def begin_class(self, class_name: str, word: str) -> None:
        """Give a per-class model (WinCLIP+) its references for this class before it scores the class's images."""
        if self.references is not None:
            self.model.set_references({class_name: self.references[0]})
        if hasattr(self.model, "begin_class"):
            self.model.begin_class(class_name, word)

    # ------------------------------------------------------------------------------------------ the Inferencer
    @property
    def image_size(self) -> int:
        return self.model.backbone.image_size

    def describe(self) -> dict:
        return self.method

    def check_class(self, class_name: str) -> None:
        """Any class: the prompts name it (its word by class_word's rule)."""

    def preprocess(self, image) -> np.ndarray:
        """A PIL RGB image -> (3, S, S) float32 (anomaly_data.io.image_to_array, as the loaders and the graph's runtime)."""
        from kano.anomaly_data.io import image_to_array

        bb = self.model.backbone
        return image_to_array(image, bb.image_size, bb.mean, bb.std)

    def score(self, images: np.ndarray, classes: Sequence[str], words: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """images (N, 3, S, S) float32 -> image scores (N,), maps (N, S, S), float32 numpy; words: the prompts'
        (None: class_word's rule for each class)."""
        import torch

        words = list(words) if words is not None else [self.class_word(c) for c in classes]
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device), words).inference()
        return out.image_score.float().cpu().numpy(), out.anomaly_map.float().cpu().numpy()

    def score_files(self, paths: Sequence[str], classes: Sequence[str], words: Sequence[str], batch_size: int,
                    advance: Callable[[int], None], errors: dict[int, str]) -> tuple[np.ndarray, np.ndarray]:
        """The files decoded by evaluator.evaluate.run_inference (DataLoader workers, or the CPU's model streams)."""
        from kano.anomaly_data import Sample

        samples = [Sample(str(Path(p).resolve()), None, c, "unknown", 0) for p, c in zip(paths, classes)]
        scores, maps, _ = self.score_samples(samples, words, batch_size, advance, errors)
        return scores.numpy(), maps.numpy()

    @property
    def transductive(self) -> bool:
        return self.model.transductive

    def score_samples(self, samples, words, batch_size, advance, errors, dist=None):
        """`kano eval`'s step on the torch model: evaluator.evaluate.run_inference (DataLoader workers, or the CPU's
        model streams; masks decoded with the images), over a launch's processes with `dist` (sharded_inference:
        every process gets all results). -> torch tensors: scores (N,), maps (N, S, S), masks (N, S, S) uint8."""
        from kano.evaluator.evaluate import run_inference, sharded_inference

        if dist is not None and dist.world > 1:
            return sharded_inference(dist, self.model, samples, list(words), batch_size, self.device, self.workers, advance,
                                     errors=errors)
        return run_inference(self.model, samples, list(words), batch_size, self.device, self.workers, advance, errors=errors)

    def batches_per_round(self) -> int:
        """On the CPU in-process, one batch per model stream (evaluate.cpu_streams); on a GPU or with workers, enough
        to keep the loader's prefetch busy and to amortise its start."""
        from kano.evaluator.evaluate import cpu_streams

        return ROUND if (self.device.type != "cpu" or self.workers) else cpu_streams(self.device, self.workers, 4, self.model)

    # ------------------------------------------------------------------------------------------ scoring
    def __call__(self, images: ImageInput | Sequence[ImageInput], class_name: str, class_word: str | None = None):
        """Score one image or a batch.

        images: a path, a PIL image or an (H, W, 3) uint8 array -> Result; a list of them or an (N, H, W, 3)
        uint8 array -> list[Result]. class_name: what the images show; class_word: the prompt word, when it
        should differ from the rule's (see anomaly_data.names.class_word)."""
        items, single = _as_list(images)
        if not items:
            raise KanoError("images must hold at least one image, got an empty batch")
        word = self.class_word(class_name, class_word)
        if (msg := self.word_warning(word)) is not None:
            warnings.warn(msg, stacklevel=2)
        threshold, source = self.threshold_for(class_name, word)
        self.begin_class(class_name, word)
        results: list[Result] = []
        for a in range(0, len(items), self.batch_size):
            pics = [_to_pil(x) for x in items[a:a + self.batch_size]]
            scores, maps = self.score(np.stack([self.preprocess(p) for p, _ in pics]), [class_name] * len(pics), [word] * len(pics))
            results += [postprocess(s, m, pic.size, threshold, source, word, path) for (pic, path), s, m in zip(pics, scores, maps)]
        return results[0] if single else results
