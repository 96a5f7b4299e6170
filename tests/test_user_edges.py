"""What a new user met on their own photos: the training-photo guard of `kano calibrate` (by pixels), one
class-name rule (warnings, corrected names in advice, `--class` to say which class a folder is), and the
smaller rough edges (layout and weights errors, unreadable photos, result order, the service)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DATA

PHOTOS = DATA / "hazelnut_toy" / "train" / "good"
NAMES = sorted(p.name for p in PHOTOS.iterdir())  # 28 photos, 00.jpg .. 33.jpg with gaps


def _photos(dst: Path, names: list[str]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(PHOTOS / n, dst / n)
    return dst


@pytest.fixture(scope="module")
def photo_synth(tmp_path_factory) -> dict:
    """The issue's path: `kano data synth --from` on 6 real photos (shrunk to 128 px, written as PNG); 9 others held out."""
    from kano.anomaly_data.photo_defects import synthesize_from_photos

    base = tmp_path_factory.mktemp("photos")
    mine = _photos(base / "my_photos", NAMES[:6])
    held = _photos(base / "held_out", NAMES[6:15])
    synthesize_from_photos(mine, base / "synth", "hazelnut", max_side=128, n_per_defect=1, defects=("colour",))
    return {"mine": mine, "held": held, "synth": base / "synth"}


# ------------------------------------------------------------------ 3. the training-photo guard, by pixels


def test_guard_finds_photos_synth_rewrote_as_png(photo_synth):
    """The same JPEGs `synth --from` shrank and rewrote as PNG: no byte in common, the pixels after the same shrink."""
    from kano.evaluator.overlap import training_overlap

    train = sorted((photo_synth["synth"] / "hazelnut" / "train" / "good").iterdir())
    assert len(train) == 6 and all(t.suffix == ".png" for t in train)
    calib = sorted(photo_synth["mine"].iterdir()) + sorted(photo_synth["held"].iterdir())[:3]
    hits = training_overlap(train, calib)
    # synth numbers the photos in sorted order: 00.jpg -> 000.png ... 05.jpg -> 005.png; the held-out ones match none
    assert [(f.name, t.name) for f, t in hits] == [(NAMES[i], f"{i:03d}.png") for i in range(6)]
    # a photo re-encoded losslessly in another format is the same photo; one changed pixel is another photo
    other = photo_synth["held"].parent / "recoded"
    other.mkdir(exist_ok=True)
    a = np.asarray(Image.open(train[2]).convert("RGB")).copy()
    Image.fromarray(a).save(other / "same.bmp")
    a[0, 0] ^= 1
    Image.fromarray(a).save(other / "changed.png")
    assert [f.name for f, _ in training_overlap(train, [other / "same.bmp", other / "changed.png"])] == ["same.bmp"]


def test_calibrate_refuses_the_training_photos_by_name(run_copy, synth_root, held_out, tmp_path, cli):
    """The run's own training photos, written again as BMP (no byte in common), among held-out ones."""
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    trained = sorted((synth_root / "disc" / "test" / "good").iterdir())
    for f in trained:
        Image.open(f).save(mixed / (f.stem + ".bmp"))
    for f in sorted(held_out.iterdir())[:6]:
        shutil.copy(f, mixed / ("held_" + f.name))
    code, out, err = cli("calibrate", "--run", run_copy, "--normal", f"disc={mixed}", "--alarm-rate", "0.1")
    msg = " ".join(err.split())
    assert code == 2 and f"must be one the run never trained on, got {len(trained)} with the same pixels" in msg, msg
    assert ", ".join(f"{f.stem}.bmp (= good/{f.name})" for f in trained) in msg, msg
    assert not (run_copy / "calibration.json").exists()
    code, out, err = cli("calibrate", "--run", run_copy, "--normal", f"disc={held_out}", "--alarm-rate", "0.1")
    assert code == 0, err


# ------------------------------------------------------------------ 4. one class-name rule


