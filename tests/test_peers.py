"""The trained peers of Table 1: April-GAN and AnomalyCLIP.

Equations are checked against numpy computed by hand from the papers' and public code's definitions (never by
calling the module's own formula); then training and evaluation through the CLI on the synthetic data."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kano.kanoclip import VisualFeatures, build_backbone
from kano.kanoclip.anomalyclip import AnomalyCLIP, AnomalyCLIPConfig
from kano.kanoclip.aprilgan import APRILGAN_ABNORMAL_STATES, APRILGAN_NORMAL_STATES, APRILGAN_TEMPLATES, AprilGAN, PeerOutput, aprilgan_prompts


@pytest.fixture(scope="module")
def bb():
    return build_backbone("tiny", image_size=32)  # 4 x 4 patch grid, 4 stages, width 96, embed 64


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _softmax(a, axis=-1):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _bilinear(a, size, align_corners):
    """a (h, w) -> (size, size), written from the definition of bilinear sampling (edge-clamped)."""
    h = a.shape[0]

    def src(i):
        x = i * (h - 1) / (size - 1) if align_corners else (i + 0.5) * h / size - 0.5
        return min(max(x, 0.0), h - 1.0)

    out = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            y, x = src(i), src(j)
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, h - 1)
            dy, dx = y - y0, x - x0
            out[i, j] = (a[y0, x0] * (1 - dy) * (1 - dx) + a[y0, x1] * (1 - dy) * dx + a[y1, x0] * dy * (1 - dx)
                         + a[y1, x1] * dy * dx)
    return out


def _code_focal(pn, pa, t):
    """The peers' code's focal loss (their loss.py, gamma 2): one-hot clamped to [1e-5, 1 - 1e-5], pt = <onehot, p>
    + 1e-5. pn, pa: P(normal), P(abnormal); t: the mask in {0, 1}."""
    pt = np.where(t > 0, (1 - 1e-5) * pa + 1e-5 * pn, (1 - 1e-5) * pn + 1e-5 * pa) + 1e-5
    return float(np.mean(-(1 - pt) ** 2 * np.log(pt)))


def _dice(p, t):
    p, t = p.reshape(p.shape[0], -1), t.reshape(t.shape[0], -1)
    return float(np.mean(1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)))


def _feats(bb, n=2, dim=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = dim or bb.embed_dim
    return VisualFeatures(torch.randn(n, bb.embed_dim, generator=g), [torch.randn(n, 16, d, generator=g) for _ in bb.stages])


# -- April-GAN -------------------------------------------------------------------------------------------------------

def test_aprilgan_prompt_ensemble_is_the_public_codes_lists():
    normal, abnormal = aprilgan_prompts("hazelnut")
    assert len(APRILGAN_TEMPLATES) == 35 and len(normal) == 7 * 35 and len(abnormal) == 5 * 35
    assert normal[0] == "a bad photo of a hazelnut." and abnormal[0] == "a bad photo of a damaged hazelnut."
    assert "this is one hazelnut without damage in the scene." in normal and "a photo of a small broken hazelnut." in abnormal
    assert "broken {}" in APRILGAN_ABNORMAL_STATES and "{}" in APRILGAN_NORMAL_STATES


def test_aprilgan_text_is_the_normalised_mean_of_normalised_sentences(bb):
    import open_clip

    model = AprilGAN(bb)
    normal, abnormal = aprilgan_prompts("disc")
    with torch.no_grad():
        f = bb.clip.encode_text(open_clip.tokenize(normal + abnormal)).numpy()
    f = _unit(f)
    want = _unit(np.stack([f[:len(normal)].mean(0), f[len(normal):].mean(0)]))
    assert np.allclose(model.text_features(["disc"])[0].numpy(), want, atol=1e-5)


def test_aprilgan_maps_and_image_score_by_hand(bb):
    torch.manual_seed(1)
    model = AprilGAN(bb)
    feats = _feats(bb, dim=bb.width)
    text = model.text_features(["disc"])[0].numpy()                                         # (2, E)
    out = model.forward_features(feats, ["disc", "disc"], out_size=8)
    maps = np.zeros((2, 8, 8))
    for s, lin in enumerate(model.linear):
        W, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
        p = _unit(feats.patch_tokens[s].numpy() @ W.T + b)                                   # (N, L, E)
        logits = 100.0 * p @ text.T                                                          # (N, L, 2)
        for n in range(2):
            up = np.stack([_bilinear(logits[n, :, k].reshape(4, 4), 8, align_corners=True) for k in range(2)])
            maps[n] += _softmax(up, axis=0)[1] / 4                                           # softmax AFTER upsampling
    assert np.allclose(out.anomaly_map.detach().numpy(), maps, atol=1e-5)
    g = 100.0 * _unit(feats.global_feature.numpy()) @ text.T
    assert np.allclose(out.image_score.detach().numpy(), _softmax(g)[:, 1], atol=1e-6)


def test_aprilgan_loss_is_focal_plus_abnormal_dice_per_stage(bb):
    torch.manual_seed(2)
    model = AprilGAN(bb)
    out = model.forward_features(_feats(bb, dim=bb.width, seed=3), ["disc", "disc"], out_size=8)
    masks = torch.zeros(2, 8, 8)
    masks[0, 2:5, 3:7] = 1
    terms = model.loss(out, masks, torch.tensor([1.0, 0.0]))
    p, t = out.stage_probs.detach().double().numpy(), masks.numpy()
    want = sum(_code_focal(p[:, s, 0], p[:, s, 1], t) + _dice(p[:, s, 1], t) for s in range(4))
    assert float(terms["total"]) == pytest.approx(want, rel=1e-5)
    # a confidently wrong pixel (P(abnormal) 0 on a defect): pt = 1e-5 (the clamped one-hot of normal) + 1e-5
    probs = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    wrong = model.loss(PeerOutput(torch.zeros(1), probs[:, 1], probs[:, 1:], probs[:, None], torch.zeros(1, 2)),
                       torch.ones(1, 1, 1), torch.ones(1))
    pt = 1e-5 + 1e-5
    assert float(wrong["local"]) == pytest.approx(-(1 - pt) ** 2 * math.log(pt) + (1 - 1 / 2), rel=1e-5)
    assert float(terms["global"]) == 0.0 and float(terms["local"]) == pytest.approx(want, rel=1e-5)


# -- AnomalyCLIP -----------------------------------------------------------------------------------------------------

def test_anomalyclip_prompts_without_deep_tokens_are_plain_clip_text(bb):
    """With depth 1 (no tokens inside the encoder) and the contexts set to the 'X' embeddings, the prompt features
    are exactly open_clip's encode_text of "X ... X object." and "X ... X damaged object."."""
    import open_clip

    model = AnomalyCLIP(bb, AnomalyCLIPConfig(depth=1))
    toks = open_clip.tokenize(["X " * 12 + "object.", "X " * 12 + "damaged object."])
    with torch.no_grad():
        model.ctx_normal.copy_(bb.clip.token_embedding(toks[0, 1:13]))
        model.ctx_abnormal.copy_(bb.clip.token_embedding(toks[1, 1:13]))
        want = _unit(bb.clip.encode_text(toks).numpy())
        assert np.allclose(model.text_features().numpy(), want, atol=1e-5)


