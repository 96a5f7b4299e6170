"""PatchCore and PaDiM: each step by hand or against an independent reference (torch's own pooling and unfold,
numpy's covariance, scipy's Gaussian filter), and the whole fit-and-score path against anomalib 2.7.0's
PatchcoreModel / PadimModel on identical feature maps of the real tiny backbone on real photos."""

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from kano.kanoclip import build_backbone
from kano.kanoclip.padim import GaussianMoments, Padim, PadimConfig, first_stages, mahalanobis
from kano.kanoclip.patchcore import (PatchCore, PatchCoreConfig, PatchReservoir, adaptive_mean, coreset_indices,
                                     kcenter_greedy, locally_aware, middle_stages, neighbourhoods, patchcore_scores,
                                     random_projection, smooth, stage_grids, support_sets)

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "hazelnut_toy"
ANOMALIB_PY = Path(os.environ.get("KANO_ANOMALIB_PYTHON", ROOT / ".venv-anomalib" / "bin" / "python"))
SIZE = 64  # tiny backbone, patch 8 -> an 8 x 8 grid; maps of 64 px leave room for the 33-px Gaussian's reflection


def split(folder, n):
    return sorted((DATA / folder).glob("*.jpg"))[:n]


def photos(paths, bb):
    """Real photos, squashed to SIZE and normalised with the backbone's mean and std -> (N, 3, SIZE, SIZE)."""
    arr = np.stack([np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32) / 255
                    for p in paths])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return (x - torch.tensor(bb.mean).view(1, 3, 1, 1)) / torch.tensor(bb.std).view(1, 3, 1, 1)


def test_stage_choices():
    # the four evenly spread blocks of 24 are 6/12/18/24: PatchCore takes the middle two, PaDiM the first three
    assert middle_stages(24) == [12, 18] and first_stages(24) == [6, 12, 18]
    assert middle_stages(4) == [2, 3] and first_stages(4) == [1, 2, 3]


def test_kcenter_greedy_by_hand():
    pts = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    # from 0: farthest is 11 (index 4); then distances to {0, 11}: 1, 2, 1 -> 2 (index 2); then {0, 2, 11}: 1, 1 -> 1
    assert kcenter_greedy(pts, 4, 0).tolist() == [0, 4, 2, 1]
    assert kcenter_greedy(pts, 2, 3).tolist() == [3, 0]


@pytest.fixture(scope="module")
def tiny64():
    return build_backbone("tiny", image_size=SIZE)


def test_coreset_size_and_memory_bound(tiny64):
    cfg = PatchCoreConfig(coreset_ratio=0.1, projection_dim=4, target_embed_dim=8)
    bank = torch.randn(123, 8)
    keep = coreset_indices(bank, cfg)
    assert keep.numel() == 12 and keep.unique().numel() == 12          # int(123 * 0.1), all distinct
    tiny64.set_layers()
    capped = PatchCore(tiny64, PatchCoreConfig(coreset_ratio=0.5, max_fit_patches=40, target_embed_dim=8), SIZE)
    info = capped.fit_embeddings(bank)
    assert {k: info[k] for k in ("patches_seen", "patches_subsampled", "memory_bank")} == \
        {"patches_seen": 123, "patches_subsampled": 40, "memory_bank": 20}
    assert capped.memory_bank.shape == (20, 8) and capped.support.shape == (20, 9)
    # the cap applied while batches stream in: a uniform subset of the right size, in arrival order, every patch
    # kept while the stream is within the cap
    res = PatchReservoir(40, 0)
    for a in range(0, 123, 10):
        res.add(bank[a:a + 10])
    kept = res.bank()
    idx = [int((bank == row).all(1).nonzero()) for row in kept]
    assert res.seen == 123 and kept.shape == (40, 8) and idx == sorted(set(idx))
    whole = PatchReservoir(200, 0)
    whole.add(bank[:60])
    whole.add(bank[60:])
    assert torch.equal(whole.bank(), bank)