def test_calibrate_warns_of_a_misspelt_class_and_errors_suggest_the_corrected_name(run_copy, held_out, tmp_path, cli):
    code, out, err = cli("calibrate", "--run", run_copy, "--normal", f"dysc={held_out}", "--alarm-rate", "0.2")
    msg = " ".join(err.split())
    assert code == 0 and "--normal dysc=...: class word 'dysc' is not a class" in msg and "did you mean 'disc'" in msg, msg
    code, out, err = cli("calibrate", "--run", run_copy, "--normal", f"disc={held_out}", "--alarm-rate", "0.2")
    assert code == 0 and "did you mean" not in err, err
    # predict with a misspelling of a calibrated class: the advice is the calibrated name, not a calibration of the typo
    code, _, err = cli("predict", str(held_out), "--class", "disk", "--run", run_copy, "--out", tmp_path / "p")
    msg = " ".join(err.split())
    assert code == 2 and "got 'disk': did you mean 'disc'? Pass --class disc" in msg and "--normal disk=" not in msg, msg
    # a misspelling of a class Kano knows but this calibration lacks: the command suggested carries the known name
    code, _, err = cli("predict", str(held_out), "--class", "hazlenut", "--run", run_copy, "--out", tmp_path / "p2")
    msg = " ".join(err.split())
    assert code == 2 and "(did you mean 'hazelnut'?)" in msg and "--normal hazelnut=DIR" in msg, msg
    assert "--normal hazlenut" not in msg
    # a class word nothing resembles: the advice keeps the user's name
    code, _, err = cli("predict", str(held_out), "--class", "gizmo", "--run", run_copy, "--out", tmp_path / "p3")
    assert code == 2 and "--normal gizmo=DIR" in " ".join(err.split()), err


def test_eval_and_predict_take_the_class_of_a_folder(run_copy, held_out, synth_root, tmp_path, cli):
    """Your own defect folder ("my_disc") evaluated against the calibration of "disc"."""
    root = tmp_path / "mine"
    shutil.copytree(synth_root / "disc", root / "my_disc")
    assert cli("calibrate", "--run", run_copy, "--normal", f"disc={held_out}", "--alarm-rate", "0.2")[0] == 0
    t = json.loads((run_copy / "calibration.json").read_text())["classes"]["disc"]["image_threshold"]
    data = f"mvtec:{root}"
    code, _, err = cli("eval", "--run", run_copy, "--data", data, "--out", tmp_path / "e0", "--n-overlays", "0")
    assert code == 2 and "got 'my_disc'" in err, err  # without --class: the folder's name, not calibrated
    for i, given in enumerate(("disc", "disc=my_disc")):
        code, out, err = cli("eval", "--run", run_copy, "--data", data, "--class", given, "--out", tmp_path / f"e{i + 1}",
                             "--n-overlays", "0")
        assert code == 0, err
        assert f"decision threshold: {t:.6f} from the calibration (class disc)" in out, out
        assert set(json.loads((tmp_path / f"e{i + 1}" / "metrics.json").read_text())["classes"]) == {"disc"}
    code, _, err = cli("eval", "--run", run_copy, "--data", data, "--class", "disc=my_dsic", "--out", tmp_path / "e3")
    assert code == 2 and "FOLDER must be a class folder" in err and "did you mean 'my_disc'" in err, err
    # predict: --class NAME=FOLDER is the folder's images as class NAME
    code, out, err = cli("predict", "--class", f"disc={held_out}", "--run", run_copy, "--out", tmp_path / "p")
    assert code == 0 and f"decision threshold: {t:.6f} from the calibration" in out, err
    assert len((tmp_path / "p" / "predictions.jsonl").read_text().splitlines()) == len(list(held_out.iterdir()))


# ------------------------------------------------------------------ 5. the smaller rough edges


def test_layout_error_shows_the_layout_and_the_command_that_makes_it(tmp_path, cli):
    photos = _photos(tmp_path / "my_photos", NAMES[:3])
    code, _, err = cli("train", "--data", f"mvtec:{photos}", "--backbone", "tiny", "--out", tmp_path / "run")
    msg = " ".join(err.split())
    assert code == 2 and "must contain images in the mvtec layout, got none (3 loose photos)" in msg, msg
    assert "ROOT/CLASS/train/good/*.png" in msg and "ROOT/CLASS/ground_truth/DEFECT/*_mask.png" in msg, msg
    assert f"kano data synth --from {photos} --classes NAME --out data/synth" in msg, msg


