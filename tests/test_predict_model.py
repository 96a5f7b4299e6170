"""`kano predict --model` on the one streaming loop of `--run`: rows appended as they are scored, a torn result file
cut back to whole batches and continued, `--resume`, Parquet, a SIGKILL partway and the same command again, two
processes writing the rows of one. A real exported graph (test_toy_method's toy, whose scores are worked out by
hand), real images, the real entry point."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import KANO, sigkill_partway_then_rerun
from conftest import predictions as _rows
from test_runtime import run_without_torch

pytest.importorskip("onnxruntime", reason="pip install 'kano[export,runtime]'")

ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
ENV.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
FAST = ("--no-maps", "--no-panels")


@pytest.fixture(scope="module")
def graph(tmp_path_factory) -> Path:
    """test_toy_method's toy (pixel |R - B| of the raw image times the class's weight: disc 1, weave 2; the image's
    score the map's maximum) exported for disc and weave with threshold 0.5: a real graph in seconds."""
    from test_toy_method import ToyDetector

    from kano.core import registry
    from kano.deploy.export import export_model

    out = tmp_path_factory.mktemp("graph") / "toy.onnx"
    spec = registry.MethodSpec("toy", "zero-parameter", "Toy", "test_toy_method's method (|R - B|)", "test_toy_method:load_toy",
                               exportable=True, model="test_toy_method:ToyDetector")
    with pytest.MonkeyPatch.context() as m:
        m.setitem(registry.METHODS, "toy", spec)
        export_model(ToyDetector(32).eval(), "toy", {"disc": "disc", "weave": "weave"}, 0.5, out)
    return out


