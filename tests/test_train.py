"""`kano train`: run directory, frozen-feature cache, resume, ablations, and the three stages together."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kano.core.errors import KanoError
from kano.kanoclip import Backbone
from kano.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def kb(synth_root, tmp_path_factory):
    from kano.kb_builder import BuildConfig, build_knowledge_base
    from kano.knowledge_store import KnowledgeStore

    path = tmp_path_factory.mktemp("kb") / "kb.duckdb"
    build_knowledge_base(KnowledgeStore(path), BuildConfig(classes=["disc", "weave"]), None, None)
    return path


def cfg(kb, synth_root, out, **kw):
    base = dict(kb=str(kb), data=f"mvtec:{synth_root}", backbone="tiny", out=str(out), epochs=2, batch_size=4, image_size=96,
                cache="memory")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def count_encodes(monkeypatch):
    seen = {"images": 0}
    original = Backbone.forward

    def counting(self, images, vv=True):
        seen["images"] += images.shape[0]
        return original(self, images, vv)

    monkeypatch.setattr(Backbone, "forward", counting)
    return seen


@pytest.mark.slow  # over 8 s on two cores
def test_cli_train_writes_a_complete_run_then_eval_and_predict_use_it(kb, synth_root, tmp_path, cli):
    run = tmp_path / "run"
    code, out, err = cli("train", "--kb", kb, "--data", f"mvtec:{synth_root}", "--backbone", "tiny", "--out", run, "--epochs", "3",
                         "--batch-size", "4", "--image-size", "96", "--cache", "memory")
    assert code == 0, err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "config.json", "train_log.jsonl", "weights.safetensors"]
    assert not [p for p in run.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".bin", ".ckpt")]
    config = json.loads((run / "config.json").read_text())
    for key in ("backbone", "image_size", "stages", "model", "train", "kb", "train_classes", "git_commit", "seed", "versions", "threshold"):
        assert key in config
    assert config["train"]["lr"] == 1e-3 and config["train"]["betas"] == [0.5, 0.999] and config["model"]["n_ctx"] == 12
    assert config["model"]["alpha"] == config["model"]["beta"] == config["model"]["gamma"] == 1.0 and config["model"]["sigma"] == 4.0
    assert len(config["kb"]["digest"]) == 64 and config["train_classes"] == ["disc", "weave"]
    assert 0.0 <= config["threshold"] <= 1.0 and config["status"] == "finished"
    log = [json.loads(l) for l in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert all({"loss", "loss_kd", "loss_global", "loss_local", "seconds"} <= set(r) for r in log)
    weights = load_file(str(run / "weights.safetensors"))
    assert weights and all(k.startswith(("prompts.", "heads.", "adapter.")) for k in weights)
    assert "sk-" not in (run / "config.json").read_text()

    code, out, err = cli("eval", "--run", run, "--data", f"mvtec:{synth_root}", "--out", tmp_path / "eval")
    assert code == 0, err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["mean"]["pixel_auroc"] is not None
    code, out, err = cli("predict", synth_root / "disc" / "test" / "hole", "--class", "disc", "--run", run, "--out", tmp_path / "p")
    lines = [json.loads(l) for l in (tmp_path / "p" / "predictions.jsonl").read_text().splitlines()]
    assert code == 0 and all(r["threshold"] == config["threshold"] and isinstance(r["anomalous"], bool) for r in lines)


@pytest.mark.slow  # over 8 s on two cores
def test_the_backbone_runs_once_per_image_with_the_cache(kb, synth_root, tmp_path, count_encodes):
    n = 2 * (3 + 2 * 2)  # two classes: 3 good + 2 hole + 2 stain test images each
    res = train(cfg(kb, synth_root, tmp_path / "a", epochs=3), log=lambda s: None)
    # once for the cache, once more only for calibrating the threshold... from the cache as well
    assert count_encodes["images"] == n
    assert res["log"][0]["cache_seconds"] > 0 and all(r["cache_seconds"] == 0 for r in res["log"][1:])
    count_encodes["images"] = 0
    train(cfg(kb, synth_root, tmp_path / "b", epochs=3, cache="off"), log=lambda s: None)
    assert count_encodes["images"] == n * 3 + n  # every epoch, and the calibration pass


def _cache_folders(cache_dir):
    return [p for p in cache_dir.iterdir() if p.is_dir()]


@pytest.mark.slow  # over 8 s on two cores
def test_disk_cache_is_reused_and_invalidated(kb, synth_root, tmp_path, count_encodes):
    cache_dir = tmp_path / "cache"
    train(cfg(kb, synth_root, tmp_path / "a", cache="disk", cache_dir=str(cache_dir)), log=lambda s: None)
    first = count_encodes["images"]
    assert first > 0 and len(_cache_folders(cache_dir)) == 1
    train(cfg(kb, synth_root, tmp_path / "b", cache="disk", cache_dir=str(cache_dir)), log=lambda s: None)
    assert count_encodes["images"] == first  # nothing encoded again
    train(cfg(kb, synth_root, tmp_path / "c", cache="disk", cache_dir=str(cache_dir), image_size=112), log=lambda s: None)
    assert count_encodes["images"] == 2 * first and len(_cache_folders(cache_dir)) == 2


@pytest.mark.slow  # over 8 s on two cores
def test_resume_ends_with_the_weights_of_an_uninterrupted_run(kb, synth_root, tmp_path):
    train(cfg(kb, synth_root, tmp_path / "full", epochs=3), log=lambda s: None)
    train(cfg(kb, synth_root, tmp_path / "part", epochs=1), log=lambda s: None)
    train(cfg(kb, synth_root, tmp_path / "part", epochs=3), resume=True, log=lambda s: None)
    a, b = load_file(str(tmp_path / "full" / "weights.safetensors")), load_file(str(tmp_path / "part" / "weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(l) for l in (tmp_path / "part" / "train_log.jsonl").read_text().splitlines()]
    full = [json.loads(l) for l in (tmp_path / "full" / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3] and [r["loss"] for r in log] == [r["loss"] for r in full]
    with pytest.raises(KanoError, match=r"only --epochs may change.*lr: 0\.001 -> 0\.5"):
        train(cfg(kb, synth_root, tmp_path / "part", epochs=4, lr=0.5), resume=True, log=lambda s: None)
    with pytest.raises(KanoError, match="must be new"):
        train(cfg(kb, synth_root, tmp_path / "full"), log=lambda s: None)


def test_text_features_are_cached_in_the_kb(kb, synth_root, tmp_path):
    train(cfg(kb, synth_root, tmp_path / "a", epochs=1), log=lambda s: None)
    train(cfg(kb, synth_root, tmp_path / "b", epochs=1), log=lambda s: None)
    info = json.loads((tmp_path / "b" / "config.json").read_text())["kb"]
    assert info["encoded"] == 0 and info["from_cache"] == 10


def test_missing_descriptions_name_the_command(synth_root, tmp_path):
    from kano.knowledge_store import KnowledgeStore

    empty = tmp_path / "empty.duckdb"
    KnowledgeStore(empty)
    with pytest.raises(KanoError, match="kano kb build --classes disc,weave"):
        train(cfg(empty, synth_root, tmp_path / "r"), log=lambda s: None)


@pytest.mark.parametrize("flag", ["--no-knpl", "--no-vv", "--no-bicmci", "--no-adapter"])
def test_each_ablation_trains_and_evaluates(kb, synth_root, tmp_path, cli, flag):
    run = tmp_path / "run"
    code, out, err = cli("train", "--kb", kb, "--data", f"mvtec:{synth_root}", "--backbone", "tiny", "--out", run, "--epochs", "1",
                         "--batch-size", "4", "--image-size", "96", flag)
    assert code == 0, err
    key = {"--no-knpl": "use_knpl", "--no-vv": "use_vv", "--no-bicmci": "use_bicmci", "--no-adapter": "use_adapter"}[flag]
    assert json.loads((run / "config.json").read_text())["model"][key] is False
    code, out, err = cli("eval", "--run", run, "--data", f"mvtec:{synth_root}", "--out", tmp_path / "e")
    assert code == 0, err
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["mean"]["image_auroc"] is not None


def test_config_file_and_validation(kb, synth_root, tmp_path, cli):
    conf = tmp_path / "train.json"
    conf.write_text(json.dumps({"epochs": 1, "batch_size": 4, "image_size": 96, "model": {"n_ctx": 4, "sigma": 2.0}}))
    code, out, err = cli("train", "--config", conf, "--kb", kb, "--data", f"mvtec:{synth_root}", "--backbone", "tiny", "--out",
                         tmp_path / "r", "--sigma", "3")
    assert code == 0, err
    model = json.loads((tmp_path / "r" / "config.json").read_text())["model"]
    assert model["n_ctx"] == 4 and model["sigma"] == 3.0
    conf.write_text(json.dumps({"epochs": 0}))
    code, out, err = cli("train", "--config", conf, "--kb", kb, "--data", f"mvtec:{synth_root}", "--out", tmp_path / "r2")
    assert code == 2 and "epochs must be >= 1, got 0" in err
    conf.write_text(json.dumps({"epoch": 3}))
    code, out, err = cli("train", "--config", conf, "--kb", kb, "--data", f"mvtec:{synth_root}", "--out", tmp_path / "r3")
    assert code == 2 and "config keys must be among" in err
