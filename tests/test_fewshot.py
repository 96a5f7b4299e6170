"""The K-shot mode of trained runs and the untrained model (kanoclip/fewshot.py, April-GAN's few-shot memory)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kano.kanoclip.fewshot import PatchMemory
from kano.kanoclip.model import InferenceBatch


class _Fixed(torch.nn.Module):
    """A model whose map and score are known: map 0.2 everywhere but 0.6 in the top-left quarter, score 0.3."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, images, class_names):
        n, s = images.shape[0], images.shape[-1]
        amap = torch.full((n, s, s), 0.2)
        amap[:, : s // 2, : s // 2] = 0.6
        return InferenceBatch(torch.full((n,), 0.3), amap, torch.zeros(n, 1, 2, 2))


def test_distance_map_is_one_minus_the_best_cosine_averaged_over_stages(tiny_backbone):
    g = torch.Generator().manual_seed(0)
    s = tiny_backbone.image_size
    ref, test = torch.randn(2, 3, s, s, generator=g), torch.randn(1, 3, s, s, generator=g)
    mem = PatchMemory(_Fixed(tiny_backbone)).eval()
    mem.set_reference("thing", ref)
    with torch.no_grad():
        out = mem(test, ["thing"])
        # by hand: each stage's raw tokens, unit length; a test patch's distance is 1 - its best cosine over both refs
        r = [F.normalize(t.float(), dim=-1).flatten(0, 1) for t in tiny_backbone(ref, vv=False, raw=True).patch_tokens]
        t = [F.normalize(x.float(), dim=-1)[0] for x in tiny_backbone(test, vv=False, raw=True).patch_tokens]
    grid = int(t[0].shape[0] ** 0.5)
    dist = []
    for ts, rs in zip(t, r):
        best = torch.stack([(ts[p] * rs).sum(-1).max() for p in range(ts.shape[0])])  # each pair's dot product, then the best
        dist.append(F.interpolate((1 - best).view(1, 1, grid, grid), size=(s, s), mode="bilinear", align_corners=True)[0, 0])
    d = torch.stack(dist).mean(0)
    base = torch.full((s, s), 0.2)
    base[: s // 2, : s // 2] = 0.6
    assert torch.allclose(out.anomaly_map[0], (base + d) / 2, atol=1e-5)
    assert float(out.image_score[0]) == pytest.approx((0.3 + float(((base + d) / 2).max())) / 2, abs=1e-5)


def test_an_image_that_is_its_own_reference_is_at_distance_zero(tiny_backbone):
    s = tiny_backbone.image_size
    img = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(1))
    mem = PatchMemory(_Fixed(tiny_backbone)).eval()
    mem.set_reference("thing", img)
    with torch.no_grad():
        out = mem(img, ["thing"])
    assert float(out.anomaly_map.max()) == pytest.approx(0.3, abs=1e-5)      # 0.6 / 2: the memory adds nothing
    assert float(out.anomaly_map.min()) == pytest.approx(0.1, abs=1e-5)
    assert float(out.image_score[0]) == pytest.approx((0.3 + 0.3) / 2, abs=1e-5)
    with pytest.raises(ValueError, match="reference images for every class"):
        mem(img, ["other"])


def test_predict_with_references_gives_the_scores_eval_gives(tmp_path, trained_run, synth_root, cli):
    """A trained run with its K-shot memory: eval (first 1 train image of each class) and predict (--reference the
    same class's train/good) score the test images alike."""
    ev = tmp_path / "ev"
    code, out, err = cli("eval", "--run", trained_run, "--k-shot", "1", "--data", f"mvtec:{synth_root}", "--classes", "disc",
                         "--out", ev, "--n-overlays", "0")
    assert code == 0, err
    m = json.loads((ev / "metrics.json").read_text())
    assert m["provenance"]["method"]["setting"] == "few-shot" and m["provenance"]["method"]["k_shot"] == 1
    zero = tmp_path / "zero"
    assert cli("eval", "--run", trained_run, "--data", f"mvtec:{synth_root}", "--classes", "disc", "--out", zero, "--n-overlays", "0")[0] == 0
    z = json.loads((zero / "metrics.json").read_text())
    assert z["classes"]["disc"]["pixel_auroc"] != m["classes"]["disc"]["pixel_auroc"]     # the memory changed the maps
    pr = tmp_path / "pr"
    test = sorted((synth_root / "disc" / "test").iterdir())
    code, out, err = cli("predict", *test, "--run", trained_run, "--class", "disc", "--reference", synth_root / "disc" / "train" / "good",
                         "--k-shot", "1", "--out", pr)
    assert code == 0, err
    lines = (ev / "scores.csv").read_text().splitlines()[1:]
    evs = {Path(line.split(",")[2]).resolve(): float(line.split(",")[4]) for line in lines}
    prs = {Path(json.loads(x)["image"]).resolve(): json.loads(x)["score"] for x in (pr / "predictions.jsonl").read_text().splitlines()}
    assert prs.keys() == evs.keys() and max(abs(prs[k] - evs[k]) for k in evs) <= 1e-6
