"""CLIP, CLIP-AC and WinCLIP: WinCLIP against anomalib's WinClipModel on shared random open_clip weights, and
the aggregation rules by hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kano.kanoclip import build_backbone
from kano.kanoclip.winclip import WinCLIP, build_zero_shot, harmonic_aggregate, window_indices, winclip_prompts

ROOT = Path(__file__).resolve().parent.parent
ANOMALIB_PY = Path(os.environ.get("KANO_ANOMALIB_PYTHON", ROOT / ".venv-anomalib" / "bin" / "python"))
# a small ViT both accept: 80 px, patch 16 -> a 5 x 5 grid (16 windows of 2 x 2, 9 of 3 x 3)
CONFIG = {"embed_dim": 32, "quick_gelu": True,
          "vision_cfg": {"image_size": 80, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16, "mlp_ratio": 2.0},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "mlp_ratio": 2.0}}
NAME = "kano-winclip-test"


def test_window_indices_and_harmonic_mean_by_hand():
    w = window_indices(3, 3, 2)
    assert w.tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    scores = torch.tensor([[0.5, 0.25, 1.0, 0.2]])
    out = harmonic_aggregate(scores, w, 9)[0]
    # patch 0: window 0 only -> 0.5; patch 1: windows 0, 1 -> 2 / (2 + 4) = 1/3; patch 4: all -> 4 / (2+4+1+5) = 1/3
    assert out[0].item() == pytest.approx(0.5)
    assert out[1].item() == pytest.approx(1 / 3)
    assert out[4].item() == pytest.approx(4 / 12)
    assert out[8].item() == pytest.approx(0.2)
    zero = harmonic_aggregate(torch.tensor([[0.0, 0.5, 0.5, 0.5]]), w, 9)[0]
    assert zero[0].item() == 0.0 and zero[4].item() == 0.0 and zero[8].item() == pytest.approx(0.5)


def test_prompt_ensemble_sizes():
    normal, anomalous = winclip_prompts("bottle")
    assert len(normal) == 7 * 21 and len(anomalous) == 4 * 21
    assert normal[0] == "a cropped photo of the bottle." and anomalous[0] == "a cropped photo of the damaged bottle."


@pytest.mark.parametrize("method", ["clip", "clip-ac", "winclip"])
def test_zero_shot_methods_return_the_typed_result(tiny_backbone, method):
    model = build_zero_shot(method, tiny_backbone)
    x = torch.randn(2, 3, 224, 224)
    res = model(x, ["disc", "weave"]).inference()
    assert res.image_score.shape == (2,) and res.anomaly_map.shape == (2, 224, 224)
    assert ((res.image_score > 0) & (res.image_score < 1)).all() and torch.isfinite(res.anomaly_map).all()
    assert res.anomaly_map.min() >= 0 and res.anomaly_map.max() <= 1


def test_winclip_window_embedding_is_a_separate_forward(tiny_backbone):
    """A 1 x 1 window covering patch p equals the image encoder run on CLS + patch p alone."""
    v = tiny_backbone.clip.visual
    m = WinCLIP(tiny_backbone)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        t = v.conv1(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([v.class_embedding.view(1, 1, -1), t], 1) + v.positional_embedding
        emb = m._encode_windows(tokens, torch.tensor([[5], [17]]))
        alone = v.transformer(v.ln_pre(tokens[:, [0, 18]]))
        ref = v.ln_post(alone[:, 0]) @ v.proj
    assert torch.allclose(emb[0, 1], ref[0], atol=1e-5)


@pytest.mark.skipif(not ANOMALIB_PY.is_file() and os.environ.get("KANO_REQUIRE_ANOMALIB") != "1",
                    reason=f"anomalib's side venv is absent ({ANOMALIB_PY}); .ci/run prepares it (set KANO_REQUIRE_ANOMALIB=1 to fail instead)")
@pytest.mark.parametrize("k_shot", [0, 2])
@pytest.mark.slow
def test_winclip_equals_anomalib_on_shared_random_weights(tmp_path, k_shot):
    import open_clip
    from safetensors.torch import load_file, save_file

    assert ANOMALIB_PY.is_file(), f"KANO_REQUIRE_ANOMALIB=1 but {ANOMALIB_PY} is missing"
    cfg = tmp_path / f"{NAME}.json"
    cfg.write_text(json.dumps(CONFIG))
    open_clip.add_model_config(cfg)
    torch.manual_seed(7)
    clip = open_clip.create_model(NAME)
    weights = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    images = torch.randn(3, 3, 80, 80)
    save_file({"images": images}, str(tmp_path / "images.safetensors"))
    out = tmp_path / "ref.safetensors"
    refs = torch.randn(k_shot, 3, 80, 80)
    extra = []
    if k_shot:  # WinCLIP+: k normal reference images
        save_file({"images": refs}, str(tmp_path / "refs.safetensors"))
        extra = [str(tmp_path / "refs.safetensors")]
    proc = subprocess.run([str(ANOMALIB_PY), str(Path(__file__).parent / "anomalib_winclip_ref.py"), str(cfg), str(weights),
                           str(tmp_path / "images.safetensors"), "bottle", str(out), *extra], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = load_file(str(out))

    bb = build_backbone(f"{NAME}:{weights}")
    model = WinCLIP(bb).eval()
    if k_shot:
        model.set_reference("bottle", refs)
    res = model(images, ["bottle"] * 3).inference()
    d_score = (res.image_score - ref["pred_score"]).abs().max().item()
    d_map = (res.anomaly_map - ref["anomaly_map"]).abs().max().item()
    d_unadapted = (res.anomaly_map - ref["anomaly_map_unadapted"]).abs().max().item()
    print(f"\nWinCLIP vs anomalib: max |score diff| {d_score:.2e}, max |map diff| {d_map:.2e}; "
          f"vs anomalib as released (windows attend across windows) {d_unadapted:.2e}")
    assert d_score <= 1e-4 and d_map <= 1e-4
    if k_shot:  # the references changed the result: the few-shot path ran on both sides
        zero = WinCLIP(bb).eval()(images, ["bottle"] * 3).inference()
        assert (zero.anomaly_map - res.anomaly_map).abs().max().item() > 1e-3
        assert (zero.image_score - res.image_score).abs().max().item() > 1e-4
    # the maps carry information at this size: not constant, so equality is not trivial
    assert (ref["anomaly_map"].amax() - ref["anomaly_map"].amin()).item() > 1e-3


def test_winclip_plus_visual_association_by_hand():
    """WinCLIP eq. 4: (1 - the best cosine similarity to the reference memory) / 2."""
    memory = torch.nn.functional.normalize(torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]]), dim=-1)
    got = WinCLIP.association(torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]), memory)
    assert got.tolist() == pytest.approx([(1 - 2 ** -0.5) / 2, 0.0, 0.5], abs=1e-6)


def test_cli_winclip_plus_takes_its_references_from_the_train_split(synth_root, tmp_path, cli):
    out = tmp_path / "wplus"
    code, stdout, err = cli("eval", "--method", "winclip", "--k-shot", "1", "--backbone", "tiny", "--image-size", "64",
                            "--data", f"mvtec:{synth_root}", "--out", out, "--n-overlays", "0")
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    prov = m["provenance"]["method"]
    assert prov["name"] == "winclip+" and prov["setting"] == "few-shot" and prov["k_shot"] == 1
    assert all(len(v) == 1 and "/train/good/" in v[0] for v in prov["references"].values())
    assert set(prov["references"]) == {"disc", "weave"}
    zero = tmp_path / "zero"
    assert cli("eval", "--method", "winclip", "--backbone", "tiny", "--image-size", "64", "--data", f"mvtec:{synth_root}",
               "--out", zero, "--n-overlays", "0")[0] == 0
    z = json.loads((zero / "metrics.json").read_text())
    assert z["mean"]["pixel_auroc"] != m["mean"]["pixel_auroc"]


@pytest.mark.parametrize("args,expected", [
    (["--method", "clip", "--k-shot", "1"], "--k-shot is used by --method winclip only (few-shot), got --method clip"),
    (["--method", "winclip", "--k-shot", "3"], "--k-shot 3 needs 3 normal train images of class disc"),
])
def test_cli_winclip_plus_bad_input(args, expected, synth_root, tmp_path, cli):
    code, out, err = cli("eval", *args, "--backbone", "tiny", "--image-size", "64", "--data", f"mvtec:{synth_root}",
                         "--out", tmp_path / "x")
    assert code == 2 and expected in " ".join((out + err).split()) and "Traceback" not in err
