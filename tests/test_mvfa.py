"""MVFA-AD (kanoclip/mvfa.py) against its public code's formulas, worked out here in numpy (never by calling the
module's own formula): the adapter stream, the maps and the image score, one training step's losses, the few-shot
distance map; then its published recipe in a run, through train, eval (zero- and few-shot) and the API."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from kano.kanoclip import build_backbone
from kano.kanoclip.mvfa import MVFA, MVFAConfig, augment_views

SIZE = 32  # tiny backbone: 4 x 4 patches, 4 blocks (stages 1..4), width 96, embed 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MVFA(build_backbone("tiny", image_size=SIZE)).eval()


def _leaky(a):
    return np.where(a > 0, a, 0.01 * a)  # torch's LeakyReLU default slope


def _unit(a):
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def _softmax(a, axis):
    e = np.exp(a - a.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _upsample_ac(a, size):
    """(h, h) -> (size, size), bilinear with align_corners=True: source x = i (h - 1) / (size - 1)."""
    h = a.shape[0]
    pos = np.arange(size) * (h - 1) / (size - 1)
    i0 = np.minimum(np.floor(pos).astype(int), h - 2)
    t = pos - i0
    w = np.zeros((size, h))
    w[np.arange(size), i0] = 1 - t
    w[np.arange(size), i0 + 1] += t
    return w @ a @ w.T


def _tokens_by_hand(model, images, mix=(0.8, 0.1, 0.1)):
    """The stream through open_clip's own (frozen) blocks, the adapters in numpy: per stage (seg, det) bottleneck
    activations (N, 1 + L, E), after each stage x <- 0.8 x + 0.1 seg_out + 0.1 det_out."""
    bb = model.backbone
    with torch.no_grad():
        x = bb.clip.visual._embeds(images)
        seg, det = [], []
        for i, blk in enumerate(bb.clip.visual.transformer.resblocks, 1):
            x = blk(x)
            if i in bb.stages:
                k = bb.stages.index(i)
                xs = x.numpy().astype(np.float64)
                outs = []
                for ad in (model.seg_adapters[k], model.det_adapters[k]):
                    mid = _leaky(xs @ ad.down.weight.numpy().T)
                    outs.append((mid, _leaky(mid @ ad.up.weight.numpy().T)))
                seg.append(outs[0][0])
                det.append(outs[1][0])
                xs = mix[0] * xs + mix[1] * outs[0][1] + mix[2] * outs[1][1]
                x = torch.from_numpy(xs.astype(np.float32))
    return seg, det


def test_adapter_stream_by_hand(model):
    torch.manual_seed(1)
    images = torch.rand(2, 3, SIZE, SIZE)
    seg_h, det_h = _tokens_by_hand(model, images)
    with torch.no_grad():
        seg, det = model.adapted_tokens(model.encode_images(images))
    for s in range(4):
        assert seg[s].shape == (2, 17, 64)                            # class token + 16 patches, embed width
        np.testing.assert_allclose(seg[s].numpy(), seg_h[s], atol=2e-5)
        np.testing.assert_allclose(det[s].numpy(), det_h[s], atol=2e-5)
    # the residual mix matters: another mix gives other tokens from the second stage on
    seg_m, _ = _tokens_by_hand(model, images, mix=(1.0, 0.0, 0.0))
    assert np.abs(seg_m[1] - seg[1].numpy()).max() > 1e-3


def test_adapters_are_bias_free_width_to_embed():
    bb = build_backbone("tiny", image_size=SIZE)
    m = MVFA(bb)
    assert len(m.seg_adapters) == len(m.det_adapters) == 4
    assert m.seg_adapters[0].down.weight.shape == (64, 96) and m.seg_adapters[0].up.weight.shape == (96, 64)
    assert all(mod.bias is None for ad in m.seg_adapters for mod in (ad.down, ad.up))
    assert bb.mean == (0.0, 0.0, 0.0) and bb.std == (1.0, 1.0, 1.0)   # ToTensor only, as the authors
    bb2 = build_backbone("tiny", image_size=SIZE)
    MVFA(bb2, MVFAConfig(pixel_norm="mean-std"))
    assert bb2.mean[0] == pytest.approx(0.48145466)
    with pytest.raises(ValueError, match="pixel_norm must be one of none, mean-std, got 'imagenet'"):
        MVFAConfig(pixel_norm="imagenet")


def test_maps_and_image_score_by_hand(model):
    torch.manual_seed(2)
    images = torch.rand(2, 3, SIZE, SIZE)
    seg, det = _tokens_by_hand(model, images)
    text = model.text_features(["disc"])[0].numpy().astype(np.float64)            # (2, E)
    with torch.no_grad():
        out = model(images, ["disc", "disc"])
    maps, scores = np.zeros((2, SIZE, SIZE)), np.zeros(2)
    for s in range(4):
        seg_logits = 100.0 * _unit(seg[s][:, 1:]) @ text.T                            # (N, L, 2), class token dropped
        det_p = _softmax(100.0 * _unit(det[s][:, 1:]) @ text.T, axis=-1)[..., 1]      # (N, L)
        scores += det_p.mean(1)                                                        # mean over patches, summed
        for n in range(2):
            up = np.stack([_upsample_ac(seg_logits[n, :, k].reshape(4, 4), SIZE) for k in range(2)])
            maps[n] += _softmax(up, axis=0)[1]                                         # softmax after upsampling
    np.testing.assert_allclose(out.image_score.numpy() * 4, scores, atol=1e-5)        # Kano reports sum / stages
    np.testing.assert_allclose(out.anomaly_map.numpy() * 4, maps, atol=1e-4)


def test_one_training_step_losses_by_hand(model):
    torch.manual_seed(3)
    images = torch.rand(2, 3, SIZE, SIZE)
    masks = torch.zeros(2, SIZE, SIZE)
    masks[0, 5:20, 8:25] = 1
    labels = torch.tensor([1.0, 0.0])
    out = model(images, ["disc", "disc"])
    terms = model.loss(out, masks, labels)
    p, t = out.stage_probs.detach().numpy().astype(np.float64), masks.numpy()
    seg = 0.0
    for s in range(4):
        # focal (loss.py): one-hot clamped to [1e-5, 1 - 1e-5], pt = <onehot, p> + 1e-5, -(1 - pt)^2 log pt
        oh = np.stack([1 - t, t], 1).clip(1e-5, 1 - 1e-5)
        pt = (oh * p[:, s]).sum(1) + 1e-5
        seg += np.mean(-(1 - pt) ** 2 * np.log(pt))
        a = p[:, s, 1].reshape(2, -1)
        seg += np.mean(1 - (2 * (a * t.reshape(2, -1)).sum(1) + 1) / (a.sum(1) + t.reshape(2, -1).sum(1) + 1))
    # BCE with logits applied to the stage's image score (a probability): log(1 + e^-x) for 1, log(1 + e^x) for 0
    x = out.det_scores.detach().numpy().astype(np.float64)                              # (N, S)
    det = sum(np.mean([math.log1p(math.exp(-x[0, s])), math.log1p(math.exp(x[1, s]))]) for s in range(4))
    assert float(terms["local"].detach()) == pytest.approx(seg, rel=1e-5)
    assert float(terms["global"].detach()) == pytest.approx(det, rel=1e-6)
    assert float(terms["total"].detach()) == pytest.approx(seg + det, rel=1e-5)
    # the gradient reaches both adapter sets and only them
    terms["total"].backward()
    assert all(float(ad.down.weight.grad.abs().sum()) > 0 for ad in [*model.seg_adapters, *model.det_adapters])
    assert all(p.grad is None for p in model.backbone.parameters())
    model.zero_grad(set_to_none=True)


def test_few_shot_distance_map_by_hand():
    from kano.kanoclip.fewshot import PatchMemory

    torch.manual_seed(4)
    m = MVFA(build_backbone("tiny", image_size=SIZE), MVFAConfig(reference_augment=False)).eval()
    refs, query = torch.rand(2, 3, SIZE, SIZE), torch.rand(1, 3, SIZE, SIZE)
    mem_seg, _ = _tokens_by_hand(m, refs)
    q_seg, _ = _tokens_by_hand(m, query)
    want = np.zeros((SIZE, SIZE))
    for s in range(4):
        mem = _unit(mem_seg[s].reshape(-1, 64))                       # every token of every reference, class tokens too
        d = (1 - _unit(q_seg[s][0, 1:]) @ mem.T).min(1)                # min over the memory of 1 - cos
        want += _upsample_ac(d.reshape(4, 4), SIZE)                   # summed over stages
    pm = PatchMemory(m)
    pm.set_reference("disc", refs)
    assert pm._memory["disc"][0].shape == (2 * 17, 64)
    got = pm.distance(query, ["disc"])[0].numpy()
    np.testing.assert_allclose(got * 4, want, atol=1e-4)              # Kano averages the stages


def test_reference_views_flip_and_shift_as_published():
    img = torch.rand(1, 3, 40, 40)
    v = augment_views(img)
    assert v.shape == (11, 3, 40, 40)
    assert torch.equal(v[0], img[0])
    assert torch.equal(v[9], img[0].flip(-1)) and torch.equal(v[10], img[0].flip(-2))
    # shift (0.1, 0.1) in normalised coordinates = 2 px of 40: output (i, j) reads input (i + 2, j + 2)
    assert torch.allclose(v[5][:, 5:30, 5:30], img[0][:, 7:32, 7:32], atol=1e-5)
    # rotation by -pi/8 keeps the centre pixel's neighbourhood mean roughly but not the pixels
    assert not torch.allclose(v[1], img[0], atol=1e-2)


def test_published_recipe_is_the_default():
    from kano.trainer import TrainConfig

    m = TrainConfig(method="mvfa", data="mvtec:x")
    assert (m.epochs, m.batch_size, m.lr, m.betas) == (50, 1, 1e-4, (0.5, 0.999)) and "train_zero.py" in m.recipe
    a = TrainConfig(method="aprilgan", data="mvtec:x")
    assert (a.epochs, a.batch_size, a.lr) == (3, 8, 1e-3) and "MVTec-AD" in a.recipe
    v = TrainConfig(method="aprilgan", data="visa:x")
    assert (v.epochs, v.batch_size) == (15, 8)
    k = TrainConfig(method="kanoclip", data="mvtec:x", epochs=2)
    assert (k.epochs, k.batch_size, k.lr) == (2, 8, 1e-3)
    assert TrainConfig(method="mvfa", data="mvtec:x", epochs=1, batch_size=2, lr=1e-3, betas=(0.9, 0.99), aug_rate=0.0).recipe is None


def test_mvfa_run_trains_records_and_serves(synth_root, tmp_path, cli):
    run = tmp_path / "run"
    cli("train", "--method", "mvfa", "--data", f"mvtec:{synth_root}", "--backbone", "tiny", "--image-size", "32",
        "--epochs", "1", "--out", str(run))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["method"] == "mvfa" and cfg["model"]["mix"] == [0.8, 0.1, 0.1]
    assert cfg["train"]["batch_size"] == 1 and cfg["train"]["lr"] == 1e-4 and cfg["train"]["betas"] == [0.5, 0.999]
    assert cfg["feature_cache"]["mode"] == "off"
    cli("eval", "--run", str(run), "--data", f"mvtec:{synth_root}", "--out", str(tmp_path / "ev"), "--k-shot", "1")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["provenance"]["method"]["method"] == "mvfa"
    import kano

    det = kano.Detector.load(run)
    photo = sorted((synth_root / "disc" / "test").rglob("*.png"))[0]
    res = det(str(photo), "disc")
    assert 0.0 <= res.score <= 1.0 and res.map.shape == (128, 128) and res.anomalous is not None


# -- April-GAN's 2 x 2 mosaic --------------------------------------------------------------------------------------

def test_mosaic_pairs_each_image_with_its_own_mask(synth_root):
    """Four samples of one class pasted row-major; each quadrant's mask is its own image's (nearest resize of a 2x
    canvas: exact), and each quadrant's pixels away from the seams are that image's (the same bicubic weights)."""
    from kano.anomaly_data import load_dataset, load_image, load_mask
    from kano.anomaly_data.torch_data import image_to_tensor, mask_to_tensor, mosaic_sample

    ds = load_dataset(f"mvtec:{synth_root}")
    disc = ds.samples("test", ["disc"])
    bad = [s for s in disc if s.label == 1]
    four = [bad[0], disc[0] if disc[0].label == 0 else disc[1], bad[1], bad[2]]
    assert four[1].label == 0
    img, mask, label = mosaic_sample(four, 64)
    assert img.shape == (3, 64, 64) and mask.shape == (64, 64) and label == 1
    for k, s in enumerate(four):
        y, x = (k // 2) * 32, (k % 2) * 32
        own = load_image(s.image_path)
        want_mask = mask_to_tensor(load_mask(s.mask_path, own.size), 32)
        assert torch.equal(mask[y:y + 32, x:x + 32], want_mask), f"quadrant {k}"
        want_img = image_to_tensor(own, 32)
        assert torch.allclose(img[:, y + 3:y + 29, x + 3:x + 29], want_img[:, 3:29, 3:29], atol=1e-4), f"quadrant {k}"
    assert mask[32:, :32].sum() > 0 and mask[:32, 32:].sum() == 0        # the normal image's quadrant is empty
    _, _, label_normal = mosaic_sample([four[1]] * 4, 64)
    assert label_normal == 0


def test_mosaic_plan_follows_the_rate_and_stays_in_the_class(synth_root, tmp_path):
    from types import SimpleNamespace

    from kano.anomaly_data import load_dataset
    from kano.trainer.train import mosaic_plan

    samples = load_dataset(f"mvtec:{synth_root}").samples("test")
    run = SimpleNamespace(samples=samples, cfg=SimpleNamespace(seed=1, aug_rate=1.0))
    plan = mosaic_plan(run, 0)
    assert sorted(plan) == list(range(len(samples)))
    assert all(len(f) == 4 and {samples[j].class_name for j in f} == {samples[i].class_name} for i, f in plan.items())
    assert mosaic_plan(run, 0) == plan and mosaic_plan(run, 1) != plan
    run.cfg.aug_rate = 0.0
    assert mosaic_plan(run, 0) == {}
    run.cfg.aug_rate = 0.2
    many = [len(mosaic_plan(SimpleNamespace(samples=samples * 20, cfg=run.cfg), e)) for e in range(5)]
    assert 0.1 < sum(many) / (5 * 20 * len(samples)) < 0.3


def test_aprilgan_on_mvtec_data_trains_with_the_published_recipe(synth_root, tmp_path, cli):
    run = tmp_path / "ag"
    cli("train", "--method", "aprilgan", "--data", f"mvtec:{synth_root}", "--backbone", "tiny", "--image-size", "32",
        "--out", str(run), "--cache", "memory")
    cfg = json.loads((run / "config.json").read_text())["train"]
    assert (cfg["batch_size"], cfg["epochs"], cfg["aug_rate"]) == (8, 3, 0.2) and "train.sh" in cfg["recipe"]
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and sum(r["mosaics"] for r in log) > 0


# -- the authors' quirks as settings ----------------------------------------------------------------------------------

def test_activation_setting_replaces_every_mlp_activation_and_is_recorded(synth_root, tmp_path, cli):
    from open_clip.transformer import QuickGELU

    from kano.kanoclip.runs import load_run

    quick, gelu = build_backbone("tiny", image_size=SIZE), build_backbone("tiny", image_size=SIZE, activation="gelu")
    assert quick.activation == "quickgelu" and gelu.activation == "gelu" and gelu.activation_set
    acts = [b.mlp.gelu for t in (gelu.clip.visual.transformer, gelu.clip.transformer) for b in t.resblocks]
    assert len(acts) == 6 and all(type(a) is torch.nn.GELU for a in acts)
    x = torch.linspace(-3, 3, 7)
    assert torch.allclose(QuickGELU()(x), x * torch.sigmoid(1.702 * x))
    images = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = quick(images, vv=False, raw=True), gelu(images, vv=False, raw=True)
    diff = (a.patch_tokens[0] - b.patch_tokens[0]).abs().max()             # same weights, another activation
    assert 1e-4 < float(diff) < 1.0
    run = tmp_path / "gelu"
    cli("train", "--method", "aprilgan", "--data", f"mvtec:{synth_root}", "--backbone", "tiny", "--image-size", "32",
        "--epochs", "1", "--activation", "gelu", "--out", str(run), "--cache", "memory")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["activation"] == "gelu" and cfg["train"]["activation"] == "gelu"
    model, _ = load_run(run)
    assert model.backbone.activation == "gelu"


def test_folder_class_words_reach_training_eval_and_the_api(synth_root, tmp_path, cli):
    import shutil

    import kano

    root = tmp_path / "data"
    shutil.copytree(synth_root / "disc", root / "pcb1")                  # Kano's word: "printed circuit board"
    run = tmp_path / "run"
    cli("train", "--method", "aprilgan", "--data", f"mvtec:{root}", "--backbone", "tiny", "--image-size", "32",
        "--epochs", "1", "--class-words", "folder", "--out", str(run), "--cache", "memory")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["class_words"] == "folder" and cfg["prompt_names"] == {"pcb1": "pcb1"}
    shutil.copytree(root / "pcb1", tmp_path / "target" / "pcb2")           # a class the run never saw
    cli("eval", "--run", str(run), "--data", f"mvtec:{tmp_path / 'target'}", "--out", str(tmp_path / "ev"), "--n-overlays", "0")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["provenance"]["class_words"] == {"pcb2": "pcb2"}
    det = kano.Detector.load(run)
    assert det.class_word("pcb2") == "pcb2" and det.class_word("pcb2", "board") == "board"
    kano_rule = tmp_path / "kano_rule"
    cli("train", "--method", "aprilgan", "--data", f"mvtec:{root}", "--backbone", "tiny", "--image-size", "32",
        "--epochs", "1", "--out", str(kano_rule), "--cache", "memory")
    assert json.loads((kano_rule / "config.json").read_text())["prompt_names"] == {"pcb1": "printed circuit board"}


def test_seeded_reference_sampling_draws_with_replacement(synth_root, tmp_path, cli):
    from kano.core.errors import KanoError
    from kano.evaluator.methods import reference_images

    bb = build_backbone("tiny", image_size=SIZE)
    train = sorted(s.image_path for s in __import__("kano.anomaly_data", fromlist=["x"]).load_dataset(
        f"mvtec:{synth_root}").samples("train", ["disc"]) if s.label == 0)
    with pytest.raises(KanoError, match="needs 3 normal train images"):
        reference_images(f"mvtec:{synth_root}", 3, bb, ["disc"])            # first K: not enough images
    _, files = reference_images(f"mvtec:{synth_root}", 3, bb, ["disc"], "seeded:7")
    g = torch.Generator().manual_seed(7)
    assert files["disc"] == [train[int(i)] for i in torch.randint(0, len(train), (3,), generator=g)]
    assert len(files["disc"]) == 3 and len(set(files["disc"])) < 3          # duplicates: drawn with replacement
    out = tmp_path / "ev"
    cli("eval", "--backbone", "tiny", "--image-size", "32", "--data", f"mvtec:{synth_root}", "--classes", "disc",
        "--k-shot", "2", "--reference-sampling", "seeded", "--out", str(out), "--n-overlays", "0")
    fs = json.loads((out / "metrics.json").read_text())["provenance"]["method"]["few_shot"]
    assert fs["sampling"] == "seeded" and "seeded 10" in fs["rule"]
