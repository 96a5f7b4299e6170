"""CLIP-VV (eq. 4-8) against an independent transcription, on tiny and on a random-weight ViT-B-16."""

import pytest
import torch

from kano.core.errors import KanoError
from kano.kanoclip import build_backbone


def reference_clip_vv(bb, images):
    """Eq. 4-8 written out directly: blocks run as open_clip runs them; the V-V stream by hand, head by head."""
    v = bb.clip.visual
    x = v._embeds(images)
    s = None
    out = []
    for l, blk in enumerate(v.transformer.resblocks, 1):
        if l >= bb.vv_start:
            if s is None:
                s = x.clone()                                                   # S_{l-1} = S^ori_{l-1} at the first V-V block
            attn = blk.attn
            d = x.shape[-1]
            h = attn.num_heads
            y = blk.ln_1(x)                                                    # V_l from the ORIGINAL stream (eq. 7)
            w_v, b_v = attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:]
            val = y @ w_v.T + b_v
            heads = []
            for k in range(h):
                vk = val[..., k * d // h:(k + 1) * d // h]
                a = torch.softmax(vk @ vk.transpose(-1, -2) * (d // h) ** -0.5, dim=-1)   # softmax(V Vᵀ · scale) (eq. 4)
                heads.append(a @ vk)
            s = attn.out_proj(torch.cat(heads, -1)) + s                        # eq. 8, no MLP
        x = blk(x)                                                             # the original path, unchanged
        if l in bb.stages:
            t = s if s is not None else x
            out.append(v.ln_post(t[:, 1:]) @ v.proj)
    return out


@pytest.mark.parametrize("spec,size", [("tiny", 224), ("tiny", 160), ("ViT-B-16-quickgelu", 224), ("ViT-B-16-quickgelu", 160)])
def test_clip_vv_matches_independent_transcription(spec, size):
    torch.manual_seed(0)
    bb = build_backbone(spec, image_size=size)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = bb(images)
        ref = reference_clip_vv(bb, images)
        enc = bb.clip.encode_image(images)
    grid = size // bb.patch_size
    assert feats.global_feature.shape == (2, bb.embed_dim)
    assert len(feats.patch_tokens) == len(bb.stages) == 4
    for got, want in zip(feats.patch_tokens, ref):
        assert got.shape == (2, grid * grid, bb.embed_dim)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(feats.global_feature, enc, atol=1e-4, rtol=1e-4)
    for a in range(4):  # the stages differ (no shared view)
        for b in range(a + 1, 4):
            assert not torch.allclose(feats.patch_tokens[a], feats.patch_tokens[b])
    assert torch.isfinite(torch.stack(feats.patch_tokens)).all()


def test_defaults_for_the_papers_backbone_and_stage_spread():
    from kano.kanoclip import spread_stages

    assert spread_stages(24) == [6, 12, 18, 24]
    assert spread_stages(12) == [3, 6, 9, 12]
    bb = build_backbone("ViT-B-16-quickgelu")
    assert bb.stages == [3, 6, 9, 12] and bb.vv_start == 3 and bb.image_size == 224


def test_random_weights_are_the_same_on_every_build():
    """A run stores only its trainable weights: eval, predict and export each rebuild the frozen backbone, so a
    random-weight open_clip backbone must come out identical every time (else each step scores another model),
    without touching the caller's random stream."""
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    a = build_backbone("ViT-S-32", image_size=64)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(6)  # another caller state: same weights
    b = build_backbone("ViT-S-32", image_size=64)
    sa, sb = a.clip.state_dict(), b.clip.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert float(sa["visual.conv1.weight"].std()) > 0  # random, not a constant


def test_vv_off_gives_the_qk_stream():
    bb = build_backbone("tiny")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        qk = bb(x, vv=False)
        v = bb.clip.visual
        t = v._embeds(x)
        for blk in v.transformer.resblocks:
            t = blk(t)
        last = v.ln_post(t[:, 1:]) @ v.proj
    torch.testing.assert_close(qk.patch_tokens[-1], last, atol=1e-5, rtol=1e-5)


def test_frozen_and_eval():
    bb = build_backbone("tiny")
    bb.train()
    assert not bb.training and not bb.clip.training
    assert all(not p.requires_grad for p in bb.parameters())


def test_tiny_is_seeded():
    a, b = build_backbone("tiny"), build_backbone("tiny")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("spec,message", [
    ("NoSuchModel-99", "open_clip model name"),
    ("ViT-B-16-quickgelu:not-a-tag", "pretrained tag for ViT-B-16-quickgelu must be one of"),
    ("ViT-B-16-quickgelu:/nonexistent/weights.safetensors", "weights file must exist"),
    ("ViT-B-16-quickgelu:openai", "must be in the cache"),
])
def test_unavailable_weights_and_bad_specs_are_clear(spec, message, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KanoError, match=message):
        build_backbone(spec)


def test_damaged_cached_weights_are_named(tmp_path, monkeypatch):
    """A truncated file in the Hub cache (an interrupted download) is a clear error naming it, not a traceback."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--timm--vit_base_patch16_clip_224.openai"
    (repo / "refs").mkdir(parents=True)
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    bad = repo / "snapshots" / "abc123" / "open_clip_model.safetensors"
    bad.write_bytes(b"\x08\x00")                                     # a header length and nothing else
    with pytest.raises(KanoError, match="must be a complete weights file") as info:
        build_backbone("ViT-B-16-quickgelu:openai")
    assert str(bad) in str(info.value) and "Delete that file" in str(info.value)


def test_local_weights_file(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = open_clip.create_model("ViT-B-16-quickgelu")
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    bb = build_backbone(f"ViT-B-16-quickgelu:{path}")
    assert torch.equal(bb.clip.visual.proj, model.visual.proj)
