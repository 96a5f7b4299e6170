"""`kano demo`: the three stages together, offline, and what the trained run finds on unseen classes,
read against the floors: the untrained CLIP-AC baseline and every zero-parameter detector.

The margins are the must-show of issue 11 (>= 5 points of image and pixel AUROC over every per-image
zero-parameter detector) and a smaller one for AUPRO and over CLIP-AC; README "The demo" gives the
seed-to-seed spread they are read against. The transductive floor is reported, not asserted: it sees
the whole test set, the trained run one image at a time.
"""

import json

import pytest

MARGIN_AUROC = 0.05    # image and pixel AUROC over every per-image zero-parameter detector
MARGIN_AUPRO = 0.03    # AUPRO over the same detectors
MARGIN_UNTRAINED = 0.03  # over CLIP-AC on the same backbone, each of the three metrics


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import subprocess

    from tests.conftest import KANO

    out = tmp_path_factory.mktemp("demo") / "demo"
    proc = subprocess.run([KANO, "demo", "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_end_to_end_on_unseen_classes(demo_run):
    out, stdout = demo_run
    from demo import AUX_CLASSES, TARGET_CLASSES

    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(m["classes"]) == set(TARGET_CLASSES) and not set(TARGET_CLASSES) & set(AUX_CLASSES)
    log = [json.loads(line) for line in (out / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["cache_seconds"] > 0 and all(r["cache_seconds"] == 0 for r in log[1:])
    assert (out / "run" / "weights.safetensors").is_file() and list((out / "eval" / "overlays").glob("*.png"))
    assert "demo finished" in stdout and "transductive" in stdout
    held_out = {p.name for p in (out / "data" / "target").glob("*/test/*")} - {p.name for p in (out / "data" / "aux").glob("*/test/*")}
    from anomaly_data.world import HELD_OUT_DEFECTS

    assert held_out == set(HELD_OUT_DEFECTS)  # the kinds held out of training reach the target only


import demo as _demo


@pytest.mark.skipif(_demo.DEMO_BACKBONE != "micro", reason="the margins are the micro-CLIP demo's claim; on the random-weight "
                    "tiny backbone the zero-parameter detectors win (README, The demo)")
def test_trained_run_beats_every_zero_parameter_detector_and_the_untrained_baseline(demo_run):
    out, _ = demo_run
    comp = json.loads((out / "eval" / "comparison.json").read_text())
    rows = {r["name"]: r for r in comp["rows"]}
    trained = next(r for r in comp["rows"] if r["kind"] == "trained on aux")["metrics"]["all"]
    floors = [r for r in comp["rows"] if r["kind"].startswith("per-image")]
    assert len(floors) >= 6 and any(r["kind"] == "transductive" for r in comp["rows"])
    failures = []
    for r in floors:
        f = r["metrics"]["all"]
        for key, margin in (("image_auroc", MARGIN_AUROC), ("pixel_auroc", MARGIN_AUROC), ("aupro", MARGIN_AUPRO)):
            if trained[key] < f[key] + margin:
                failures.append(f"{key}: trained {trained[key]:.3f} vs {r['name']} {f[key]:.3f} (+{margin})")
    untrained = next(r for r in comp["rows"] if r["kind"] == "untrained")["metrics"]["all"]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        if trained[key] < untrained[key] + MARGIN_UNTRAINED:
            failures.append(f"{key}: trained {trained[key]:.3f} vs CLIP-AC {untrained[key]:.3f} (+{MARGIN_UNTRAINED})")
    assert not failures, "\n".join(failures) + "\n" + json.dumps({k: v["metrics"]["all"] for k, v in rows.items()}, indent=1)
