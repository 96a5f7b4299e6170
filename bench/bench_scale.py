"""`kano predict` at scale: images/s for 1 and 2 processes and for 1 process with 2 threads; peak memory against
the number of images.

    python bench/bench_scale.py [--dir /tmp/kano_bench_scale] [--sizes 1000 10000 100000] [--images 10000]
                                [--repeats 3] [--batch-size 16] [--skip-throughput] [--skip-memory]

Images: random 32 px PNGs, generated once into --dir (kept for the next run) and named by text lists of the
first N paths. Every case runs the real command line (`kano predict LIST --class part --backbone tiny
--image-size 32 --no-maps --no-panels`) as a fresh process tree, so start-up (imports, model) is included in
images/s; it is printed beside them, measured by the same case on 8 images (on a loaded machine it varies by
seconds from run to run, too much to subtract).

1. Throughput on --images images, three cases: one process with OMP_NUM_THREADS=1; two processes under
   `torchrun --nproc_per_node 2` (gloo), one thread each, each scoring every other batch, process 0 merging;
   one process with OMP_NUM_THREADS=2 (on the CPU it runs two single-thread streams). One warm-up of each,
   then --repeats rounds in alternating order (bench/_repeat.py); the ratios to the one-process case are
   paired per round.
2. Peak memory: the largest resident set (getrusage of the finished child, ru_maxrss) of one process,
   OMP_NUM_THREADS=1, for each of --sizes images, and its ratio to the smallest size's.

The machine's load is printed beside the numbers: timings on a shared machine are inflated.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _repeat import alternate, paired_ratio, spread  # noqa: E402

BIN = Path(sys.executable).parent
KANO, TORCHRUN = str(BIN / "kano"), str(BIN / "torchrun")
# getrusage in a wrapper process: ru_maxrss of RUSAGE_CHILDREN is the largest child it waited for (kilobytes on Linux)
PEAK = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def load() -> str:
    a = os.getloadavg()
    return f"load average {a[0]:.1f} / {a[1]:.1f} / {a[2]:.1f} on {os.cpu_count()} cores"


def make_images(folder: Path, n: int, size: int = 32) -> list[Path]:
    """n random PNGs in folder (those already there are kept)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"{i // 1000:03d}" / f"{i:06d}.png" for i in range(n)]
    t = time.perf_counter()
    for i, p in enumerate(paths):
        if not p.exists():
            p.parent.mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p, compress_level=1)
    print(f"images: {n} in {folder} ({time.perf_counter() - t:.0f} s to make the missing ones)", flush=True)
    return paths


def write_list(paths: list[Path], n: int, where: Path) -> Path:
    f = where / f"list_{n}.txt"
    if not f.exists():
        f.write_text("".join(f"{p}\n" for p in paths[:n]))
    return f


def command(listing: Path, out: Path, procs: int, batch_size: int) -> list[str]:
    args = [KANO, "predict", str(listing), "--class", "part", "--backbone", "tiny", "--image-size", "32", "--no-maps",
            "--no-panels", "--batch-size", str(batch_size), "--device", "cpu", "--out", str(out), "--force"]
    return [TORCHRUN, "--standalone", "--nproc_per_node", str(procs), "--no-python", *args] if procs > 1 else args


def env(threads: int) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    e.update(OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    return e


def run(cmd: list[str], threads: int) -> None:
    p = subprocess.run(cmd, env=env(threads), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "kano_bench_scale")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--images", type=int, default=10000, help="images per throughput run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    a = ap.parse_args()
    paths = make_images(a.dir / "img", max(a.sizes + [a.images]))
    lists = {n: write_list(paths, n, a.dir) for n in sorted(set(a.sizes + [a.images, 8]))}
    work = Path(tempfile.mkdtemp(prefix="kano-bench-scale-"))
    print(f"{load()}; batch size {a.batch_size}; 32 px PNGs; --backbone tiny --image-size 32 --no-maps --no-panels", flush=True)
    try:
        if not a.skip_throughput:
            cases = {"1 process x 1 thread": (1, 1), "2 processes x 1 thread": (2, 1), "1 process x 2 threads": (1, 2)}
            start = {}
            for name, (procs, threads) in cases.items():  # start-up alone: 8 images, the best of 2
                start[name] = min(timed_run(command(lists[8], work / "s", procs, a.batch_size), threads) for _ in range(2))
            times = alternate({name: (lambda c=c: run(command(lists[a.images], work / "t", c[0], a.batch_size), c[1]))
                               for name, c in cases.items()}, repeats=a.repeats)
            print(f"\nthroughput, {a.images} images ({load()}):")
            ref = "1 process x 1 thread"
            for name in cases:
                line = (f"  {name:24s} {spread(times[name])}, {statistics.median(a.images / t for t in times[name]):.0f} images/s "
                        f"(the whole command; its start-up on 8 images: {start[name]:.1f} s)")
                if name != ref:
                    line += f"; speed-up over one process {spread(paired_ratio(times[ref], times[name]), 'x', 2)}"
                print(line, flush=True)
        if a.skip_memory:
            return
        print(f"\npeak memory, one process, OMP_NUM_THREADS=1 ({load()}):")
        first = None
        for n in sorted(a.sizes):
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", PEAK, *command(lists[n], work / f"m{n}", 1, a.batch_size)], env=env(1),
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(f"failed: {p.stderr[-3000:]}")
            mib = int(p.stdout.split()[-1]) / 1024
            first = first or mib
            el = time.perf_counter() - t
            print(f"  {n:7d} images: peak RSS {mib:.0f} MiB ({mib / first:.3f}x of {min(a.sizes)}), {el:.0f} s, {n / el:.0f} images/s "
                  f"whole command", flush=True)
            shutil.rmtree(work / f"m{n}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def timed_run(cmd: list[str], threads: int) -> float:
    t = time.perf_counter()
    run(cmd, threads)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