def test_adaptive_mean_and_neighbourhoods_equal_torch():
    for n_in, n_out in ((864, 1024), (4608, 1024), (10, 3), (2048, 1024), (7, 7)):
        x = torch.randn(2, 5, n_in)
        assert torch.allclose(adaptive_mean(x, n_out), F.adaptive_avg_pool1d(x.view(10, 1, n_in), n_out).view(2, 5, n_out),
                              atol=1e-6)
    g = torch.randn(2, 4, 5, 6)
    ref = F.unfold(g, 3, padding=1).view(2, 4 * 9, 30).transpose(1, 2)   # the authors' Unfold, (C, 3, 3) per patch
    assert torch.equal(neighbourhoods(g, 3), ref)


def test_locally_aware_with_channel_sized_pooling_is_a_3x3_mean():
    """pretrain_embed_dim = C: each channel's 3 x 3 mean (zero padding counted); target = 2C: the concatenation."""
    grids = [torch.randn(1, 4, 5, 5), torch.randn(1, 4, 5, 5)]
    emb = locally_aware(grids, PatchCoreConfig(pretrain_embed_dim=4, target_embed_dim=8))
    # position (0, 0) of stage 0, channel 1: the 2 x 2 corner summed over 9 cells
    assert emb[0, 0, 1].item() == pytest.approx(grids[0][0, 1, :2, :2].sum().item() / 9, abs=1e-6)
    # position (2, 3) of stage 1, channel 3: a full 3 x 3 window
    assert emb[0, 2 * 5 + 3, 4 + 3].item() == pytest.approx(grids[1][0, 3, 1:4, 2:5].mean().item(), abs=1e-6)


def test_patchcore_image_score_by_hand():
    """Paper eq. 7 on a 2-D memory: s = (1 - softmax(distances to m*'s b nearest))[m*] * s*."""
    bank = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    support = support_sets(bank, 2)
    assert support.tolist() == [[0, 1], [1, 0], [2, 0]]
    emb = torch.tensor([[[0.0, 1.0], [6.0, 0.0]]])                      # distances 1 and 3: patch 2, m* = (3, 0)
    scores, image = patchcore_scores(emb, bank, support, 2)
    assert scores[0].tolist() == pytest.approx([1.0, 3.0])
    d = torch.tensor([3.0, 6.0])                                        # (6, 0) to m* = (3, 0) and to (0, 0)
    want = (1 - torch.exp(d[0]) / torch.exp(d).sum()) * 3.0
    assert image.item() == pytest.approx(want.item(), rel=1e-6)
    assert patchcore_scores(emb, bank, support_sets(bank, 1), 1)[1].item() == pytest.approx(3.0)  # b = 1: the maximum


def test_smooth_equals_scipy():
    from scipy.ndimage import gaussian_filter

    x = torch.rand(2, 40, 37)
    ref = np.stack([gaussian_filter(m, 4.0, mode="mirror", truncate=4.0) for m in x.numpy().astype(np.float64)])
    assert np.abs(smooth(x, 4.0).numpy() - ref).max() < 1e-6


def test_gaussian_moments_and_mahalanobis_by_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 3, 4)) * np.array([1.0, 2.0, 0.5, 3.0]) + 100.0   # 9 images, 3 positions, 4 features
    m = GaussianMoments()
    m.add(torch.from_numpy(x[:4]).float())
    m.add(torch.from_numpy(x[4:]).float())
    mean, inv = m.gaussian(0.01, 1e-5)
    xf = x.astype(np.float32).astype(np.float64)
    for pos in range(3):
        cov = np.cov(xf[:, pos], rowvar=False) + 0.01 * np.eye(4) + 1e-5 * np.eye(4)
        assert np.allclose(mean[pos].numpy(), xf[:, pos].mean(0), atol=1e-4)
        assert np.allclose(inv[pos].numpy(), np.linalg.inv(cov), rtol=1e-4, atol=1e-5)
    q = torch.from_numpy(rng.normal(size=(2, 3, 4)) + 100.0).float()
    d = mahalanobis(q, mean, inv)
    delta = q[1, 2].double().numpy() - xf[:, 2].mean(0)
    cov = np.cov(xf[:, 2], rowvar=False) + 0.01001 * np.eye(4)
    assert d[1, 2].item() == pytest.approx(float(np.sqrt(delta @ np.linalg.solve(cov, delta))), rel=1e-4)


