"""Each peer's published recipe: the position-embedding resize in each mode (explicit interpolation weights),
AnomalyCLIP's single block-24 stage with its x 4 local loss, the V-V start as its own setting (the dual path
recomputed through open_clip's own blocks), MuSc's RsCIN windows per dataset kind and its map on the public
code's scale. Expectations are worked out here, never by calling the function under test."""

from __future__ import annotations

import csv
import json
import math
import os

import numpy as np
import pytest
import torch

from kano.kanoclip import build_backbone, method_backbone
from kano.kanoclip import musc as M
from kano.kanoclip.anomalyclip import AnomalyCLIP
from kano.kanoclip.pos_embed import resize


# ---- explicit interpolation weights (1-D; every mode is separable) ---------------------------------------------

def _keys(x: float, a: float) -> float:
    """Keys' cubic convolution kernel with parameter a."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0


def _weights(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """(n_out, n_in) sampling weights, half-pixel centres (align_corners False).

    bilinear: the source coordinate clamped at 0, two taps (edge-clamped); bicubic: Keys a = -0.75, four taps
    with the edge pixel repeated; bicubic-antialias: Keys a = -0.5, taps within the grid only, renormalised
    (the PIL-style filter; upsampling keeps the kernel's support at 2)."""
    scale = n_in / n_out
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        if mode == "bilinear":
            x = max((i + 0.5) * scale - 0.5, 0.0)
            i0 = int(math.floor(x))
            lam = x - i0
            w[i, min(i0, n_in - 1)] += 1 - lam
            w[i, min(i0 + 1, n_in - 1)] += lam
        elif mode == "bicubic":
            x = (i + 0.5) * scale - 0.5
            i0 = int(math.floor(x))
            t = x - i0
            for off, d in zip((-1, 0, 1, 2), (t + 1, t, 1 - t, 2 - t)):
                w[i, min(max(i0 + off, 0), n_in - 1)] += _keys(d, -0.75)
        else:
            support = 2.0 * max(scale, 1.0)
            inv = 1.0 / max(scale, 1.0)
            centre = scale * (i + 0.5)
            lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
            taps = [_keys((j - centre + 0.5) * inv, -0.5) for j in range(lo, hi)]
            total = sum(taps)
            for j, v in zip(range(lo, hi), taps):
                w[i, j] = v / total
    return w


def test_explicit_weights_for_the_2_to_3_case_are_the_textbook_ones():
    # bilinear: source positions -1/6 (clamped to 0), 1/2, 7/6 (clamped to 1): the corners, then the midpoint
    assert np.allclose(_weights(2, 3, "bilinear"), [[1, 0], [0.5, 0.5], [0, 1]])
    # antialiased bicubic, first row: taps 0 and 1 at distances 1/6 and 7/6, Keys(-0.5) = 0.9375 and -0.05787
    k0, k1 = 1 - 2.5 / 36 + 1.5 / 216, -0.5 * (7 / 6) ** 3 + 2.5 * (7 / 6) ** 2 - 4 * (7 / 6) + 2
    assert k0 == pytest.approx(0.9375) and k1 == pytest.approx(-0.0578704, abs=1e-6)
    assert np.allclose(_weights(2, 3, "bicubic-antialias")[0], [k0 / (k0 + k1), k1 / (k0 + k1)])


@pytest.mark.parametrize("mode", ["bicubic-antialias", "bilinear", "bicubic"])
def test_pos_embed_resize_2x2_to_3x3(mode):
    g = torch.tensor([[1.0, 2.0], [3.0, 5.0]])                        # one channel: a 2 x 2 grid
    pos = torch.cat([torch.tensor([[7.0, -7.0]]), torch.stack([g.flatten(), -2 * g.flatten()], 1)])  # (1 + 4, 2)
    got = resize(pos, 3, mode)
    assert got.shape == (10, 2)
    assert torch.equal(got[0], pos[0])                                 # the class token is kept
    w = _weights(2, 3, mode)
    for c, factor in ((0, 1.0), (1, -2.0)):
        want = w @ (factor * g.numpy()) @ w.T                          # rows then columns
        np.testing.assert_allclose(got[1:, c].reshape(3, 3).numpy(), want, atol=1e-5)
    if mode == "bilinear":  # written out: corners kept, edge midpoints, the centre the mean of all four
        np.testing.assert_allclose(got[1:, 0].numpy(), [1, 1.5, 2, 2, 2.75, 3.5, 3, 4, 5], atol=1e-6)


def test_the_three_modes_differ():
    g = torch.arange(1.0 + 16).reshape(17, 1) ** 1.5
    outs = [resize(g, 6, m) for m in ("bicubic-antialias", "bilinear", "bicubic")]
    assert not torch.allclose(outs[0], outs[1], atol=1e-3) and not torch.allclose(outs[0], outs[2], atol=1e-3)
    with pytest.raises(Exception, match="must be one of bicubic-antialias, bilinear, bicubic, got 'nearest'"):
        resize(g, 6, "nearest")


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "bicubic-antialias"])
def test_build_backbone_resamples_a_pretrained_weights_file_in_each_mode(mode, tmp_path_factory):
    """A weights file loaded through open_clip at another image size: the grid (12 x 12 at 96 px) resampled to
    16 x 16 (128 px) as the mode says; bicubic-antialias is open_clip's own resize at build."""
    from safetensors.torch import save_file

    from kano.kanoclip import micro_clip

    path = tmp_path_factory.getbasetemp() / "micro_open_clip.safetensors"
    native = micro_clip.build()
    if not path.exists():
        save_file({k: v.contiguous() for k, v in native.state_dict().items()}, str(path))
    name = micro_clip.register()
    bb = build_backbone(f"{name}:{path}", image_size=128, pos_resize=mode)
    assert bb.grid == 16 and bb.pos_resize == mode
    pe = native.visual.positional_embedding.detach().numpy()
    got = bb.clip.visual.positional_embedding.detach().numpy()
    w = _weights(12, 16, mode)
    grid = pe[1:].reshape(12, 12, -1)
    want = np.einsum("ia,abc,jb->ijc", w, grid, w).reshape(256, -1)
    np.testing.assert_allclose(got[1:], want, atol=1e-5)
    np.testing.assert_allclose(got[0], pe[0])


