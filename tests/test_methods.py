"""`kano eval --method clip|clip-ac|winclip`: the zero-shot CLIP methods through the real CLI, their provenance,
their input errors, and CLIP's two-way softmax against a hand computation."""

import json

import numpy as np
import pytest
import torch

from kano.kanoclip import build_backbone
from kano.kanoclip.winclip import WINCLIP_TEMPLATES, build_zero_shot


def _provenance_method(out_dir):
    return json.loads((out_dir / "metrics.json").read_text())["provenance"]["method"]


def test_cli_eval_clip_ac_records_the_zero_shot_method(synth_root, tmp_path, cli):
    code, out, err = cli("eval", "--method", "clip-ac", "--backbone", "tiny", "--image-size", "64", "--data", f"mvtec:{synth_root}",
                         "--out", tmp_path / "e", "--classes", "disc", "--workers", "0")
    assert code == 0, err
    m = _provenance_method(tmp_path / "e")
    assert {k: m[k] for k in ("kind", "name", "backbone", "setting", "image_size")} == {
        "kind": "zero-shot", "name": "clip-ac", "backbone": "tiny", "setting": "per-image", "image_size": 64}
    assert "WinCLIP" in m["source"] and m["prompts"]["templates"] == len(WINCLIP_TEMPLATES) == 21
    assert m["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-3)  # the tiny backbone's untrained CLIP temperature
    assert "per-image zero-shot clip-ac" in " ".join(out.split())  # the summary wraps at 160 columns
    for name in ("metrics.csv", "metrics.md", "report.html"):
        assert (tmp_path / "e" / name).is_file()


def test_cli_eval_winclip_records_windows_and_templates(synth_root, tmp_path, cli):
    code, out, err = cli("eval", "--method", "winclip", "--backbone", "tiny", "--image-size", "64", "--data", f"mvtec:{synth_root}",
                         "--out", tmp_path / "e", "--classes", "disc", "--workers", "0")
    assert code == 0, err
    m = _provenance_method(tmp_path / "e")
    assert m["kind"] == "zero-shot" and m["name"] == "winclip" and m["setting"] == "per-image" and m["backbone"] == "tiny"
    assert m["window_scales"] == [2, 3] and m["temperature"] == 0.07 and "Jeong" in m["source"]
    assert m["prompts"] == {"normal_states": 7, "anomalous_states": 4, "templates": 21,
                            "ensemble": "states x templates, text features averaged per state"}
    scores = json.loads((tmp_path / "e" / "metrics.json").read_text())["classes"]["disc"]
    assert scores["image_auroc"] is not None and scores["pixel_auroc"] is not None


@pytest.mark.parametrize("args, message", [
    (["--method", "winclip"], "--method winclip needs --backbone SPEC (tiny, micro or MODEL:PRETRAINED)"),
    (["--method", "clip", "--run", "some/run", "--backbone", "tiny"], "give --backbone SPEC, not --run, got --run some/run"),
    (["--method", "winclipp"], "--method must be one of kanoclip, aprilgan, anomalyclip, mvfa, oneclass, patchcore, padim, kanoclip-untrained, clip,"),
    (["--method", "winclip", "--backbone", "tiny", "--image-size", "16"],
     "must give a patch grid of at least 3 x 3 (its largest window), i.e. >= 24 px with 8 px patches; got 16 px -> 2 x 2"),
])
def test_cli_eval_zero_shot_bad_input(synth_root, tmp_path, cli, args, message):
    code, out, err = cli("eval", "--data", f"mvtec:{synth_root}", "--out", tmp_path / "e", *args)
    assert code == 2 and message in err and "Traceback" not in err, err
    if args[1] == "winclipp":
        assert "self_similarity_randconv, mutual, musc, musc_randconv, got 'winclipp'" in err


def test_winclip_runs_on_the_smallest_grid_its_windows_fit():
    bb = build_backbone("tiny", image_size=24)  # 3 x 3 patches: one 3 x 3 window, four 2 x 2 ones
    res = build_zero_shot("winclip", bb)(torch.rand(2, 3, 24, 24), ["disc", "disc"]).inference()
    assert res.image_score.shape == (2,) and res.anomaly_map.shape == (2, 24, 24) and res.stage_maps.shape == (2, 3, 3, 3)
    with pytest.raises(ValueError, match="must give a patch grid of at least 3 x 3"):
        build_zero_shot("winclip", build_backbone("tiny", image_size=16))


def test_clip_image_score_is_the_two_way_softmax_by_hand(tiny_backbone):
    """CLIP: p(anomalous) = exp(s cos(g, t_a)) / (exp(s cos(g, t_n)) + exp(s cos(g, t_a))), s = exp(logit_scale)."""
    torch.manual_seed(0)
    model = build_zero_shot("clip", tiny_backbone)
    x = torch.randn(3, 3, 224, 224)
    clip = tiny_backbone.clip
    with torch.no_grad():
        g = clip.encode_image(x).numpy().astype(np.float64)                          # (3, E)
    e = g.shape[1]
    rng = np.random.default_rng(1)
    # hand-set (normal, anomalous) text features, random: cosines of about +-0.1, probabilities far from 0 and 1
    text = {c: rng.normal(size=(2, e)) for c in ("disc", "weave", "wood")}
    model.text._cache = {c: torch.tensor(t, dtype=torch.float32) for c, t in text.items()}
    names = ["weave", "disc", "wood"]
    res = model(x, names).inference()
    s = float(np.exp(clip.logit_scale.item()))
    expected = []
    for gi, c in zip(g, names):
        cos = [gi @ t / (np.linalg.norm(gi) * np.linalg.norm(t)) for t in text[c]]
        expected.append(np.exp(s * cos[1]) / (np.exp(s * cos[0]) + np.exp(s * cos[1])))
    np.testing.assert_allclose(res.image_score.numpy(), expected, rtol=1e-4, atol=1e-6)
    # unsaturated and distinct, so a wrong scale, a missing normalisation or a swapped class would show
    assert all(0.02 < v < 0.98 for v in expected) and len({round(v, 3) for v in expected}) == 3, expected
