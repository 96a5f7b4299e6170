"""`kano demo`: the three stages together, offline, in the synthetic world, and its table of floors: the
untrained model, zero-shot CLIP-AC and WinCLIP, every zero-parameter detector, the transductive floor.

What the micro world shows (docs/methods-results.md; two seeds): the micro-CLIP learned something from its
captions (zero-shot image AUROC about 59-60 on the unseen target classes), but training on the auxiliary
classes does not yet beat the untrained model or the zero-parameter detectors. The claim of a margin (>= 5
points of image and pixel AUROC over every per-image zero-parameter detector) is kept as a strict xfail: it
runs every time, and the day it passes the suite says so and docs/methods-results.md must change with it.
"""

import json

import pytest

pytestmark = pytest.mark.slow  # the full demo: data, training and every method, minutes

MARGIN_AUROC = 0.05    # image and pixel AUROC over every per-image zero-parameter detector
MARGIN_AUPRO = 0.03    # AUPRO over the same detectors
MARGIN_UNTRAINED = 0.03  # over CLIP-AC on the same backbone, each of the three metrics


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    import subprocess

    from conftest import KANO

    out = tmp_path_factory.mktemp("demo") / "demo"
    proc = subprocess.run([KANO, "demo", "--out", str(out)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out.parent / "console.txt").write_text(proc.stdout + proc.stderr)  # what the user saw, for the warning count
    return out, proc.stdout


def test_demo_run_prints_no_warning(demo_run):
    """The happy path says nothing a user would have to act on (its world's class names and its built-in knowledge
    are by design)."""
    text = (demo_run[0].parent / "console.txt").read_text()
    assert "warning" not in text.lower(), [ln for ln in text.splitlines() if "warning" in ln.lower()]


def test_demo_end_to_end_on_unseen_classes(demo_run):
    out, stdout = demo_run
    from kano.demo import AUX_CLASSES, TARGET_CLASSES

    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(m["classes"]) == set(TARGET_CLASSES) and not set(TARGET_CLASSES) & set(AUX_CLASSES)
    log = [json.loads(line) for line in (out / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["cache_seconds"] > 0 and all(r["cache_seconds"] == 0 for r in log[1:])
    assert (out / "run" / "weights.safetensors").is_file() and list((out / "eval" / "overlays").glob("*.png"))
    assert "demo finished" in stdout and "transductive" in stdout
    held_out = {p.name for p in (out / "data" / "target").glob("*/test/*")} - {p.name for p in (out / "data" / "aux").glob("*/test/*")}
    from kano.anomaly_data.world import HELD_OUT_DEFECTS

    assert held_out == set(HELD_OUT_DEFECTS)  # the kinds held out of training reach the target only


def test_the_table_holds_every_floor_labelled_and_says_what_produced_it(demo_run):
    out, stdout = demo_run
    from kano.demo import PER_IMAGE_BASELINES

    comp = json.loads((out / "eval" / "comparison.json").read_text())
    kinds = [r["kind"] for r in comp["rows"]]
    assert kinds.count("trained on aux") == 1 and kinds.count("untrained") == 1
    assert [r["name"] for r in comp["rows"] if r["kind"] == "zero-shot, untrained"] == ["CLIP-AC (zero-shot)", "WinCLIP (zero-shot)"]
    assert [r["name"] for r in comp["rows"] if r["kind"] == "per-image, 0 params"] == list(PER_IMAGE_BASELINES)
    assert kinds.count("transductive") == 2
    assert comp["produced_by"]["backbone"] == "micro" and comp["produced_by"]["seed"] == 0 and comp["produced_by"]["kano_version"]
    for r in comp["rows"]:
        assert set(r["metrics"]) == {"all", "seen", "held_out", "surface", "structural", "part"}, r["name"]
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            assert 0.0 <= r["metrics"]["all"][key] <= 1.0, (r["name"], key)
    md = (out / "eval" / "comparison.md").read_text()
    assert "transductive" in md and "WinCLIP (zero-shot)" in md


def test_the_micro_clip_learned_something_from_its_captions(demo_run):
    """Untrained, on classes it never saw: above chance (seed 0 measured 59.3; chance is 50 and the spread of a
    12-class mean of AUROCs on 8 good + about 20 defective images each is about 3 points)."""
    out, _ = demo_run
    comp = json.loads((out / "eval" / "comparison.json").read_text())
    untrained = next(r for r in comp["rows"] if r["kind"] == "untrained")["metrics"]["all"]
    assert untrained["image_auroc"] >= 0.55, untrained


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="blocked on the micro-CLIP: the trained run does not beat the zero-parameter "
                   "detectors (docs/methods-results.md gives the measured table and the frozen features' ceiling)")
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
