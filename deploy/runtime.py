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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from kano.anomaly_data.io import image_to_array, load_image
from kano.core.errors import KanoError

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
        from kano.core.registry import METHODS

        src = self.meta.get("source") or {}
        spec = METHODS.get(self.meta["method"])  # the registry's kind, as every result records it
        return {"kind": spec.kind if spec else "unknown", "name": f"{self.meta['method']} ({self.engine})",
                "method": self.meta["method"], "engine": self.engine, "model": str(self.path.resolve()),
                "backbone": self.meta.get("backbone"), "source": src}


def predict(model_path: "str | os.PathLike | ExportedModel", inputs: list[str], class_name: str, out_dir: Path, threshold: float | None = None,
            batch_size: int = 8, force: bool = False, progress: Callable | None = None, threads: int | None = None,
            maps: bool = True, panels: bool = True, fmt: str = "jsonl"):
    """`kano predict --model`: the rows and files of evaluator.predict (written by the same functions,
    evaluator.predict_files), scored by the exported graph. Inputs as evaluator.stream reads them (images,
    folders, lists); a list's class column picks that row's exported class. threshold None: each class's
    threshold exported with the model (the run's calibrated one, or none). maps, panels: write each image's map /
    panel (evaluator.predict_files.row); fmt "parquet": also predictions.parquet. -> the rows."""
    from kano.evaluator import outputs, records
    from kano.evaluator import predict_files as pf
    from kano.evaluator.stream import iter_inputs

    started = time.time()
    if batch_size < 1:
        raise KanoError(f"--batch-size must be an integer >= 1, got {batch_size}")
    model = model_path if isinstance(model_path, ExportedModel) else ExportedModel(model_path, threads)  # loaded once by a caller that predicts often
    model.class_index(class_name)
    threshold_given = threshold
    threshold, source = model.threshold_for(class_name, threshold_given)
    items = list(iter_inputs(inputs))
    if not items:
        raise KanoError("predict needs at least one image or folder, got none")
    for _, c in items:  # every class named by a list must be an exported one, before anything is written
        if c:
            model.class_index(c)
    out_dir = Path(out_dir)
    method = model.describe()
    word = model.words[class_name]
    identity = {"method": method, "class": class_name, "class_word": word, "threshold": threshold, "threshold_source": source,
                "inputs": [str(Path(p).resolve()) for p, _ in items], "image_size": model.image_size}
    outputs.claim(out_dir, "predict", json.loads(json.dumps(identity, default=str)), force)
    write_maps, write_panels = maps, panels  # `maps` names each batch's maps below
    if fmt not in ("jsonl", "parquet"):
        raise KanoError(f"--format must be one of jsonl, parquet, got {fmt!r}")
    for folder, on in (("maps", maps), ("panels", panels)):
        if on:
            (out_dir / folder).mkdir(exist_ok=True)
    names = outputs.unique_names([[Path(p).stem, *reversed(Path(p).resolve().parent.parts[-4:])] for p, _ in items])
    advance, close = progress(len(items)) if progress else (lambda k: None, lambda: None)
    try:
        def prepare(chunk):
            """Decode and preprocess one batch -> (arrays, the positions read, {position: why not})."""
            arrays, ok, errors = [], [], {}
            for j, (p, _) in enumerate(chunk):
                try:
                    arrays.append(model.preprocess(load_image(p)))
                    ok.append(j)
                except KanoError as exc:
                    errors[j] = str(exc)
            return arrays, ok, errors

        starts = list(range(0, len(items), batch_size))
        # the next batch is decoded in a thread while the graph scores this one (both release the GIL): decoding
        # and resizing cost about a tenth of the micro-CLIP's time per image (bench/bench_deploy.py)
        with records.RowWriter(out_dir / records.RESULT, fresh=True) as writer, ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(prepare, items[:batch_size])
            for k, a in enumerate(starts):
                chunk = items[a:a + batch_size]
                arrays, ok, errors = ahead.result()
                if k + 1 < len(starts):
                    ahead = pool.submit(prepare, items[starts[k + 1]:starts[k + 1] + batch_size])
                classes = [c or class_name for _, c in chunk]
                idx = np.array([model.class_index(classes[j]) for j in ok], dtype=np.int64)
                scores, maps = model.score(np.stack(arrays), idx) if ok else ([], [])
                got = dict(zip(ok, zip(scores, maps)))
                rows = []
                for j, (p, _) in enumerate(chunk):
                    c = classes[j]
                    t, src = (threshold, source) if c == class_name else model.threshold_for(c, threshold_given)
                    s, m = got.get(j, (None, None))
                    rows.append(pf.row(out_dir, p, c, model.words[c], names[a + j], s, m, errors.get(j), t, src, write_maps,
                                       write_panels, model.pixel_thresholds.get(c)))
                writer.append(rows)
                advance(len(chunk))
    finally:
        close()
    pf.finish(out_dir, identity, 1, len(items), batch_size, fmt, method, model.image_size, class_name, word, threshold, source,
              started, merge=False, pixel_threshold=model.pixel_thresholds.get(class_name))
    return list(records.read_rows(out_dir / records.RESULT))
