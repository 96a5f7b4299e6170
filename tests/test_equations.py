"""Eq. 2, 9-13 and BiCA against expectations computed by hand (numpy) on small fixed tensors.

Each test here was checked against a deliberate wrong change of the code (tools/mutate.py lists them):
a test that recomputes the code's own formula with the code's own functions cannot fail, so the
expectations below are written out independently, in numpy, from the paper's equations.
"""

import numpy as np
import pytest
import torch
from scipy import ndimage

from kano.kanoclip import (BiCA, ConvAdapter, DeformableSelfAttention, KAnoCLIP, LinearHead, ModelConfig, PromptLearner, TextTower,
                      VisualFeatures, kd_loss, knowledge_vector, local_loss, global_loss, tokenize)
from kano.kanoclip.prompts import FixedPrompts

MAP_T = 1 / 0.07  # the patch-text temperature (CLIP's initial one, fixed)


# ---- numpy helpers: the equations written out ------------------------------------------------------
def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def two_way_softmax(a, b):
    """softmax over {a, b}: returns (p_a, p_b)."""
    m = np.maximum(a, b)
    ea, eb = np.exp(a - m), np.exp(b - m)
    return ea / (ea + eb), eb / (ea + eb)


def bilinear(img, out):
    """PyTorch's bilinear resize with align_corners=False (half-pixel centres, clamped at the border)."""
    h, w = img.shape
    def idx(n_in, n_out):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0
    r0, r1, wr = idx(h, out)
    c0, c1, wc = idx(w, out)
    top = img[r0][:, c0] * (1 - wc) + img[r0][:, c1] * wc
    bot = img[r1][:, c0] * (1 - wc) + img[r1][:, c1] * wc
    return top * (1 - wr[:, None]) + bot * wr[:, None]


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def np_(t):
    return t.detach().double().numpy()


def mha(x, ctx, attn):
    """nn.MultiheadAttention by hand: per-head softmax(Q Kᵀ / sqrt(d_h)) V, concatenated, out_proj."""
    d = x.shape[-1]
    h = attn.num_heads
    w, b = np_(attn.in_proj_weight), np_(attn.in_proj_bias)
    q, k, v = x @ w[:d].T + b[:d], ctx @ w[d:2 * d].T + b[d:2 * d], ctx @ w[2 * d:].T + b[2 * d:]
    dh = d // h
    outs = []
    for j in range(h):
        s = slice(j * dh, (j + 1) * dh)
        logits = q[..., s] @ np.swapaxes(k[..., s], -1, -2) / np.sqrt(dh)
        a = np.exp(logits - logits.max(-1, keepdims=True))
        outs.append((a / a.sum(-1, keepdims=True)) @ v[..., s])
    return np.concatenate(outs, -1) @ np_(attn.out_proj.weight).T + np_(attn.out_proj.bias)


def adapter_by_hand(ad: ConvAdapter, x):
    """Eq. 11 with the residual: x + W_up ReLU(W_down depthwise(LN(x)))."""
    y = layer_norm(x, np_(ad.ln.weight), np_(ad.ln.bias))
    kern, kb = np_(ad.depthwise.weight).reshape(3), float(ad.depthwise.bias.detach())
    pad = np.pad(y, ((0, 0), (1, 1)))
    conv = kern[0] * pad[:, :-2] + kern[1] * pad[:, 1:-1] + kern[2] * pad[:, 2:] + kb   # cross-correlation, zero padding
    pre = conv @ np_(ad.pointwise.weight).T + np_(ad.pointwise.bias)
    return x + np.maximum(pre, 0) @ np_(ad.up.weight).T + np_(ad.up.bias), pre


# ---- fixtures ----------------------------------------------------------------------------------
def fixed_features(n=2, stages=4, grid=4, dim=64, seed=7):
    g = torch.Generator().manual_seed(seed)
    patches = [torch.randn(n, grid * grid, dim, generator=g) for _ in range(stages)]
    return VisualFeatures(torch.randn(n, dim, generator=g), patches)


def passthrough(model: KAnoCLIP) -> KAnoCLIP:
    """BiCA blocks that return their inputs unchanged (the up-projections zeroed), so eq. 9 can be checked alone."""
    with torch.no_grad():
        for h in model.heads:
            for lin in (h.up_v, h.up_t):
                lin.weight.zero_()
                lin.bias.zero_()
    return model


