"""Your own photos, end to end: synthetic defects on normal photos -> train -> calibrate -> evaluate on real defects.

    python bench/own_photos.py [--photos tests/data/hazelnut_toy] [--class hazelnut] [--out own_photos_out]
                               [--seeds 0,1] [--epochs 6] [--n-calibration 10] [--alarm-rate 0.1]

--photos is a class folder in MVTec layout: train/good (normal photos), test/good and test/KIND (real test
images), ground_truth/KIND (their masks). Only train/good feeds training and calibration: its last
--n-calibration photos (sorted by name) are held out for `kano calibrate`, the others receive synthetic
defects (`kano data synth --from`). The real test images are only evaluated.

Every step is a `kano` command, run in this process and printed before it runs, so each can be re-run by
hand. Per seed s the synthetic defects (seed s) and the training (seed s) change; the untrained model, the
zero-shot methods and the floors have no seed. The Markdown table is `kano compare`'s; after it, each trained
run's decisions on the real test images at its calibrated threshold and at the run's own (auxiliary) one.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import time
from pathlib import Path

from kano.demo import DEMO_MODEL

ROOT = Path(__file__).resolve().parent.parent
ZERO_SHOT = "clip,clip-ac,winclip"
FLOORS = "median_colour,local_median,self_similarity"
TRANSDUCTIVE = "mutual,musc"
IMAGE_SIZE = 96  # the micro-CLIP's own input size
SYNTH_SIDE = 128  # photos are kept at most this large: the model sees 96 px, and scars and scratches stay visible


def kano(*args) -> None:
    """Run one `kano` command in this process (the installed CLI), echoing it first; a failure stops the script."""
    from kano.cli import app

    argv = [str(a) for a in args]
    print("$ kano " + " ".join(shlex.quote(a) for a in argv), flush=True)
    code = app(argv, standalone_mode=False, prog_name="kano")
    if code not in (None, 0):
        raise SystemExit(f"kano {argv[0]} exited with {code}")


def split_photos(photos: Path, out: Path, n_cal: int) -> tuple[Path, Path]:
    from kano.anomaly_data import list_images

    files = list_images(photos / "train" / "good")
    if len(files) <= n_cal:
        raise SystemExit(f"{photos}/train/good must hold more than --n-calibration {n_cal} photos, got {len(files)}")
    train_dir, cal_dir = out / "photos" / "train", out / "photos" / "calibration"
    for d, group in ((train_dir, files[:-n_cal]), (cal_dir, files[-n_cal:])):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for f in group:
            shutil.copy2(f, d / f.name)
    return train_dir, cal_dir


def decisions(pred_dir: Path) -> tuple[int, int]:
    recs = [json.loads(line) for line in (pred_dir / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return sum(bool(r["anomalous"]) for r in recs), len(recs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", type=Path, default=ROOT / "tests" / "data" / "hazelnut_toy")
    ap.add_argument("--class", dest="cls", default="hazelnut")
    ap.add_argument("--out", type=Path, default=Path("own_photos_out"))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--n-calibration", type=int, default=10)
    ap.add_argument("--alarm-rate", type=float, default=0.1)
    ap.add_argument("--n-defect", type=int, default=4, help="synthetic images per defect kind")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out, cls = args.out, args.cls
    seeds = [int(s) for s in args.seeds.split(",")]
    train_dir, cal_dir = split_photos(args.photos, out, args.n_calibration)
    real_root = out / "data" / "real"
    shutil.rmtree(real_root, ignore_errors=True)
    shutil.copytree(args.photos, real_root / cls)
    real = f"mvtec:{real_root}"
    kano("kb", "build", "--classes", cls, "--llm", "builtin", "--kb", out / "kb.duckdb")
    # the demo's narrower Bi-CMCI bottleneck keeps training within minutes on two CPU cores
    config = out / "train_config.json"
    config.write_text(json.dumps({"model": DEMO_MODEL}))
    trained = []
    for s in seeds:
        synth, run = out / "data" / f"synth_seed{s}", out / "runs" / f"kanoclip_seed{s}"
        if not (synth / "meta.json").is_file():
            kano("data", "synth", "--from", train_dir, "--classes", cls, "--out", synth, "--seed", s, "--size", SYNTH_SIDE,
                 "--n-defect", args.n_defect, "--defects", "local", "--force")  # the local kinds: the recipe the figures in docs/own-images.md were measured with
        if not (run / "weights.safetensors").is_file():
            kano("train", "--config", config, "--kb", out / "kb.duckdb", "--data", f"mvtec:{synth}", "--backbone", "micro", "--epochs", args.epochs,
                 "--seed", s, "--image-size", IMAGE_SIZE, "--cache", "memory", "--out", run)
        kano("calibrate", "--run", run, "--normal", f"{cls}={cal_dir}", "--alarm-rate", args.alarm_rate,
             "--out", out / "calibration" / f"seed{s}")
        kano("eval", "--run", run, "--data", real, "--classes", cls, "--out", out / "eval" / f"kanoclip_seed{s}", "--force")
        trained.append((s, run))
    ev = out / "eval"
    kano("eval", "--backbone", "micro", "--data", real, "--out", ev / "untrained", "--force")
    kano("eval", "--method", ZERO_SHOT, "--backbone", "micro", "--data", real, "--out", ev / "zero_shot", "--force")
    kano("eval", "--method", FLOORS, "--data", real, "--out", ev / "floors", "--force")
    kano("eval", "--method", TRANSDUCTIVE, "--backbone", "micro", "--data", real, "--out", ev / "transductive", "--force")
    dirs = ([ev / f"kanoclip_seed{s}" for s in seeds] + [ev / "untrained"] + [ev / "zero_shot" / m for m in ZERO_SHOT.split(",")]
            + [ev / "floors" / m for m in FLOORS.split(",")] + [ev / "transductive" / m for m in TRANSDUCTIVE.split(",")])
    kano("compare", *dirs, "--out", out / "comparison", "--metrics", "image_auroc,pixel_auroc,aupro", "--force")
    spread = [f"Trained KAnoCLIP over seeds {args.seeds} (mean, max - min):"]
    for key, name in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO")):
        vals = [100 * json.loads((ev / f"kanoclip_seed{s}" / "metrics.json").read_text())["mean"][key] for s in seeds]
        spread.append(f"- {name}: {', '.join(f'{v:.1f}' for v in vals)} (mean {sum(vals) / len(vals):.1f}, spread {max(vals) - min(vals):.1f})")
    print("\n".join(["", *spread]))
    lines = [f"Decisions on the real test images ({cls}: test/good normal, the other test folders defective):", ""]
    for s, run in trained:
        cal = json.loads((run / "calibration.json").read_text())["classes"][cls]
        own = json.loads((run / "config.json").read_text())["threshold"]
        # no --threshold: predict takes the class's calibrated one from RUN/calibration.json
        for label, thr, flag in (("calibrated", cal["image_threshold"], []), ("run's own", own, ["--threshold", own])):
            counts = {}
            for sub in sorted(p.name for p in (args.photos / "test").iterdir() if p.is_dir()):
                pred = out / "predict" / f"seed{s}_{'calibrated' if not flag else 'own'}_{sub}"
                kano("predict", real_root / cls / "test" / sub, "--class", cls, "--run", run, "--out", pred, *flag, "--force")
                counts[sub] = decisions(pred)
            good = counts.pop("good", (0, 0))
            bad = (sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values()))
            lines.append(f"- seed {s}, {label} threshold {thr:.4f}"
                         + (f" (alarm rate {args.alarm_rate:g}, n={cal['n']}, rank {cal['rank']})" if label == "calibrated" else
                            " (F1-best on the synthetic training data)")
                         + f": flagged {good[0]}/{good[1]} normal, {bad[0]}/{bad[1]} defective")
    print("\n".join(["", *lines, "", f"own-photos example finished in {time.perf_counter() - t0:.0f} s; table in "
                     f"{out / 'comparison' / 'comparison.md'}"]))


if __name__ == "__main__":
    main()