def test_anomalyclip_deep_tokens_replace_positions_after_the_start_token(bb):
    """An independent path: open_clip's own encode_text with a pre-hook on text block 1 that overwrites positions
    1..t_n_ctx with the deep tokens, and the learnable contexts put in by a hook on the token embedding."""
    torch.manual_seed(4)
    model = AnomalyCLIP(bb)                                   # tiny's text tower has 2 blocks: one deep set
    assert model.depth == 2 and tuple(model.deep.shape) == (1, 4, 64)
    clip = bb.clip
    ctx = torch.stack([model.ctx_normal, model.ctx_abnormal]).detach()
    deep = model.deep[0].detach()

    def put_ctx(mod, args, out):
        out = out.clone()
        out[:, 1:13] = ctx
        return out

    def put_deep(mod, args, kwargs):
        x = args[0].clone()
        x[:, 1:5] = deep
        return (x, *args[1:]), kwargs

    h1 = clip.token_embedding.register_forward_hook(put_ctx)
    h2 = clip.transformer.resblocks[1].register_forward_pre_hook(put_deep, with_kwargs=True)
    try:
        with torch.no_grad():
            want = _unit(clip.encode_text(model.tokens).numpy())
    finally:
        h1.remove()
        h2.remove()
    with torch.no_grad():
        got = model.text_features().numpy()
    assert np.allclose(got, want, atol=1e-5)
    with torch.no_grad():
        model.deep.add_(torch.randn_like(model.deep))  # (a constant shift would vanish in the LayerNorm)
        assert not np.allclose(model.text_features().numpy(), want, atol=1e-3)