# ---- the V-V start, apart from the stages -----------------------------------------------------------------------

def _dual_path_by_hand(bb, images, vv_start, stage):
    """The V-V stream at `stage`, recomputed: the original stream through open_clip's own residual blocks; from
    block vv_start on, S += out_proj(softmax(V Vᵀ / sqrt(head dim)) V), V from ln_1 of the original stream."""
    v = bb.clip.visual
    x = v._embeds(images)
    s = None
    for i, blk in enumerate(v.transformer.resblocks, 1):
        if i >= vv_start:
            a = blk.attn
            d, h = a.embed_dim, a.num_heads
            val = blk.ln_1(x) @ a.in_proj_weight[2 * d:].T + a.in_proj_bias[2 * d:]
            n, l, _ = val.shape
            vh = val.view(n, l, h, d // h).transpose(1, 2)
            att = torch.softmax(vh @ vh.transpose(-1, -2) / math.sqrt(d // h), -1) @ vh
            upd = a.out_proj(att.transpose(1, 2).reshape(n, l, d))
            s = (x if s is None else s) + upd
        x = blk(x)
        if i == stage:
            return v.ln_post(s[:, 1:]) @ v.proj


def test_vv_start_is_its_own_setting():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    bb = build_backbone("tiny", image_size=32, stages=[4], vv_start=2)
    assert bb.stages == [4] and bb.vv_start == 2
    with torch.no_grad():
        got = bb(images).patch_tokens[0]
        want = _dual_path_by_hand(bb, images, vv_start=2, stage=4)
        later = _dual_path_by_hand(bb, images, vv_start=4, stage=4)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, later, atol=1e-3)  # the start matters: V-V from block 4 is another feature
    # unset, the V-V start stays at the first of four spread blocks (6 of 24; 1 of 4) whatever the stages
    assert build_backbone("tiny", image_size=32, stages=[4]).vv_start == 1


def test_anomalyclip_published_layers_are_block_24_with_vv_from_block_6():
    assert AnomalyCLIP.published_layers(24) == ([24], 6)
    assert AnomalyCLIP.pos_resize == "bilinear"
    bb = method_backbone("anomalyclip", "tiny", image_size=32)
    assert (bb.stages, bb.vv_start, bb.pos_resize) == ([4], 1, "bilinear")
    bb = method_backbone("anomalyclip", "tiny", image_size=32, stages=[2, 4], vv_start=2, pos_resize="bicubic")
    assert (bb.stages, bb.vv_start, bb.pos_resize) == ([2, 4], 2, "bicubic")
    with pytest.raises(Exception, match="V-V start must be at or before the last stage 2 .*got vv_start 3"):
        method_backbone("anomalyclip", "tiny", image_size=32, stages=[1, 2], vv_start=3)
    assert method_backbone("aprilgan", "tiny", image_size=32, stages=[1, 2], vv_start=3).vv_start == 3  # no V-V path


def test_anomalyclip_loss_on_its_single_published_stage_is_ce_plus_four_times_local():
    """One stage (the last block), a 2 x 2 grid upsampled to 2 x 2 (no interpolation), the loss written out."""
    from kano.kanoclip.backbone import VisualFeatures

    bb = method_backbone("anomalyclip", "tiny", image_size=16)        # 2 x 2 patch grid
    torch.manual_seed(3)
    model = AnomalyCLIP(bb)
    g = torch.Generator().manual_seed(4)
    feats = VisualFeatures(torch.randn(2, bb.embed_dim, generator=g), [torch.randn(2, 4, bb.embed_dim, generator=g)])
    out = model.forward_features(feats, ["disc", "disc"], out_size=2)
    assert out.stage_probs.shape == (2, 1, 2, 2, 2)                    # one stage
    masks = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]])
    terms = model.loss(out, masks, torch.tensor([0.0, 1.0]))
    p = out.stage_probs.detach()[:, 0].double().numpy()               # (2 images, 2 classes, 2, 2)
    pa, pn, t = p[:, 1], p[:, 0], masks.double().numpy()
    # the code's focal loss (loss.py): one-hot clamped to [1e-5, 1 - 1e-5], pt = <onehot, p> + 1e-5
    pt = np.where(t > 0, (1 - 1e-5) * pa + 1e-5 * pn, (1 - 1e-5) * pn + 1e-5 * pa) + 1e-5
    focal = np.mean(-(1 - pt) ** 2 * np.log(pt))
    dice_a = np.mean([1 - (2 * (pa[i] * t[i]).sum() + 1) / (pa[i].sum() + t[i].sum() + 1) for i in range(2)])
    dice_n = np.mean([1 - (2 * (pn[i] * (1 - t[i])).sum() + 1) / (pn[i].sum() + (1 - t[i]).sum() + 1) for i in range(2)])
    logits = out.global_logits.detach().double().numpy()
    ce = np.mean([math.log(np.exp(logits[i]).sum()) - logits[i, lab] for i, lab in enumerate((0, 1))])
    local = focal + dice_a + dice_n
    assert float(terms["local"].detach()) == pytest.approx(local, rel=1e-5)
    assert float(terms["total"].detach()) == pytest.approx(4 * local + ce, rel=1e-5)


