"""Full MuSc (kanoclip/musc.py) against hand computations in numpy written from MuSc's definitions (LNAMD, MSM's
interval average, RsCIN), its invariants, `kano eval --method musc` and `kano eval --mutual`."""

import json
import math

import numpy as np
import pytest
import torch

from kano.evaluator.metrics import METRIC_KEYS
from kano.kanoclip import build_backbone
from kano.kanoclip import musc as M


# ---- numpy references, from the equations (loops, no pooling or top-k helpers) ----

def np_lnamd(tokens, r, eps=1e-5):
    """tokens (N, L, C) on a g x g grid: layer norm over all L*C values of each image, r x r neighbourhood
    mean with zeros outside the grid (always divided by r*r), unit norm."""
    n, l, c = tokens.shape
    g = math.isqrt(l)
    out = np.zeros_like(tokens, dtype=np.float64)
    for i in range(n):
        x = tokens[i].astype(np.float64)
        x = (x - x.mean()) / np.sqrt(x.var() + eps)
        grid = x.reshape(g, g, c)
        for y in range(g):
            for xx in range(g):
                acc = np.zeros(c)
                for dy in range(-(r // 2), r // 2 + 1):
                    for dx in range(-(r // 2), r // 2 + 1):
                        if 0 <= y + dy < g and 0 <= xx + dx < g:
                            acc += grid[y + dy, xx + dx]
                v = acc / (r * r)
                out[i, y * g + xx] = v / np.linalg.norm(v)
    return out


def np_msm(z, fraction=0.3):
    """z (N, L, C): per patch, min distance to each other image's patches; mean of the lowest
    max(1, floor(fraction * (N - 1))) of those N - 1 values."""
    n, l, _ = z.shape
    keep = max(1, int(fraction * (n - 1)))
    out = np.zeros((n, l))
    for i in range(n):
        for p in range(l):
            per_image = sorted(min(np.linalg.norm(z[i, p] - z[j, q]) for q in range(l)) for j in range(n) if j != i)
            out[i, p] = np.mean(per_image[:keep])
    return out


def np_rscin(scores, cls, ks=(1, 2, 3), clamp_negative=False):
    s = (scores - scores.min()) / (scores.max() - scores.min())
    t = cls / np.linalg.norm(cls, axis=1, keepdims=True)
    w = np.maximum(t @ t.T, 0) if clamp_negative else t @ t.T
    out = np.zeros(len(s))
    for i in range(len(s)):
        order = sorted(range(len(s)), key=lambda j: -w[i, j])
        vals = []
        for k in ks:
            nb = order[:min(k, len(s))]
            vals.append(sum(w[i, j] * s[j] for j in nb) / sum(w[i, j] for j in nb))
        out[i] = np.mean(vals)
    return out


# ---- LNAMD ----

def test_lnamd_on_a_3x3_grid_by_hand():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(2, 9, 2)) + np.array([3.0, -1.0])  # an offset the layer norm must remove
    for r in (1, 3, 5):
        got = M.lnamd(torch.tensor(tokens, dtype=torch.float32), r).numpy()
        np.testing.assert_allclose(got, np_lnamd(tokens, r), atol=1e-5)
    # r = 3 at the corner (0, 0) sums 4 grid tokens and 5 zeros; one number written out in full
    x = tokens[0]
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-5)
    corner = (x[0] + x[1] + x[3] + x[4]) / 9
    np.testing.assert_allclose(M.lnamd(torch.tensor(tokens, dtype=torch.float32), 3)[0, 0].numpy(),
                               corner / np.linalg.norm(corner), atol=1e-5)


def test_lnamd_rejects_a_non_square_grid_and_an_even_degree():
    with pytest.raises(ValueError, match="square grid, got 6"):
        M.lnamd(torch.zeros(1, 6, 2), 1)
    with pytest.raises(ValueError, match="odd integer >= 1, got 2"):
        M.lnamd(torch.zeros(1, 4, 2), 2)


# ---- MSM ----

def test_msm_interval_average_by_hand():
    e1, e2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    # 3 images x 4 patches x 2 dims; image 1 is all e1, image 2 holds one odd patch (-e1)
    z = np.stack([np.stack([e1, e2, e1, e2]), np.stack([e1, e1, e1, e1]), np.stack([e1, e2, e2, -e1])])
    got = M.msm(torch.tensor(z, dtype=torch.float32)).numpy()
    # floor(0.3 * 2) = 0 -> 1 image kept, the closer one. -e1: nearest is e2 in image 0 (sqrt 2), e1 in image 1 (2)
    assert got[2, 3] == pytest.approx(math.sqrt(2), abs=1e-6)
    assert got[0, 0] == pytest.approx(0.0, abs=1e-6) and got[2, 0] == pytest.approx(0.0, abs=1e-6)
    # image 0's e2 patch: sqrt(2) to image 1 (only e1), 0 to image 2 (has e2) -> 0
    assert got[0, 1] == pytest.approx(0.0, abs=1e-6)
    # image 1's e1 patches: 0 to both others
    assert np.allclose(got[1], 0.0, atol=1e-6)


def test_msm_keeps_the_lowest_30_percent_of_the_other_images():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(11, 4, 3))
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    got = M.msm(torch.tensor(z, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, np_msm(z), atol=1e-5)  # 10 other images: the 3 closest
    # the interval matters: the mean over all 10 images differs from the lowest 3
    assert not np.allclose(got, np_msm(z, fraction=1.0), atol=1e-3)
    # the public code floors: 7 others -> floor(2.1) = 2 images, 5 -> 1, 20 -> 6; fewer than 4 -> at least 1
    z8 = z[:8]
    np.testing.assert_allclose(M.msm(torch.tensor(z8, dtype=torch.float32)).numpy(), np_msm(z8), atol=1e-5)
    assert [M.interval_count(k) for k in (2, 3, 5, 7, 10, 20)] == [(0, 1), (0, 1), (0, 1), (0, 2), (0, 3), (0, 6)]


def test_msm_averaged_over_degrees_and_stages():
    rng = np.random.default_rng(2)
    stages = [rng.normal(size=(4, 9, 3)), rng.normal(size=(4, 9, 3))]
    got = M.musc_patch_scores([torch.tensor(t, dtype=torch.float32) for t in stages], r_list=(1, 3)).numpy()  # (4, 2, 9)
    want = np.stack([np.mean([np_msm(np_lnamd(t, r)) for r in (1, 3)], 0) for t in stages], 1)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_msm_needs_two_images():
    with pytest.raises(Exception, match="at least 2 test images per class, got 1"):
        M.msm(torch.ones(1, 4, 2))


# ---- RsCIN ----

def test_rscin_by_hand():
    angles = np.radians([0.0, 10.0, 30.0, 70.0])
    cls = np.stack([np.cos(angles), np.sin(angles)], 1) * np.array([[1.0], [2.0], [0.5], [3.0]])  # norms must not matter
    scores = np.array([0.2, 0.4, 0.6, 1.0])
    got = M.rscin(torch.tensor(scores), torch.tensor(cls)).numpy()
    np.testing.assert_allclose(got, np_rscin(scores, cls), atol=1e-6)
    # image 0 written out: s = (0, 0.25, 0.5, 1); its nearest are itself (1), image 1 (cos 10), image 2 (cos 30)
    c10, c30 = math.cos(math.radians(10)), math.cos(math.radians(30))
    k1, k2, k3 = 0.0, (c10 * 0.25) / (1 + c10), (c10 * 0.25 + c30 * 0.5) / (1 + c10 + c30)
    assert got[0] == pytest.approx((k1 + k2 + k3) / 3, abs=1e-6)
    assert not np.allclose(got, (scores - 0.2) / 0.8)  # RsCIN changes the scores


def test_rscin_range_and_degenerate_inputs():
    cls = torch.randn(5, 8)
    out = M.rscin(torch.rand(5), cls, clamp_negative=True)
    assert out.shape == (5,) and 0 <= out.min() and out.max() <= 1
    assert torch.equal(M.rscin(torch.full((5,), 0.3), cls), torch.zeros(5))  # all equal: no NaN
    # opposite class tokens: the kept similarities sum to 0 (1 - 1), where the public code divides by zero; such a
    # row counts the negative similarity as 0, so each image keeps its own score
    two = M.rscin(torch.tensor([0.0, 1.0]), torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    assert torch.allclose(two, torch.tensor([0.0, 1.0]))


# ---- the module ----

@pytest.fixture(scope="module")
def bb32():
    return build_backbone("tiny", image_size=32)


def test_musc_module_shapes_range_and_transductive(bb32):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 32, 32)
    model = M.MuSc(bb32)
    assert model.transductive and model.constants()["r_list"] == [1, 3, 5]
    with torch.no_grad():
        res = model(x, ["c"] * 5).inference()
    assert res.image_score.shape == (5,) and res.anomaly_map.shape == (5, 32, 32) and res.stage_maps.shape == (5, 4, 4, 4)
    for t in res:  # the map on the public code's scale: MSM distances between unit vectors, in [0, 2]
        assert not torch.isnan(t).any() and 0 <= t.min() and t.max() <= 2
    assert 0 <= res.image_score.min() and res.image_score.max() <= 1
    # the image score is RsCIN of the map's maximum (per class), not the maximum itself
    glob, _ = M.stage_features(bb32, x)
    assert torch.allclose(res.image_score, M.rscin(res.anomaly_map.flatten(1).amax(1), glob), atol=1e-6)
    with pytest.raises(Exception, match="at least 2 test images per class, got 1"):
        model(x[:1], ["c"])


def test_mutual_fusion_is_the_mean_of_the_two_parts(bb32):
    from kano.kanoclip.winclip import build_zero_shot

    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    base = build_zero_shot("clip-ac", bb32).eval()
    musc = M.MuSc(bb32, map_scale=0.5)
    with torch.no_grad():
        a, b = base(x, ["c"] * 3).inference(), musc(x, ["c"] * 3).inference()
        f = M.MutualFusion(base, musc)(x, ["c"] * 3).inference()
    assert M.MutualFusion(base, musc).transductive
    i, y, z = 1, 5, 20  # one pixel by hand
    assert f.anomaly_map[i, y, z].item() == pytest.approx((a.anomaly_map[i, y, z].item() + b.anomaly_map[i, y, z].item()) / 2, abs=1e-6)
    assert torch.allclose(f.anomaly_map, (a.anomaly_map + b.anomaly_map) / 2, atol=1e-6)
    assert torch.allclose(f.image_score, (a.image_score + b.image_score) / 2, atol=1e-6)
    assert not torch.allclose(f.anomaly_map, a.anomaly_map, atol=1e-4)  # MuSc's part is not a no-op


# ---- the CLI ----

def _method(out_dir):
    return json.loads((out_dir / "metrics.json").read_text())


def test_cli_eval_musc(synth_root, tmp_path, cli):
    code, out, err = cli("eval", "--method", "musc", "--backbone", "tiny", "--image-size", "64", "--data", f"mvtec:{synth_root}",
                         "--out", tmp_path / "e", "--workers", "0")
    assert code == 0, err
    m = _method(tmp_path / "e")
    meth = m["provenance"]["method"]
    assert {k: meth[k] for k in ("name", "setting", "backbone", "image_size")} == {
        "name": "musc", "setting": "transductive", "backbone": "tiny", "image_size": 64}
    assert "MuSc" in meth["source"] and meth["constants"]["r_list"] == [1, 3, 5] and meth["constants"]["interval"] == [0.0, 0.3]
    assert meth["constants"]["rscin_windows"] == [1, 2, 3] and "MVTec AD" in meth["constants"]["rscin_windows_source"]
    assert set(m["mean"]) == set(METRIC_KEYS) and m["mean"]["pixel_auroc"] is not None and set(m["classes"]) == {"disc", "weave"}
    assert "(transductive musc)" in " ".join(out.split())  # the registry kind, once


def test_cli_eval_musc_refuses_a_class_with_one_test_image(tmp_path, cli):
    from kano.anomaly_data import synthesize

    root = synthesize(tmp_path / "one", ["disc"], seed=3, size=64, n_train=1, n_good=1, n_per_defect=0, defects=("hole",))
    code, out, err = cli("eval", "--method", "musc", "--backbone", "tiny", "--image-size", "64", "--data", f"mvtec:{root}",
                         "--out", tmp_path / "e")
    assert code == 2 and "Traceback" not in err, err
    assert "each class must hold at least 2 test images for a transductive method" in err and "got 1 in disc" in err
    assert not (tmp_path / "e").exists()  # refused before anything was written


@pytest.mark.parametrize("args", [["--backbone", "tiny"], ["--method", "clip-ac", "--backbone", "tiny"]])
def test_cli_eval_mutual_fuses_with_musc(synth_root, tmp_path, cli, args):
    code, out, err = cli("eval", *args, "--mutual", "--image-size", "64", "--data", f"mvtec:{synth_root}",
                         "--out", tmp_path / "e", "--classes", "disc", "--workers", "0")
    assert code == 0, err
    m = _method(tmp_path / "e")
    meth = m["provenance"]["method"]
    assert meth["mutual"] is True and meth["setting"] == "transductive" and "Kano's own addition" in meth["fusion"]
    assert meth["musc"]["name"] == "musc" and meth["musc"]["backbone"] == "tiny"
    assert meth["musc"]["constants"]["map_scale"] == 0.5  # both halves of the fused mean in [0, 1]
    assert set(m["mean"]) == set(METRIC_KEYS) and "+ MuSc (--mutual)" in " ".join(out.split())  # rich wraps long titles


@pytest.mark.parametrize("args, message", [
    (["--method", "median_colour"], "--mutual must go with a method that has a frozen backbone"),
    (["--method", "musc", "--backbone", "tiny"], "--mutual must go with a per-image method"),
    (["--method", "mutual", "--backbone", "tiny"], "got --method mutual, which is already transductive"),
    (["--method", "musc_randconv"], "got --method musc_randconv, which is already transductive"),
])
def test_cli_eval_mutual_bad_input(synth_root, tmp_path, cli, args, message):
    code, out, err = cli("eval", *args, "--mutual", "--image-size", "64", "--data", f"mvtec:{synth_root}", "--out", tmp_path / "e")
    assert code == 2 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("args, message", [
    (["--method", "musc"], "--method musc needs --backbone SPEC (tiny, micro or MODEL:PRETRAINED)"),
    (["--method", "musc", "--backbone", "tiny", "--run", "some/run"], "give --backbone SPEC, not --run, got --run some/run"),
])
def test_cli_eval_musc_bad_input(synth_root, tmp_path, cli, args, message):
    code, out, err = cli("eval", *args, "--data", f"mvtec:{synth_root}", "--out", tmp_path / "e")
    assert code == 2 and message in err and "Traceback" not in err, err
