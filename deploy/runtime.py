"""The torch-free runtime: score images with an exported graph (ONNX through onnxruntime, or OpenVINO IR).

Imports neither torch nor open_clip (tests/test_runtime.py runs it where importing them fails): numpy, Pillow,
and onnxruntime or openvino; `pip install 'kano[runtime]'` installs the ONNX path. The preprocessing is the
sidecar JSON's (kano.deploy.export writes it): squash-resize to S x S (bicubic), (v / 255 - mean) / std,
the same function (anomaly_data.io.image_to_array) that the torch loaders call.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from kano.anomaly_data.io import image_to_array, load_image
from kano.errors import KanoError

SIDECAR_VERSION = 1  # kano.deploy.export.SIDECAR_VERSION (not imported from there: that module needs torch)
SUFFIXES = {".onnx": "onnxruntime", ".xml": "openvino"}


def _threads(threads: int | None) -> int:
    return int(threads or os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


class ExportedModel:
    """An exported graph and its sidecar. score(images, class_index) -> (image_score (N,), anomaly_map (N, S, S)).

    threads: intra-op threads (default $OMP_NUM_THREADS, else all cores)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
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
            raise KanoError(f"class must be one of the exported classes {', '.join(self.classes)}, got {class_name!r} "
                            f"(kano export --classes names them)")
        return self.classes.index(class_name)

    def threshold_for(self, class_name: str, given: float | None = None) -> tuple[float | None, str | None]:
        """-> (threshold, source): `given` (the command line) or the one exported for the class (e.g. "run,
        exported" for the run's calibrated threshold)."""
        if given is not None:
            if not 0.0 <= given <= 1.0:
                raise KanoError(f"--threshold must be a number in [0, 1] (scores are in [0, 1]), got {given}")
            return float(given), "command line"
        t = self.thresholds.get(class_name)
        src = self.threshold_sources.get(class_name)
        return t, (None if t is None else f"{src or 'export'}, exported")

    def preprocess(self, image) -> np.ndarray:
        """A PIL RGB image -> (3, S, S) float32 as the sidecar says."""
        return image_to_array(image, self.image_size, self.mean, self.std)

    def score(self, images: np.ndarray, class_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """images (N, 3, S, S) float32, class_index (N,) int -> image_score (N,), anomaly_map (N, S, S) float32."""
        s, m = self._run(np.ascontiguousarray(images, dtype=np.float32), np.asarray(class_index, dtype=np.int64))
        return np.asarray(s, dtype=np.float32), np.asarray(m, dtype=np.float32)

    def describe(self) -> dict:
        """The method description recorded in the outputs' provenance (evaluator.report)."""
        src = self.meta.get("source") or {}
        return {"kind": "exported", "name": f"{self.meta['method']} ({self.engine})", "model": str(self.path.resolve()),
                "backbone": self.meta.get("backbone"), "source": src}


def predict(model_path: str | os.PathLike, inputs: list[str], class_name: str, out_dir: Path, threshold: float | None = None,
            batch_size: int = 8, force: bool = False, progress: Callable | None = None, threads: int | None = None) -> list[dict]:
    """`kano predict --model`: the files and records of evaluator.predict, scored by the exported graph.
    threshold None: the class's threshold exported with the model (the run's calibrated one, or none)."""
    from kano.evaluator import predict_files as pf
    from kano.evaluator import report

    started = time.time()
    if batch_size < 1:
        raise KanoError(f"--batch-size must be an integer >= 1, got {batch_size}")
    model = ExportedModel(model_path, threads)
    index = model.class_index(class_name)
    threshold, source = model.threshold_for(class_name, threshold)
    word = model.words[class_name]
    files = pf.collect_images(inputs)
    out_dir = Path(out_dir)
    method = model.describe()
    identity = {"method": method, "class": class_name, "class_word": word, "threshold": threshold, "threshold_source": source,
                "inputs": [str(f.resolve()) for f in files], "image_size": model.image_size}
    names = pf.begin(out_dir, files, identity, force)
    advance, close = progress(len(files)) if progress else (lambda k: None, lambda: None)
    records = []
    try:
        for a in range(0, len(files), batch_size):
            chunk = files[a:a + batch_size]
            arrays, errors = [], {}
            for j, f in enumerate(chunk):
                try:
                    arrays.append(model.preprocess(load_image(f)))
                except KanoError as exc:
                    errors[j] = str(exc)
            ok = [j for j in range(len(chunk)) if j not in errors]
            scores, maps = model.score(np.stack(arrays), np.full(len(ok), index)) if ok else ([], [])
            got = dict(zip(ok, zip(scores, maps)))
            for j, f in enumerate(chunk):
                s, m = got.get(j, (None, None))
                records.append(pf.write_record(out_dir, f, names[a + j], class_name, threshold, None if s is None else float(s), m,
                                               errors.get(j), word=word, threshold_source=source))
            advance(len(chunk))
    finally:
        close()
    header = {"class": class_name, "class_word": word, "threshold": threshold, "threshold_source": source,
              "provenance": {**report.provenance(method, model.image_size, started, None), "class_words": {class_name: word}}}
    pf.finish(out_dir, records, header, identity)
    return records
