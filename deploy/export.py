"""`kano export`: a run (or a zero-shot method on a backbone) as one ONNX graph or OpenVINO IR, image side only.

After training the text side is constant, so the graph holds only the image side (CLIP-VV, the heads, the
scoring) and the text features of the exported classes as an initialiser (C, 2, E); the tokenizer, the
text encoder and its argmax pooling never reach the exporter. One graph per run:

    inputs   image        (N, 3, S, S) float32, normalised as the sidecar JSON says (N dynamic)
             class_index  (N,) int64, the position of each image's class in the sidecar's "classes"
    outputs  image_score  (N,) float32 in [0, 1]
             anomaly_map  (N, S, S) float32 in [0, 1]
             anomalous    (N,) bool, image_score >= the image's class threshold (an initialiser (C,): the
                          run's calibrated threshold per class, as `kano predict --run` resolves it; false
                          where there is none)

Beside it, NAME.json (SIDECAR_VERSION) holds what the torch-free runtime needs: the preprocessing (size, mean,
std, resize), the classes and their prompt words, the thresholds and their sources, the method and where it
came from.

Exporter: torch.onnx.export with dynamo=True (torch.export + onnxscript), the exporter torch maintains; the
TorchScript one is deprecated in torch 2.x. The graph is tidied by onnxscript's clean-up passes (tidy_graph), then
checked by onnx.checker. OpenVINO IR is converted from that ONNX file by openvino.convert_model and written by
openvino.save_model, whose compress_to_fp16 stores the weights in half precision (computations stay fp32 on CPU).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

from kano.core.errors import KanoError

SIDECAR_VERSION = 1
FORMATS = ("onnx", "openvino")
OPSET = 18  # onnxscript's default for torch 2.14; onnxruntime 1.2x and OpenVINO 2025+ read it


def _need(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise KanoError(f"kano export needs the {module} package: pip install 'kano[{extra}]'") from None


class ImageSide(nn.Module):
    """The deployed graph: a method's image side with the text features as a buffer.

    images (N, 3, S, S), class_index (N,) int64 -> (image_score (N,), anomaly_map (N, S, S), anomalous (N,) bool).
    The method's module gives both halves: `text_bank(words)` -> (C, 2, E) per exported class (normal, abnormal),
    and `score_bank(images, rows (N, 2, E))`, the image side against each image's rows."""

    def __init__(self, model: nn.Module, text: torch.Tensor, thresholds: list[float | None]):
        super().__init__()
        self.model = model
        self.register_buffer("text", text.detach().float().clone())
        # per class; none: +inf, so that `anomalous` is false for that class (the sidecar says null)
        self.register_buffer("threshold", torch.tensor([float("inf") if t is None else float(t) for t in thresholds]))

    def forward(self, images: torch.Tensor, class_index: torch.Tensor):
        res = self.model.score_bank(images, self.text[class_index])
        return res.image_score, res.anomaly_map, res.image_score >= self.threshold[class_index]


def text_bank(model: nn.Module, words: list[str]) -> torch.Tensor:
    """(C, 2, E): each class word's text features as the method's own forward computes them."""
    with torch.no_grad():
        return model.text_bank(words).float()


def refuse_unexportable(method: str) -> None:
    """A KanoError saying why `method` has no graph (from its registry entry), or nothing when it has one."""
    from kano.core.registry import not_exportable_reason

    if why := not_exportable_reason(method):
        raise KanoError(f"--method {method} cannot be exported: {why}")


def load_source(run: str | None, method: str | None, backbone: str | None, classes: list[str], calibration=None):
    """-> (model in eval mode on the CPU, method name, {class: prompt word}, {class: (threshold, its source, pixel
    threshold)}, source description). Words and thresholds are the ones `kano predict` uses for the same options
    (kano.evaluator.detector.Detector, the API's), with `calibration` (a calibration file of this mode; a run's own by
    default); --backbone alone is the untrained model, as in `kano eval` and `kano predict`."""
    from kano.anomaly_data.names import class_word
    from kano.core.registry import UNTRAINED_METHOD, methods_with

    if not classes or any(not c.strip() for c in classes) or len(set(classes)) != len(classes):
        raise KanoError(f"--classes must be distinct, non-empty class names separated by commas, got {','.join(classes)!r}")
    if run:
        if method or backbone:
            raise KanoError("give --run RUN alone (its config names the method and backbone), got --run with "
                            f"{'--method' if method else '--backbone'}")
        from kano.evaluator.detector import Detector

        det = Detector.load(run, device="cpu", calibration=calibration)
        name = det.method["method"]
        refuse_unexportable(name)
        return det.model, name, {c: det.class_word(c) for c in classes}, _thresholds(det, classes), det.method
    if not backbone and not method:
        raise KanoError("kano export needs --run RUN, or --method NAME (one of "
                        f"{', '.join(methods_with(exportable=True, trained=False))}, with --backbone SPEC for those that "
                        f"take one), or --backbone SPEC alone ({UNTRAINED_METHOD})")
    from kano.evaluator.detector import Detector
    from kano.evaluator.methods import load_method
    from kano.core.registry import method_spec

    name = method or UNTRAINED_METHOD
    if method_spec(name).trained:
        raise KanoError(f"--method {name} is a trained method: export its run with --run RUN_DIR (without --method)")
    refuse_unexportable(name)
    model, info = load_method(name, None, backbone, None, "cpu")
    det = Detector(model, info["method"], calibration=calibration)  # the thresholds of this mode's calibration, if given
    return model, name, {c: class_word(c) for c in classes}, _thresholds(det, classes), info["method"]


