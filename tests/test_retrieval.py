"""The retrieval floor (kanoclip/retrieval.py, `kano eval --method retrieval`): the top-k rule by hand, the
memory on the real tiny backbone, and the command line."""

import json
import math

import pytest
import torch

from kano.kanoclip.retrieval import PatchRetrieval, RetrievalConfig, build_memory, retrieval_probability


def test_retrieval_probability_by_hand():
    normal = torch.tensor([[1.0, 0.0], [0.8, 0.6]])
    abnormal = torch.tensor([[0.0, 3.0]])                  # memories are compared by cosine: the scale is irrelevant
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # k = 1, T = 1: query 1: s_n = 1, s_a = 0; query 2: s_n = 0.6, s_a = 1
    p = retrieval_probability(q, normal, abnormal, k=1, temperature=1.0)
    torch.testing.assert_close(p, torch.tensor([1 / (1 + math.e), math.e / (math.e + math.exp(0.6))]))
    # k = 2: s_n = mean of the two best normal cosines (1 and 0.8 for query 1); the single abnormal memory is used once
    p2 = retrieval_probability(q[:1], normal, abnormal, k=2, temperature=0.5)
    torch.testing.assert_close(p2, torch.tensor([1 / (1 + math.exp(0.9 / 0.5))]))


def test_config_rejects_contradictions():
    for kw, msg in (({"k": 0}, "k must be"), ({"temperature": 0}, "temperature must be"), ({"defect_share": 0}, "defect_share")):
        with pytest.raises(ValueError, match=msg):
            RetrievalConfig(**kw)


def test_memory_of_the_images_themselves_finds_their_defects(tiny_backbone, synth_root):
    """Scored on the very images the memory holds, each patch's nearest memory is itself: defects come out on top.
    A swapped normal/abnormal rule or a memory built from the wrong patches fails this."""
    from torch.utils.data import DataLoader

    from kano.anomaly_data import SampleDataset, load_dataset
    from kano.evaluator.metrics import pixel_metrics

    bb = tiny_backbone
    samples = load_dataset(f"mvtec:{synth_root}").samples("test", ["disc"])
    ds = SampleDataset(samples, bb.image_size, bb.mean, bb.std)
    cfg = RetrievalConfig(k=1, sigma=1.0, defect_share=0.5)
    mem = build_memory(bb, DataLoader(ds, batch_size=4), cfg)
    n_bad = sum(int((torch.nn.functional.adaptive_avg_pool2d(ds[i]["mask"][None, None].float(), bb.grid) >= 0.5).sum())
                for i in range(len(ds)))
    assert mem["abnormal_patches"][0].shape[0] == n_bad > 0
    assert mem["normal_images"].shape[0] == sum(s.label == 0 for s in samples)
    assert mem["normal_patches"][0].shape[0] == sum(s.label == 0 for s in samples) * bb.grid ** 2  # patches of normal images only
    model = PatchRetrieval(bb, cfg=cfg, **mem).eval()
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    out = model(x, ["disc"] * len(ds)).inference()
    masks = torch.stack([ds[i]["mask"] for i in range(len(ds))])
    assert out.anomaly_map.shape == masks.shape and torch.isfinite(out.anomaly_map).all()
    assert pixel_metrics(masks.numpy().astype(bool), out.anomaly_map.numpy(), with_aupro=False)["pixel_auroc"] > 0.9


def test_cli_eval_retrieval_records_its_memory(synth_root, tmp_path, cli):
    code, out, err = cli("eval", "--method", "retrieval", "--backbone", "tiny", "--image-size", "64", "--aux", f"mvtec:{synth_root}",
                         "--data", f"mvtec:{synth_root}", "--classes", "weave", "--out", tmp_path / "e", "--n-overlays", "0")
    assert code == 0, err
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    method = m["provenance"]["method"]
    assert method["kind"] == "memory" and method["name"] == "retrieval" and method["aux"] == f"mvtec:{synth_root}"
    assert method["memory"]["normal_images"] > 0 and min(method["memory"]["abnormal_patches_per_stage"]) > 0
    assert "per-image memory retrieval" in " ".join(out.split())  # the summary wraps at 160 columns


def test_cli_eval_retrieval_bad_input(synth_root, tmp_path, cli):
    good_only = tmp_path / "good_only"
    from kano.anomaly_data import synthesize

    synthesize(good_only, ["disc"], seed=1, size=64, n_train=1, n_good=2, n_per_defect=0, defects=("hole",))
    base = ["eval", "--data", f"mvtec:{synth_root}", "--out", tmp_path / "e"]
    for args, message in ((["--method", "retrieval", "--backbone", "tiny"], "--method retrieval needs --aux KIND:PATH"),
                          (["--method", "retrieval", "--aux", f"mvtec:{synth_root}"], "--method retrieval needs --backbone"),
                          (["--method", "darkness", "--aux", f"mvtec:{synth_root}"], "--aux is used by --method retrieval only"),
                          (["--backbone", "tiny", "--aux", f"mvtec:{synth_root}"], "--aux is used by --method retrieval only"),
                          (["--method", "retrieval", "--backbone", "tiny", "--aux", f"mvtec:{good_only}"], "must hold normal and anomalous")):
        code, _, err = cli(*base, *args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
