"""Damaged or edited run folders, output paths the file system refuses, and classes with empty folders:
each is `error: ...` naming the file or value, exit 2, no traceback, and nothing already written is lost."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _clean_error(code, err, *needles):
    text = " ".join(err.split())
    assert code == 2, err
    assert "Traceback" not in err and "\nerror: " in "\n" + err, err
    for n in needles:
        assert n in text, text


def _predict(cli, run, synth_root, out):
    return cli("predict", synth_root / "disc" / "test" / "hole", "--class", "disc", "--run", run, "--out", out)


def _eval(cli, run, synth_root, out, *extra):
    return cli("eval", "--run", run, "--data", f"mvtec:{synth_root}", "--out", out, "--n-overlays", "0", *extra)


def test_the_undamaged_run_scores(trained_run, synth_root, tmp_path, cli):
    code, out, err = _predict(cli, trained_run, synth_root, tmp_path / "p")
    assert code == 0, err
    assert all(isinstance(json.loads(l)["score"], float) for l in (tmp_path / "p" / "predictions.jsonl").read_text().splitlines())


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_a_damaged_weights_file_is_named(trained_run, synth_root, tmp_path, cli, damage):
    r = _copy(trained_run, tmp_path)
    w = r / "weights.safetensors"
    data = w.read_bytes()
    w.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": bytes(range(256)) * (len(data) // 256)}[damage])
    for code, out, err in (_predict(cli, r, synth_root, tmp_path / "p"), _eval(cli, r, synth_root, tmp_path / "e")):
        _clean_error(code, err, str(w), "must be a complete safetensors file written by `kano train`", "train the run again")
    assert not (tmp_path / "p" / "predictions.jsonl").exists()


def test_weights_changed_after_training_are_refused(trained_run, synth_root, tmp_path, cli):
    r = _copy(trained_run, tmp_path)
    w = r / "weights.safetensors"
    tensors = load_file(str(w))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.25  # finite, readable, and not what was trained
    save_file(tensors, str(w))
    want = json.loads((r / "config.json").read_text())["ranks"][0]["weights_sha256"]
    code, out, err = _predict(cli, r, synth_root, tmp_path / "p")
    _clean_error(code, err, str(w), "must hold the weights recorded in its config.json", f"digest {want[:16]}...")


def test_non_finite_weights_are_refused_even_without_a_recorded_digest(trained_run, synth_root, tmp_path, cli):
    r = _copy(trained_run, tmp_path)
    cfg = json.loads((r / "config.json").read_text())
    del cfg["ranks"]  # a run written before the digest was recorded
    (r / "config.json").write_text(json.dumps(cfg))
    w = r / "weights.safetensors"
    tensors = load_file(str(w))
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[-1]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(w))
    code, out, err = _predict(cli, r, synth_root, tmp_path / "p")
    _clean_error(code, err, str(w), "must hold finite numbers, got NaN or inf in", name)


@pytest.mark.parametrize("edit, needles", [
    (lambda c: c.update(threshold="high"), ["threshold must be a number in [0, 1] or null, got 'high'"]),
    (lambda c: c.update(threshold=True), ["threshold must be a number in [0, 1] or null, got True"]),
    (lambda c: c.pop("backbone"), ["must have the keys backbone, image_size, stages, vv_start, model", "got none for backbone"]),
    (lambda c: (c.pop("stages"), c.pop("model")), ["got none for stages, model"]),
])
def test_an_edited_config_is_named(trained_run, synth_root, tmp_path, cli, edit, needles):
    r = _copy(trained_run, tmp_path)
    cfg = json.loads((r / "config.json").read_text())
    edit(cfg)
    (r / "config.json").write_text(json.dumps(cfg))
    for code, out, err in (_predict(cli, r, synth_root, tmp_path / "p"), _eval(cli, r, synth_root, tmp_path / "e")):
        _clean_error(code, err, str(r / "config.json"), *needles)


@pytest.mark.parametrize("size", ["0", "-8"])
def test_eval_image_size_must_be_positive(synth_root, tmp_path, cli, size):
    code, out, err = cli("eval", "--backbone", "tiny", "--image-size", size, "--data", f"mvtec:{synth_root}", "--out", tmp_path / "e")
    _clean_error(code, err, f"image_size must be a positive integer (leave it unset for the backbone's default), got {size}")
    assert not (tmp_path / "e").exists()


def test_out_under_a_file_is_named_and_the_file_kept(trained_run, synth_root, tmp_path, cli):
    f = tmp_path / "precious.txt"
    f.write_text("keep me")
    for code, out, err in (_predict(cli, trained_run, synth_root, f / "sub"), _eval(cli, trained_run, synth_root, f / "sub"),
                           cli("data", "synth", "--out", f / "sub", "--classes", "disc", "--size", "64", "--n-good", "1",
                               "--n-defect", "1", "--defects", "hole")):
        _clean_error(code, err, str(f / "sub"), "must be under a folder", "a part of that path is a file")
    assert f.read_text() == "keep me"


def test_train_refuses_a_folder_of_eval_results(trained_run, synth_root, tmp_path, cli):
    code, out, err = _eval(cli, trained_run, synth_root, tmp_path / "res")
    assert code == 0, err
    before = sorted(p.relative_to(tmp_path / "res") for p in (tmp_path / "res").rglob("*"))
    kb = trained_run.parent / "kb.duckdb"
    code, out, err = cli("train", "--kb", kb, "--data", f"mvtec:{synth_root}", "--backbone", "tiny", "--out", tmp_path / "res",
                         "--epochs", "1", "--image-size", "96", "--cache", "memory")
    _clean_error(code, err, str(tmp_path / "res"), "must be a new folder or a run to --resume, got the results of `kano eval`")
    assert sorted(p.relative_to(tmp_path / "res") for p in (tmp_path / "res").rglob("*")) == before


def test_a_class_with_empty_test_folders_is_skipped_or_named(synth_root, tmp_path, cli):
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    for p in (data / "weave" / "test").rglob("*.png"):
        p.unlink()
    code, out, err = cli("eval", "--backbone", "tiny", "--data", f"mvtec:{data}", "--out", tmp_path / "e", "--n-overlays", "0")
    assert code == 0, err
    assert "skipping weave" in " ".join(err.split()) and "no test images" in err
    assert list(json.loads((tmp_path / "e" / "metrics.json").read_text())["classes"]) == ["disc"]
    code, out, err = cli("eval", "--backbone", "tiny", "--data", f"mvtec:{data}", "--classes", "disc,weave", "--out", tmp_path / "e2")
    _clean_error(code, err, "each class asked for must hold test images", "got none for weave")
