"""Split conformal thresholds (evaluator.calibrate, `kano calibrate`) and their use by predict and eval."""

import csv
import hashlib
import json
import math
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from kano.core.errors import KanoError
from kano.evaluator.calibrate import calibrated_threshold, conformal_rank, conformal_threshold, images_needed


def test_hand_worked_case_n9_a02():
    # n = 9, A = 0.2: k = ceil(10 * 0.8) = 8, the 8th smallest of 0.1 .. 0.9 is 0.8
    scores = [0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6]
    thr, t, k = conformal_threshold(scores, 0.2)
    assert (t, k) == (0.8, 8)
    assert thr > 0.8 and not 0.8 >= thr and np.nextafter(0.8, 1.0) >= thr  # 0.8 itself is normal, anything above is not
    # n = 9, A = 0.1: k = ceil(10 * 0.9) = 9, the largest; n = 4, A = 0.2: k = ceil(5 * 0.8) = 4
    assert conformal_threshold(scores, 0.1)[1:] == (0.9, 9)
    assert conformal_threshold([3.0, 1.0, 2.0, 2.0], 0.2)[1:] == (3.0, 4)
    # ties: n = 5, A = 0.5: k = ceil(6 * 0.5) = 3, the 3rd smallest of 1, 1, 1, 2, 2 is 1
    assert conformal_threshold([2, 1, 1, 2, 1], 0.5)[1:] == (1.0, 3)


def test_too_few_images_and_bad_rates():
    # n >= 1/A - 1: A = 0.2 needs 4, A = 0.05 needs 19, A = 0.1 needs 9, A = 0.3 needs ceil(2.33) = 3
    assert [images_needed(a) for a in (0.2, 0.05, 0.1, 0.3)] == [4, 19, 9, 3]
    with pytest.raises(KanoError, match=r"at least 4 normal images for --alarm-rate 0.2 .*got 3"):
        conformal_rank(3, 0.2)
    assert conformal_rank(4, 0.2) == 4
    with pytest.raises(KanoError, match=r"at least 19 normal images .*got 18"):
        conformal_rank(18, 0.05)
    for bad in (0, 1, -0.1, 1.5, float("nan")):
        with pytest.raises(KanoError, match=r"--alarm-rate must be a number in \(0, 1\)"):
            conformal_rank(100, bad)


def _false_alarms(draw, n: int, m: int, a: float, trials: int, seed: int) -> np.ndarray:
    """Per trial: the share of m new normal scores at or above the threshold set on n calibration scores."""
    r = np.random.default_rng(seed)
    rates = np.empty(trials)
    for i in range(trials):
        thr, _, _ = conformal_threshold(draw(r, n), a)
        rates[i] = np.mean(draw(r, m) >= thr)  # Kano's decision: anomalous when score >= threshold
    return rates


DISTRIBUTIONS = {
    "uniform": lambda r, k: r.uniform(0, 1, k),
    # heavy right tail (Pareto, shape 1.1: infinite variance), squashed into [0, 1) like a score
    "pareto": lambda r, k: 1 - 1 / (1 + r.pareto(1.1, k)),
    # discrete, heavy ties: 0.2 w.p. 0.5, 0.5 w.p. 0.45, 0.9 w.p. 0.05
    "discrete": lambda r, k: r.choice([0.2, 0.5, 0.9], size=k, p=[0.5, 0.45, 0.05]),
}


