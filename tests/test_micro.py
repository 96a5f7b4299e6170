"""The shipped micro-CLIP: loads offline like any CLIP, its file is the one its record names, and its text
tower tells flawless from damaged on images of classes it never saw in pretraining."""

import hashlib
import json
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import roc_auc_score

from kano.core.errors import KanoError
from kano.kanoclip import build_backbone

MICRO_DIR = Path(str(resources.files("kano.kanoclip").joinpath("micro")))


@pytest.fixture(scope="module")
def micro():
    return build_backbone("micro")


def test_shipped_file_is_the_one_config_records():
    record = json.loads((MICRO_DIR / "config.json").read_text())
    path = MICRO_DIR / record["weights"]
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == record["sha256"]
    assert len(data) == record["bytes"] and len(data) < 8_000_000, "a few MB, shipped as package data"


def test_micro_builds_through_open_clip_offline(micro):
    import open_clip

    assert "kano-micro" in open_clip.list_models()          # registered as an open_clip model config
    assert isinstance(micro.clip, open_clip.CLIP)
    assert (micro.image_size, micro.patch_size, micro.grid, micro.depth) == (96, 8, 12, 6)
    feats = micro(torch.zeros(1, 3, 96, 96))
    assert len(feats.patch_tokens) == len(micro.stages) and feats.patch_tokens[0].shape == (1, 144, micro.embed_dim)


def test_text_tower_tells_flawless_from_damaged_on_unseen_classes(micro, tmp_path):
    """Zero-shot on anomaly_data/synth.py images (classes outside the pretraining world, by construction of
    bench/micro_world.py): p(damaged) from two captions must rank defective images above normal ones."""
    import open_clip

    from kano.anomaly_data import synthesize

    root = synthesize(tmp_path / "d", ["disc", "weave"], seed=11, size=192, n_train=0, n_good=6, n_per_defect=3,
                      defects=("hole", "stain"))
    meta = json.loads((root / "meta.json").read_text())["test"]
    mean, std = torch.tensor(micro.mean).view(1, 3, 1, 1), torch.tensor(micro.std).view(1, 3, 1, 1)
    aucs = []
    for cls, samples in meta.items():
        imgs = np.stack([np.asarray(Image.open(root / s["img_path"]).convert("RGB").resize((96, 96), Image.BICUBIC)) for s in samples])
        x = (torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255 - mean) / std
        y = np.array([s["anomaly"] for s in samples])
        with torch.no_grad():
            g = F.normalize(micro.clip.encode_image(x), dim=-1)
            tok = open_clip.tokenize([f"a photo of a flawless {cls}.", f"a photo of a damaged {cls}."], context_length=micro.clip.context_length)
            t = F.normalize(micro.clip.encode_text(tok), dim=-1)
        p_damaged = (g @ t.T).softmax(-1)[:, 1].numpy()
        aucs.append(roc_auc_score(y, p_damaged))
    assert np.mean(aucs) >= 0.75, f"flawless-vs-damaged AUROC per class {aucs}"


def test_other_weights_file_and_bad_file(tmp_path, micro):
    own = tmp_path / "copy.safetensors"
    shutil.copy(MICRO_DIR / "micro_clip.safetensors", own)
    other = build_backbone(f"micro:{own}")
    for a, b in zip(other.clip.state_dict().values(), micro.clip.state_dict().values()):
        assert torch.equal(a, b)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(KanoError, match="safetensors"):
        build_backbone(f"micro:{bad}")
    with pytest.raises(KanoError, match="must exist"):
        build_backbone(f"micro:{tmp_path / 'none.safetensors'}")


def test_language_free_control(tiny_backbone):
    from kano.kanoclip import KAnoCLIP, ModelConfig

    with pytest.raises(ValueError, match="use_knpl must be False"):
        ModelConfig(text_free=True)
    model = KAnoCLIP(tiny_backbone, ModelConfig(use_knpl=False, text_free=True, bica_dim=32, bica_heads=2))
    names = {k for k, _ in model.named_parameters() if k.startswith("prompts.")}
    assert names == {"prompts.normal", "prompts.abnormal"}
    out = model(torch.randn(2, 3, 224, 224), ["disc", "weave"])
    # class names reach no text tower: both classes get the same two vectors
    assert torch.equal(out.text_normal[0], out.text_normal[1]) and torch.equal(out.text_abnormal[0], model.prompts.abnormal)
    out.global_prob.sum().backward()
    assert model.prompts.abnormal.grad is not None and model.prompts.abnormal.grad.abs().sum() > 0
