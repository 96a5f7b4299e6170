"""The Python API (kano.Detector) as docs/api.md shows it, and what the CLI records beside it: the threshold
used and its source, the class word, few-shot references in predict, unreadable files in eval."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kano.core.errors import KanoError
from conftest import DATA, ROOT

HAZEL = DATA / "hazelnut_toy"


def _doc_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), re.S)


@pytest.fixture
def user_folder(tmp_path, trained_run, monkeypatch):
    """A user's folder as docs/api.md assumes it: runs/x, photo.png, photos/good, a.png, b.png."""
    shutil.copytree(trained_run, tmp_path / "runs" / "x")
    shutil.copytree(HAZEL / "train" / "good", tmp_path / "photos" / "good")
    shutil.copy(HAZEL / "test" / "colour" / "00.jpg", tmp_path / "photo.png")  # PIL reads by content, not suffix
    shutil.copy(HAZEL / "test" / "colour" / "01.jpg", tmp_path / "a.png")
    shutil.copy(HAZEL / "test" / "good" / "04.jpg", tmp_path / "b.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_import_kano_does_not_import_torch():
    code = "import sys, kano; print(kano.__version__, 'torch' in sys.modules, 'open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[1:] == ["False", "False"]
    out = subprocess.run([sys.executable, "-c", "import kano, kano.api; print(kano.Detector is kano.api.Detector)"],
                         capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert out.stdout.strip() == "True", out.stderr


def test_readme_python_api_example(user_folder):
    """The README's Python API block, run as written in a user's folder (runs/x, photo.png)."""
    import kano

    block = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[0]
    ns: dict = {}
    exec(block, ns)
    res = ns["result"]
    assert isinstance(res, kano.Result) and 0.0 <= res.score <= 1.0 and res.class_word == "hazelnut"
    assert res.threshold_source == "run" and res.anomalous == (res.score >= res.threshold)


def test_docs_trained_run_example(user_folder):
    import kano

    ns: dict = {}
    exec(_doc_blocks()[0], ns)  # "hazelnut" is in the built-in pack: no warning, though the run knows disc and weave only
    res, cfg = ns["res"], json.loads((user_folder / "runs/x/config.json").read_text())
    assert isinstance(res, kano.Result)
    with Image.open(user_folder / "photo.png") as im:
        assert res.map.shape == (im.height, im.width) and res.map.dtype == np.float32
    assert 0.0 <= res.score <= 1.0 and res.class_word == "hazelnut" and res.image == "photo.png"
    assert res.threshold == cfg["threshold"] and res.threshold_source == "run"
    assert res.anomalous == (res.score >= cfg["threshold"])


def test_docs_zero_shot_example_and_the_same_scores_for_every_input_form(user_folder):
    ns: dict = {}
    exec(_doc_blocks()[1], ns)
    results, det = ns["results"], ns["det"]
    assert [r.image for r in results] == ["a.png", "b.png"]
    assert det.method["name"] == "winclip+" and det.method["k_shot"] == 4
    assert [Path(p).name for p in det.method["references"]] == sorted(p.name for p in (user_folder / "photos/good").iterdir())[:4]
    assert all(r.threshold is None and r.threshold_source is None and r.anomalous is None for r in results)
    # a PIL image, an H x W x 3 array and an N x H x W x 3 batch give what the path gave
    pil = Image.open(user_folder / "a.png").convert("RGB")
    one = det(pil, class_name="hazelnut")
    arr = det(np.asarray(pil), class_name="hazelnut")
    batch = det(np.stack([np.asarray(pil)] * 2), class_name="hazelnut")
    for r in (one, arr, *batch):
        assert r.score == pytest.approx(results[0].score, abs=1e-6) and r.image is None
        assert np.abs(r.map - results[0].map).max() < 1e-5


def _calibrate(run: Path, classes: dict, sha: str | None = None) -> None:
    cfg = json.loads((run / "config.json").read_text())
    digest = sha or cfg["ranks"][0]["weights_sha256"]
    (run / "calibration.json").write_text(json.dumps({"format": 1, "run_weights_sha256": digest, "alarm_rate": 0.1,
                                                      "classes": {c: {"image_threshold": t, "pixel_threshold": 0.5, "n": 9}
                                                                  for c, t in classes.items()}}))


def test_threshold_order_command_line_then_calibration_then_run(tmp_path, trained_run):
    import kano

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    run_thr = json.loads((run / "config.json").read_text())["threshold"]
    img = HAZEL / "test" / "good" / "04.jpg"
    assert (kano.Detector.load(run)(img, class_name="disc").threshold_source, ) == ("run",)
    _calibrate(run, {"disc": 0.37})
    det = kano.Detector.load(run)
    r_disc = det(img, class_name="disc")
    assert (r_disc.threshold, r_disc.threshold_source) == (0.37, "calibration")
    assert r_disc.anomalous == (r_disc.score >= 0.37)
    with pytest.raises(KanoError, match="class must be one of the classes calibrated"):  # weave is not calibrated
        det(img, class_name="weave")
    assert kano.Detector.load(run, threshold=0.4)(img, class_name="weave").threshold == 0.4
    r = kano.Detector.load(run, threshold=0.52)(img, class_name="disc")
    assert (r.threshold, r.threshold_source, r.anomalous) == (0.52, "command line", r.score >= 0.52)
    _calibrate(run, {"disc": 0.37}, sha="0" * 64)
    with pytest.raises(KanoError, match="must be made for this run's weights"):  # a calibration of other weights
        kano.Detector.load(run)(img, class_name="disc")


def test_zero_shot_refuses_transductive_methods_and_references_without_k(tmp_path):
    import kano

    with pytest.raises(KanoError, match="transductive"):
        kano.Detector.zero_shot(method="musc_randconv")
    with pytest.raises(KanoError, match="needs k_shot K >= 1"):  # the API's own argument names
        kano.Detector.zero_shot(method="winclip", backbone="tiny", references=HAZEL / "train" / "good", k_shot=0)
    with pytest.raises(KanoError, match=r"references is used by method winclip only \(few-shot\), got method .clip."):  # API words
        kano.Detector.zero_shot(method="clip", backbone="tiny", references=HAZEL / "train" / "good", k_shot=2)
    with pytest.raises(KanoError, match="k_shot 99 needs 99 reference images"):
        kano.Detector.zero_shot(method="winclip", backbone="micro", references=HAZEL / "train" / "good", k_shot=99)


@pytest.mark.slow
def test_predict_winclip_with_references_gives_evals_scores(tmp_path, hazelnut_root, cli):
    """The same 4 references (hazelnut's first 4 train images) in eval and in predict: the same scores."""
    ev, pr = tmp_path / "ev", tmp_path / "pr"
    code, out, err = cli("eval", "--method", "winclip", "--k-shot", "4", "--backbone", "micro", "--data", f"mvtec:{hazelnut_root}",
                         "--out", ev, "--n-overlays", "0")
    assert code == 0, err
    assert "few-shot winclip+" in out and "few-shot few-shot" not in out
    test = hazelnut_root / "hazelnut" / "test"
    code, out, err = cli("predict", test / "good", test / "colour", "--class", "hazelnut", "--method", "winclip", "--reference",
                         hazelnut_root / "hazelnut" / "train" / "good", "--k-shot", "4", "--backbone", "micro", "--out", pr)
    assert code == 0, err
    evs = {Path(r["image"]).resolve(): float(r["score"])
           for r in map(lambda line: dict(zip(["class", "defect", "image", "label", "score"], line.split(","))),
                        (ev / "scores.csv").read_text().splitlines()[1:])}
    prs = {Path(json.loads(line)["image"]).resolve(): json.loads(line)["score"] for line in (pr / "predictions.jsonl").read_text().splitlines()}
    assert len(prs) == len(evs) == 23 and prs.keys() == evs.keys()
    assert max(abs(prs[k] - evs[k]) for k in evs) <= 1e-6  # predictions.jsonl rounds to 6 decimals
    refs = json.loads((ev / "metrics.json").read_text())["provenance"]["method"]["references"]["hazelnut"]
    header = json.loads((pr / "kano_outputs.json").read_text())["identity"]["method"]
    first4 = sorted((hazelnut_root / "hazelnut" / "train" / "good").iterdir())[:4]
    assert [Path(p).resolve() for p in header["references"]] == [Path(p).resolve() for p in refs] == first4


def test_eval_records_the_threshold_given_everywhere(tmp_path, trained_run, synth_root, cli):
    out = tmp_path / "ev"
    code, _, err = cli("eval", "--run", trained_run, "--data", f"mvtec:{synth_root}", "--out", out, "--threshold", "0.52",
                       "--n-overlays", "1", "--class-word", "disc=round disc")
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    for cls in ("disc", "weave"):
        assert (m["classes"][cls]["threshold"], m["classes"][cls]["threshold_source"]) == (0.52, "command line")
    assert m["classes"]["disc"]["class_word"] == "round disc" and m["classes"]["weave"]["class_word"] == "weave"
    assert m["provenance"]["class_words"] == {"disc": "round disc", "weave": "weave"}
    assert "class words: disc -> 'round disc', weave -> 'weave'" in (out / "metrics.md").read_text()
    assert "threshold" not in m["provenance"]["method"]  # the run's own lives under run_threshold
    ident = json.loads((out / "kano_outputs.json").read_text())["identity"]
    assert ident["thresholds"]["disc"] == {"threshold": 0.52, "source": "command line"}
    assert ident["class_words"] == {"disc": "round disc", "weave": "weave"}
    html = (out / "report.html").read_text()
    assert "0.520 (given on the command line (--threshold))" in html and "from the run" not in html
    assert "&#x27;round disc&#x27;" in html or "'round disc'" in html


def test_eval_uses_each_class_calibrated_threshold(tmp_path, trained_run, synth_root, cli):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _calibrate(run, {"disc": 0.11, "weave": 0.23})
    out = tmp_path / "ev"
    code, stdout, err = cli("eval", "--run", run, "--data", f"mvtec:{synth_root}", "--out", out, "--n-overlays", "0")
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert (m["classes"]["disc"]["threshold"], m["classes"]["disc"]["threshold_source"]) == (0.11, "calibration")
    assert (m["classes"]["weave"]["threshold"], m["classes"]["weave"]["threshold_source"]) == (0.23, "calibration")
    assert "decision threshold: 0.230000 from the calibration (class weave)" in stdout


def test_predict_records_threshold_source_and_class_word(tmp_path, trained_run, cli):
    out = tmp_path / "pr"
    img = HAZEL / "test" / "good" / "04.jpg"
    code, _, err = cli("predict", img, "--run", trained_run, "--class", "disc", "--class-word", "flat disc", "--threshold", "0.3",
                       "--out", out)
    assert code == 0, err
    rec = json.loads((out / "predictions.jsonl").read_text())
    assert (rec["threshold"], rec["threshold_source"], rec["class_word"]) == (0.3, "command line", "flat disc")
    assert rec["anomalous"] == (rec["score"] >= 0.3)
    ident = json.loads((out / "kano_outputs.json").read_text())["identity"]
    assert (ident["threshold"], ident["threshold_source"], ident["class_word"]) == (0.3, "command line", "flat disc")
    html = (out / "index.html").read_text()
    assert "0.300 (given on the command line (--threshold))" in html and "flat disc" in html


def test_a_misspelt_class_word_warns_with_the_closest_names(tmp_path, cli):
    code, _, err = cli("predict", HAZEL / "test" / "good" / "04.jpg", "--method", "clip", "--backbone", "tiny", "--class", "hazlenut",
                       "--out", tmp_path / "p")
    assert code == 0, err
    assert "warning: class word 'hazlenut'" in " ".join(err.split()) and "did you mean 'hazelnut'" in " ".join(err.split())
    code, _, err = cli("predict", HAZEL / "test" / "good" / "04.jpg", "--method", "clip", "--backbone", "tiny", "--class", "hazelnut",
                       "--out", tmp_path / "q")
    assert code == 0 and "warning" not in err


def test_predict_refuses_transductive_methods_and_references_without_k(tmp_path, cli):
    img = HAZEL / "test" / "good" / "04.jpg"
    code, _, err = cli("predict", img, "--method", "mutual", "--backbone", "tiny", "--class", "hazelnut", "--out", tmp_path / "p")
    assert code == 2 and "transductive" in err and "Traceback" not in err
    code, _, err = cli("predict", img, "--backbone", "tiny", "--reference", HAZEL / "train" / "good", "--class", "hazelnut",
                       "--out", tmp_path / "q")
    assert code == 2 and "--reference DIR and --k-shot K >= 1 go together" in " ".join(err.split())


def _corrupt_copy(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(HAZEL, root / "hazelnut")
    bad = root / "hazelnut" / "test" / "good" / "04.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    return root


def test_eval_goes_on_past_an_unreadable_image_and_strict_stops(tmp_path, cli):
    root = _corrupt_copy(tmp_path)
    out = tmp_path / "ev"
    code, _, err = cli("eval", "--method", "median_colour", "--data", f"mvtec:{root}", "--out", out, "--n-overlays", "0")
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["unreadable"]) == 1 and m["unreadable"][0]["image"].endswith("test/good/04.jpg")
    assert m["classes"]["hazelnut"]["n_images"] == 22 and m["classes"]["hazelnut"]["n_anomalous"] == 17
    assert "1 unreadable image(s) skipped" in " ".join(err.split())
    assert "unreadable image(s), left out of the metrics" in (out / "report.html").read_text()
    code, _, err = cli("eval", "--method", "median_colour", "--data", f"mvtec:{root}", "--out", tmp_path / "strict",
                       "--n-overlays", "0", "--strict")
    assert code == 2 and "04.jpg" in err and "Traceback" not in err
