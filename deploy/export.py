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
TorchScript one is deprecated in torch 2.x. The graph is then checked by onnx.checker. OpenVINO IR is
converted from that ONNX file by openvino.convert_model and written by openvino.save_model, whose
compress_to_fp16 stores the weights in half precision (computations stay fp32 on CPU).
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
def _one_class_methods() -> tuple[str, ...]:
    from kano.core.registry import ONE_CLASS_METHODS

    return ONE_CLASS_METHODS


# one-class methods (kanoclip/one_class.py): their fitted tensors are the graph's constants, no text side
EXPORTABLE = ("kanoclip", "aprilgan", "anomalyclip", "winclip", *_one_class_methods())
# Why the other methods of `kano eval --method` have no graph: named in the refusal.
NOT_EXPORTABLE = {
    "musc": "MuSc is transductive: it scores each image against the other test images of its batch, so it has no "
            "fixed per-image graph",
    "retrieval": "retrieval scores against a memory of auxiliary images built at load time (not a fixed graph)",
    "clip": "the plain CLIP baseline is not exported (export kanoclip, aprilgan, anomalyclip or winclip)",
    "clip-ac": "export the untrained CLIP-AC baseline as `kano export --backbone SPEC` (KAnoCLIP without training)",
}
OPSET = 18  # onnxscript's default for torch 2.14; onnxruntime 1.2x and OpenVINO 2025+ read it


