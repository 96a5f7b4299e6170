"""`kano predict` as a stream: inputs from lists and manifests, rows appended as they are scored, resume after a
kill, error rows, refusals. Real tiny CLIP, real images, the real entry point."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import KANO, sigkill_partway_then_rerun
from conftest import predictions as _rows

FAST = ("--backbone", "tiny", "--image-size", "32", "--no-maps", "--no-panels")


def _images(folder, n, size=32, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.mark.slow
def test_lists_manifests_and_globs_name_the_same_images(tmp_path, cli):
    paths = _images(tmp_path / "img", 5)
    (tmp_path / "list.txt").write_text("# the five\n" + "\n".join(f"img/{p.name}" for p in paths) + "\n\n")
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "path"])
        for i, p in enumerate(paths):
            w.writerow(["nut" if i % 2 else "", f"img/{p.name}"])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": [str(p) for p in paths]}), tmp_path / "m.parquet")
    got = {}
    for key, arg in (("folder", tmp_path / "img"), ("txt", tmp_path / "list.txt"), ("csv", tmp_path / "m.csv"),
                     ("parquet", tmp_path / "m.parquet"), ("glob", f"{tmp_path}/img/*.png")):
        code, _, err = cli("predict", arg, "--class", "hazelnut", *FAST, "--out", tmp_path / key)
        assert code == 0, err
        got[key] = _rows(tmp_path / key)
    ref = [r["score"] for r in got["folder"]]
    for key, rows in got.items():
        assert [os.path.realpath(r["image"]) for r in rows] == [os.path.realpath(p) for p in paths], key
        if key == "csv":  # a batch of mixed classes encodes other prompts beside them: the same to float rounding
            assert [rows[i]["score"] for i in (0, 2, 4)] == pytest.approx([ref[i] for i in (0, 2, 4)], abs=1e-6)
        else:
            assert [r["score"] for r in rows] == ref, key                                   # the same images, the same bits
    assert [r["class"] for r in got["csv"]] == ["hazelnut", "nut", "hazelnut", "nut", "hazelnut"]   # the column, else --class
    assert all(got["csv"][i]["score"] != ref[i] for i in (1, 3))                           # scored with the prompts of "nut"
    assert set(got["folder"][0]) == {"image", "class", "class_word", "threshold", "threshold_source", "score", "anomalous",
                                     "error"}                                                 # no map, no panel
    assert not (tmp_path / "folder" / "maps").exists() and not (tmp_path / "folder" / "panels").exists()


def test_manifest_without_a_path_column_is_refused_before_anything_is_written(tmp_path, cli):
    _images(tmp_path / "img", 2)
    (tmp_path / "m.csv").write_text("file,class\nimg/0000.png,nut\n")
    code, _, err = cli("predict", tmp_path / "m.csv", "--class", "nut", *FAST, "--out", tmp_path / "out")
    assert code == 2 and "must have a 'path' column" in err and "got columns: file, class" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    (tmp_path / "notes.txt").write_text("img/0000.png\nsee the other list\n")                # prose is not a list of images
    code, _, err = cli("predict", tmp_path / "notes.txt", "--class", "nut", *FAST, "--out", tmp_path / "out")
    assert code == 2 and "notes.txt line 2 must be an image file path (.png, .jpg" in err and "got 'see the other list'" in err
    assert not (tmp_path / "out").exists()


def test_a_missing_file_mid_run_is_an_error_row_and_the_run_goes_on(tmp_path, cli):
    paths = _images(tmp_path / "img", 6)
    paths[2].unlink()
    (tmp_path / "list.txt").write_text("\n".join(map(str, paths)) + "\n")
    code, out, err = cli("predict", tmp_path / "list.txt", "--class", "nut", *FAST, "--batch-size", "2", "--threshold", "0.0",
                         "--out", tmp_path / "o")
    assert code == 1                                                     # some image not scored: exit 1, the rest written
    rows = _rows(tmp_path / "o")
    assert [r["image"] for r in rows] == list(map(str, paths))
    assert rows[2]["score"] is None and "must exist" in rows[2]["error"] and str(paths[2]) in rows[2]["error"]
    assert all(isinstance(r["score"], float) and r["anomalous"] is True and r["error"] is None for r in rows[:2] + rows[3:])
    assert json.loads((tmp_path / "o" / "summary.json").read_text()) == {"images": 6, "scored": 5, "errors": 1, "anomalous": 5, "normal": 0}
    assert "6 images: 5 scored (5 anomalous, 0 normal), 1 not scored" in out
    assert "not scored: image" in err


def test_resume_with_other_options_is_refused_naming_them(tmp_path, cli):
    _images(tmp_path / "img", 3)
    base = ("predict", tmp_path / "img", "--class", "nut", *FAST, "--out", tmp_path / "o")
    code, _, err = cli(*base, "--resume")
    assert code == 2 and "--resume needs --out" in err and "no such folder" in err
    code, _, err = cli(*base, "--threshold", "0.5")
    assert code == 0, err
    before = (tmp_path / "o" / "predictions.jsonl").read_bytes()
    code, _, err = cli(*base, "--threshold", "0.4", "--resume")
    assert code == 2 and "--resume must repeat the options" in err and "got different: threshold;" in err
    code, _, err = cli(*base[:-2], "--format", "parquet", "--threshold", "0.5", "--resume", "--out", tmp_path / "o")
    assert code == 2 and "got different: format;" in err
    assert (tmp_path / "o" / "predictions.jsonl").read_bytes() == before                  # nothing written was lost
    code, _, err = cli(*base, "--threshold", "0.5", "--resume")                           # the same options: nothing to do
    assert code == 0 and (tmp_path / "o" / "predictions.jsonl").read_bytes() == before


def test_a_torn_last_line_is_cut_and_the_run_continues_after_the_whole_rows(tmp_path, cli):
    _images(tmp_path / "img", 7)
    base = ("predict", tmp_path / "img", "--class", "nut", *FAST, "--batch-size", "2", "--out", tmp_path / "o")
    code, _, err = cli(*base)
    assert code == 0, err
    full = (tmp_path / "o" / "predictions.jsonl").read_bytes()
    lines = full.splitlines(keepends=True)
    # what a kill in the middle of a write leaves: three whole rows, half of the fourth, the manifest unfinished
    (tmp_path / "o" / "predictions.jsonl").write_bytes(b"".join(lines[:3]) + lines[3][:20])
    mf = json.loads((tmp_path / "o" / "kano_outputs.json").read_text())
    (tmp_path / "o" / "kano_outputs.json").write_text(json.dumps({**mf, "finished": False}))
    code, _, err = cli(*base)
    assert code == 0, err
    assert (tmp_path / "o" / "predictions.jsonl").read_bytes() == full                   # the same rows, bit for bit


def test_resume_refuses_inputs_that_changed_under_it(tmp_path, cli):
    paths = _images(tmp_path / "img", 4)
    (tmp_path / "list.txt").write_text("\n".join(map(str, paths)) + "\n")
    base = ("predict", tmp_path / "list.txt", "--class", "nut", *FAST, "--batch-size", "1", "--out", tmp_path / "o")
    assert cli(*base)[0] == 0
    mf = json.loads((tmp_path / "o" / "kano_outputs.json").read_text())
    (tmp_path / "o" / "kano_outputs.json").write_text(json.dumps({**mf, "finished": False}))
    (tmp_path / "list.txt").write_text("\n".join(map(str, [paths[1], paths[0], paths[2], paths[3]])) + "\n")
    code, _, err = cli(*base)
    assert code == 2 and "must be the ones of the interrupted run" in err and "row 1" in err


def test_parquet_rows_and_a_capped_page(tmp_path, cli, monkeypatch):
    import pyarrow.parquet as pq

    from kano.evaluator import predict_files

    monkeypatch.setattr(predict_files, "MAX_PAGE_ROWS", 2)  # the page is written there
    _images(tmp_path / "img", 5)
    code, _, err = cli("predict", tmp_path / "img", "--class", "nut", *FAST, "--format", "parquet", "--threshold", "0.3",
                       "--out", tmp_path / "o")
    assert code == 0, err
    rows = _rows(tmp_path / "o")
    table = pq.read_table(tmp_path / "o" / "predictions.parquet").to_pylist()
    assert [(t["image"], t["score"], t["anomalous"], t["threshold"]) for t in table] == \
        [(r["image"], r["score"], r["score"] >= 0.3, 0.3) for r in rows]
    page = (tmp_path / "o" / "index.html").read_text()
    ranked = sorted(rows, key=lambda r: (r["score"] < 0.3, -r["score"]))  # the flagged first, by score
    assert "the 2 highest-scoring of 5 images" in page
    assert all(Path(r["image"]).name in page for r in ranked[:2]) and not any(Path(r["image"]).name in page for r in ranked[2:])


def test_rows_files_repair_and_merge(tmp_path):
    from kano.evaluator import records

    f = tmp_path / "r.jsonl"
    f.write_bytes(b'{"i": 0}\n{"i": 1}\n{"i": 2')
    assert records.repair(f) == 2 and f.read_bytes() == b'{"i": 0}\n{"i": 1}\n'
    with records.RowWriter(f) as w:
        w.append([{"i": 2}])
    assert [r["i"] for r in records.ResultRows(f)] == [0, 1, 2] and records.ResultRows(f)[-1] == {"i": 2}
    # batches of 2 over 7 inputs dealt to 2 processes: batches 0 and 2 (and the short last one, 3) ... by hand
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"i": i}) + "\n" for i in (0, 1, 4, 5)))
    b.write_text("".join(json.dumps({"i": i}) + "\n" for i in (2, 3, 6)))
    assert records.merge_parts([a, b], [2, 2, 2, 1], tmp_path / "m.jsonl") == 7
    assert [r["i"] for r in records.read_rows(tmp_path / "m.jsonl")] == [0, 1, 2, 3, 4, 5, 6]
    from kano.evaluator.stream import shard_batches

    assert [[i for i, _ in b] for b in shard_batches("abcdefg", 2, 2, 1)] == [[2, 3], [6]]


@pytest.mark.slow
def test_sigkill_partway_then_the_same_command_scores_every_image_exactly_once(tmp_path):
    paths = _images(tmp_path / "img", 300, size=24)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [KANO, "predict", str(tmp_path / "img"), "--class", "nut", *FAST, "--batch-size", "2", "--device", "cpu"]
    clean = subprocess.run(cmd + ["--out", str(tmp_path / "clean")], env=env, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-2000:]
    out = tmp_path / "o"
    sigkill_partway_then_rerun(cmd, out, env, 300, timeout=600, poll=0.005)
    rows = _rows(out)
    assert [r["image"] for r in rows] == list(map(str, paths))                            # every image once, in order
    assert [r["score"] for r in rows] == [r["score"] for r in _rows(tmp_path / "clean")]  # and as if never killed



def test_the_row_writer_needs_no_torch():
    # a torch-free runtime writes the same rows: records.py loads with torch, numpy and PIL unimportable
    import kano.evaluator

    path = os.path.join(os.path.dirname(kano.evaluator.__file__), "records.py")
    probe = ("import sys, importlib.util\n"
             "class Block:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('torch', 'numpy', 'PIL'):\n"
             "            raise ImportError('blocked ' + name)\n"
             "sys.meta_path.insert(0, Block())\n"
             f"spec = importlib.util.spec_from_file_location('records', {path!r})\n"
             "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
             "print(m.decision(0.5, 0.5), m.decision(0.4, 0.5), m.decision(None, 0.5))\n")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.split() == ["True", "False", "None"], p.stderr[-2000:]