# ---- MuSc -------------------------------------------------------------------------------------------------------

def test_rscin_windows_for_visa_by_hand():
    """Nine images whose class tokens lie at 0, 10, ..., 80 degrees: image 0's neighbours in order are 1, 2, ..., 8.
    VisA's windows (1, 8, 9): itself; the eight nearest (all but image 8); all nine."""
    assert M.rscin_windows("visa")[0] == (1, 8, 9) and "VisA" in M.rscin_windows("visa")[1]
    assert M.rscin_windows("mvtec")[0] == (1, 2, 3) and M.rscin_windows("btad")[0] == (1, 2, 3)
    assert M.rscin_windows(None)[0] == (1, 2, 3)
    deg = np.arange(9) * 10.0
    cls = np.stack([np.cos(np.radians(deg)), np.sin(np.radians(deg))], 1)
    scores = np.array([0.0, 0.5, 0.25, 1.0, 0.75, 0.125, 0.375, 0.625, 0.875])   # already min-max normalised
    c = np.cos(np.radians(deg))                                                    # image 0's similarities
    k1 = scores[0]
    k8 = (c[:8] * scores[:8]).sum() / c[:8].sum()
    k9 = (c * scores).sum() / c.sum()
    got = M.rscin(torch.tensor(scores), torch.tensor(cls), M.rscin_windows("visa")[0])
    assert float(got[0]) == pytest.approx((k1 + k8 + k9) / 3, abs=1e-6)
    mvtec = M.rscin(torch.tensor(scores), torch.tensor(cls), (1, 2, 3))
    assert abs(float(mvtec[0]) - float(got[0])) > 0.05                             # the windows matter


def test_rscin_keeps_negative_similarities_as_the_public_code_does():
    """Three images: tokens at 0, 60 and 180 degrees (cos 0-2 = -1). Window 3 for image 0: weights 1, 0.5, -1."""
    cls = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [-1.0, 0.0]])
    s = torch.tensor([0.0, 1.0, 0.5])
    official = (1 * 0.0 + 0.5 * 1.0 - 1 * 0.5) / (1 + 0.5 - 1)
    clamped = (1 * 0.0 + 0.5 * 1.0 + 0 * 0.5) / (1 + 0.5 + 0)
    assert float(M.rscin(s, cls, (3,))[0]) == pytest.approx(official, abs=1e-6)
    assert float(M.rscin(s, cls, (3,), clamp_negative=True)[0]) == pytest.approx(clamped, abs=1e-6)