def test_anomalyclip_maps_and_image_score_by_hand(bb):
    torch.manual_seed(5)
    model = AnomalyCLIP(bb, AnomalyCLIPConfig(sigma=0.01))  # a Gaussian this narrow is the identity
    feats = _feats(bb, seed=6)
    with torch.no_grad():
        text = model.text_features().numpy()
        out = model.forward_features(feats, ["disc", "disc"], out_size=8)
    maps = np.zeros((2, 8, 8))
    for s in range(4):
        prob = _softmax(_unit(feats.patch_tokens[s].numpy()) @ text.T / 0.07)                 # softmax BEFORE upsampling
        for n in range(2):
            up = [_bilinear(prob[n, :, k].reshape(4, 4), 8, align_corners=False) for k in range(2)]
            maps[n] += (up[1] + 1 - up[0]) / 2 / 4
    assert np.allclose(out.anomaly_map.numpy(), maps, atol=1e-5)
    g = _unit(feats.global_feature.numpy()) @ text.T / 0.07
    assert np.allclose(out.image_score.numpy(), _softmax(g)[:, 1], atol=1e-6)


def test_anomalyclip_loss_is_ce_plus_four_times_focal_and_both_dices(bb):
    torch.manual_seed(7)
    model = AnomalyCLIP(bb)
    out = model.forward_features(_feats(bb, seed=8), ["disc", "disc"], out_size=8)
    masks = torch.zeros(2, 8, 8)
    masks[1, 1:4, 1:6] = 1
    labels = torch.tensor([0.0, 1.0])
    terms = model.loss(out, masks, labels)
    p, t = out.stage_probs.detach().double().numpy(), masks.numpy()
    local = sum(_code_focal(p[:, s, 0], p[:, s, 1], t) + _dice(p[:, s, 1], t) + _dice(p[:, s, 0], 1 - t) for s in range(4))
    logp = np.log(_softmax(out.global_logits.detach().numpy()))
    ce = -float(np.mean(logp[[0, 1], [0, 1]]))
    assert float(terms["local"]) == pytest.approx(local, rel=1e-5)
    assert float(terms["global"]) == pytest.approx(ce, rel=1e-5)
    assert float(terms["total"]) == pytest.approx(4 * local + ce, rel=1e-5)


@pytest.mark.parametrize("cls", [AprilGAN, AnomalyCLIP])
def test_every_trainable_parameter_gets_a_gradient_and_clip_stays_frozen(bb, cls):
    torch.manual_seed(9)
    model = cls(bb)
    before = {k: v.clone() for k, v in bb.clip.state_dict().items()}
    images = torch.randn(2, 3, 32, 32)
    out = model(images, ["disc", "disc"])
    assert torch.isfinite(out.anomaly_map).all() and out.anomaly_map.min() >= 0 and out.anomaly_map.max() <= 1
    masks = torch.zeros(2, 32, 32)
    masks[0, 4:12, 4:12] = 1
    model.loss(out, masks, torch.tensor([1.0, 0.0]))["total"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable), [n for n, p in trainable if p.grad is None]
    assert not any(p.requires_grad for p in bb.clip.parameters())
    assert all(torch.equal(before[k], v) for k, v in bb.clip.state_dict().items())


