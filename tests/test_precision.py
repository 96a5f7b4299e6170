"""Full precision where it decides: only the frozen backbone may run in bf16/fp16.

Half precision in the heads tied scores: on a CPU bf16 autocast run the distinct map values fell from
8,188 to 355 and the image scores from 64 to 19. Here autocast is forced on (CPU bf16) and what
comes after the backbone must not notice.
"""

import pytest
import torch

from kano.anomaly_data import load_dataset
from kano.kanoclip import KAnoCLIP, ModelConfig, VisualFeatures, backbone_autocast, build_backbone


@pytest.fixture(scope="module")
def setup(synth_root):
    bb = build_backbone("tiny", image_size=96)
    torch.manual_seed(0)
    model = KAnoCLIP(bb, ModelConfig()).eval()
    samples = load_dataset(f"mvtec:{synth_root}").samples("test", ["disc", "weave"])
    return model, samples


def _features(model, samples) -> VisualFeatures:
    from kano.anomaly_data import SampleDataset

    bb = model.backbone
    ds = SampleDataset(samples, bb.image_size, bb.mean, bb.std)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    feats = model.encode_images(images)
    # what the feature cache stores: fp16
    return VisualFeatures(feats.global_feature.half(), [t.half() for t in feats.patch_tokens])


def test_the_same_features_score_identically_with_and_without_autocast(setup):
    model, samples = setup
    feats = _features(model, samples)
    names = ["disc" if s.class_name == "disc" else "weave" for s in samples]
    with torch.no_grad():
        plain = model.forward_features(feats, names, 96)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model.forward_features(feats, names, 96)
    for field in ("image_score", "anomaly_map", "global_prob", "map_abnormal", "map_normal"):
        a, b = getattr(plain, field), getattr(auto, field)
        assert b.dtype == torch.float32, field
        assert torch.equal(a, b), field  # bit-identical: autocast never reached the heads
    # the same ranking and no added ties
    assert torch.equal(torch.argsort(plain.image_score), torch.argsort(auto.image_score))
    assert torch.unique(auto.anomaly_map).numel() == torch.unique(plain.anomaly_map).numel()
    assert torch.unique(auto.image_score).numel() == torch.unique(plain.image_score).numel() == len(samples)


def test_losses_are_float32_under_autocast(setup):
    model, samples = setup
    feats = _features(model, samples[:4])
    names = [s.class_name for s in samples[:4]]
    masks = torch.zeros(4, 96, 96)
    masks[:, 10:30, 10:30] = 1
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    knowledge = {c: torch.randn(model.backbone.embed_dim, generator=torch.Generator().manual_seed(1)) for c in set(names)}
    plain = model.loss(model.forward_features(feats, names, 96), masks, labels, knowledge)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model.loss(model.forward_features(feats, names, 96), masks, labels, knowledge)
    for k in plain:
        assert auto[k].dtype == torch.float32 and torch.equal(plain[k].detach(), auto[k].detach()), k


def test_a_cpu_run_with_backbone_autocast_forced_on_keeps_every_distinct_value(setup, monkeypatch):
    """The must-show: evaluation with the backbone in bf16 has as many distinct map values and scores as without."""
    from kano.evaluator.evaluate import run_inference

    model, samples = setup
    names = [s.class_name for s in samples]
    counts = {}
    for mode in ("off", "bf16"):
        monkeypatch.setenv("KANO_BACKBONE_AUTOCAST", mode)
        scores, maps, _ = run_inference(model, samples, names, 8, torch.device("cpu"))
        assert scores.dtype == maps.dtype == torch.float32
        counts[mode] = (torch.unique(maps).numel(), torch.unique(scores).numel())
    n_pixels = len(samples) * 96 * 96
    # the backbone's own rounding changes the values, not how many there are: nearly every pixel distinct in both
    assert counts["off"][0] > 0.9 * n_pixels and counts["bf16"][0] >= 0.99 * counts["off"][0], counts
    assert counts["bf16"][1] == counts["off"][1] == len(samples), counts


def test_backbone_autocast_choices(monkeypatch):
    monkeypatch.delenv("KANO_BACKBONE_AUTOCAST", raising=False)
    with backbone_autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")  # CPU default: the backbone in float32 too
    monkeypatch.setenv("KANO_BACKBONE_AUTOCAST", "bf16")
    with backbone_autocast("cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("KANO_BACKBONE_AUTOCAST", "fp8")
    with pytest.raises(ValueError, match="must be one of bf16, fp16, off, got 'fp8'"):
        backbone_autocast("cpu")
