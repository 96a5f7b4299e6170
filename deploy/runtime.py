"""The torch-free runtime: score images with an exported graph (ONNX through onnxruntime, or OpenVINO IR), the
exported side of the one inference interface (kano.evaluator.inference.Inferencer): `kano predict --model` runs
it through the same streaming loop as `--run` (evaluator.predict), `kano serve --model` through the same service.

Imports neither torch nor open_clip (tests/test_runtime.py runs it where importing them fails): numpy, Pillow,
and onnxruntime or openvino; `pip install 'kano[runtime]'` installs the ONNX path. The preprocessing is the
sidecar JSON's (kano.deploy.export writes it): squash-resize to S x S (bicubic), (v / 255 - mean) / std,
the same function (anomaly_data.io.image_to_array) that the torch loaders call.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from kano.anomaly_data.io import image_to_array
from kano.core import thresholds
from kano.core.errors import KanoError
from kano.evaluator.inference import FileScoring

SIDECAR_VERSION = 1  # kano.deploy.export.SIDECAR_VERSION (not imported from there: that module needs torch)
SUFFIXES = {".onnx": "onnxruntime", ".xml": "openvino"}


def _threads(threads: int | None) -> int:
    return int(threads or os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


class ExportedModel(FileScoring):
    """An exported graph and its sidecar (an evaluator.inference.Inferencer). score(images, classes) ->
    (image_score (N,), anomaly_map (N, S, S)).

    threads: intra-op threads (default $OMP_NUM_THREADS, else all cores); threshold: the one given on the command
    line, which every class's decision then uses (None: each class's exported threshold)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, threshold: float | None = None):
        self.threshold = thresholds.check_given(threshold, "--threshold")
        path = Path(path)
        if path.suffix not in SUFFIXES:
            raise KanoError(f"--model must be an exported graph, .onnx or .xml (kano export), got {path}")
        if not path.is_file():
            raise KanoError(f"--model {path} must exist, got no such file")
        side = path.with_suffix(".json")
        try:
            meta = json.loads(side.read_text())
        except FileNotFoundError:
            raise KanoError(f"--model {path} needs its sidecar {side} (kano export writes both), got no such file") from None
        except (OSError, ValueError) as exc:
            raise KanoError(f"{side} must be the JSON kano export wrote, got unreadable content ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != "kano-deploy" or meta.get("version") != SIDECAR_VERSION:
            raise KanoError(f"{side} must be a kano export sidecar of version {SIDECAR_VERSION}, got "
                            f"format {meta.get('format') if isinstance(meta, dict) else type(meta).__name__!r}, "
                            f"version {meta.get('version') if isinstance(meta, dict) else None!r}")
        missing = [k for k in ("classes", "prompt_words", "image_size", "mean", "std", "thresholds", "method") if k not in meta]
        if missing:
            raise KanoError(f"{side} must hold {', '.join(missing)}, got none")
        self.path, self.meta = path, meta
        self.classes: list[str] = list(meta["classes"])
        self.image_size, self.mean, self.std = int(meta["image_size"]), tuple(meta["mean"]), tuple(meta["std"])
        self.words: dict[str, str] = dict(zip(self.classes, meta["prompt_words"]))
        self.thresholds: dict[str, float | None] = dict(meta["thresholds"])
        self.threshold_sources: dict[str, str | None] = dict(meta.get("threshold_sources") or {})
        # the calibration's pixel thresholds (the maps' colour scale, the masks' cut); absent in older sidecars
        self.pixel_thresholds: dict[str, float | None] = dict(meta.get("pixel_thresholds") or {})
        self.engine = SUFFIXES[path.suffix]
        n = _threads(threads)
        if self.engine == "onnxruntime":
            try:
                import onnxruntime as ort
            except ImportError:
                raise KanoError("--model .onnx needs onnxruntime: pip install 'kano[runtime]'") from None
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = n, 1
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            self._run = lambda x, c: self._session.run(["image_score", "anomaly_map"], {"image": x, "class_index": c})
        else:
            try:
                import openvino as ov
            except ImportError:
                raise KanoError("--model .xml needs openvino: pip install openvino") from None
            compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": n, "INFERENCE_PRECISION_HINT": "f32"})
            self._request = compiled.create_infer_request()
            outs = {o.get_any_name(): o for o in compiled.outputs}
            self._ov_outputs = (outs["image_score"], outs["anomaly_map"])

            def run(x, c):
                res = self._request.infer({"image": x, "class_index": c})
                return [res[o] for o in self._ov_outputs]

            self._run = run

    def class_index(self, class_name: str) -> int:
        if class_name not in self.classes:
            from kano.anomaly_data.names import closest

            meant = closest(class_name, self.classes)
            raise KanoError(f"class must be one of the exported classes {', '.join(self.classes)}, got {class_name!r} "
                            + (f"(did you mean {meant!r}? Pass --class {meant})" if meant else "(kano export --classes names them)"))
        return self.classes.index(class_name)

    def check_class(self, class_name: str) -> None:
        self.class_index(class_name)

    def class_word(self, class_name: str) -> str:
        """The prompt word the class was exported with."""
        return self.words[class_name]

    def threshold_for(self, class_name: str, word: str | None = None) -> tuple[float | None, str | None]:
        """-> (threshold, source): the one given (command line) or the one exported for the class (e.g. "run,
        exported" for the run's calibrated threshold), by kano.core.thresholds' order."""
        src = self.threshold_sources.get(class_name)
        return thresholds.pick(self.threshold, None, self.thresholds.get(class_name), f"{src or 'export'}, exported")

    def pixel_threshold_for(self, class_name: str, word: str | None = None) -> tuple[float | None, str | None]:
        """-> (the calibration's pixel threshold exported for the class, "calibration"), or (None, None)."""
        t = self.pixel_thresholds.get(class_name)
        return (None, None) if t is None else (float(t), "calibration")

    def preprocess(self, image) -> np.ndarray:
        """A PIL RGB image -> (3, S, S) float32 as the sidecar says."""
        return image_to_array(image, self.image_size, self.mean, self.std)

    def score(self, images: np.ndarray, classes: Sequence, words: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """images (N, 3, S, S) float32, classes (N,): exported class names, or the graph's class indices (int) ->
        image_score (N,), anomaly_map (N, S, S) float32. words: unused (the graph's were fixed at export)."""
        c = np.asarray(classes)
        idx = c.astype(np.int64) if c.dtype.kind in "iu" else np.array([self.class_index(n) for n in classes], dtype=np.int64)
        s, m = self._run(np.ascontiguousarray(images, dtype=np.float32), idx)
        return np.asarray(s, dtype=np.float32), np.asarray(m, dtype=np.float32)

    def describe(self) -> dict:
        """The method description recorded in the outputs' provenance (evaluator.report)."""
        from kano.core.registry import METHODS

        src = self.meta.get("source") or {}
        spec = METHODS.get(self.meta["method"])  # the registry's kind, as every result records it
        return {"kind": spec.kind if spec else "unknown", "name": f"{self.meta['method']} ({self.engine})",
                "method": self.meta["method"], "engine": self.engine, "model": str(self.path.resolve()),
                "backbone": self.meta.get("backbone"), "source": src}