def _images(folder, n, size=24):
    """n one-colour images; image i is (10 + 25 (i mod 10), 50, 5), so its toy score for disc is (5 + 25 (i mod 10)) / 255."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:04d}.png"
        Image.new("RGB", (size, size), (10 + 25 * (i % 10), 50, 5)).save(p)
        paths.append(p)
    return paths


def _kano(*args, timeout=300):
    return subprocess.run([KANO, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=timeout)


def test_a_torn_result_file_is_cut_to_whole_batches_and_resumed_to_the_same_bytes(graph, tmp_path, cli):
    import pyarrow.parquet as pq

    paths = _images(tmp_path / "img", 7)
    base = ("predict", tmp_path / "img", "--class", "disc", "--model", graph, *FAST, "--batch-size", "2", "--format", "parquet",
            "--out", tmp_path / "o")
    code, _, err = cli(*base)
    assert code == 0, err
    result = tmp_path / "o" / "predictions.jsonl"
    full = result.read_bytes()
    rows = _rows(tmp_path / "o")
    assert [r["image"] for r in rows] == list(map(str, paths))
    assert [r["score"] for r in rows] == pytest.approx([(5 + 25 * i) / 255 for i in range(7)], abs=1e-6)
    assert [r["anomalous"] for r in rows] == [False] * 5 + [True] * 2                # 105/255 < 0.5 (exported) <= 130/255
    table = pq.read_table(tmp_path / "o" / "predictions.parquet").to_pylist()
    assert [(t["image"], t["score"]) for t in table] == [(r["image"], r["score"]) for r in rows]
    # what a kill in the middle of a write leaves: three whole rows, half of the fourth, the manifest unfinished
    lines = full.splitlines(keepends=True)
    result.write_bytes(b"".join(lines[:3]) + lines[3][:20])
    mf = json.loads((tmp_path / "o" / "kano_outputs.json").read_text())
    (tmp_path / "o" / "kano_outputs.json").write_text(json.dumps({**mf, "finished": False}))
    p = run_without_torch(base + ("--resume",), tmp_path)                    # the loop imports no torch
    assert p.returncode == 0, p.stderr[-2000:]
    assert result.read_bytes() == full                                       # the same rows, bit for bit
    code, _, err = cli(*base, "--resume", "--threshold", "0.3")
    assert code == 2 and "--resume must repeat the options" in err and "got different: threshold" in err, err


def test_a_manifest_class_the_graph_lacks_is_refused_before_anything_is_written(graph, tmp_path, cli):
    paths = _images(tmp_path / "img", 2)
    (tmp_path / "m.csv").write_text(f"path,class\n{paths[0]},weave\n{paths[1]},screw\n")
    code, _, err = cli("predict", tmp_path / "m.csv", "--class", "disc", "--model", graph, *FAST, "--out", tmp_path / "o")
    assert code == 2 and "class must be one of the exported classes disc, weave, got 'screw'" in err, err
    assert not (tmp_path / "o").exists()
    code, _, err = cli("predict", tmp_path / "m.csv", "--class", "bolt", "--model", graph, *FAST, "--out", tmp_path / "o")
    assert code == 2 and "class must be one of the exported classes disc, weave, got 'bolt'" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # three runs of the entry point over 300 images (about 15 s on two loaded cores)
def test_sigkill_partway_then_the_same_command_scores_every_image_exactly_once_with_model(graph, tmp_path):
    paths = _images(tmp_path / "img", 300)
    cmd = [KANO, "predict", str(tmp_path / "img"), "--class", "disc", "--model", str(graph), *FAST, "--batch-size", "2"]
    clean = subprocess.run(cmd + ["--out", str(tmp_path / "clean")], env=ENV, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]
    out = tmp_path / "o"
    sigkill_partway_then_rerun(cmd, out, ENV, 300, timeout=300, poll=0.002)
    rows = _rows(out)
    assert [r["image"] for r in rows] == list(map(str, paths))                            # every image once, in order
    assert [r["score"] for r in rows] == [r["score"] for r in _rows(tmp_path / "clean")]  # and as if never killed


@pytest.mark.slow  # torchrun starts two processes that import torch for their process group (about 15 s)
def test_two_processes_write_the_rows_of_one_with_model(graph, tmp_path):
    _images(tmp_path / "img", 7)
    args = ["predict", tmp_path / "img", "--class", "disc", "--model", graph, *FAST, "--batch-size", "2"]
    one = _kano(*args, "--out", tmp_path / "one")
    torchrun = str(Path(sys.executable).parent / "torchrun")
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "--no-python", KANO, *map(str, args), "--out",
                          str(tmp_path / "two")], env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    assert _rows(tmp_path / "one") == _rows(tmp_path / "two") and not (tmp_path / "two" / "parts").exists()


def test_both_scorers_meet_the_one_interface_and_every_front_end_gets_the_same_score(graph, tmp_path, cli):
    """The exported graph and the torch Detector are both evaluator.inference.Inferencer; a one-colour image scores
    (200 - 100) / 255 times the class's weight (disc 1, weave 2) through the graph alone, serve's Scorer and predict."""
    from kano.deploy.runtime import ExportedModel
    from kano.deploy.serve import Scorer
    from kano.evaluator.detector import Detector
    from kano.evaluator.inference import Inferencer

    graph_scorer = ExportedModel(graph, threads=1)
    assert isinstance(graph_scorer, Inferencer) and isinstance(Detector.zero_shot("median_colour"), Inferencer)
    picture = tmp_path / "one.png"
    Image.new("RGB", (40, 30), (200, 50, 100)).save(picture)
    x = graph_scorer.preprocess(Image.open(picture).convert("RGB"))[None]
    assert graph_scorer.score(x, ["weave"])[0][0] == pytest.approx(2 * 100 / 255, abs=1e-6)
    assert Scorer(graph_scorer, ["weave"]).score(x, [0])[0][0] == pytest.approx(2 * 100 / 255, abs=1e-6)
    code, _, err = cli("predict", picture, "--class", "weave", "--model", graph, *FAST, "--out", tmp_path / "p")
    assert code == 0, err
    assert _rows(tmp_path / "p")[0]["score"] == pytest.approx(2 * 100 / 255, abs=1e-6)


def test_the_threshold_order_is_one_rule():
    from kano.core.errors import KanoError
    from kano.core.thresholds import pick

    assert pick(0.3, 0.4, 0.5) == (0.3, "command line")
    assert pick(None, 0.4, 0.5) == (0.4, "calibration")
    assert pick(None, None, 0.5) == (0.5, "run") and pick(None, None, 0.5, "run, exported") == (0.5, "run, exported")
    assert pick(None) == (None, None)
    with pytest.raises(KanoError, match=r"threshold must be a number in \[0, 1\] \(scores are in \[0, 1\]\), got 1.5"):
        pick(1.5)