def test_missing_weights_error_names_the_offline_backbone(tmp_path, cli):
    # conftest: HF_HUB_OFFLINE=1 and an empty Hugging Face cache, as on a machine that never downloaded weights
    photos = _photos(tmp_path / "p", NAMES[:1])
    code, _, err = cli("predict", str(photos), "--class", "hazelnut", "--backbone", "ViT-B-32-quickgelu:openai",
                       "--out", tmp_path / "o")
    msg = " ".join(err.split())
    assert code == 2 and "must be in the cache" in msg and "Offline with no weights at all: --backbone micro" in msg, msg


def test_console_and_page_list_the_flagged_first_by_score(tmp_path, cli):
    import re

    photos = tmp_path / "new"
    photos.mkdir()
    for sub in ("good", "colour"):  # 6 good and 17 painted photos, named so that the painted ones sort last
        for f in sorted((DATA / "hazelnut_toy" / "test" / sub).iterdir()):
            shutil.copy(f, photos / f"{sub[0]}{f.name}")
    args = ["predict", str(photos), "--class", "hazelnut", "--method", "median_colour"]
    assert cli(*args, "--out", tmp_path / "a", "--no-maps", "--no-panels")[0] == 0
    scores = {Path(r["image"]).name: r["score"] for r in map(json.loads, (tmp_path / "a" / "predictions.jsonl").read_text().splitlines())}
    thr = sorted(scores.values())[-5]  # the 5 highest scores are flagged (score >= threshold)
    code, out, err = cli(*args, "--out", tmp_path / "b", "--no-maps", "--no-panels", "--threshold", repr(thr))
    assert code == 0, err
    # expected, worked out here: flagged (score >= thr) first, then the rest, each by score from the highest
    want = sorted(scores, key=lambda n: (scores[n] < thr, -scores[n]))
    printed = re.findall(r"([cg]\d\d\.jpg)\s.*?\b(yes|no)\b", out)
    assert [n for n, _ in printed] == want[:20], out
    assert [d for _, d in printed[:6]] == ["yes"] * 5 + ["no"], out
    page = (tmp_path / "b" / "index.html").read_text()
    listed = [Path(p).name for p in re.findall(r"<tr><td>([^<]+)</td><td>[0-9.]+</td>", page)]
    assert listed == want, listed


@pytest.mark.slow  # a real `kano serve` process (torch import, about 10 s)
def test_service_titles_panels_logs_requests_and_removes_its_folder_on_sigterm(trained_run, synth_root, tmp_path):
    import base64
    import io
    import os
    import signal
    import socket
    import subprocess

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from kano.evaluator.visualize import panel
    from conftest import KANO, wait_until_serving

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([KANO, "serve", "--run", str(trained_run), "--port", str(port), "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        first = proc.stdout.readline()
        folder = Path(first.split("folder ")[1].split(")")[0])  # the temporary folder it made and names
        assert folder.is_dir() and folder.name.startswith("kano-serve-"), first
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, proc)
        img = sorted((synth_root / "disc" / "test" / "good").iterdir())[0]
        ok = httpx.post(url + "/v1/predict", files={"file": ("my_part.png", img.read_bytes(), "image/png")},
                        data={"class": "disc"}, timeout=60)
        bad = httpx.post(url + "/v1/predict", files={"file": ("notes.txt", b"hello", "text/plain")}, data={"class": "disc"},
                         timeout=60)
        assert ok.status_code == 200 and bad.status_code == 415
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(ok.json()["panel_png"]))).convert("RGB"))
        amap = np.asarray(Image.open(io.BytesIO(base64.b64decode(ok.json()["map_png"]))), dtype=np.float32) / 65535
        r = ok.json()
        draw = lambda name: np.asarray(panel(Image.open(img).convert("RGB"), amap, name=name, score=r["score"],
                                             threshold=r["threshold"]))
        assert got.shape == draw("disc").shape
        assert (got[:44] == draw("disc / my_part.png")[:44]).all()      # the title band: class and file name
        assert not (got[:44] == draw("disc")[:44]).all()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [ln for ln in out.splitlines() if "/v1/predict" in ln or "/healthz" in ln]
    predicts = [ln for ln in lines if "POST /v1/predict" in ln]
    assert len(predicts) == 2, out
    assert " 200 " in predicts[0] and "file 'my_part.png'" in predicts[0] and " 415 " in predicts[1], predicts
    assert not folder.exists(), f"{folder} left behind after SIGTERM"