@pytest.mark.parametrize("shape", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("n,a", [(19, 0.1), (9, 0.2), (40, 0.05)])
def test_false_alarm_rate_at_most_a(shape, n, a):
    """2000 calibration/test draws; the mean false-alarm rate must be <= A + 3 standard errors of that mean."""
    rates = _false_alarms(DISTRIBUTIONS[shape], n, 50, a, 2000, seed=zlib.crc32(f"{shape}{n}".encode()))
    se = rates.std(ddof=1) / math.sqrt(len(rates))
    assert rates.mean() <= a + 3 * se, (shape, n, a, rates.mean(), se)
    if shape == "uniform":
        # continuous scores: the rate is exactly 1 - k/(n+1) in expectation (e.g. n=19, A=0.1: 1 - 18/20 = 0.1)
        k = math.ceil((n + 1) * (1 - a) - 1e-9)
        assert abs(rates.mean() - (1 - k / (n + 1))) <= 3 * se


# ------------------------------------------------------------------ the command, on a real tiny run


def test_calibrate_writes_the_order_statistic_and_predict_uses_it(run_copy, held_out, tmp_path, cli):
    code, out, err = cli("calibrate", "--run", run_copy, "--normal", f"disc={held_out}", "--alarm-rate", "0.1",
                         "--out", tmp_path / "cal")
    assert code == 0, err
    cal = json.loads((run_copy / "calibration.json").read_text())
    config = json.loads((run_copy / "config.json").read_text())
    assert cal["format"] == 2 and cal["alarm_rate"] == 0.1 and set(cal["classes"]) == {"disc"}
    # keyed by the scoring mode: the run's weights, scored as it is (no references, K = 0)
    assert cal["mode"] == {"method": config.get("method", "kanoclip"), "backbone": config["backbone"],
                           "weights_sha256": config["ranks"][0]["weights_sha256"], "references_sha256": None, "k_shot": 0,
                           "image_size": config["image_size"]}
    c = cal["classes"]["disc"]
    assert (c["n"], c["rank"]) == (9, 9)  # ceil(10 * 0.9) = 9
    with open(tmp_path / "cal" / "calibration_scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    scores = sorted(float(r["score"]) for r in rows)
    peaks = sorted(float(r["map_max"]) for r in rows)
    assert c["image_threshold"] == float(np.nextafter(scores[8], np.inf))  # the 9th smallest, exclusive
    assert c["pixel_threshold"] == float(np.nextafter(peaks[8], np.inf))
    h = hashlib.sha256()
    for f in sorted(held_out.iterdir()):
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    assert c["data_sha256"] == h.hexdigest()
    assert c["class_word"] == (config["prompt_names"].get("disc") or "disc")
    assert calibrated_threshold(run_copy, "disc") == c["image_threshold"]
    # the calibration images themselves: none is at or above a threshold above their maximum
    code, out, err = cli("predict", str(held_out), "--class", "disc", "--run", run_copy, "--out", tmp_path / "pred")
    assert code == 0, err
    assert f"decision threshold: {c['image_threshold']:.6f} from the calibration" in out
    recs = [json.loads(line) for line in (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()]
    assert all(r["threshold"] == c["image_threshold"] and r["anomalous"] is False for r in recs)
    # a class the calibration lacks
    code, _, err = cli("predict", str(held_out), "--class", "weave", "--run", run_copy, "--out", tmp_path / "pred2")
    assert code == 2 and "class must be one of the classes calibrated" in err and "(disc), got 'weave'" in err
    # --threshold still wins
    code, out, _ = cli("predict", str(held_out), "--class", "weave", "--run", run_copy, "--out", tmp_path / "pred3",
                       "--threshold", "0.5")
    assert code == 0 and "decision threshold: 0.500000 from the command line" in out


def test_eval_of_one_class_shows_its_calibrated_threshold(run_copy, held_out, synth_root, tmp_path, cli):
    assert cli("calibrate", "--run", run_copy, "--normal", f"disc={held_out}", "--alarm-rate", "0.2")[0] == 0
    t = json.loads((run_copy / "calibration.json").read_text())["classes"]["disc"]["image_threshold"]
    code, out, err = cli("eval", "--run", run_copy, "--data", f"mvtec:{synth_root}", "--classes", "disc",
                         "--out", tmp_path / "ev", "--n-overlays", "0")
    assert code == 0, err
    assert f"decision threshold: {t:.6f} from the calibration" in out


def test_bad_input(run_copy, held_out, synth_root, tmp_path, cli):
    normal = f"disc={held_out}"
    for rate in ("0", "1", "1.5", "-0.2"):
        code, _, err = cli("calibrate", "--run", run_copy, "--normal", normal, "--alarm-rate", rate)
        assert code == 2 and "--alarm-rate must be a number in (0, 1)" in err, (rate, err)
    code, _, err = cli("calibrate", "--run", run_copy, "--normal", normal, "--alarm-rate", "0.05")
    assert code == 2 and "at least 19 normal images for --alarm-rate 0.05" in err and "got 9" in err
    code, _, err = cli("calibrate", "--run", run_copy, "--normal", str(held_out), "--alarm-rate", "0.1")
    assert code == 2 and "--normal must be CLASS=DIR" in err
    # an image the run trained on
    code, _, err = cli("calibrate", "--run", run_copy, "--normal", f"disc={synth_root / 'disc' / 'test' / 'good'}",
                       "--alarm-rate", "0.5")
    assert code == 2 and "must be one the run never trained on" in err
    assert not (run_copy / "calibration.json").exists()
    # a calibration made for another run's weights
    assert cli("calibrate", "--run", run_copy, "--normal", normal, "--alarm-rate", "0.1")[0] == 0
    cal = json.loads((run_copy / "calibration.json").read_text())
    cal["mode"]["weights_sha256"] = "0" * 64
    (run_copy / "calibration.json").write_text(json.dumps(cal))
    code, _, err = cli("predict", str(held_out), "--class", "disc", "--run", run_copy, "--out", tmp_path / "p")
    assert code == 2 and "must be made for this run's weights" in err and "got a calibration made for 0000000000000000" in err


def test_a_damaged_calibration_file_is_named(run_copy, held_out, tmp_path, cli):
    (run_copy / "calibration.json").write_text(json.dumps({"classes": {"disc": {"image_threshold": 0.5}}}))
    code, _, err = cli("predict", str(held_out), "--class", "disc", "--run", run_copy, "--out", tmp_path / "p")
    assert code == 2 and "calibration.json must be a calibration of format 2" in err and "got format None" in err
    (run_copy / "calibration.json").write_text("{not json")
    code, _, err = cli("predict", str(held_out), "--class", "disc", "--run", run_copy, "--out", tmp_path / "p")
    assert code == 2 and "must be the JSON file `kano calibrate` writes" in err


def test_few_shot_on_a_run_never_reuses_its_zero_shot_calibration(run_copy, held_out, tmp_path, cli):
    refs = tmp_path / "refs"
    shutil.copytree(held_out, refs)  # references: any normal images; here the held-out ones themselves
    few = ["--run", run_copy, "--reference", refs, "--k-shot", "2"]
    # no calibration: the run's own threshold (set on its scores without references) is not used with them
    code, out, err = cli("predict", str(held_out), "--class", "disc", *few, "--out", tmp_path / "p0", "--no-maps", "--no-panels")
    assert code == 0 and "no threshold" in err, err
    assert cli("calibrate", "--run", run_copy, "--normal", f"disc={held_out}", "--alarm-rate", "0.1")[0] == 0
    code, _, err = cli("predict", str(held_out), "--class", "disc", *few, "--out", tmp_path / "p1", "--no-maps", "--no-panels")
    assert code == 2 and "calibration.json must be a calibration of the scoring mode in use" in err
    assert "k_shot 0 there, 2 here" in err and "references_sha256 none there" in err
    cal = tmp_path / "few.json"
    code, _, err = cli("calibrate", *few, "--normal", f"disc={held_out}", "--alarm-rate", "0.1")
    assert code == 2 and "--calibration FILE must name where to write" in err  # never into the run's own file
    assert cli("calibrate", *few, "--normal", f"disc={held_out}", "--alarm-rate", "0.1", "--calibration", cal)[0] == 0
    t = json.loads(cal.read_text())["classes"]["disc"]["image_threshold"]
    assert t != json.loads((run_copy / "calibration.json").read_text())["classes"]["disc"]["image_threshold"]
    code, out, err = cli("predict", str(held_out), "--class", "disc", *few, "--calibration", cal, "--out", tmp_path / "p2",
                         "--no-maps", "--no-panels")
    assert code == 0 and f"decision threshold: {t:.6f} from the calibration" in out, err
