"""`kano eval` and `kano predict` on real photos (hazelnut toy), and bad inputs."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from kano.evaluator.metrics import METRIC_KEYS


def test_eval_untrained_backbone_on_real_photos(hazelnut_root, tmp_path, cli):
    out = tmp_path / "eval"
    code, stdout, err = cli("eval", "--backbone", "tiny", "--data", f"mvtec:{hazelnut_root}", "--out", out)
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == f"mvtec:{hazelnut_root}"
    assert set(m["classes"]) == {"hazelnut"} and set(METRIC_KEYS) <= set(m["classes"]["hazelnut"]) and set(m["mean"]) == set(METRIC_KEYS)
    assert all(0.0 <= m["classes"]["hazelnut"][k] <= 1.0 for k in METRIC_KEYS)
    assert m["classes"]["hazelnut"]["n_images"] == 23
    assert (out / "metrics.csv").read_text().splitlines()[0] == "class,unit," + ",".join(METRIC_KEYS) + ",n_images,n_anomalous"
    assert "| hazelnut |" in (out / "metrics.md").read_text()
    overlays = sorted((out / "overlays").glob("*.png"))
    # 6 by default (--n-overlays); image | ground truth | map | overlay at 224 px with 8 px gaps, plus the colour bar
    assert len(overlays) == 6 and Image.open(overlays[0]).size == (4 * (224 + 8) + 68 + 8, 62 + 18 + 224 + 16)
    assert "img AUROC" in stdout and "hazelnut" in stdout


def test_predict_writes_maps_and_json_lines(hazelnut_root, tmp_path, cli):
    out = tmp_path / "pred"
    folder = hazelnut_root / "hazelnut" / "test" / "colour"
    code, stdout, err = cli("predict", folder, "--class", "hazelnut", "--backbone", "tiny", "--out", out)
    assert code == 0, err
    lines = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 17 and all(r["anomalous"] is None and 0 <= r["score"] <= 1 for r in lines)
    first = lines[0]
    assert Image.open(first["map_png"]).size == (256, 256)
    amap = np.load(first["map_npy"])
    assert amap.shape == (256, 256) and np.isfinite(amap).all()
    code, _, err = cli("predict", folder / "00.jpg", folder / "01.jpg", "--class", "hazelnut", "--backbone", "tiny", "--out", out,
                       "--threshold", "0.0", "--force")
    lines = [json.loads(l) for l in (out / "predictions.jsonl").read_text().splitlines()]
    assert code == 0 and [r["anomalous"] for r in lines] == [True, True]


def test_corrupt_image_in_dataset(hazelnut_root, tmp_path, cli):
    root = tmp_path / "mvtec"
    shutil.copytree(hazelnut_root, root)
    bad = root / "hazelnut" / "test" / "colour" / "03.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    code, out, err = cli("eval", "--backbone", "tiny", "--data", f"mvtec:{root}", "--out", tmp_path / "e", "--strict")
    assert code == 2 and "03.jpg" in err and "corrupt or truncated" in err and "Traceback" not in err


def test_mask_of_the_wrong_size(hazelnut_root, tmp_path, cli):
    root = tmp_path / "mvtec"
    shutil.copytree(hazelnut_root, root)
    m = root / "hazelnut" / "ground_truth" / "colour" / "05.png"
    Image.open(m).resize((100, 80)).save(m)
    code, out, err = cli("eval", "--backbone", "tiny", "--data", f"mvtec:{root}", "--out", tmp_path / "e", "--strict")
    assert code == 2 and "05.png" in err and "must have the size of its image, 256x256, got 100x80" in err


@pytest.mark.parametrize("make,args,message", [
    (lambda p: (p / "empty").mkdir(), ["predict", "{p}/empty", "--class", "x", "--backbone", "tiny"], "must contain images"),
    (lambda p: None, ["predict", "{p}/missing", "--class", "x", "--backbone", "tiny"], "must be an existing image file or folder"),
    (lambda p: (p / "notes.txt").write_text("hi"), ["predict", "{p}/notes.txt", "--class", "x", "--backbone", "tiny"], "must be an image file"),
    (lambda p: None, ["eval", "--backbone", "tiny", "--data", "pascal:{p}"], "KIND one of"),
    (lambda p: None, ["eval", "--backbone", "tiny", "--data", "mvtec:{p}/missing"], "must exist"),
    (lambda p: (p / "e2").mkdir(), ["eval", "--backbone", "tiny", "--data", "mvtec:{p}/e2"], "got none"),
    (lambda p: None, ["eval", "--data", "mvtec:{p}"], "exactly one of --run"),
    (lambda p: None, ["eval", "--run", "{p}/norun", "--data", "mvtec:{p}"], "must contain config.json"),
    (lambda p: None, ["eval", "--backbone", "tiny", "--data", "mvtec:{p}", "--classes", "nosuch"], "class must be one of"),
])
def test_bad_inputs_give_clear_errors(tmp_path, hazelnut_root, cli, make, args, message):
    make(tmp_path)
    args = [a.format(p=tmp_path) for a in args]
    if "--classes" in args:
        args[args.index("--data") + 1] = f"mvtec:{hazelnut_root}"
    code, out, err = cli(*args, "--out", tmp_path / "o")
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err


def test_data_synth_and_meta_commands(tmp_path, cli):
    code, out, err = cli("data", "synth", "--out", tmp_path / "s", "--classes", "disc", "--size", "64", "--n-good", "1",
                         "--n-defect", "1", "--defects", "hole")
    assert code == 0, err
    code, out, err = cli("data", "meta", f"mvtec:{tmp_path / 's'}", "--out", tmp_path / "meta.json")
    assert code == 0 and json.loads((tmp_path / "meta.json").read_text())["test"]["disc"]
    code, out, err = cli("data", "synth", "--out", tmp_path / "t", "--classes", "unicorn")
    assert code == 2 and "synthetic class must be one of" in err


def test_prefetch_keeps_order_raises_where_the_consumer_is_and_stops_when_abandoned():
    import threading
    import time

    from kano.evaluator.evaluate import _prefetch

    assert list(_prefetch(iter(range(7)))) == list(range(7))

    def broken():
        yield 1
        raise ValueError("bad batch")

    it = _prefetch(broken())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad batch"):
        next(it)
    made = []

    def endless():
        for i in range(10**9):
            made.append(i)
            yield i

    before = threading.active_count()
    gen = _prefetch(endless())
    assert next(gen) == 0
    gen.close()  # the consumer stops early (an error, Ctrl-C): the filling thread must stop too
    time.sleep(0.5)
    n = len(made)
    time.sleep(0.3)
    assert len(made) == n and n < 10 and threading.active_count() <= before


def test_cpu_streams_give_the_one_stream_results_in_order_and_give_the_threads_back(hazelnut_root, tmp_path):
    """With --workers 0 on the CPU the batches run in parallel streams (evaluator.evaluate.cpu_streams), each
    decoding its own images: same scores, maps and masks as one stream, in sample order, errors where they
    belong, torch's thread count as it was afterwards, an error included."""
    import dataclasses
    import threading

    import torch

    from kano.anomaly_data import load_dataset
    from kano.evaluator import load_model
    from kano.evaluator.evaluate import cpu_streams, run_inference
    from kano.core.errors import KanoError

    model, _ = load_model(None, "tiny", 64, torch.device("cpu"))
    samples = load_dataset(f"mvtec:{hazelnut_root}").samples("test")
    names = ["hazelnut"] * len(samples)
    cpu = torch.device("cpu")
    callers = set()
    forward = model.forward

    def recording(*a, **k):
        callers.add(threading.get_ident())
        return forward(*a, **k)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu_streams(cpu, 0, 4, model) == 1
        one = run_inference(model, samples, names, 3, cpu, workers=0)
        torch.set_num_threads(2)
        assert cpu_streams(cpu, 0, 4, model) == 2 and cpu_streams(cpu, 1, 4, model) == 1 and cpu_streams(cpu, 0, 1, model) == 1
        assert cpu_streams(torch.device("cuda"), 0, 4, model) == 1
        model.forward = recording
        two = run_inference(model, samples, names, 3, cpu, workers=0)
        assert len(callers) == 2 and threading.get_ident() not in callers      # two streams, neither the caller
        assert torch.get_num_threads() == 2
        assert torch.equal(one[2], two[2]) and one[2].sum() > 0                 # masks: the same pixels, in order
        assert torch.allclose(one[0], two[0], atol=1e-5) and torch.allclose(one[1], two[1], atol=1e-5)
        assert len(set(one[0].tolist())) == len(samples)                        # distinct scores: order is checked
        bad = tmp_path / "broken.png"
        bad.write_bytes(b"not a png")
        broken = list(samples)
        broken[4] = dataclasses.replace(samples[4], image_path=str(bad), mask_path=None)
        with pytest.raises(KanoError, match="broken.png"):
            run_inference(model, broken, names, 3, cpu, workers=0)
        assert torch.get_num_threads() == 2
        errors = {}
        part = run_inference(model, broken, names, 3, cpu, workers=0, errors=errors)
        assert list(errors) == [4] and "broken.png" in errors[4] and torch.isnan(part[0][4])
        keep = [i for i in range(len(samples)) if i != 4]
        assert torch.allclose(part[0][keep], one[0][keep], atol=1e-5) and torch.get_num_threads() == 2
    finally:
        model.forward = forward
        torch.set_num_threads(before)