def test_musc_map_is_on_the_public_codes_scale():
    """MuSc's stage maps are the MSM distances themselves (mean over r), not halved: checked against the numpy
    references of tests/test_musc.py on the tiny backbone's stage tokens."""
    from test_musc import np_lnamd, np_msm

    bb = build_backbone("tiny", image_size=32)
    torch.manual_seed(2)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        res = M.MuSc(bb)(x, ["c"] * 3)
        half = M.MuSc(bb, map_scale=0.5)(x, ["c"] * 3)
        _, tokens = M.stage_features(bb, x)
    for s, t in enumerate(tokens):
        want = np.mean([np_msm(np_lnamd(t.numpy(), r)) for r in (1, 3, 5)], 0)
        np.testing.assert_allclose(res.stage_maps[:, s].reshape(3, -1).numpy(), want, atol=1e-5)
    assert torch.allclose(half.stage_maps, res.stage_maps / 2, atol=1e-6)


def _visa_copy(synth_root, root):
    """The synthetic MVTec-layout data as a VisA root: split_csv/1cls.csv naming the same files."""
    from kano.anomaly_data import load_dataset

    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        for s in load_dataset(f"mvtec:{synth_root}").samples("test"):
            mask = os.path.relpath(s.mask_path, root) if s.mask_path else ""
            w.writerow([s.class_name, "test", "anomaly" if s.label else "normal", os.path.relpath(s.image_path, root), mask])
    return root


@pytest.mark.slow
def test_cli_eval_musc_on_visa_uses_and_records_its_windows(synth_root, tmp_path, cli):
    visa = _visa_copy(synth_root, tmp_path / "visa")
    common = ("--method", "musc", "--backbone", "tiny", "--image-size", "64", "--classes", "disc", "--workers", "0", "--n-overlays", "0")
    code, out, err = cli("eval", *common, "--data", f"visa:{visa}", "--out", tmp_path / "v")
    assert code == 0, err
    meth = json.loads((tmp_path / "v" / "metrics.json").read_text())["provenance"]["method"]
    assert meth["constants"]["rscin_windows"] == [1, 8, 9] and "line 243" in meth["constants"]["rscin_windows_source"]
    assert meth["constants"]["map_scale"] == 1.0 and meth["constants"]["pos_resize"] == "bicubic"
    code, out, err = cli("eval", *common, "--data", f"visa:{visa}", "--out", tmp_path / "o", "--rscin-windows", "1,2")
    assert code == 0, err
    meth = json.loads((tmp_path / "o" / "metrics.json").read_text())["provenance"]["method"]
    assert meth["constants"]["rscin_windows"] == [1, 2] and meth["constants"]["rscin_windows_source"] == "--rscin-windows"
    for bad, message in ((["--rscin-windows", "1,x"], "--rscin-windows must be comma-separated window sizes >= 1 (e.g. 1,8,9), got '1,x'"),
                         (["--rscin-windows", "0,8"], "RsCIN windows must be integers >= 1 (e.g. 1,8,9), got [0, 8]")):
        code, out, err = cli("eval", *common, "--data", f"visa:{visa}", "--out", tmp_path / "bad", *bad)
        assert code == 2 and message in err and "Traceback" not in err, err
    code, out, err = cli("eval", "--method", "median_colour", "--data", f"visa:{visa}", "--out", tmp_path / "bad",
                         "--rscin-windows", "1,8,9")
    assert code == 2 and "--rscin-windows is used by --method musc and --mutual only" in err, err


# ---- through the CLI ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_train_sets_stages_vv_start_and_resize_apart(synth_root, tmp_path, cli):
    from kano.trainer.checkpoint import load_run

    run = tmp_path / "run"
    code, out, err = cli("train", "--method", "anomalyclip", "--data", f"mvtec:{synth_root}", "--classes", "disc",
                         "--backbone", "tiny", "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--out", run,
                         "--cache", "off", "--stages", "2,4", "--vv-start", "2", "--pos-resize", "bicubic")
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert (config["stages"], config["vv_start"], config["pos_resize"]) == ([2, 4], 2, "bicubic")
    assert config["train"]["vv_start"] == 2 and config["train"]["pos_resize"] == "bicubic"
    model, _ = load_run(run)
    assert (model.backbone.stages, model.backbone.vv_start, model.backbone.pos_resize) == ([2, 4], 2, "bicubic")
    # a run whose config.json has no pos_resize loads with the loader's own resize (open_clip's)
    del config["pos_resize"]
    (run / "config.json").write_text(json.dumps(config))
    assert load_run(run)[0].backbone.pos_resize == "bicubic-antialias"
    config["pos_resize"] = "nearest"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="pos_resize must be one of bicubic-antialias, bilinear, bicubic \\(or absent\\), got 'nearest'"):
        load_run(run)
    code, out, err = cli("train", "--method", "anomalyclip", "--data", f"mvtec:{synth_root}", "--backbone", "tiny",
                         "--out", tmp_path / "bad", "--pos-resize", "nearest")
    assert code == 2 and "pos_resize must be one of bicubic-antialias, bilinear, bicubic, got 'nearest'" in err, err
    assert not (tmp_path / "bad").exists()
