"""Zero-parameter baselines: each map on a small hand-made image against a hand computation, and `kano eval --method`."""

import json
import math

import pytest
import torch

from kano.evaluator import baselines as B


def _det(method, size=32):
    return B.ZeroParameterDetector(method, image_size=size)


def _flat_image(value=(0.2, 0.2, 0.2), size=8):
    return torch.tensor(value).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


def test_median_colour_distance_by_hand():
    img = _flat_image()
    img[0, :, 3, 5] = torch.tensor([1.0, 0.2, 0.2])  # one red pixel among 63 grey ones: the median stays grey
    m = _det("median_colour").raw_map(img)[0]
    assert m[3, 5].item() == pytest.approx(0.8 / math.sqrt(3), abs=1e-6)
    assert m.sum().item() == pytest.approx(0.8 / math.sqrt(3), abs=1e-6)  # every other pixel is at distance 0


def test_darkness_and_brightness_by_hand():
    img = _flat_image((0.5, 0.5, 0.5))
    img[0, :, 0, 0] = torch.tensor([0.1, 0.4, 0.9])
    lum = 0.299 * 0.1 + 0.587 * 0.4 + 0.114 * 0.9  # 0.4393
    assert _det("brightness").raw_map(img)[0, 0, 0].item() == pytest.approx(lum, abs=1e-6)
    assert _det("darkness").raw_map(img)[0, 0, 0].item() == pytest.approx(1 - lum, abs=1e-6)
    assert _det("darkness").raw_map(img)[0, 4, 4].item() == pytest.approx(0.5, abs=1e-6)


def test_local_median_by_hand():
    img = _flat_image((0.3, 0.3, 0.3), size=7)
    img[0, :, 3, 3] = 0.9  # a lone bright pixel: its 3x3 median is the background, its neighbours' too
    img[0, :, :, 6] = 0.7  # a bright column at the border: half of each of its pixels' windows (reflected) is bright
    m = B.local_median_map(img, 3)[0]
    assert m[3, 3].item() == pytest.approx(0.6, abs=1e-6)  # sqrt(3 * 0.6^2) / sqrt(3)
    assert m[3, 2].item() == pytest.approx(0.0, abs=1e-6)
    # pixel (2, 6): window columns 5, 6, 5 (reflect) -> 6 of 9 values are 0.3, 3 are 0.7: median 0.3, distance 0.4
    assert m[2, 6].item() == pytest.approx(0.4, abs=1e-6)
    # pixel (2, 5): columns 4, 5, 6 -> 6 at 0.3, 3 at 0.7: median 0.3, its own value 0.3
    assert m[2, 5].item() == pytest.approx(0.0, abs=1e-6)


def test_self_similarity_on_raw_pixels_by_hand():
    img = _flat_image((0.5, 0.5, 0.5), size=32)
    img[0, :, 8:16, 8:16] = 1.0  # one 8x8 block exactly under the patch at grid cell (2, 2) (stride 4)
    feats, gh, gw = B.patch_grid(img, 8, 4)
    assert (gh, gw) == (7, 7) and feats.shape == (1, 49, 192)
    sc = B.self_similarity_scores(feats, gh, gw, exclude=3).view(7, 7)  # cells >= 12 px apart: no overlap
    # that patch's 3 nearest patches outside its neighbourhood are plain grey: RMS distance 0.5 on all 192 values
    assert sc[2, 2].item() == pytest.approx(0.5, abs=1e-6)
    # a grey patch far from the block has grey patches at distance 0 outside its neighbourhood
    assert sc[6, 6].item() == pytest.approx(0.0, abs=1e-6)
    # a patch half over the block (cell (2, 3): columns 12-19, 4 of 8 bright): RMS over 192 values of 0.5 on half of them
    assert sc[2, 3].item() == pytest.approx(0.5 * math.sqrt(0.5), abs=1e-6)


