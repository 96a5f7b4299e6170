"""report.html and predict's index.html in a real headless browser; provenance in every result.
Screenshots are saved under each test's tmp dir."""

import datetime as dt
import hashlib
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import kano
from kano.evaluator.metrics import METRIC_KEYS
from browser import check_page, no_external_references, screenshot


@pytest.fixture(scope="module")
def eval_out(hazelnut_root, tmp_path_factory):
    """One `kano eval` (its library call) of the untrained tiny baseline on the real hazelnut photos."""
    from kano.evaluator import command

    out = tmp_path_factory.mktemp("report") / "eval"
    command.evaluate(data=f"mvtec:{hazelnut_root}", run=None, backbone="tiny", out=out, classes=None, batch_size=8, workers=0,
                     image_size=None, device=None, n_overlays=5)
    return out


@pytest.mark.slow
def test_report_html_renders_with_every_image_and_no_error(eval_out, tmp_path):
    page = eval_out / "report.html"
    text = page.read_text()
    assert "<script" not in text.lower()                      # no JavaScript at all, so none from a CDN
    assert no_external_references(text) == []               # nothing that needs the network
    seen = check_page(page)
    assert seen["errors"] == [] and seen["broken"] == [], seen
    overlays = sorted(p.name for p in (eval_out / "overlays").glob("*.png"))
    assert seen["images"] == len(overlays) == 5              # the gallery: one <img> per overlay written
    assert seen["svgs"] == 3                                  # ROC, PR and the score histogram of the one class
    shot = screenshot(page, tmp_path / "report.png")
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape == (2400, 1400, 3) and len(np.unique(img.reshape(-1, 3), axis=0)) > 500   # a drawn page, not blank
    m = json.loads((eval_out / "metrics.json").read_text())
    for k in METRIC_KEYS:                                     # the table holds every metric in percent, one decimal
        assert f"<td>{100 * m['classes']['hazelnut'][k]:.1f}</td>" in text
    for name in overlays:
        assert f'src="overlays/{name}"' in text
    for words in ("image AUROC (%)", "most confident anomaly", "ROC, image AUROC", "precision-recall, image AP",
                  "image scores, normal vs anomalous", "zero-shot kanoclip-untrained, backbone tiny"):
        assert words in text


@pytest.mark.slow
def test_the_browser_check_fails_on_a_broken_or_remote_image(eval_out, tmp_path):
    """The check itself, against mutants: a missing overlay file and an image that needs the network."""
    copy = tmp_path / "eval"
    shutil.copytree(eval_out, copy)
    victim = sorted((copy / "overlays").glob("*.png"))[0]
    victim.unlink()
    seen = check_page(copy / "report.html")
    assert seen["broken"] == [f"overlays/{victim.name}"] and any(victim.name in e for e in seen["errors"]), seen
    page = eval_out / "_remote_mutant.html"   # beside the intact files: only the remote image may fail
    page.write_text((eval_out / "report.html").read_text().replace('src="overlays/', 'src="https://example.com/overlays/', 1))
    try:
        seen = check_page(page)
        assert len(seen["broken"]) == 1 and seen["broken"][0].startswith("https://example.com/"), seen
        assert no_external_references(page.read_text())
    finally:
        page.unlink()


@pytest.mark.slow
def test_predict_gallery_page_renders(hazelnut_root, tmp_path, cli):
    folder = tmp_path / "imgs"
    shutil.copytree(hazelnut_root / "hazelnut" / "test" / "colour", folder)
    for p in sorted(folder.glob("*.jpg"))[4:]:
        p.unlink()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    code, out, err = cli("predict", folder, "--class", "hazelnut", "--backbone", "tiny", "--out", tmp_path / "p", "--threshold", "0.3")
    assert code == 1, err                                    # one image unreadable: reported, the rest written
    page = tmp_path / "p" / "index.html"
    text = page.read_text()
    assert "<script" not in text.lower() and no_external_references(text) == []
    seen = check_page(page)
    assert seen["errors"] == [] and seen["broken"] == [] and seen["images"] == 4, seen
    assert "not scored" in text and "broken.png" in text and "threshold 0.300" in text
    screenshot(page, tmp_path / "predict.png", height=1600)


def test_metrics_say_what_produced_them_baseline(eval_out):
    m = json.loads((eval_out / "metrics.json").read_text())
    p = m["provenance"]
    assert {k: v for k, v in p["method"].items() if k != "source"} == {
        "kind": "zero-shot", "name": "kanoclip-untrained", "method": "kanoclip-untrained", "backbone": "tiny",
        "prompts": "a photo of a normal/abnormal [class]"}  # the registry's kind
    assert p["method"]["source"].startswith("KAnoCLIP's model with KnPL, Bi-CMCI and Conv-Adapter off")
    assert p["image_size"] == 224 and p["kano_version"] == kano.__version__ and "git_commit" in p
    when = dt.datetime.fromisoformat(p["date"])
    assert when.tzinfo is not None and abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds()) < 3600
    assert 0 < p["elapsed_s"] < 600
    assert m["units"].startswith("fraction")
    md = (eval_out / "metrics.md").read_text()
    head = md.split("| class |")[0]
    assert "method: zero-shot kanoclip-untrained, backbone tiny" in head and "image size: 224 px" in head and f"Kano: {kano.__version__}" in head
    assert "| image_auroc (%) |" in md and "Values in percent" in md
    rows = list(map(lambda l: l.split(","), (eval_out / "metrics.csv").read_text().splitlines()))
    assert rows[0][:2] == ["class", "unit"] and all(r[1] == "fraction" for r in rows[1:])
    assert abs(float(rows[1][2]) - m["classes"]["hazelnut"]["image_auroc"]) < 1e-6   # the CSV holds fractions
    html = (eval_out / "report.html").read_text()
    assert html.index("zero-shot kanoclip-untrained") < html.index("Metrics per class")          # in the heading, before the table


def test_metrics_say_what_produced_them_trained_run(trained_run, synth_root, tmp_path, cli):
    out = tmp_path / "e"
    code, _, err = cli("eval", "--run", trained_run, "--data", f"mvtec:{synth_root}", "--out", out, "--classes", "disc")
    assert code == 0, err
    m = json.loads((out / "metrics.json").read_text())
    method = m["provenance"]["method"]
    digest = hashlib.sha256((trained_run / "config.json").read_bytes()).hexdigest()
    assert method["kind"] == "trained" and method["run"] == str(trained_run.resolve()) and method["config_sha256"] == digest
    assert method["backbone"] == "tiny" and m["provenance"]["image_size"] == 96
    threshold = json.loads((trained_run / "config.json").read_text())["threshold"]
    html = (out / "report.html").read_text()
    assert f"trained run {trained_run.resolve()} (config sha256 {digest[:12]})" in html
    assert f"threshold {threshold:.3f}" in html                                   # the run's threshold on the histogram
    assert f"config sha256 {digest[:12]}" in (out / "metrics.md").read_text().split("| class |")[0]


def test_provenance_takes_any_method_description():
    import time

    from kano.evaluator.report import provenance

    p = provenance({"kind": "baseline", "name": "median-colour"}, None, time.time() - 2.0, "mvtec:/x")
    assert p["method"]["name"] == "median-colour" and p["data"] == "mvtec:/x" and 2.0 <= p["elapsed_s"] < 60
    with pytest.raises(ValueError, match="kind"):
        provenance({"name": "x"}, None, time.time())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", p["date"])
