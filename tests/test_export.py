"""kano export: the exported graph (ONNX through onnxruntime, OpenVINO IR) against the torch model it came from.

Every exportable method on the random-weight tiny CLIP and the shipped micro-CLIP, at two batch sizes, on real
photos: maps and scores within 1e-4 (fp32) and the same decisions. The trainable parts are moved off their
initial values (seeded), so that an export that dropped a head or the adapter would not pass by accident."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from kano.anomaly_data.io import image_to_array, list_images, load_image

from conftest import DATA

onnxruntime = pytest.importorskip("onnxruntime", reason="pip install 'kano[export,runtime]'")

PHOTOS = sorted(list_images(DATA / "hazelnut_toy" / "test" / "good")) + sorted(list_images(DATA / "hazelnut_toy" / "test" / "colour"))
CLASSES = {"hazelnut": "hazelnut", "metal_nut": "metal nut"}  # class -> prompt word (anomaly_data.prompt_name)


def build(method: str, spec: str):
    from kano.kanoclip import build_backbone, build_model
    from kano.kanoclip.winclip import build_zero_shot

    torch.manual_seed(0)
    bb = build_backbone(spec, image_size=64 if spec == "tiny" else None)
    if method == "winclip":
        return build_zero_shot("winclip", bb)
    model = build_model(method, bb).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model


def batch(model, n: int, offset: int = 0):
    bb = model.backbone
    files = [PHOTOS[(offset + i) % len(PHOTOS)] for i in range(n)]
    x = np.stack([image_to_array(load_image(f), bb.image_size, bb.mean, bb.std) for f in files])
    idx = np.array([(offset + i) % 2 for i in range(n)], dtype=np.int64)
    return x, idx


def torch_result(model, x: np.ndarray, idx: np.ndarray):
    words = list(CLASSES.values())
    with torch.inference_mode():
        r = model(torch.from_numpy(x), [words[i] for i in idx.tolist()]).inference()
    return r.image_score.numpy(), r.anomaly_map.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["tiny", "micro"])
@pytest.mark.parametrize("method", ["kanoclip", "aprilgan", "anomalyclip", "mvfa", "winclip"])
def test_onnx_equals_torch(method, spec, tmp_path):
    from kano.deploy.export import export_model
    from kano.deploy.runtime import ExportedModel

    model = build(method, spec)
    cases = [batch(model, n, offset) for n, offset in ((1, 5), (3, 0), (5, 2))]
    refs = [torch_result(model, x, idx) for x, idx in cases]
    # the threshold: the middle of the widest gap between the scores, so that both decisions occur and none
    # hangs on the last digits (a score equal to the threshold would flip with any rounding)
    ranked = np.unique(np.concatenate([s for s, _ in refs]))
    k = int(np.argmax(np.diff(ranked)))
    threshold = float(ranked[k] + ranked[k + 1]) / 2
    assert ranked[k + 1] - ranked[k] > 2e-4  # half of it exceeds the scores' tolerance below
    side = export_model(model, method, CLASSES, threshold, tmp_path / "m.onnx")
    assert side["classes"] == list(CLASSES) and side["thresholds"] == {c: threshold for c in CLASSES}
    assert side["image_size"] == model.backbone.image_size and side["prompt_words"] == list(CLASSES.values())
    exported = ExportedModel(tmp_path / "m.onnx", threads=1)
    for (x, idx), (s_ref, m_ref) in zip(cases, refs):
        n = len(x)
        s, m = exported.score(x, idx)
        assert s.shape == (n,) and m.shape == m_ref.shape
        assert np.abs(s - s_ref).max() <= 1e-4, f"{method} on {spec}, batch {n}: scores differ by {np.abs(s - s_ref).max()}"
        assert np.abs(m - m_ref).max() <= 1e-4, f"{method} on {spec}, batch {n}: maps differ by {np.abs(m - m_ref).max()}"
        decided = exported._session.run(["anomalous"], {"image": x, "class_index": idx})[0]
        assert decided.tolist() == (s_ref >= threshold).tolist()
    # the class index matters where the method's text depends on the class (AnomalyCLIP's prompts do not)
    x, _ = batch(model, 2)
    a, _ = exported.score(x, np.array([0, 0]))
    b, _ = exported.score(x, np.array([1, 1]))
    assert (np.abs(a - b).max() > 1e-6) == (method != "anomalyclip")


@pytest.mark.slow
def test_onnx_from_a_run_equals_torch_on_vit_b16_at_512_px(tmp_path):
    """The export's promise at a CLIP-size backbone and grid: ViT-B-16 with random weights at 512 px (a 32 x 32
    grid; 518 is not a multiple of 16), saved as a run and exported from it, so that the graph's backbone is rebuilt
    from the run's config as `kano export --run` does, against the model in memory. Within 1e-4 and the same
    decisions (measured: 6e-8 on scores, 4e-7 on maps)."""
    from kano.deploy.export import export
    from kano.deploy.runtime import ExportedModel
    from kano.kanoclip.runs import WEIGHTS, save_config, save_weights

    spec, size = "ViT-B-16-quickgelu", 512
    from kano.kanoclip import build_backbone, build_model

    torch.manual_seed(0)
    bb = build_backbone(spec, image_size=size)
    model = build_model("kanoclip", bb).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    x, idx = batch(model, 2, offset=5)  # a normal photo and a colour defect, one class each
    s_ref, m_ref = torch_result(model, x, idx)
    assert abs(s_ref[0] - s_ref[1]) > 2e-4
    threshold = float(s_ref.mean())
    run = tmp_path / "run"
    run.mkdir()
    save_weights(run / WEIGHTS, model.trainable_state_dict())
    save_config(run, {"method": "kanoclip", "backbone": spec, "image_size": size, "stages": bb.stages,
                      "vv_start": bb.vv_start, "pos_resize": bb.pos_resize, "model": model.cfg.to_dict(),
                      "threshold": threshold, "prompt_names": CLASSES})
    export(run=str(run), method=None, backbone=None, classes=list(CLASSES), fmt="onnx", out=tmp_path / "m.onnx")
    exported = ExportedModel(tmp_path / "m.onnx", threads=1)
    s, m = exported.score(x, idx)
    assert np.abs(s - s_ref).max() <= 1e-4, f"scores differ by {np.abs(s - s_ref).max()}"
    assert np.abs(m - m_ref).max() <= 1e-4, f"maps differ by {np.abs(m - m_ref).max()}"
    decided = exported._session.run(["anomalous"], {"image": x, "class_index": idx})[0]
    assert decided.tolist() == (s_ref >= threshold).tolist() and decided.any() and not decided.all()


@pytest.mark.slow
def test_openvino_ir_fp32_and_fp16(tmp_path):
    pytest.importorskip("openvino", reason="pip install 'kano[export]'")
    from kano.deploy.export import export_model
    from kano.deploy.runtime import ExportedModel

    model = build("kanoclip", "micro")
    x, idx = batch(model, 3)
    s_ref, m_ref = torch_result(model, x, idx)
    errors = {}
    for fp16 in (False, True):
        out = tmp_path / f"m{int(fp16)}.xml"
        side = export_model(model, "kanoclip", CLASSES, 0.5, out, "openvino", fp16=fp16)
        assert out.with_suffix(".bin").is_file() and side["precision"] == ("fp16 weights" if fp16 else "fp32")
        s, m = ExportedModel(out, threads=1).score(x, idx)
        errors[fp16] = max(np.abs(s - s_ref).max(), np.abs(m - m_ref).max())
    assert errors[False] <= 1e-4
    # fp16 weights: the error is stated in docs/deploy.md; here it must stay far below a map's useful resolution
    assert errors[True] <= 2e-2, errors
    print(f"OpenVINO IR max abs error vs torch: fp32 {errors[False]:.2e}, fp16 weights {errors[True]:.2e}")


def test_refusals_name_the_reason(tmp_path, cli):
    code, _, err = cli("export", "--backbone", "tiny", "--method", "musc", "--classes", "a", "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and "transductive" in err
    code, _, err = cli("export", "--backbone", "tiny", "--classes", "a", "--out", str(tmp_path / "m.onnx"), "--fp16")
    assert code == 2 and "--fp16 must go with --format openvino" in err
    code, _, err = cli("export", "--backbone", "tiny", "--classes", "a", "--out", str(tmp_path / "m.xml"))
    assert code == 2 and "must end in .onnx" in err
    code, _, err = cli("export", "--backbone", "tiny", "--classes", "a", "--format", "tflite", "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and "--format must be one of onnx, openvino, got 'tflite'" in err
    code, _, err = cli("export", "--backbone", "tiny", "--classes", "a,,b", "--out", str(tmp_path / "m.onnx"))
    assert code == 2 and "--classes must be distinct" in err
    assert not any(tmp_path.iterdir())  # nothing written by a refused export