# -- through the CLI -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,name", [("aprilgan", "April-GAN"), ("anomalyclip", "AnomalyCLIP")])
def test_cli_trains_and_evaluates_a_peer_without_a_knowledge_base(method, name, synth_root, tmp_path, cli):
    run, ev = tmp_path / "run", tmp_path / "eval"
    code, out, err = cli("train", "--method", method, "--kb", tmp_path / "no-such.duckdb", "--data", f"mvtec:{synth_root}",
                         "--backbone", "tiny", "--image-size", "64", "--epochs", "2", "--batch-size", "4", "--out", run,
                         "--cache", "memory")
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == method and config["kb"] is None and config["status"] == "finished"
    # no extra options: the authors' recipe (tiny has 4 blocks: AnomalyCLIP maps from the last, V-V from block 1 of 4
    # as from block 6 of 24; April-GAN four spread blocks), recorded in the run's config
    layers = {"aprilgan": ([1, 2, 3, 4], "bicubic-antialias"), "anomalyclip": ([4], "bilinear")}[method]
    assert (config["stages"], config["vv_start"], config["pos_resize"]) == (layers[0], 1, layers[1])
    if method == "anomalyclip":
        assert config["model"]["lam"] == 4 and config["model_used"]["stages"] == [4]
    weights = load_file(str(run / "weights.safetensors"))
    prefix = {"aprilgan": {"linear"}, "anomalyclip": {"ctx_normal", "ctx_abnormal", "deep"}}[method]
    assert {k.split(".")[0] for k in weights} == prefix
    code, out, err = cli("eval", "--run", run, "--data", f"mvtec:{synth_root}", "--out", ev)
    assert code == 0, err
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["provenance"]["method"]["name"] == name and metrics["provenance"]["method"]["method"] == method
    assert metrics["provenance"]["method"]["pos_resize"] == layers[1] and metrics["provenance"]["method"]["stages"] == layers[0]
    assert 0 <= metrics["mean"]["pixel_auroc"] <= 1
    if method == "anomalyclip":  # the fusion with MuSc and prediction read the run like any other
        code, out, err = cli("eval", "--run", run, "--mutual", "--data", f"mvtec:{synth_root}", "--out", tmp_path / "fused",
                             "--n-overlays", "0")
        assert code == 0, err
        fused = json.loads((tmp_path / "fused" / "metrics.json").read_text())["provenance"]["method"]
        assert fused["name"] == name and fused["mutual"] is True and fused["setting"] == "transductive"
        image = sorted((synth_root / "disc" / "test").rglob("*.png"))[0]
        code, out, err = cli("predict", str(image), "--class", "disc", "--run", run, "--out", tmp_path / "pred")
        assert code == 0, err
        rec = json.loads((tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()[0])
        assert 0 <= rec["score"] <= 1 and rec["anomalous"] in (True, False)
    code, out, err = cli("train", "--method", method, "--data", f"mvtec:{synth_root}", "--backbone", "tiny", "--image-size", "64",
                         "--epochs", "3", "--batch-size", "4", "--out", run, "--cache", "memory", "--resume")
    assert code == 0, err
    assert [json.loads(l)["epoch"] for l in (run / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_aprilgan_cache_holds_raw_width_tokens_under_its_own_key(synth_root, tmp_path):
    from kano.anomaly_data import load_dataset
    from kano.kanoclip import KAnoCLIP
    from kano.trainer.cache import build_feature_store, cache_key

    bb = build_backbone("tiny", image_size=32)
    samples = load_dataset(f"mvtec:{synth_root}").samples("test")[:3]
    peer, ours = AprilGAN(bb), KAnoCLIP(bb)
    assert cache_key(peer, samples) != cache_key(ours, samples)
    store = build_feature_store(peer, samples, "disk", tmp_path, torch.device("cpu"), 2)
    assert store.patches.shape == (3, 4, 16, bb.width) and store.global_feature.shape == (3, bb.embed_dim)
    images = torch.stack([__import__("kano.anomaly_data", fromlist=["x"]).SampleDataset(samples, 32, bb.mean, bb.std)[i]["image"] for i in range(3)])
    raw = bb(images, vv=False, raw=True)
    assert torch.allclose(torch.as_tensor(np.asarray(store.patches[:, 0])).float(), raw.patch_tokens[0], atol=2e-2)


@pytest.mark.parametrize("args,expected", [
    (["--method", "winclip"], "method must be one of kanoclip, aprilgan, anomalyclip, mvfa, oneclass, patchcore, padim, got 'winclip'"),
    (["--method", "aprilgan", "--no-vv"], "KAnoCLIP's model options (use_vv) apply to method kanoclip only"),
    (["--method", "anomalyclip", "--knowledge-sources", "llm"], "knowledge_sources apply to method kanoclip only"),
])
def test_cli_train_refuses_contradictory_method_options(args, expected, synth_root, tmp_path, cli):
    code, out, err = cli("train", *args, "--data", f"mvtec:{synth_root}", "--backbone", "tiny", "--out", tmp_path / "r")
    assert code == 2 and expected in " ".join((out + err).split()) and "Traceback" not in err
    assert not (tmp_path / "r").exists()
