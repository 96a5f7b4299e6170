"""`kano predict` and `kano eval` sharded over processes: a real `torchrun` with two gloo processes on CPU gives the
one result a single process writes (rows, scores to the bit, metrics exactly)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import KANO

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
ENV.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def _run(args, procs: int, timeout=600):
    cmd = ([TORCHRUN, "--standalone", "--nproc_per_node", str(procs), "--no-python", KANO] if procs > 1 else [KANO]) + list(map(str, args))
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def _rows(out: Path) -> list[dict]:
    # the files of each row live under its own --out: compared relative to it
    return [json.loads(line.replace(str(out), "OUT")) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_two_processes_predict_the_rows_of_one_in_the_fast_tier(hazelnut_root, tmp_path):
    """The fast tier's sharding check: a zero-parameter floor (no CLIP to load) on 7 real photos in batches of 2,
    one process against two torchrun processes: the same rows, in input order, scores to the bit."""
    photos = sorted((hazelnut_root / "hazelnut" / "test").glob("*/*.jpg"))[:7]
    args = ["predict", *photos, "--class", "hazelnut", "--method", "median_colour", "--batch-size", "2", "--threshold", "0.5",
            "--no-panels", "--no-maps", "--device", "cpu"]
    one = _run(args + ["--out", tmp_path / "one"], 1)
    two = _run(args + ["--out", tmp_path / "two"], 2)
    assert one.returncode == 0 and two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["image"] for r in b] == [str(p) for p in photos] and a == b
    assert len({r["score"] for r in a}) > 1 and not (tmp_path / "two" / "parts").exists()


@pytest.mark.slow
def test_two_processes_predict_the_rows_of_one(hazelnut_root, tmp_path):
    photos = sorted((hazelnut_root / "hazelnut" / "test").glob("*/*.jpg"))
    listed = [*map(str, photos[:9]), str(tmp_path / "gone.png"), *map(str, photos[9:])]    # a missing file in the middle
    (tmp_path / "list.txt").write_text("\n".join(listed) + "\n")
    args = ["predict", tmp_path / "list.txt", "--class", "hazelnut", "--backbone", "tiny", "--image-size", "64", "--batch-size", "3",
            "--threshold", "0.5", "--no-panels", "--device", "cpu"]
    one = _run(args + ["--out", tmp_path / "one"], 1)
    two = _run(args + ["--out", tmp_path / "two"], 2)
    assert one.returncode == 1 and two.returncode == 1, two.stdout[-2000:] + two.stderr[-3000:]   # 1: an image not scored
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(a) == len(listed) == 24 and [r["image"] for r in b] == listed
    assert a == b                                                                     # every field, scores to the bit
    assert b[9]["error"] and all(r["error"] is None for r in b[:9] + b[10:])
    for ra, rb in zip(a, b):
        if ra["error"] is None:
            assert np.array_equal(np.load(tmp_path / "one" / ra["map_npy"][4:]), np.load(tmp_path / "two" / rb["map_npy"][4:]))
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["errors"] == 1
    assert not (tmp_path / "two" / "parts").exists()                                 # merged, parts gone
    assert "23 scored" in two.stdout and two.stdout.count("23 scored") == 1           # process 0 alone reports


@pytest.mark.slow
def test_two_processes_eval_the_metrics_of_one(hazelnut_root, tmp_path):
    args = ["eval", "--data", f"mvtec:{hazelnut_root}", "--backbone", "tiny", "--image-size", "64", "--batch-size", "3",
            "--device", "cpu", "--n-overlays", "2"]
    one = _run(args + ["--out", tmp_path / "one"], 1)
    two = _run(args + ["--out", tmp_path / "two"], 2)
    assert one.returncode == 0 and two.returncode == 0, two.stdout[-2000:] + two.stderr[-3000:]
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert ma["classes"] == mb["classes"] and ma["mean"] == mb["mean"]                # exactly, not approximately
    assert mb["classes"]["hazelnut"]["n_images"] == 23
    assert (tmp_path / "one" / "scores.csv").read_bytes() == (tmp_path / "two" / "scores.csv").read_bytes()


@pytest.mark.slow
def test_a_process_that_dies_fails_the_job_and_the_rerun_finishes_it(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for i in range(600):
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i:04d}.png")
    args = ["predict", tmp_path / "img", "--class", "nut", "--backbone", "tiny", "--image-size", "32", "--batch-size", "2",
            "--no-maps", "--no-panels", "--device", "cpu", "--out", tmp_path / "o"]
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "--no-python", KANO] + list(map(str, args))
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = tmp_path / "o" / "parts" / "rank1-of-2.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None and not (part.exists() and part.stat().st_size):
        time.sleep(0.005)
    victim = None
    for d in Path("/proc").iterdir():  # the launched process of rank 1 (RANK=1 in its environment)
        try:
            cmdline = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if KANO.encode() in cmdline and str(tmp_path / "o").encode() in cmdline and b"RANK=1" in env:
            victim = int(d.name)
    assert victim is not None and proc.poll() is None, (proc.poll(), part.exists())
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0                                                       # the job fails
    assert "SIGKILL" in err or "Signal 9" in err or "exitcode" in err, err[-2000:]
    assert not (tmp_path / "o" / "predictions.jsonl").exists()
    again = _run(args, 2)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "o" / "predictions.jsonl").read_text().splitlines()]
    assert [Path(r["image"]).name for r in rows] == [f"{i:04d}.png" for i in range(600)]   # each image once, in order