def spread_adapter(model: KAnoCLIP, seed=3) -> None:
    """Large random up-projection so the adapter (and its ReLU) visibly changes the global feature."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.adapter.up.weight.copy_(torch.randn(model.adapter.up.weight.shape, generator=g) * 0.5)
        model.adapter.up.bias.copy_(torch.randn(model.adapter.up.bias.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def model(tiny_backbone):
    torch.manual_seed(0)
    m = passthrough(KAnoCLIP(tiny_backbone, ModelConfig(sigma=0.5)))
    spread_adapter(m)
    return m.eval()


# ---- eq. 9, 10, 12 --------------------------------------------------------------------------------
def test_eq9_eq10_eq12_by_hand(model, tiny_backbone):
    feats = fixed_features()
    with torch.no_grad():
        out = model.forward_features(feats, ["bottle", "carpet"], out_size=8)
        w_n, w_a = (np_(t) for t in model.text_features(["bottle", "carpet"]))
    assert out.classes == ["bottle", "carpet"]
    n_hat, a_hat = unit(w_n), unit(w_a)
    # eq. 9: per stage a two-way softmax over {normal, abnormal} of the patch-text cosines, then the mean over stages
    stage_a = []
    for p in feats.patch_tokens:
        p_hat = unit(np_(p))                                             # (N, L, E)
        cos_n = np.einsum("nle,ne->nl", p_hat, n_hat)
        cos_a = np.einsum("nle,ne->nl", p_hat, a_hat)
        pa, _ = two_way_softmax(MAP_T * cos_a, MAP_T * cos_n)
        stage_a.append(pa.reshape(2, 4, 4))
    stage_a = np.stack(stage_a, 1)                                       # (N, S, 4, 4)
    np.testing.assert_allclose(np_(out.stage_maps), stage_a, atol=1e-5)
    grid_a = stage_a.mean(1)
    grid_n = (1 - stage_a).mean(1)
    m_a = np.stack([bilinear(g, 8) for g in grid_a])
    m_n = np.stack([bilinear(g, 8) for g in grid_n])
    np.testing.assert_allclose(np_(out.map_abnormal), m_a, atol=1e-5)
    np.testing.assert_allclose(np_(out.map_normal), m_n, atol=1e-5)
    # eq. 10: M = G_σ(Mᵃ + 1 - Mⁿ) / 2, G_σ from scipy (mirror borders, truncated at 3σ)
    m = np.stack([ndimage.gaussian_filter(a + 1 - n, 0.5, mode="mirror", truncate=3.0) for a, n in zip(m_a, m_n)]) / 2
    np.testing.assert_allclose(np_(out.anomaly_map), m, atol=1e-5)
    # eq. 11 + 12: adapted global feature against [w̄ⁿ, w̄ᵃ], softmax, abnormal column; score = (p + max M) / 2
    glob, pre = adapter_by_hand(model.adapter, np_(feats.global_feature))
    assert (pre < 0).any() and (pre > 0).any()                           # the ReLU matters on these inputs
    scale = min(float(np.exp(tiny_backbone.clip.logit_scale.item())), 100.0)
    g_hat = unit(glob)
    pa, _ = two_way_softmax(scale * (g_hat * a_hat).sum(-1), scale * (g_hat * n_hat).sum(-1))
    np.testing.assert_allclose(np_(out.global_prob), pa, atol=1e-5)
    np.testing.assert_allclose(np_(out.image_score), (pa + m.reshape(2, -1).max(1)) / 2, atol=1e-5)
    # the typed result carries the same numbers
    res = out.inference()
    assert res.image_score is out.image_score and res.anomaly_map is out.anomaly_map


def test_eq10_keeps_a_saturated_map_below_float32_epsilon(model):
    """A confident head (here: a sharp temperature) gives pᵃ far below 6e-8; eq. 10 must keep it (Mᵃ + 1 − Mⁿ = 2Mᵃ for a
    two-way softmax), not round it to float32 steps and zeros as Mᵃ + 1 − Mⁿ computed in float32 does."""
    import copy

    sharp = copy.deepcopy(model)
    with torch.no_grad():
        w_n, w_a = (np_(t) for t in sharp.text_features(["bottle", "carpet"]))
    # every patch close to w̄ⁿ − w̄ᵃ (normal-looking at every stage), with a little noise so the map varies
    g = torch.Generator().manual_seed(5)
    d = torch.from_numpy(unit(unit(w_n) - unit(w_a))).float()          # (2, E)
    base = fixed_features()
    patches = [d[:, None, :] + 0.05 * torch.randn(t.shape, generator=g) for t in base.patch_tokens]
    feats = type(base)(base.global_feature, patches)
    # the temperature that puts the median logit margin at 30 (pᵃ about 1e-13: below 6e-8, far above float32's 1.2e-38)
    margins = [np.einsum("nle,ne->nl", unit(np_(p).astype(np.float64)), unit(w_n) - unit(w_a)) for p in patches]
    scale = 30.0 / float(np.median(np.concatenate([m.ravel() for m in margins])))
    sharp.map_logit_scale.fill_(scale)
    with torch.no_grad():
        out = sharp.forward_features(feats, ["bottle", "carpet"], out_size=8)
    stage_a = []
    for p in feats.patch_tokens:
        p_hat = unit(np_(p).astype(np.float64))
        cos_n = np.einsum("nle,ne->nl", p_hat, unit(w_n))
        cos_a = np.einsum("nle,ne->nl", p_hat, unit(w_a))
        stage_a.append((1 / (1 + np.exp(scale * (cos_n - cos_a)))).reshape(2, 4, 4))   # pᵃ of the two-way softmax
    m_a = np.stack([bilinear(g, 8) for g in np.stack(stage_a, 1).mean(1)])
    m = np.stack([ndimage.gaussian_filter(2 * a, 0.5, mode="mirror", truncate=3.0) for a in m_a]) / 2
    assert (m < 6e-8).mean() > 0.5                                      # most of the map is below float32's half epsilon
    got = np_(out.anomaly_map).astype(np.float64)
    keep = m > 1e-30                                                     # float32's own range (normal floats from 1.2e-38)
    assert keep.mean() > 0.9
    np.testing.assert_allclose(got[keep], m[keep], rtol=2e-3)


def test_eq11_adapter_by_hand():
    torch.manual_seed(4)
    ad = ConvAdapter(12, bottleneck=5)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape) * 0.7)
    x = torch.randn(3, 12)
    want, pre = adapter_by_hand(ad, np_(x))
    assert (pre < 0).sum() >= 3 and (pre > 0).sum() >= 3
    np.testing.assert_allclose(np_(ad(x)), want, atol=1e-5)
    assert ad.pointwise.out_features == 5 and ConvAdapter(64).pointwise.out_features == 16   # d_bottle = D // 4 by default


# ---- column 1 is the abnormal prompt, end to end ---------------------------------------------------
def test_raising_the_abnormal_texts_similarity_raises_map_and_score(tiny_backbone):
    torch.manual_seed(1)
    m = KAnoCLIP(tiny_backbone, ModelConfig(n_ctx=4, normal_words=("normal",), abnormal_words=("damaged",))).eval()
    words = tiny_backbone.clip.token_embedding(tokenize(["a photo of the"])[0, 1:5])
    with torch.no_grad():
        m.prompts.ctx_normal.copy_(words)
        m.prompts.ctx_abnormal.copy_(words)
        # the two prompts, independently of the model's column order: open_clip's encode_text
        e_n, e_a = tiny_backbone.clip.encode_text(tokenize(["a photo of the normal bottle.", "a photo of the damaged bottle."]))
    u = e_a / e_a.norm() - e_n / e_n.norm()
    u = u / u.norm()                      # more of u: more similar to the abnormal prompt, less to the normal one
    g = torch.Generator().manual_seed(2)
    base = fixed_features(n=1, grid=4, seed=11)
    maps, scores, globs, stage = [], [], [], []
    for t in (-3.0, 0.0, 3.0):
        patches = [p.clone() * 0.05 for p in base.patch_tokens]
        for p in patches:
            p[0, 5] += t * u                  # token (1, 1) of the 4x4 grid
        feats = VisualFeatures(base.global_feature * 0.05 + t * u + 0.01 * torch.randn(64, generator=g), patches)
        with torch.no_grad():
            out = m.forward_features(feats, ["bottle"], out_size=16)
        maps.append(float(out.anomaly_map[0, 6, 6]))
        stage.append(out.stage_maps[0, :, 1, 1])
        globs.append(float(out.global_prob[0]))
        scores.append(float(out.image_score[0]))
    assert maps[0] < maps[1] < maps[2] and globs[0] < globs[1] < globs[2] and scores[0] < scores[1] < scores[2]
    assert (stage[0] < stage[1]).all() and (stage[1] < stage[2]).all()
    assert globs[0] < 0.5 < globs[2]


def test_prompt_columns_and_word_means_by_hand(tiny_backbone):
    """w̄ⁿ/w̄ᵃ: the mean over the state words of each prompt; FixedPrompts: normal first."""
    tower = TextTower(tiny_backbone.clip)
    learner = PromptLearner(tower, n_ctx=4, normal_words=("normal", "perfect"), abnormal_words=("abnormal", "defective"))
    words = tiny_backbone.clip.token_embedding(tokenize(["a photo of the"])[0, 1:5])
    with torch.no_grad():
        learner.ctx_normal.copy_(words)
        learner.ctx_abnormal.copy_(words)
        n, a = learner(["screw"])
        ref = tiny_backbone.clip.encode_text(tokenize([f"a photo of the {w} screw." for w in ("normal", "perfect", "abnormal", "defective")]))
        fn, fa = FixedPrompts(tower)(["screw", "tile"])
        fref = tiny_backbone.clip.encode_text(tokenize(["a photo of a normal screw.", "a photo of a normal tile.",
                                                        "a photo of an abnormal screw.", "a photo of an abnormal tile."]))
    torch.testing.assert_close(n[0], ref[:2].mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[0], ref[2:].mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fn, fref[:2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fa, fref[2:], atol=1e-5, rtol=1e-5)


# ---- BiCA -----------------------------------------------------------------------------------------
def spread_bica(seed=0, clip_dim=16, dim=8, heads=2):
    torch.manual_seed(seed)
    b = BiCA(clip_dim, dim, heads)
    with torch.no_grad():
        for lin in (b.up_v, b.up_t):
            lin.weight.normal_(std=0.5)
        for mod in b.modules():   # attention output projections start at zero bias; make every path visible
            if isinstance(mod, torch.nn.MultiheadAttention):
                mod.out_proj.bias.normal_(std=0.1)
                mod.in_proj_bias.normal_(std=0.1)
    return b.eval()


def bica_inputs(seed=1, n=2, hw=(4, 4), clip_dim=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hw[0] * hw[1], clip_dim, generator=g), torch.randn(n, 2, clip_dim, generator=g)


def test_bica_visual_output_depends_on_text_only_through_text_to_visual():
    b = spread_bica()
    patches, text = bica_inputs()
    other_text = bica_inputs(seed=9)[1]   # new text (an affine change or a swap of the two would be invisible after LN + attention)
    with torch.no_grad():
        p1, _ = b(patches, text, (4, 4))
        p2, _ = b(patches, other_text, (4, 4))
        assert (p1 - p2).abs().max() > 1e-3               # the text reaches the visual tokens
        b.t2v.attn.out_proj.weight.zero_()
        b.t2v.attn.out_proj.bias.zero_()
        p1, _ = b(patches, text, (4, 4))
        p2, _ = b(patches, other_text, (4, 4))
    torch.testing.assert_close(p1, p2, atol=0, rtol=0)   # ...and only through text-to-visual attention


def test_bica_text_output_depends_on_visual_tokens_only_through_visual_to_text():
    b = spread_bica()
    patches, text = bica_inputs()
    other = bica_inputs(seed=9)[0]
    with torch.no_grad():
        _, t1 = b(patches, text, (4, 4))
        _, t2 = b(other, text, (4, 4))
        assert (t1 - t2).abs().max() > 1e-3
        b.v2t.attn.out_proj.weight.zero_()
        b.v2t.attn.out_proj.bias.zero_()
        _, t1 = b(patches, text, (4, 4))
        _, t2 = b(other, text, (4, 4))
    torch.testing.assert_close(t1, t2, atol=0, rtol=0)


def test_bica_by_hand():
    """Fig. 3 written out: bottleneck, self-attention per modality, deformable SA, text->visual, visual->text, residual up."""
    b = spread_bica()
    patches, text = bica_inputs()
    with torch.no_grad():
        got_p, got_t = b(patches, text, (4, 4))
    P, T = np_(patches), np_(text)
    ln = lambda x, m: layer_norm(x, np_(m.weight), np_(m.bias))
    lin = lambda x, m: x @ np_(m.weight).T + np_(m.bias)
    p = lin(ln(P, b.ln_v), b.down_v)
    t = lin(ln(T, b.ln_t), b.down_t)
    q = ln(p, b.sa_v.ln_q)
    p = p + mha(q, q, b.sa_v.attn)
    q = ln(t, b.sa_t.ln_q)
    t = t + mha(q, q, b.sa_t.attn)
    with torch.no_grad():  # the deformable attention is checked on its own below
        p = p + np_(b.dsa(torch.tensor(ln(p, b.ln_d), dtype=torch.float32), (4, 4)))
    p = p + mha(ln(p, b.t2v.ln_q), ln(t, b.t2v.ln_kv), b.t2v.attn)
    t = t + mha(ln(t, b.v2t.ln_q), ln(p, b.v2t.ln_kv), b.v2t.attn)
    np.testing.assert_allclose(np_(got_p), P + lin(p, b.up_v), atol=1e-4)
    np.testing.assert_allclose(np_(got_t), T + lin(t, b.up_t), atol=1e-4)


def test_deformable_attention_with_zero_offsets_attends_to_the_strided_grid():
    torch.manual_seed(2)
    d = DeformableSelfAttention(8, heads=2, stride=2)
    with torch.no_grad():
        d.offset_net[2].weight.zero_()              # no offsets: keys sampled exactly at the reference grid
    x = torch.randn(1, 25, 8)                        # a 5x5 grid -> 3x3 keys at rows/cols 0, 2, 4
    with torch.no_grad():
        got = d(x, (5, 5))
    X = np_(x)[0].reshape(5, 5, 8)
    keys = X[::2, ::2].reshape(9, 8)
    q = X.reshape(25, 8) @ np_(d.q.weight).T + np_(d.q.bias)
    kv = keys @ np_(d.kv.weight).T + np_(d.kv.bias)
    k, v = kv[:, :8], kv[:, 8:]
    heads = []
    for j in range(2):
        s = slice(4 * j, 4 * j + 4)
        logit = q[:, s] @ k[:, s].T / 2.0
        a = np.exp(logit - logit.max(1, keepdims=True))
        heads.append((a / a.sum(1, keepdims=True)) @ v[:, s])
    want = np.concatenate(heads, 1) @ np_(d.out.weight).T + np_(d.out.bias)
    np.testing.assert_allclose(np_(got)[0], want, atol=1e-5)
    # with offsets the keys move: the output changes
    with torch.no_grad():
        d.offset_net[2].weight.normal_(std=1.0)
        assert (d(x, (5, 5)) - got).abs().max() > 1e-4


def test_deformable_offsets_by_hand_on_a_non_square_grid():
    """One shared, known offset: each key is the bilinear sample at its reference point shifted by it."""
    torch.manual_seed(3)
    d = DeformableSelfAttention(4, heads=1, stride=2, offset_range=2.0)
    x = torch.randn(1, 3 * 5, 4)                     # 3 rows x 5 columns -> 2 x 3 keys
    with torch.no_grad():
        d.offset_net[2].weight.normal_(std=1.0)      # offsets of a few pixels, some pushed past the border
        off = d.offset_net(d.q(x).transpose(1, 2).reshape(1, 4, 3, 5))   # (1, 2, 2, 3), the predicted offsets
        got = d(x, (3, 5))
    X = np_(x)[0].reshape(3, 5, 4)
    o = np_(off)[0]
    keys = []
    for i in range(2):
        for j in range(3):
            # reference point in pixels: rows 0 and 2, cols 0, 2, 4; offset in key cells -> pixels (cell = 2 px here)
            r = np.clip(i * 2.0 + np.tanh(o[1, i, j]) * 2.0 * 2.0, 0, 2)
            c = np.clip(j * 2.0 + np.tanh(o[0, i, j]) * 2.0 * 2.0, 0, 4)
            r0, c0 = min(int(np.floor(r)), 1), min(int(np.floor(c)), 3)
            fr, fc = r - r0, c - c0
            keys.append(X[r0, c0] * (1 - fr) * (1 - fc) + X[r0, c0 + 1] * (1 - fr) * fc
                        + X[r0 + 1, c0] * fr * (1 - fc) + X[r0 + 1, c0 + 1] * fr * fc)
    keys = np.stack(keys)
    q = X.reshape(15, 4) @ np_(d.q.weight).T + np_(d.q.bias)
    kv = keys @ np_(d.kv.weight).T + np_(d.kv.bias)
    logit = q @ kv[:, :4].T / 2.0
    a = np.exp(logit - logit.max(1, keepdims=True))
    want = (a / a.sum(1, keepdims=True)) @ kv[:, 4:] @ np_(d.out.weight).T + np_(d.out.bias)
    np.testing.assert_allclose(np_(got)[0], want, atol=1e-5)


# ---- losses: eq. 2 through the model, eq. 13-15 --------------------------------------------------
def test_kd_hinge_sign_through_the_model(model):
    """w̄ᵏ equal to the abnormal prompt costs nothing; equal to the normal prompt costs d(k̂, â)."""
    feats = fixed_features()
    masks, labels = torch.zeros(2, 8, 8), torch.tensor([0.0, 1.0])
    with torch.no_grad():
        out = model.forward_features(feats, ["bottle", "carpet"], out_size=8)
        w_n, w_a = out.text_normal, out.text_abnormal
        at_abnormal = model.loss(out, masks, labels, {"bottle": w_a[0] * 3, "carpet": w_a[1]})["kd"]
        at_normal = model.loss(out, masks, labels, {"bottle": w_n[0], "carpet": w_n[1] * 2})["kd"]
    assert float(at_abnormal) == pytest.approx(0.0, abs=1e-6)
    d_na = np.linalg.norm(unit(np_(w_n)) - unit(np_(w_a)), axis=-1)
    assert d_na.min() > 1e-3
    assert float(at_normal) == pytest.approx(float(d_na.mean()), rel=1e-4)


def test_kd_uses_each_classs_own_knowledge_vector(model):
    feats = fixed_features()
    masks, labels = torch.zeros(2, 8, 8), torch.tensor([0.0, 1.0])
    g = torch.Generator().manual_seed(5)
    know = {"bottle": torch.randn(64, generator=g), "carpet": torch.randn(64, generator=g)}
    with torch.no_grad():
        out = model.forward_features(feats, ["carpet", "bottle"], out_size=8)
        kd = float(model.loss(out, masks, labels, know)["kd"])
    n_hat, a_hat = unit(np_(out.text_normal)), unit(np_(out.text_abnormal))
    assert out.classes == ["bottle", "carpet"]
    want = []
    for i, c in enumerate(out.classes):
        k_hat = unit(np_(know[c]))
        want.append(max(0.0, np.linalg.norm(k_hat - a_hat[i]) - np.linalg.norm(k_hat - n_hat[i])))
    swapped = [max(0.0, np.linalg.norm(unit(np_(know[c])) - a_hat[1 - i]) - np.linalg.norm(unit(np_(know[c])) - n_hat[1 - i]))
               for i, c in enumerate(out.classes)]
    assert abs(np.mean(want) - np.mean(swapped)) > 1e-4   # the check can tell the classes apart
    assert kd == pytest.approx(float(np.mean(want)), rel=1e-5)


def test_kd_loss_by_hand_on_several_classes():
    k = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    n = torch.tensor([[0.0, 2.0], [1.0, 1.0]])
    a = torch.tensor([[3.0, 3.0], [-1.0, 0.0]])
    want = np.mean([max(0.0, np.linalg.norm(unit(k[i]) - unit(a[i])) - np.linalg.norm(unit(k[i]) - unit(n[i]))) for i in range(2)])
    assert want > 0
    assert float(kd_loss(k, n, a)) == pytest.approx(want, rel=1e-6)


def test_local_and_global_losses_by_hand():
    ma = torch.tensor([[[0.9, 0.2], [0.6, 0.1]]])
    mn = torch.tensor([[[0.3, 0.7], [0.5, 0.8]]])
    g = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    A, N, G = np_(ma)[0], np_(mn)[0], np_(g)[0]
    pt = A * G + (1 - A) * (1 - G)
    focal = np.mean(-(1 - pt) ** 2 * np.log(pt))
    dice = lambda p, t: 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
    assert float(local_loss(ma, mn, g)) == pytest.approx(focal + dice(N, 1 - G) + dice(A, G), rel=1e-5)
    p, y = torch.tensor([0.8, 0.3, 0.6]), torch.tensor([1.0, 0.0, 0.0])
    bce = -np.mean([np.log(0.8), np.log(0.7), np.log(0.4)])
    assert float(global_loss(p, y)) == pytest.approx(bce, rel=1e-5)


def test_eq13_weights(tiny_backbone):
    torch.manual_seed(0)
    m = KAnoCLIP(tiny_backbone, ModelConfig(alpha=2.0, beta=3.0, gamma=5.0))
    feats = fixed_features()
    masks = torch.zeros(2, 8, 8)
    masks[1, 2:5, 3:6] = 1
    with torch.no_grad():
        out = m.forward_features(feats, ["bottle", "bottle"], out_size=8)
        terms = m.loss(out, masks, torch.tensor([0.0, 1.0]), {"bottle": out.text_normal[0]})
        local = local_loss(out.map_abnormal, out.map_normal, masks)
        glob = global_loss(out.global_prob, torch.tensor([0.0, 1.0]))
    assert float(terms["kd"]) > 0 and float(terms["local"]) == pytest.approx(float(local)) and float(terms["global"]) == pytest.approx(float(glob))
    assert float(terms["total"]) == pytest.approx(2 * float(terms["kd"]) + 3 * float(glob) + 5 * float(local), rel=1e-6)


def test_each_state_uses_its_own_learnable_context(tiny_backbone):
    """Eq. 1: the normal prompts carry the LNP context, the abnormal ones the LAP context (two different ones)."""
    tower = TextTower(tiny_backbone.clip)
    learner = PromptLearner(tower, n_ctx=4, normal_words=("normal",), abnormal_words=("damaged",))
    emb = tiny_backbone.clip.token_embedding
    with torch.no_grad():
        learner.ctx_normal.copy_(emb(tokenize(["a photo of the"])[0, 1:5]))
        learner.ctx_abnormal.copy_(emb(tokenize(["a close up of"])[0, 1:5]))
        n, a = learner(["screw"])
        ref = tiny_backbone.clip.encode_text(tokenize(["a photo of the normal screw.", "a close up of damaged screw."]))
    torch.testing.assert_close(n[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[0], ref[1], atol=1e-5, rtol=1e-5)


def test_knowledge_vector_is_the_mean_of_all_descriptions():
    """Eq. 3 on three hand-written feature rows: w̄ᵏ = their mean, not any one of them."""
    f = torch.tensor([[1.0, 0.0, 2.0], [3.0, 3.0, 0.0], [2.0, 6.0, 1.0]])
    torch.testing.assert_close(knowledge_vector(f), torch.tensor([2.0, 3.0, 1.0]))
    with pytest.raises(ValueError, match="knowledge features must be"):
        knowledge_vector(torch.zeros(0, 3))


def test_linear_head_projects_patches_and_leaves_text_alone():
    """Bi-CMCI off (the ablation): patches -> W p + b with the head's own W, b; text unchanged."""
    head = LinearHead(2)
    with torch.no_grad():
        head.proj.weight.copy_(torch.tensor([[0.0, 2.0], [1.0, -1.0]]))
        head.proj.bias.copy_(torch.tensor([0.5, 0.0]))
    p = torch.tensor([[[1.0, 3.0], [2.0, 0.0]]])   # (1, 2 patches, 2)
    t = torch.tensor([[4.0, 5.0]])
    out_p, out_t = head(p, t, (1, 2))
    torch.testing.assert_close(out_p, torch.tensor([[[6.5, -2.0], [0.5, 2.0]]]))
    assert out_t is t or torch.equal(out_t, t)
