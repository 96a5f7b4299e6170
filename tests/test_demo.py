"""`kano demo`: the three stages together, offline, and what the trained run finds on unseen classes."""

import json


def test_demo_end_to_end_finds_defects_on_unseen_classes(tmp_path, cli):
    out = tmp_path / "demo"
    code, stdout, err = cli("demo", "--out", out)
    assert code == 0, err
    m = json.loads((out / "eval" / "metrics.json").read_text())
    from demo import AUX_CLASSES, TARGET_CLASSES

    assert set(m["classes"]) == set(TARGET_CLASSES) and not set(TARGET_CLASSES) & set(AUX_CLASSES)
    assert m["mean"]["image_auroc"] >= 0.80, m["mean"]
    assert m["mean"]["pixel_auroc"] >= 0.85, m["mean"]
    log = [json.loads(l) for l in (out / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["cache_seconds"] > 0 and all(r["cache_seconds"] == 0 for r in log[1:])
    assert (out / "run" / "weights.safetensors").is_file() and list((out / "eval" / "overlays").glob("*.png"))
    assert "demo finished" in stdout