def _thresholds(det, classes: list[str]) -> dict:
    """{class: (threshold, source, pixel threshold)} as `kano predict` resolves them."""
    return {c: (*det.threshold_for(c), det.pixel_threshold_for(c)[0]) for c in classes}


def export_model(model: nn.Module, method: str, words: dict[str, str], thresholds: dict | float | None, out: Path,
                 fmt: str = "onnx", fp16: bool = False, source: dict | None = None) -> dict:
    """Write OUT (model.onnx, or model.xml + model.bin) and OUT with suffix .json; returns the sidecar dict.
    words: class -> prompt word, in class_index order; thresholds: class -> (threshold, source), or one threshold
    for every class (None: no decisions)."""
    check_target(fmt, out, fp16)
    refuse_unexportable(method)
    out = Path(out)
    _need("onnx", "export")
    if fmt == "openvino":
        _need("openvino", "export")
    bb = model.backbone
    model = model.cpu().eval()
    classes = list(words)
    if not isinstance(thresholds, dict):
        thresholds = {c: (thresholds, None if thresholds is None else "given") for c in classes}
    thr = [thresholds[c][0] for c in classes]
    pixel = {c: (thresholds[c][2] if len(thresholds[c]) > 2 else None) for c in classes}
    graph = ImageSide(model, text_bank(model, [words[c] for c in classes]), thr).eval()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kano-export-") as tmp:
        onnx_path = out if fmt == "onnx" else Path(tmp) / "model.onnx"
        write_onnx(graph, bb.image_size, onnx_path)
        if fmt == "openvino":
            import openvino as ov

            ov.save_model(ov.convert_model(str(onnx_path)), str(out), compress_to_fp16=fp16)
    sidecar = {"format": "kano-deploy", "version": SIDECAR_VERSION, "model_format": fmt,
               "precision": "fp16 weights" if fp16 else "fp32", "method": method, "backbone": bb.spec,
               "image_size": bb.image_size, "mean": [float(v) for v in bb.mean], "std": [float(v) for v in bb.std],
               # anomaly_data.image_to_tensor: squash to S x S (no crop, so maps align with the image), bicubic
               "resize": "squash-bicubic", "classes": classes, "prompt_words": [words[c] for c in classes],
               "thresholds": dict(zip(classes, thr)), "threshold_sources": {c: thresholds[c][1] for c in classes}, "pixel_thresholds": pixel, "inputs": {"image": ["N", 3, bb.image_size, bb.image_size], "class_index": ["N"]},
               "outputs": {"image_score": ["N"], "anomaly_map": ["N", bb.image_size, bb.image_size], "anomalous": ["N"]},
               "opset": OPSET, "source": source or {}, "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    sidecar_path(out).write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def check_target(fmt: str, out: Path, fp16: bool) -> None:
    """The format, the file name and --fp16 agree (checked before anything is loaded)."""
    if fmt not in FORMATS:
        raise KanoError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fp16 and fmt != "openvino":
        raise KanoError("--fp16 must go with --format openvino (the IR's compress_to_fp16), got --format onnx")
    want = ".onnx" if fmt == "onnx" else ".xml"
    if Path(out).suffix != want:
        raise KanoError(f"--out must end in {want} for --format {fmt}, got {out}")


def sidecar_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".json")


def write_onnx(graph: ImageSide, size: int, path: Path) -> None:
    """torch.onnx.export (dynamo) with a dynamic batch dimension, then onnx.checker."""
    import onnx

    n = torch.export.Dim("batch", min=1, max=4096)
    example = (torch.zeros(2, 3, size, size), torch.zeros(2, dtype=torch.long))
    import logging
    import warnings

    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [q.level for q in quiet]
    for q in quiet:  # the exporter logs a line per folded op; the result is checked below instead
        q.setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(graph, example, input_names=["image", "class_index"],
                                 output_names=["image_score", "anomaly_map", "anomalous"],
                                 dynamic_shapes={"images": {0: n}, "class_index": {0: n}}, opset_version=OPSET,
                                 dynamo=True, external_data=False, verbose=False, optimize=False)
        tidy_graph(prog.model)
    for q, level in zip(quiet, levels):
        q.setLevel(level)
    prog.save(str(path), external_data=False)
    onnx.checker.check_model(str(path))


def tidy_graph(model) -> None:
    """onnxscript's clean-up passes on the exported graph (an onnx_ir Model, in place): inline functions, fold
    constants, drop what is unused, lift constants to initialisers and store equal ones once, merge common
    subexpressions. torch.onnx.export's optimize=True runs these plus onnxscript's pattern rewrites; the rewrites
    only fuse ops that onnxruntime and OpenVINO fuse again when they load a graph, and took about 40% of an
    export's CPU time (the tiny CLIP's KAnoCLIP: 33 s with them, 19 s with these passes alone; the file 0.3%
    larger, the same onnxruntime speed and scores)."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript.optimizer import constant_folding

    ir.passes.Sequential(
        common.InlinePass(),
        constant_folding.FoldConstantsPass(shape_inference=True,
                                           input_size_limit=constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                           output_size_limit=constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
        common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
    )(model)


def export(*, run: str | None, method: str | None, backbone: str | None, classes: list[str], fmt: str, out: Path,
           fp16: bool = False, calibration=None) -> dict:
    """`kano export`: load the source, write the graph and its sidecar; returns the sidecar dict."""
    check_target(fmt, out, fp16)
    model, name, words, thresholds, source = load_source(run, method, backbone, classes, calibration)
    return export_model(model, name, words, thresholds, out, fmt, fp16, source)