def test_fit_and_score_real_photos(tiny64):
    """Both methods fit on real good photos through the real tiny backbone and give finite maps with spread; a
    PatchCore that keeps every patch (coreset_ratio 1) scores a photo it was fitted on at 0 (round-off)."""
    bb = tiny64
    train, test = photos(split("train/good", 7), bb), photos(split("test/good", 2) + split("test/colour", 4), bb)
    for cls, cfg in ((PatchCore, PatchCoreConfig()), (Padim, PadimConfig())):
        bb.set_layers()
        model = cls(bb, cfg, SIZE)
        model.fit([train[:4], train[4:]])
        res = model(test, ["hazelnut"] * 6)
        assert res.image_score.shape == (6,) and res.anomaly_map.shape == (6, SIZE, SIZE)
        assert torch.isfinite(res.anomaly_map).all() and (res.anomaly_map >= 0).all() and (res.anomaly_map < 1).all()
        assert (res.anomaly_map.amax((1, 2)) - res.anomaly_map.amin((1, 2))).min() > 0
        raw = model.raw(test)  # the [0, 1) scores are an increasing function of the distances: same order
        assert torch.equal(raw.image_score.argsort(), res.image_score.argsort())
    bb.set_layers()
    full = PatchCore(bb, PatchCoreConfig(coreset_ratio=1.0), SIZE)
    assert full.fit([train])["memory_bank"] == len(train) * 64
    seen, unseen = full.raw(train[:2]), full.raw(test[:2])
    # 0 up to the round-off of |x|² - 2 x·m + |m|² (about sqrt(1e-7) |x|), far below any unseen photo's distance
    assert seen.stage_maps.abs().max() < 0.01 * unseen.stage_maps.amax((1, 2, 3)).min()


@pytest.mark.skipif(not ANOMALIB_PY.is_file() and os.environ.get("KANO_REQUIRE_ANOMALIB") != "1",
                    reason=f"anomalib's side venv is absent ({ANOMALIB_PY}); .ci/run prepares it (set KANO_REQUIRE_ANOMALIB=1 to fail instead)")