def test_synth_from_and_calibrate_skip_and_count_a_corrupt_photo(run_copy, held_out, tmp_path, cli):
    photos = _photos(tmp_path / "my_photos", NAMES[:3])
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    args = ["data", "synth", "--from", photos, "--classes", "hazelnut", "--size", "64", "--n-defect", "1", "--defects", "colour"]
    code, out, err = cli(*args, "--out", tmp_path / "s")
    msg = " ".join((out + err).split())
    assert code == 0 and "3 normal photos" in msg and "not used (unreadable): broken.jpg" in msg, msg
    assert "1 unreadable photo(s) skipped" in msg
    assert len(list((tmp_path / "s" / "hazelnut" / "train" / "good").iterdir())) == 3
    code, _, err = cli(*args, "--out", tmp_path / "s2", "--strict")
    assert code == 2 and "broken.jpg" in err, err
    # calibrate: 9 readable photos and a broken one -> the 9 calibrate it, the broken one is named and counted
    normal = tmp_path / "normal"
    shutil.copytree(held_out, normal)
    (normal / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, out, err = cli("calibrate", "--run", run_copy, "--normal", f"disc={normal}", "--alarm-rate", "0.1")
    msg = " ".join(err.split())
    assert code == 0 and "not scored (left out of the calibration)" in msg and "zz_broken.png" in msg, msg
    assert "1 unreadable image(s) of disc skipped" in msg
    assert json.loads((run_copy / "calibration.json").read_text())["classes"]["disc"]["n"] == 9
    code, _, err = cli("calibrate", "--run", run_copy, "--normal", f"disc={normal}", "--alarm-rate", "0.1", "--strict")
    assert code == 2 and "zz_broken.png" in err, err


def test_readme_recipe_with_its_example_class_prints_no_warning(tmp_path, cli):
    """The README's own-images recipe names its class `widget`: a class word Kano has never seen is the normal case
    of a zero-shot detector, not a mistake; a probable misspelling of a known class still warns."""
    photos = _photos(tmp_path / "my_photos", NAMES[:2])
    code, out, err = cli("kb", "build", "--classes", "widget", "--llm", "builtin", "--kb", tmp_path / "kb.duckdb")
    assert code == 0 and "warning" not in (out + err).lower(), err
    code, out, err = cli("predict", str(photos), "--class", "widget", "--method", "winclip", "--backbone", "tiny",
                         "--reference", str(photos), "--k-shot", "1", "--out", tmp_path / "p", "--no-panels", "--no-maps")
    assert code == 0 and "warning" not in (out + err).lower(), err
    code, out, err = cli("kb", "build", "--classes", "hazlenut", "--llm", "builtin", "--kb", tmp_path / "kb2.duckdb")
    assert code == 0 and "did you mean 'hazelnut'" in " ".join(err.split()), err


def test_readme_names_the_deploy_extras_and_the_cpu_only_torch():
    import re

    from conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    # the top two commands, unchanged
    assert blocks[0].strip() == "python3 -m venv .venv && .venv/bin/pip install -q . && .venv/bin/kano demo --out demo_out"
    assert blocks[1].strip() == "python3 -m venv .venv && .venv/bin/pip install -q '.[test]' && .venv/bin/python -m pytest"
    deploy = next(b for b in blocks if "kano export" in b)
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([a-z]+) = \[", section, re.M))  # Python 3.10 has no tomllib
    install = next(line for line in deploy.splitlines() if line.startswith("pip install"))
    named = set(re.search(r"\[([a-z,]+)\]", install).group(1).split(","))
    assert named == {"export", "runtime", "serve"} and named <= set(extras)
    assert deploy.index("pip install") < deploy.index("kano export")   # said before the commands that need it
    prose = " ".join(readme.split())
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in prose
    assert "the install then weighs about" in prose and "CUDA libraries" in prose
