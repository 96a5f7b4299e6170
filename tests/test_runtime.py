"""kano predict --model: a trained run exported, then scored in a process where torch and open_clip cannot be
imported, writes what `kano predict --run` writes (same records, scores within 1e-4, same decisions, same maps)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import KANO

pytest.importorskip("onnxruntime", reason="pip install 'kano[export,runtime]'")

# Put first on PYTHONPATH: importing torch, torchvision or open_clip raises ImportError in that process, and at exit
# it lists which of them (or their submodules) were loaded anyway.
BLOCKER = '''
import atexit, os, sys
BLOCKED = ("torch", "torchvision", "open_clip")
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed here (test_runtime blocks it)")
        return None
sys.meta_path.insert(0, _Block())
atexit.register(lambda: open(os.environ["KANO_TEST_MODULES"], "w").write(
    "\\n".join(m for m in sys.modules if m.split(".")[0] in BLOCKED)))
'''


@pytest.fixture(scope="module")
def exported(exported_run) -> Path:
    return exported_run[0]  # trained_run exported for disc, weave (conftest)


def run_without_torch(args: list, tmp: Path) -> subprocess.CompletedProcess:
    (tmp / "blocker").mkdir(exist_ok=True)
    (tmp / "blocker" / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(tmp / "blocker"), "KANO_TEST_MODULES": str(tmp / "modules.txt"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([KANO, *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    loaded = (tmp / "modules.txt").read_text().split()
    assert loaded == [], f"the torch-free path loaded {loaded}"
    return p


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_exported_run_scores_like_the_run_without_torch(trained_run, exported_run, synth_root, tmp_path, cli):
    exported, out = exported_run  # `kano export --run trained_run --classes disc,weave`, and what it printed
    assert "kanoclip on tiny, 96 px, classes disc, weave; thresholds disc 0." in " ".join(out.split())  # as wrapped at 160
    side = json.loads(exported.with_suffix(".json").read_text())
    config = json.loads((trained_run / "config.json").read_text())
    assert side["thresholds"] == {"disc": config["threshold"], "weave": config["threshold"]}  # the run's: no calibration.json
    assert side["threshold_sources"] == {"disc": "run", "weave": "run"}
    assert side["method"] == "kanoclip" and side["classes"] == ["disc", "weave"]
    images = [synth_root / "disc" / "test" / "hole", synth_root / "disc" / "test" / "good"]
    p = run_without_torch(["predict", *images, "--class", "disc", "--model", exported, "--out", tmp_path / "onnx",
                           "--batch-size", "3"], tmp_path)
    assert p.returncode == 0, p.stderr
    code, _, err = cli("predict", *images, "--class", "disc", "--run", trained_run, "--out", tmp_path / "torch")
    assert code == 0, err
    got, ref = records(tmp_path / "onnx"), records(tmp_path / "torch")
    assert [r["name"] for r in got] == [r["name"] for r in ref] and len(got) == 5
    for g, r in zip(got, ref):
        assert abs(g["score"] - r["score"]) <= 1e-4 and g["anomalous"] == r["anomalous"] and g["threshold"] == r["threshold"]
        assert g["class_word"] == r["class_word"] and g["threshold_source"] == "run, exported" and r["threshold_source"] == "run"
        assert g["image_size"] == r["image_size"] and g["map_size"] == r["map_size"]
        assert np.abs(np.load(g["map_npy"]) - np.load(r["map_npy"])).max() <= 1e-4
        assert Path(g["panel_png"]).is_file() and Path(g["map_png"]).is_file()
    assert (tmp_path / "onnx" / "index.html").is_file()
    assert "exported" in (tmp_path / "onnx" / "index.html").read_text()


@pytest.mark.slow
def test_runtime_errors_are_clear_without_torch(exported, synth_root, tmp_path):
    good = synth_root / "disc" / "test" / "good"
    p = run_without_torch(["predict", good, "--class", "bottle", "--model", exported, "--out", tmp_path / "a"], tmp_path)
    assert p.returncode == 2 and "class must be one of the exported classes disc, weave, got 'bottle'" in p.stderr
    assert "Traceback" not in p.stderr
    broken = tmp_path / "in"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (broken / "y.png").write_bytes((next(good.iterdir())).read_bytes())
    p = run_without_torch(["predict", broken, "--class", "weave", "--model", exported, "--out", tmp_path / "b"], tmp_path)
    assert p.returncode == 1 and "not scored" in p.stderr
    got = records(tmp_path / "b")
    assert got[0]["error"] and got[0]["score"] is None and got[1]["error"] is None and 0 <= got[1]["score"] <= 1
    p = run_without_torch(["predict", good, "--class", "disc", "--model", tmp_path / "none.onnx", "--out", tmp_path / "c"], tmp_path)
    assert p.returncode == 2 and "must exist" in p.stderr
    p = run_without_torch(["predict", good, "--class", "disc", "--model", exported, "--run", "x", "--out", tmp_path / "d"], tmp_path)
    assert p.returncode == 2 and "got --run beside it" in p.stderr


def test_model_file_checks(tmp_path, cli):
    weights = tmp_path / "m.pt"
    weights.write_bytes(b"")
    code, _, err = cli("predict", str(tmp_path), "--class", "a", "--model", weights)
    assert code == 2 and "--model must be an exported graph, .onnx or .xml" in err
    graph = tmp_path / "m.onnx"
    graph.write_bytes(b"")
    code, _, err = cli("predict", str(tmp_path), "--class", "a", "--model", graph)
    assert code == 2 and "needs its sidecar" in err and str(tmp_path / "m.json") in err
    (tmp_path / "m.json").write_text('{"format": "something else"}')
    code, _, err = cli("predict", str(tmp_path), "--class", "a", "--model", graph)
    assert code == 2 and "must be a kano export sidecar of version 1" in err


@pytest.mark.slow
def test_eval_model_gives_the_metrics_of_its_run(exported_run, trained_run, cli, synth_root, tmp_path):
    """`kano eval --model` on the run's export gives the run's metrics, thresholds and words (scores within 1e-4)."""
    import csv

    from kano.evaluator import METRIC_KEYS

    def _metrics(out):
        return json.loads((out / "metrics.json").read_text())

    def _scores(out):
        with open(out / "scores.csv", newline="") as f:
            return {r["image"]: (r["class"], float(r["score"])) for r in csv.DictReader(f)}

    exported, _ = exported_run
    data = f"mvtec:{synth_root}"
    code, _, err = cli("eval", "--model", exported, "--data", data, "--out", tmp_path / "graph", "--n-overlays", "0")
    assert code == 0, err
    code, _, err = cli("eval", "--run", trained_run, "--data", data, "--out", tmp_path / "torch", "--n-overlays", "0")
    assert code == 0, err
    got, ref = _metrics(tmp_path / "graph"), _metrics(tmp_path / "torch")
    for cls in ("disc", "weave"):
        for k in METRIC_KEYS:
            assert abs(got["classes"][cls][k] - ref["classes"][cls][k]) <= 1e-4, (cls, k)
        assert got["classes"][cls]["threshold"] == ref["classes"][cls]["threshold"]
        assert got["classes"][cls]["class_word"] == ref["classes"][cls]["class_word"]
    gs, rs = _scores(tmp_path / "graph"), _scores(tmp_path / "torch")
    assert gs.keys() == rs.keys() and all(abs(gs[i][1] - rs[i][1]) <= 1e-4 for i in gs)