@pytest.mark.slow
def test_patchcore_and_padim_equal_anomalib_on_identical_features(tmp_path):
    assert ANOMALIB_PY.is_file(), f"KANO_REQUIRE_ANOMALIB=1 but {ANOMALIB_PY} is missing"
    bb = build_backbone("tiny", image_size=SIZE)
    train, test = photos(split("train/good", 7), bb), photos(split("test/good", 2) + split("test/colour", 3), bb)
    C = bb.width
    # PatchCore with the pooling sizes at which the authors' aggregation is anomalib's (3 x 3 mean, concatenation),
    # and anomalib's nearest upsampling of the map; the coreset's projection and start are Kano's, handed to anomalib
    pc_cfg = PatchCoreConfig(pretrain_embed_dim=C, target_embed_dim=2 * C, upsample="nearest", coreset_ratio=0.1, seed=3)
    pc = PatchCore(bb, pc_cfg, SIZE)
    assert bb.stages == [2, 3]
    pc_train, pc_test = stage_grids(bb, train), stage_grids(bb, test)
    projection = random_projection(2 * C, pc_cfg.projection_dim, pc_cfg.seed)
    pc.fit_embeddings(locally_aware(pc_train, pc_cfg).flatten(0, 1), projection=projection)
    pc_res = pc.raw(test)
    bb.set_layers()
    pd = Padim(bb, PadimConfig(), SIZE)
    assert bb.stages == [1, 2, 3]
    pd.fit([train[:4], train[4:]])
    pd_res = pd.raw(test)
    pd_train, pd_test = stage_grids(bb, train), stage_grids(bb, test)

    given = {"patchcore.image_size": torch.tensor([SIZE]), "patchcore.projection": projection,
             "patchcore.seed": torch.tensor([pc_cfg.seed]), "patchcore.ratio": torch.tensor([pc_cfg.coreset_ratio]),
             "patchcore.num_neighbors": torch.tensor([pc_cfg.num_neighbors]),
             "padim.image_size": torch.tensor([SIZE]), "padim.channels": pd.channels}
    for method, tr, te in (("patchcore", pc_train, pc_test), ("padim", pd_train, pd_test)):
        given.update({f"{method}.train.{i}": t for i, t in enumerate(tr)})
        given.update({f"{method}.test.{i}": t for i, t in enumerate(te)})
    save_file({k: v.contiguous() for k, v in given.items()}, str(tmp_path / "in.safetensors"))
    proc = subprocess.run([str(ANOMALIB_PY), str(Path(__file__).parent / "anomalib_oneclass_ref.py"),
                           str(tmp_path / "in.safetensors"), str(tmp_path / "ref.safetensors")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = load_file(str(tmp_path / "ref.safetensors"))

    def gap(ours, key):
        """(|ours - anomalib|, |ours - anomalib float64|, |anomalib - anomalib float64|), each relative to the scale."""
        a, a64 = ref[key].reshape(ours.shape), ref[key + "_f64"].reshape(ours.shape)
        scale = a64.abs().max().item()
        return ((ours - a).abs().max().item() / scale, (ours.double() - a64).abs().max().item() / scale,
                (a.double() - a64).abs().max().item() / scale)

    report = {}
    for name, ours, key in (("patchcore memory bank", pc.memory_bank, "patchcore.memory_bank"),
                            ("patchcore image score", pc_res.image_score, "patchcore.pred_score"),
                            ("patchcore map", pc_res.anomaly_map, "patchcore.anomaly_map"),
                            ("padim mean", pd.mean.T, "padim.mean"), ("padim inverse covariance", pd.inv_cov, "padim.inv_covariance"),
                            ("padim image score", pd_res.image_score, "padim.pred_score"),
                            ("padim map", pd_res.anomaly_map, "padim.anomaly_map")):
        report[name] = gap(ours, key)
    print("\nrelative gaps (vs anomalib, vs anomalib float64, anomalib vs its float64):")
    for k, v in report.items():
        print(f"  {k}: {v[0]:.1e} {v[1]:.1e} {v[2]:.1e}")
    for name, (d32, d64, own) in report.items():
        # float32 round-off: within 1e-4 of the scale of anomalib's float32 result and of its float64 one (anomalib's
        # own float32 run is up to about 1e-5 from its float64 one here: the covariance inverse amplifies round-off)
        assert d32 <= 1e-4 and d64 <= 1e-4, name
    # the steps that could silently agree by being trivial did not: the coreset kept a tenth, eq. 7 changed the score
    assert pc.memory_bank.shape[0] == int(7 * 64 * 0.1)
    assert (pc_res.image_score - pc_res.stage_maps.flatten(1).amax(1)).abs().min() > 1e-3
    assert (pd_res.image_score.amax() - pd_res.image_score.amin()).item() > 1e-2


# ------------------------------------------------------------------------------------------ the run, end to end
@pytest.mark.slow
@pytest.mark.parametrize("method,fitted", [("patchcore", {"memory_bank": (int(28 * 64 * 0.1), 1024), "support": (179, 9),
                                                          "score_scale": ()}),
                                           ("padim", {"channels": (100,), "mean": (64, 100), "inv_cov": (64, 100, 100)})])
def test_run_through_train_eval_predict_calibrate_export_serve_and_detector(method, fitted, hazelnut_root, tmp_path, cli):
    """`kano train --method` on the 28 real good photos (tiny backbone at 64 px: an 8 x 8 grid), then every command
    that takes a run, with no special case; the ONNX graph equals torch within 1e-4."""
    import json

    from kano.api import Detector
    from kano.deploy.serve import Scorer

    conf = tmp_path / "train.json"
    conf.write_text(json.dumps({"model": {"encoder_side": SIZE}}))
    run = tmp_path / "run"
    code, out, err = cli("train", "--method", method, "--backbone", "tiny", "--image-size", str(SIZE), "--config", conf,
                         "--data", f"mvtec:{hazelnut_root}", "--out", run)
    assert code == 0, err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == method and cfg["kind"] == "one-class" and cfg["image_size"] == SIZE
    assert cfg["stages"] == ([2, 3] if method == "patchcore" else [1, 2, 3]) and cfg["model"]["encoder_side"] == SIZE
    weights = load_file(str(run / "weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == fitted
    # eval, then predict --run and the Python API on the same photos: one scoring path
    code, _, err = cli("eval", "--run", run, "--data", f"mvtec:{hazelnut_root}", "--out", tmp_path / "ev", "--n-overlays", "0")
    assert code == 0, err
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["provenance"]["method"]["kind"] == "one-class"
    evs = {Path(r.split(",")[2]).name + r.split(",")[1]: float(r.split(",")[4])
           for r in (tmp_path / "ev" / "scores.csv").read_text().splitlines()[1:]}
    colour = sorted((hazelnut_root / "hazelnut" / "test" / "colour").glob("*.jpg"))[:3]
    code, _, err = cli("predict", *colour, "--run", run, "--class", "hazelnut", "--out", tmp_path / "p")
    assert code == 0, err
    preds = [json.loads(line) for line in (tmp_path / "p" / "predictions.jsonl").read_text().splitlines()]
    det = Detector.load(run)
    res = det(colour, "hazelnut")
    assert [round(r.score, 6) for r in res] == pytest.approx([p["score"] for p in preds], abs=1e-6)
    assert [p["score"] for p in preds] == pytest.approx([evs[f.name + "colour"] for f in colour], abs=1e-6)
    assert all(0 <= r.score < 1 and r.map.shape == Image.open(p).size[::-1] for r, p in zip(res, colour))
    code, _, err = cli("calibrate", "--run", run, "--normal", f"hazelnut={hazelnut_root / 'hazelnut' / 'test' / 'good'}",
                       "--alarm-rate", "0.2")
    assert code == 0, err
    assert json.loads((run / "calibration.json").read_text())["classes"]["hazelnut"]["n"] == 6
    # export: the memory bank or the Gaussians as graph constants; onnxruntime equals torch; serve scores either way
    pytest.importorskip("onnxruntime")
    code, _, err = cli("export", "--run", run, "--classes", "hazelnut", "--out", tmp_path / "m.onnx")
    assert code == 0, err
    onnx_scorer, torch_scorer = Scorer.exported(tmp_path / "m.onnx"), Scorer.torch_run(run)
    x = np.stack([onnx_scorer.preprocess(Image.open(p).convert("RGB")) for p in colour])
    s_onnx, m_onnx = onnx_scorer.score(x, np.zeros(len(colour), dtype=np.int64))
    s_torch, m_torch = torch_scorer.score(x, np.zeros(len(colour), dtype=np.int64))
    np.testing.assert_allclose(s_onnx, s_torch, atol=1e-4)
    np.testing.assert_allclose(m_onnx, m_torch, atol=1e-4)
    assert float(m_torch.max() - m_torch.min()) > 1e-2                   # the maps are not flat: equality means something


@pytest.mark.parametrize("method,model,expected", [
    ("patchcore", None, "patchcore reads a backbone's patch features: --backbone must name one"),
    ("padim", None, "padim reads a backbone's patch features: --backbone must name one"),
    ("patchcore", {"coreset_ratio": 2}, "coreset_ratio must be in (0, 1], got 2"),
    ("padim", {"regularizer": 0, "stabilizer": 0}, "regularizer and stabilizer must be >= 0 with a positive sum"),
])
def test_bad_input_is_refused_with_clear_messages(method, model, expected, hazelnut_root, tmp_path, cli):
    import json

    extra = []
    if model is not None:
        (tmp_path / "c.json").write_text(json.dumps({"model": model}))
        extra = ["--config", tmp_path / "c.json"]
    code, out, err = cli("train", "--method", method, "--backbone", "none" if model is None else "tiny", *extra,
                         "--data", f"mvtec:{hazelnut_root}", "--out", tmp_path / "run")
    assert code == 2 and expected in " ".join((out + err).split()) and "Traceback" not in err
