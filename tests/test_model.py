"""The full model: prompts, heads, scores, losses, gradients, frozen CLIP, ablations."""


import numpy as np
import pytest
import torch
from scipy import ndimage

from kano.kanoclip import (KAnoCLIP, ModelConfig, PromptLearner, TextTower, build_backbone, dice_loss, focal_loss, gaussian_blur,
                      kd_loss, tokenize)


@pytest.fixture(scope="module")
def bb():
    return build_backbone("tiny")


def batch(n=4, size=224, anomalous=(1, 0, 1, 0)):
    torch.manual_seed(5)
    images = torch.randn(n, 3, size, size)
    masks = torch.zeros(n, size, size)
    for i, a in enumerate(anomalous):
        if a:
            masks[i, 40:90, 60:120] = 1
    return images, masks, torch.tensor(anomalous, dtype=torch.float32)


def test_coop_encoder_equals_encode_text(bb):
    tower = TextTower(bb.clip)
    learner = PromptLearner(tower, n_ctx=4, normal_words=("normal",), abnormal_words=("damaged",))
    prefix = tokenize(["a photo of the"])[0, 1:5]
    with torch.no_grad():
        words = bb.clip.token_embedding(prefix)
        learner.ctx_normal.copy_(words)
        learner.ctx_abnormal.copy_(words)
        n, a = learner(["metal nut", "bottle"])
        ref = bb.clip.encode_text(tokenize(["a photo of the normal metal nut.", "a photo of the damaged metal nut.",
                                            "a photo of the normal bottle.", "a photo of the damaged bottle."]))
    torch.testing.assert_close(n, ref[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, ref[[1, 3]], atol=1e-5, rtol=1e-5)


def test_shapes_scores_and_typed_output(bb):
    model = KAnoCLIP(bb)
    images, masks, labels = batch()
    out = model(images, ["hazelnut", "hazelnut", "carpet", "carpet"])
    res = out.inference()
    assert res.image_score.shape == (4,) and res.anomaly_map.shape == (4, 224, 224)
    assert res.stage_maps.shape == (4, 4, bb.grid, bb.grid)
    assert ((res.image_score >= 0) & (res.image_score <= 1)).all()
    assert ((res.anomaly_map >= 0) & (res.anomaly_map <= 1)).all()
    torch.testing.assert_close(res.image_score, (out.global_prob + out.anomaly_map.flatten(1).amax(1)) / 2)
    # eq. 10 from eq. 9's maps
    torch.testing.assert_close(out.anomaly_map, gaussian_blur(out.map_abnormal + 1 - out.map_normal, 4.0) / 2)


def test_every_trainable_parameter_gets_a_gradient_and_clip_stays_frozen(bb):
    model = KAnoCLIP(bb)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.5, 0.999))
    images, masks, labels = batch()
    know = {"hazelnut": torch.randn(bb.embed_dim), "carpet": torch.randn(bb.embed_dim)}
    out = model(images, ["hazelnut", "hazelnut", "carpet", "carpet"])
    terms = model.loss(out, masks, labels, know)
    terms["total"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("prompts.", "heads.", "adapter.")) for n, _ in trainable)
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert no_grad == []
    opt.step()
    after = bb.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("labels", [(0, 0, 0, 0), (1, 1, 1, 1)])
def test_no_nan_on_all_normal_and_all_anomalous_batches(bb, labels):
    model = KAnoCLIP(bb)
    images, masks, y = batch(anomalous=labels)
    out = model(images, ["bottle"] * 4)
    terms = model.loss(out, masks, y, {"bottle": torch.randn(bb.embed_dim)})
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_seeded_determinism(bb):
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = KAnoCLIP(bb)
        images, masks, labels = batch()
        outs.append(model(images, ["a", "b", "a", "b"]).anomaly_map)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("switch", [None, "use_knpl", "use_vv", "use_bicmci", "use_adapter"])
def test_one_training_step_with_each_ablation(bb, switch):
    cfg = ModelConfig(**({switch: False} if switch else {}))
    model = KAnoCLIP(bb, cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images, masks, labels = batch()
    out = model(images, ["x", "y", "x", "y"])
    terms = model.loss(out, masks, labels, {"x": torch.randn(bb.embed_dim), "y": torch.randn(bb.embed_dim)})
    opt.zero_grad()
    terms["total"].backward()
    opt.step()
    assert torch.isfinite(terms["total"])
    if switch == "use_knpl":
        assert float(terms["kd"]) == 0.0 and not any(n.startswith("prompts.") for n, p in model.named_parameters() if p.requires_grad)
    if switch == "use_adapter":
        assert model.adapter is None
    if switch == "use_bicmci":
        assert type(model.heads[0]).__name__ == "LinearHead"


def test_vv_switch_changes_the_patch_tokens(bb):
    images = torch.randn(1, 3, 224, 224)
    on = KAnoCLIP(bb).encode_images(images).patch_tokens[0]
    off = KAnoCLIP(bb, ModelConfig(use_vv=False)).encode_images(images).patch_tokens[0]
    assert not torch.allclose(on, off)


def test_gaussian_matches_scipy():
    x = torch.rand(2, 40, 50)
    ours = gaussian_blur(x, 4.0).numpy()
    ref = np.stack([ndimage.gaussian_filter(a, 4.0, mode="mirror", truncate=3.0) for a in x.numpy()])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_kd_loss_by_hand():
    k, n, a = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[3.0, 3.0]])
    d_ka = np.linalg.norm(np.array([1, 0]) - np.array([1, 1]) / np.sqrt(2))
    d_kn = np.linalg.norm(np.array([1, 0]) - np.array([0, 1]))
    assert float(kd_loss(k, n, a)) == pytest.approx(max(0.0, d_ka - d_kn))
    assert float(kd_loss(k, a, n)) == pytest.approx(max(0.0, d_kn - d_ka))


def test_focal_and_dice_by_hand():
    p = torch.tensor([[[0.9, 0.2]]])
    t = torch.tensor([[[1.0, 0.0]]])
    want = -((0.1 ** 2) * np.log(0.9) + (0.2 ** 2) * np.log(0.8)) / 2
    assert float(focal_loss(p, t)) == pytest.approx(want, rel=1e-5)
    assert float(dice_loss(p, t)) == pytest.approx(1 - (2 * 0.9 + 1) / (1.1 + 1 + 1), rel=1e-5)
    assert float(dice_loss(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))) == 0.0  # empty mask, empty prediction


@pytest.mark.parametrize("kwargs,message", [
    ({"n_ctx": 0}, "n_ctx must be >= 1"),
    ({"normal_words": ("ok",), "abnormal_words": ("ok",)}, "must not overlap"),
    ({"sigma": 0}, "sigma must be > 0"),
    ({"bica_dim": 100, "bica_heads": 3}, "divisible"),
    ({"alpha": -1}, "loss weights"),
])
def test_config_rejects_contradictions(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_checkpoint_roundtrip_of_trainable_parameters(bb):
    a = KAnoCLIP(bb)
    torch.manual_seed(99)
    b = KAnoCLIP(bb)
    b.load_trainable_state_dict(a.trainable_state_dict())
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="exactly the trainable parameters"):
        b.load_trainable_state_dict({"x": torch.zeros(1)})
