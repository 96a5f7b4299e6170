"""The paper's path at the paper's scale: train, eval, predict, export and predict on the exported graph, each as a
real `kano` process, on ViT-L/14@336 (QuickGELU) at 518 px with random weights (no download).

    python bench/paper_scale.py [--backbone ViT-L-14-336-quickgelu] [--image-size N] [--device cpu|cuda]
                                [--precision auto|bf16|fp16|fp32] [--epochs 2] [--keep DIR]

Data (written to a temporary folder, not timed): 6 auxiliary images (one synthetic class, `disc`: 2 normal, 4 with
defects and masks) and a knowledge base from the built-in pack for training; 4 target images (real hazelnut photos
of tests/data: 2 normal, 2 with a colour defect and its mask) for eval and both predicts. Steps, in order:

    kano train   --backbone B --data mvtec:AUX --epochs 2 --cache memory   (KAnoCLIP's other defaults)
    kano eval    --run RUN --data mvtec:TARGET
    kano predict TARGET --class hazelnut --run RUN
    kano export  --run RUN --classes hazelnut --out model.onnx            (always on the CPU)
    kano predict TARGET --class hazelnut --model model.onnx               (onnxruntime, CPU)

Per step: exit status, wall seconds (process start, imports and model load included), seconds per image (train:
per auxiliary image for all its epochs; export: per graph) and the process's peak resident memory (os.wait4's
ru_maxrss of that child alone); on CUDA also the GPU's peak memory in use during the step (nvidia-smi, sampled
every 0.2 s). Then the exported graph against torch: the largest score and map difference between the two
predicts' records (predictions.jsonl, maps/*.npy) and whether their decisions agree.

A random-weight backbone is built under a fixed seed (kanoclip/backbone.py RANDOM_WEIGHTS_SEED), so each step's
process rebuilds the same frozen weights. Precision: `auto` is fp32 on the CPU and bf16 autocast of the frozen
backbone on CUDA (KANO_BACKBONE_AUTOCAST; the heads, maps and scores stay fp32 whatever it is); the exported graph
is fp32, so on CUDA the score difference includes the backbone's reduced precision (run `--precision fp32` to
compare like with like).

On a machine without Kano's console script on the interpreter's folder (e.g. Kano installed with `pip install
--no-deps --target`), each step runs as `python -m kano.cli` with this process's environment (PYTHONPATH included).
The export step needs onnx and onnxscript, `predict --model` onnxruntime, `kb build` duckdb.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "tests" / "data" / "hazelnut_toy"
TARGET_GOOD, TARGET_BAD = ("04.jpg", "05.jpg"), ("00.jpg", "01.jpg")
AUX_CLASS = "disc"
N_AUX = 6  # 2 normal + 2 defect kinds x 2


def kano_command() -> list[str]:
    """The `kano` console script of this interpreter's environment, else the same entry point through -m."""
    script = Path(sys.executable).with_name("kano")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "kano.cli"]


