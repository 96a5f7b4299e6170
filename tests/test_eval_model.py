"""`kano eval --model FILE`: an exported graph's metrics on a labelled dataset, through the same scoring step as the
torch model (the one inference interface): the graph gives the metrics its torch model gives, within the export's
tolerance; a class of the data the graph lacks is refused before anything is written; the options a graph cannot
use are refused by name. A real exported graph (test_toy_method's toy, exported by test_predict_model's fixture),
the real synthetic data with masks, the real entry point. A trained run and its export: test_runtime.py (slow tier,
beside the other tests of that export)."""

import csv
import json

import pytest

from test_predict_model import graph  # noqa: F401  (the toy exported for disc and weave: a fixture)
from test_toy_method import toy  # noqa: F401  (the toy in the method table: a fixture)

from kano.evaluator import METRIC_KEYS
from kano.evaluator.options import EvalOptions

pytest.importorskip("onnxruntime", reason="pip install 'kano[export,runtime]'")


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def _scores(out) -> dict[str, tuple[str, float]]:
    with open(out / "scores.csv", newline="") as f:
        return {r["image"]: (r["class"], float(r["score"])) for r in csv.DictReader(f)}


def test_eval_model_gives_the_metrics_of_the_torch_model_it_was_exported_from(graph, toy, cli, synth_root, tmp_path):  # noqa: F811
    data = f"mvtec:{synth_root}"
    code, out, err = cli("eval", "--model", graph, "--data", data, "--out", tmp_path / "graph", "--batch-size", "3",
                         "--n-overlays", "1")
    assert code == 0, err
    assert "toy exported, toy.onnx" in " ".join(out.split())
    code, _, err = cli("eval", "--method", "toy", "--data", data, "--out", tmp_path / "torch", "--batch-size", "3",
                       "--n-overlays", "1", "--workers", "0")
    assert code == 0, err
    got, ref = _metrics(tmp_path / "graph"), _metrics(tmp_path / "torch")
    assert sorted(got["classes"]) == sorted(ref["classes"]) == ["disc", "weave"]
    for cls in ("disc", "weave"):
        for k in METRIC_KEYS:
            assert ref["classes"][cls][k] is not None, (cls, k)  # image and pixel metrics alike: the masks were read
            assert abs(got["classes"][cls][k] - ref["classes"][cls][k]) <= 1e-4, (cls, k)
        assert got["classes"][cls]["n_images"] == ref["classes"][cls]["n_images"] == 7
    # the graph's own thresholds and words, its provenance; the torch method has no threshold
    assert got["classes"]["disc"]["threshold"] == 0.5 and got["classes"]["disc"]["threshold_source"] == "given, exported"
    method = got["provenance"]["method"]
    assert method["engine"] == "onnxruntime" and method["method"] == "toy" and method["model"] == str(graph.resolve())
    # per image: disc's scores are the torch model's; weave's twice them (the graph's class weight 2: test_toy_method),
    # which the rank metrics above do not see
    gs, rs = _scores(tmp_path / "graph"), _scores(tmp_path / "torch")
    assert gs.keys() == rs.keys() and len(gs) == 14
    for image, (cls, s) in gs.items():
        assert abs(s - {"disc": 1, "weave": 2}[cls] * rs[image][1]) <= 1e-4, image


def test_eval_model_refuses_a_class_the_graph_lacks_before_writing(graph, cli, hazelnut_root, tmp_path):  # noqa: F811
    code, _, err = cli("eval", "--model", graph, "--data", f"mvtec:{hazelnut_root}", "--out", tmp_path / "e")
    err = " ".join(err.split())
    assert code == 2 and "Traceback" not in err, err
    assert "holds class 'hazelnut', which this model cannot score" in err and "exported classes disc, weave" in err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("option", sorted(EvalOptions.NOT_WITH_MODEL))
def test_eval_model_refuses_each_option_a_graph_cannot_use(option, graph, cli, synth_root, tmp_path):  # noqa: F811
    flag, value = {"class_words": ("--class-word", "disc=disc"), "mutual": ("--mutual", None), "run": ("--run", synth_root),
                   "k_shot": ("--k-shot", "1"), "image_size": ("--image-size", "32"), "workers": ("--workers", "1"),
                   "rscin_windows": ("--rscin-windows", "1,2"), "reference_sampling": ("--reference-sampling", "seeded"),
                   "device": ("--device", "cpu"), "aux": ("--aux", f"mvtec:{synth_root}"), "backbone": ("--backbone", "tiny"),
                   "method": ("--method", "darkness"), "reference": ("--reference", synth_root),
                   "calibration": ("--calibration", synth_root / "cal.json")}[option]
    code, _, err = cli("eval", "--model", graph, flag, *([] if value is None else [value]), "--data", f"mvtec:{synth_root}",
                       "--out", tmp_path / "e")
    assert code == 2 and f"--model scores with the exported graph alone, got {flag} beside it" in " ".join(err.split()), err
    assert not (tmp_path / "e").exists()