def _need(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError:
        raise KanoError(f"kano export needs the {module} package: pip install 'kano[{extra}]'") from None


class ImageSide(nn.Module):
    """The deployed graph: a method's image side with the text features as a buffer.

    images (N, 3, S, S), class_index (N,) int64 -> (image_score (N,), anomaly_map (N, S, S), anomalous (N,) bool).
    text: (C, 2, E) per exported class (normal, abnormal), or (2, E) for AnomalyCLIP's class-agnostic prompts."""

    def __init__(self, model: nn.Module, method: str, text: torch.Tensor, thresholds: list[float | None]):
        super().__init__()
        self.model, self.method = model, method
        self.register_buffer("text", text.detach().float().clone())
        # per class; none: +inf, so that `anomalous` is false for that class (the sidecar says null)
        self.register_buffer("threshold", torch.tensor([float("inf") if t is None else float(t) for t in thresholds]))

    def forward(self, images: torch.Tensor, class_index: torch.Tensor):
        if getattr(self.model, "one_class", False):  # fitted on one product's normal photos: class_index selects nothing
            res = self.model(images)
        elif self.method == "winclip":
            res = self.model.score_text(images, self.text[class_index])
        else:
            feats = self.model.encode_images(images)
            # AnomalyCLIP's prompts are class-agnostic; class_index still selects a row (all rows equal), so the
            # graph keeps that input and every exported method has the same signature
            text = self.text[class_index][0] if self.method == "anomalyclip" else self.text[class_index]
            res = self.model.score_text(feats, text, images.shape[-1])
        return res.image_score, res.anomaly_map, res.image_score >= self.threshold[class_index]


def text_bank(model: nn.Module, method: str, words: list[str]) -> torch.Tensor:
    """(C, 2, E): each class word's text features as the method's own forward computes them."""
    with torch.no_grad():
        if getattr(model, "one_class", False):  # no text side: a (C, 2, 1) placeholder keeps the graph's signature
            return torch.zeros(len(words), 2, 1)
        if method == "kanoclip":
            if model.cfg.prompt_class:
                words = [model.cfg.prompt_class] * len(words)
            w_n, w_a = model.text_features(words)
            return torch.stack([w_n, w_a], 1).float()
        if method == "aprilgan":
            return model.text_features(words).float()
        if method == "anomalyclip":
            return model.text_features().float().unsqueeze(0).expand(len(words), -1, -1).contiguous()
        if method == "winclip":
            return model.text(words).float()
    raise KanoError(f"method must be one of {', '.join(EXPORTABLE)}, got {method!r}")


def load_source(run: str | None, method: str | None, backbone: str | None, classes: list[str]):
    """-> (model in eval mode on the CPU, method name, {class: prompt word}, {class: (threshold, its source)},
    source description). A run's words and thresholds are the ones `kano predict --run` uses (kano.api.Detector)."""
    from kano.anomaly_data.names import class_word

    if not classes or any(not c.strip() for c in classes) or len(set(classes)) != len(classes):
        raise KanoError(f"--classes must be distinct, non-empty class names separated by commas, got {','.join(classes)!r}")
    if method and method in NOT_EXPORTABLE:
        raise KanoError(f"--method {method} cannot be exported: {NOT_EXPORTABLE[method]}")
    if run:
        if method or backbone:
            raise KanoError("give --run RUN alone (its config names the method and backbone), got --run with "
                            f"{'--method' if method else '--backbone'}")
        from kano.api import Detector

        det = Detector.load(run, device="cpu")
        name = det.model.method
        return (det.model, name, {c: det.class_word(c) for c in classes}, {c: det.threshold_for(c) for c in classes},
                det.method)
    if not backbone:
        raise KanoError("kano export needs --run RUN, or --backbone SPEC (with --method winclip, or alone for the untrained "
                        "KAnoCLIP baseline)")
    from kano.evaluator.report import baseline_method

    words = {c: class_word(c) for c in classes}
    none = {c: (None, None) for c in classes}
    if method in (None, "kanoclip"):
        from kano.evaluator.loading import load_model

        model, _ = load_model(None, backbone, None, "cpu")
        return model, "kanoclip", words, none, baseline_method("clip-ac", backbone, prompts="a photo of a normal/abnormal [class]")
    if method != "winclip":
        raise KanoError(f"--method must be winclip (or left out, for the untrained KAnoCLIP baseline) with --backbone, "
                        f"got {method!r}; trained methods are exported from their run with --run")
    from kano.kanoclip import build_backbone
    from kano.kanoclip.winclip import build_zero_shot

    return build_zero_shot("winclip", build_backbone(backbone, device="cpu")), "winclip", words, none, \
        {"kind": "zero-shot", "name": "WinCLIP", "backbone": backbone}


def export_model(model: nn.Module, method: str, words: dict[str, str], thresholds: dict | float | None, out: Path,
                 fmt: str = "onnx", fp16: bool = False, source: dict | None = None) -> dict:
    """Write OUT (model.onnx, or model.xml + model.bin) and OUT with suffix .json; returns the sidecar dict.
    words: class -> prompt word, in class_index order; thresholds: class -> (threshold, source), or one threshold
    for every class (None: no decisions)."""
    check_target(fmt, out, fp16)
    if method not in EXPORTABLE:
        raise KanoError(f"method must be one of {', '.join(EXPORTABLE)}, got {method!r}"
                        + (f" ({NOT_EXPORTABLE[method]})" if method in NOT_EXPORTABLE else ""))
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
    graph = ImageSide(model, method, text_bank(model, method, [words[c] for c in classes]), thr).eval()
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
               "thresholds": dict(zip(classes, thr)), "threshold_sources": {c: thresholds[c][1] for c in classes}, "inputs": {"image": ["N", 3, bb.image_size, bb.image_size], "class_index": ["N"]},
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
                                 dynamo=True, external_data=False, verbose=False)
    for q, level in zip(quiet, levels):
        q.setLevel(level)
    prog.save(str(path), external_data=False)
    onnx.checker.check_model(str(path))


def export(*, run: str | None, method: str | None, backbone: str | None, classes: list[str], fmt: str, out: Path,
           fp16: bool = False) -> dict:
    """`kano export`: load the source, write the graph and its sidecar; returns the sidecar dict."""
    check_target(fmt, out, fp16)
    model, name, words, thresholds, source = load_source(run, method, backbone, classes)
    return export_model(model, name, words, thresholds, out, fmt, fp16, source)