def test_patches_to_map_averages_the_covering_patches():
    scores = torch.zeros(1, 9)
    scores[0, 4] = 1.0  # centre patch of a 3x3 grid, p=4, stride 2 -> covers pixels 2..5
    m = B.patches_to_map(scores, 3, 3, 4, 2, (9, 9))[0]  # patches cover 8x8; the 9th row/column repeats the 8th
    assert m[3, 3].item() == pytest.approx(1 / 4)  # pixel (3, 3) lies under patches (0..1, 0..1): 4 patches, one scores 1
    assert m[2, 2].item() == pytest.approx(1 / 4)
    assert m[0, 0].item() == 0 and m[5, 5].item() == pytest.approx(1 / 4) and m[6, 6].item() == 0
    assert m.shape == (9, 9) and m[8, 8].item() == 0 and m[8, 3].item() == m[7, 3].item()


def test_mutual_scoring_by_hand():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    tokens = torch.stack([torch.stack([e1, e2]), torch.stack([e1, e2]), torch.stack([e1, -e1])])  # (3 images, 2 patches, 2)
    sc = B.mutual_scores(tokens, fraction=0.3)  # keeps ceil(0.3 * 2) = 1 closest other image
    # image 2's patch -e1: nearest in image 0 is e2 (cos 0 -> (1 - 0) / 2 = 0.5), in image 1 the same
    assert sc[2, 1].item() == pytest.approx(0.5)
    assert sc[0, 0].item() == pytest.approx(0.0) and sc[0, 1].item() == pytest.approx(0.0)  # image 1 holds both
    # image 2's e1: image 0 has e1 (0)
    assert sc[2, 0].item() == pytest.approx(0.0)
    # with every other image kept: image 0's e2 is 0 to image 1 and 0.5 to image 2 -> mean 0.25
    assert B.mutual_scores(tokens, fraction=1.0)[0, 1].item() == pytest.approx(0.25)


def test_random_conv_net_is_seeded_and_maps_are_in_unit_range():
    a, b = B.RandomConvNet(), B.RandomConvNet()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(a(x), b(x)) and a(x).shape == (2, 64, 8, 8)
    for m in ("self_similarity_randconv", "musc_randconv", "self_similarity", "local_median"):
        out = _det(m)(x, ["c", "c"]).inference()
        assert out.anomaly_map.shape == (2, 32, 32) and 0 <= out.anomaly_map.min() and out.anomaly_map.max() <= 1
        assert torch.equal(out.image_score, out.anomaly_map.flatten(1).amax(1))


def test_cli_eval_method_writes_metrics_with_the_method(synth_root, tmp_path, cli):
    code, out, err = cli("eval", "--method", "median_colour", "--data", f"mvtec:{synth_root}", "--out", tmp_path / "e",
                         "--image-size", "64")
    assert code == 0, err
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    method = m["provenance"]["method"]
    assert method["name"] == "median_colour" and method["kind"] == "zero-parameter" and method["setting"] == "per-image"
    assert set(m["classes"]) == {"disc", "weave"} and m["mean"]["pixel_auroc"] is not None
    assert "per-image zero-parameter median_colour" in " ".join(out.split())


def test_cli_eval_mutual_is_transductive_on_a_backbone(synth_root, tmp_path, cli):
    code, out, err = cli("eval", "--method", "mutual", "--backbone", "tiny", "--image-size", "64", "--data", f"mvtec:{synth_root}",
                         "--out", tmp_path / "e", "--classes", "disc")
    assert code == 0, err
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["provenance"]["method"] == {"name": "mutual", "method": "mutual", "kind": "transductive", "setting": "transductive",
                                         "parameters": "frozen backbone, no training", "backbone": "tiny", "image_size": 64}


@pytest.mark.parametrize("args, message", [
    (["--method", "bogus"], "--method must be one of kanoclip, aprilgan, anomalyclip, mvfa, oneclass, patchcore, padim, kanoclip-untrained, clip, clip-ac, winclip, retrieval, median_colour, darkness"),
    (["--method", "mutual"], "--method mutual needs --backbone"),
    (["--method", "darkness", "--backbone", "tiny"], "--backbone is used by --method kanoclip-untrained, clip, clip-ac, winclip, retrieval, mutual, musc only, got --method darkness"),
    (["--method", "darkness", "--image-size", "30"], "multiple of 4 and >= 32, got 30"),
])
def test_cli_eval_method_bad_input(synth_root, tmp_path, cli, args, message):
    code, out, err = cli("eval", "--data", f"mvtec:{synth_root}", "--out", tmp_path / "e", *args)
    assert code == 2 and message in err and "Traceback" not in err