class GpuPeak:
    """Largest memory.used (MiB) nvidia-smi reports while the step runs; None where there is no nvidia-smi."""

    def __init__(self, device: str):
        self.smi = shutil.which("nvidia-smi") if device.startswith("cuda") else None
        index = device.partition(":")[2] or os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
        self.index, self.peak, self._stop = index, None, threading.Event()

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run([self.smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", self.index],
                                     capture_output=True, text=True, timeout=5).stdout.strip()
                self.peak = max(self.peak or 0, int(out.splitlines()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                pass
            self._stop.wait(0.2)

    def __enter__(self):
        if self.smi:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.smi:
            self._thread.join()


def run_step(name: str, args: list[str], work: Path, env: dict, device: str) -> dict:
    """Run `kano ARGS` as a child process; -> {step, rc, seconds, peak_rss_gb, gpu_peak_gb}."""
    log = work / (name.split(" (")[0].replace(" --", "_").replace(" ", "_") + ".log")
    print(f"[{time.strftime('%H:%M:%S')}] {name}: kano {' '.join(args)}", flush=True)
    with open(log, "w") as fh, GpuPeak(device) as gpu:
        t0 = time.perf_counter()
        proc = subprocess.Popen(kano_command() + args, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=work)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (RUSAGE_CHILDREN would be the max so far)
        seconds = time.perf_counter() - t0
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = log.read_text().splitlines()[-15:]
        print(f"  {name} exited {rc}; last lines of {log}:\n    " + "\n    ".join(tail), flush=True)
    # Linux reports ru_maxrss in KiB
    return {"step": name, "rc": rc, "seconds": seconds, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9,
            "gpu_peak_gb": None if gpu.peak is None else gpu.peak * 2**20 / 1e9}


def make_data(work: Path) -> tuple[Path, Path]:
    """-> (auxiliary MVTec root, target MVTec root)."""
    from kano.anomaly_data import synthesize

    aux = work / "aux"
    synthesize(aux, [AUX_CLASS], seed=0, size=256, n_train=1, n_good=2, n_per_defect=2, defects=("hole", "stain"))
    target = work / "target"
    cls = target / "hazelnut"
    for sub in ("test/good", "test/colour", "ground_truth/colour"):
        (cls / sub).mkdir(parents=True)
    for f in TARGET_GOOD:
        shutil.copy(PHOTOS / "test" / "good" / f, cls / "test" / "good" / f)
    for f in TARGET_BAD:
        shutil.copy(PHOTOS / "test" / "colour" / f, cls / "test" / "colour" / f)
        mask = Path(f).with_suffix(".png").name
        shutil.copy(PHOTOS / "ground_truth" / "colour" / mask, cls / "ground_truth" / "colour" / mask)
    return aux, target


def compare(torch_dir: Path, graph_dir: Path) -> dict:
    """The two predicts' records, image by image: largest |score| and |map| difference, decisions agreeing."""
    import numpy as np

    def rows(d):
        return {r["image"]: r for r in map(json.loads, filter(str.strip, (d / "predictions.jsonl").read_text().splitlines()))}

    a, b = rows(torch_dir), rows(graph_dir)
    if sorted(a) != sorted(b):
        raise SystemExit(f"the two predicts must score the same images, got {len(a)} and {len(b)} rows")
    ds, dm, same = 0.0, 0.0, 0
    for k in a:
        ds = max(ds, abs(a[k]["score"] - b[k]["score"]))
        # map paths are as the predicts wrote them: relative to their working folder (the work folder)
        ma, mb = (np.load(torch_dir.parent / r[k]["map_npy"]) for r in (a, b))
        dm = max(dm, float(np.abs(ma - mb).max()))
        same += a[k]["anomalous"] == b[k]["anomalous"]
    return {"max_score_diff": ds, "max_map_diff": dm, "same_decisions": same, "images": len(a),
            "scores_torch": [a[k]["score"] for k in sorted(a)], "scores_graph": [b[k]["score"] for k in sorted(a)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="ViT-L-14-336-quickgelu", help="MODEL[:PRETRAINED]; no tag: random weights")
    ap.add_argument("--image-size", type=int, default=None, help="default: the backbone's (518 for ViT-L-14-336)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (train, eval, predict --run; export and "
                    "predict --model run on the CPU)")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                    help="the frozen backbone's autocast (auto: fp32 on the CPU, bf16 on CUDA)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep (runs, logs, results.json)")
    a = ap.parse_args()
    if a.epochs < 1:
        raise SystemExit(f"--epochs must be >= 1, got {a.epochs}")
    cuda = a.device.startswith("cuda")
    precision = a.precision if a.precision != "auto" else ("bf16" if cuda else "fp32")
    env = dict(os.environ, KANO_BACKBONE_AUTOCAST="off" if precision == "fp32" else precision)
    if a.keep:
        a.keep.mkdir(parents=True, exist_ok=True)
        if any(a.keep.iterdir()):
            raise SystemExit(f"--keep must be an empty or new folder, got {a.keep} holding files")
    work = a.keep or Path(tempfile.mkdtemp(prefix="kano-paper-scale-"))
    aux, target = make_data(work)
    setup = run_step("kb build", ["kb", "build", "--classes", AUX_CLASS, "--kb", "kb.duckdb"], work, env, "cpu")
    if setup["rc"]:
        raise SystemExit("kano kb build failed")
    size = ["--image-size", str(a.image_size)] if a.image_size else []
    dev = ["--device", a.device]
    images = [str(target / "hazelnut" / "test" / "good"), str(target / "hazelnut" / "test" / "colour")]
    steps = [
        ("train", ["train", "--kb", "kb.duckdb", "--data", f"mvtec:{aux}", "--backbone", a.backbone, "--out", "run",
                   "--epochs", str(a.epochs), "--cache", "memory", *size, *dev], N_AUX),
        ("eval", ["eval", "--run", "run", "--data", f"mvtec:{target}", "--out", "eval", *dev], 4),
        ("predict --run", ["predict", *images, "--class", "hazelnut", "--run", "run", "--out", "pred_torch", *dev], 4),
        ("export (ONNX)", ["export", "--run", "run", "--classes", "hazelnut", "--out", "model.onnx"], None),
        ("predict --model", ["predict", *images, "--class", "hazelnut", "--model", "model.onnx", "--out", "pred_graph"], 4),
    ]
    results = []
    for name, args, n in steps:
        r = run_step(name, args, work, env, a.device)
        r["images"] = n
        results.append(r)
        if r["rc"]:
            break
    cfg = json.loads((work / "run" / "config.json").read_text()) if (work / "run" / "config.json").is_file() else {}
    diff = compare(work / "pred_torch", work / "pred_graph") if all(r["rc"] == 0 for r in results) and len(results) == len(steps) else None

    print(f"\n{a.backbone} at {cfg.get('image_size', a.image_size or 'default')} px, stages {cfg.get('stages')}, "
          f"device {a.device}, backbone precision {precision}, {a.epochs} epochs, {N_AUX} auxiliary images, 4 target images")
    gpu_col = cuda
    head = "| step | exit | wall s | s per image | peak RSS |" + (" GPU memory peak |" if gpu_col else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        per = (f"{r['seconds'] / r['images']:.1f}" + (f" ({a.epochs} epochs)" if r["step"] == "train" else "")
               if r["images"] else "—")
        line = f"| {r['step']} | {r['rc']} | {r['seconds']:.0f} | {per} | {r['peak_rss_gb']:.1f} GB |"
        if gpu_col:
            line += f" {r['gpu_peak_gb']:.1f} GB |" if r["gpu_peak_gb"] is not None else " — |"
        print(line)
    if diff:
        print(f"\nexported graph (onnxruntime, fp32) vs torch ({precision}): max |score diff| {diff['max_score_diff']:.2e}, "
              f"max |map diff| {diff['max_map_diff']:.2e}, same decisions {diff['same_decisions']}/{diff['images']}")
    out = {"backbone": a.backbone, "image_size": cfg.get("image_size"), "stages": cfg.get("stages"), "device": a.device,
           "precision": precision, "epochs": a.epochs, "steps": results, "export_vs_torch": diff}
    (work / "results.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nresults: {work / 'results.json'}")
    if not a.keep:
        shutil.rmtree(work / "run", ignore_errors=True)  # the large files; logs and results.json stay for reading
        (work / "model.onnx").unlink(missing_ok=True)
    if any(r["rc"] for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
