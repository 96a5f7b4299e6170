"""A method is its module plus one registry entry: a toy method defined here and put into the table (and nowhere
else) runs through `kano eval --method`, `kano predict --method`, the commands' help, the Python API and
`kano export` + `kano predict --model`.

The toy scores each pixel by |R - B| of the raw image (RGB in [0, 1]) and an image by its maximum; on a one-colour
image (200, 50, 100) every pixel, and the image, scores (200 - 100) / 255 whatever the resize, worked out by hand."""

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from kano.kanoclip.model import InferenceBatch
from kano.kanoclip.protocol import MethodDefaults, PixelPreprocessing

COLOUR = (200, 50, 100)
EXPECTED = (200 - 100) / 255


class ToyDetector(nn.Module, MethodDefaults):
    """images (N, 3, S, S) RGB in [0, 1] -> InferenceBatch: map |R - B| (N, S, S), score its max (N,)."""

    def __init__(self, image_size: int = 32):
        super().__init__()
        self.backbone = PixelPreprocessing(image_size)

    def forward(self, images: torch.Tensor, class_names: list[str]) -> InferenceBatch:
        amap = (images[:, 0] - images[:, 2]).abs()
        return InferenceBatch(amap.flatten(1).amax(1), amap, amap[:, None])

    def text_bank(self, words: list[str]) -> torch.Tensor:
        """(C, 2, 1): class c's weight c + 1 (the graph's constant), so that the class input matters."""
        return torch.stack([torch.tensor([[0.0], [c + 1.0]]) for c in range(len(words))])

    def score_bank(self, images: torch.Tensor, text: torch.Tensor) -> InferenceBatch:
        res = self(images, [])
        w = text[:, 1, 0] - text[:, 0, 0]                                               # (N,) each class's weight
        return InferenceBatch(res.image_score * w, res.anomaly_map * w[:, None, None], res.stage_maps)


def load_toy(method, run, backbone, image_size, device, **_):
    model = ToyDetector(image_size or 32).eval()
    return model, {"run": None, "backbone": None, "threshold": None, "prompt_names": {},
                   "method": {"kind": "zero-parameter", "name": method, "method": method, "setting": "per-image",
                              "image_size": model.backbone.image_size}}


@pytest.fixture
def toy(monkeypatch):
    """The toy's entry in the method table for one test; the CLI is re-read so that its help is built from it."""
    import kano.cli
    from kano.core import registry

    spec = registry.MethodSpec("toy", "zero-parameter", "Toy", "this test's own method (|R - B|)", f"{__name__}:load_toy",
                               exportable=True, model=f"{__name__}:ToyDetector")
    with monkeypatch.context() as m:
        m.setitem(registry.METHODS, "toy", spec)
        importlib.reload(kano.cli)
        yield spec
    importlib.reload(kano.cli)


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "one_colour.png"
    Image.new("RGB", (40, 30), COLOUR).save(path)
    return path


def test_the_toy_is_in_the_help(toy, cli):
    for command in ("eval", "predict", "export"):
        code, out, _ = cli(command, "--help")
        method_help = " ".join(out.split("\n  --method ")[1].split("\n  --")[0].split())
        assert code == 0 and re.search(r"(?<![\w-])toy(?![\w-])", method_help), (command, method_help)


def test_the_toy_runs_through_eval_predict_and_the_api(toy, cli, synth_root, picture, tmp_path):
    import kano

    code, _, err = cli("eval", "--method", "toy", "--data", f"mvtec:{synth_root}", "--classes", "disc", "--out",
                       tmp_path / "e", "--n-overlays", "0", "--workers", "0")
    assert code == 0, err
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["provenance"]["method"]["name"] == "toy" and m["classes"]["disc"]["image_auroc"] is not None

    code, _, err = cli("predict", picture, "--class", "disc", "--method", "toy", "--out", tmp_path / "p", "--no-panels",
                       "--no-maps")
    assert code == 0, err
    row = json.loads((tmp_path / "p" / "predictions.jsonl").read_text().splitlines()[0])
    assert row["score"] == pytest.approx(EXPECTED, abs=1e-6)

    res = kano.Detector.zero_shot(method="toy")(np.full((30, 40, 3), COLOUR, np.uint8), class_name="disc")
    assert res.score == pytest.approx(EXPECTED, abs=1e-6) and np.allclose(res.map, EXPECTED, atol=1e-6)

    code, _, err = cli("eval", "--method", "toy", "--backbone", "tiny", "--data", f"mvtec:{synth_root}", "--out", tmp_path / "x")
    assert code == 2 and "--backbone is used by --method" in err and "got --method toy with --backbone tiny" in err


def test_the_toy_exports_and_the_graph_scores_alike(toy, cli, picture, tmp_path):
    pytest.importorskip("onnxruntime", reason="pip install 'kano[export,runtime]'")
    graph = tmp_path / "toy.onnx"
    code, _, err = cli("export", "--method", "toy", "--classes", "disc,weave", "--out", graph)
    assert code == 0, err
    assert json.loads(graph.with_suffix(".json").read_text())["method"] == "toy"
    code, _, err = cli("predict", picture, "--class", "disc", "--model", graph, "--out", tmp_path / "m")
    assert code == 0, err
    row = json.loads((tmp_path / "m" / "predictions.jsonl").read_text().splitlines()[0])
    assert row["score"] == pytest.approx(EXPECTED, abs=1e-5)

    # the graph equals the torch model on real photos (scores and maps within 1e-5), one batch of three
    from kano.anomaly_data.io import image_to_array, list_images, load_image
    from kano.deploy.runtime import ExportedModel

    photos = sorted(list_images(Path(__file__).parent / "data" / "hazelnut_toy" / "test" / "colour"))[:3]
    x = np.stack([image_to_array(load_image(f), 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)) for f in photos])
    s, m = ExportedModel(graph, threads=1).score(x, np.zeros(3, dtype=np.int64))
    ref = ToyDetector()(torch.from_numpy(x), ["disc"] * 3)
    assert np.abs(s - ref.image_score.numpy()).max() <= 1e-5 and np.abs(m - ref.anomaly_map.numpy()).max() <= 1e-5
    assert float(m.std()) > 0.01  # real photos: the maps are not constant

    # kano serve --model --classes weave: the service's class 0 is the graph's class 1 (weight 2)
    from kano.deploy.serve import Scorer

    scorer = Scorer.exported(graph, 1, ["weave"])
    s, _ = scorer.score(x, np.zeros(3, dtype=np.int64))
    assert scorer.classes == ["weave"] and np.allclose(s, 2 * ref.image_score.numpy(), atol=1e-5)
    with pytest.raises(Exception, match="--classes must be among the exported classes disc, weave, got bolt"):
        Scorer.exported(graph, 1, ["bolt"])
