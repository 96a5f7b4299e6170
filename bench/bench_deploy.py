"""Deployment throughput: torch eager vs onnxruntime vs OpenVINO on the same images and threads, and `kano serve`
at N concurrent clients and in-process `kano predict --model` on the same images, each with every output (map and
panel) and without them (`outputs=none`, `--no-panels --no-maps`), against the exported model's own throughput
(requests/s, p50/p99 latency); then where one image's time goes (decoding, preprocessing, the model, the map PNG,
the panel, the files predict writes).

    python bench/bench_deploy.py [--backbone micro] [--images 32] [--batch 8] [--threads 1] [--clients 16]
                                 [--requests 64] [--repeats 3]

The model is KAnoCLIP on --backbone with its trainable parts moved off their initial values (seeded), exported
once to ONNX and to OpenVINO IR. Every case is timed in alternating rounds (bench/_repeat.py); ratios are paired
within a round and reported as median (min-max). Throughput images/s = images / seconds of a round.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _repeat import alternate, paired_ratio, spread  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ROOT / "tests" / "data" / "hazelnut_toy" / "test"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="micro")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(a.threads)

    import numpy as np
    import torch

    from kano.anomaly_data.io import image_to_array, list_images, load_image
    from kano.deploy.export import export_model
    from kano.deploy.runtime import ExportedModel
    from kano.evaluator.predict import predict as stream_predict
    from kano.kanoclip import build_backbone, build_model

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = build_model("kanoclip", build_backbone(a.backbone)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    tmp = Path(tempfile.mkdtemp(prefix="kano-bench-deploy-"))
    words = {"hazelnut": "hazelnut"}
    export_model(model, "kanoclip", words, 0.5, tmp / "m.onnx")
    export_model(model, "kanoclip", words, 0.5, tmp / "m.xml", "openvino")
    files = [f for d in sorted(PHOTOS.iterdir()) for f in list_images(d)]
    files = [files[i % len(files)] for i in range(a.images)]
    bb = model.backbone
    x = np.stack([image_to_array(load_image(f), bb.image_size, bb.mean, bb.std) for f in files])
    batches = [(x[i:i + a.batch], np.zeros(len(x[i:i + a.batch]), dtype=np.int64)) for i in range(0, len(x), a.batch)]
    ort_model, ov_model = ExportedModel(tmp / "m.onnx", a.threads), ExportedModel(tmp / "m.xml", a.threads)

    def torch_eager():
        with torch.inference_mode():
            for xb, _ in batches:
                model(torch.from_numpy(xb), ["hazelnut"] * len(xb)).inference()

    cases = {"torch eager": torch_eager,
             "onnxruntime": lambda: [ort_model.score(xb, ib) for xb, ib in batches],
             "openvino": lambda: [ov_model.score(xb, ib) for xb, ib in batches]}
    t = alternate(cases, repeats=a.repeats)
    print(f"# {a.backbone} backbone ({bb.image_size} px), {a.images} images, batch {a.batch}, {a.threads} thread(s), "
          f"{a.repeats} alternating rounds, torch {torch.__version__}")
    for name, xs in t.items():
        print(f"{name:12s} {spread(xs)} per round = {a.images / statistics.median(xs):.1f} images/s")
    r = paired_ratio(t["torch eager"], t["onnxruntime"])
    print(f"onnxruntime speed-up over torch eager: {statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})")
    r = paired_ratio(t["onnxruntime"], t["openvino"])
    print(f"OpenVINO speed-up over onnxruntime:    {statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})")

    # the server at N clients vs in-process predict (same engine, same files written per image: panel, maps)
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kano = str(Path(sys.executable).parent / "kano")
    proc = subprocess.Popen([kano, "serve", "--model", str(tmp / "m.onnx"), "--port", str(port), "--threads", str(a.threads),
                             "--folder", str(tmp / "svc"), "--batch", str(a.batch), "--queue", str(max(64, 2 * a.clients))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        jobs = [files[i % len(files)] for i in range(a.requests)]
        blobs = [(f.name, f.read_bytes()) for f in jobs]
        latencies: list[float] = []
        client = httpx.Client(limits=httpx.Limits(max_connections=a.clients), timeout=120)

        def one(blob, outputs):
            t0 = time.perf_counter()
            r = client.post(url + "/v1/predict", files={"file": (blob[0], blob[1], "image/jpeg" if blob[0].endswith(".jpg") else "image/png")},
                            data={"class": "hazelnut", **({} if outputs is None else {"outputs": outputs})})
            r.raise_for_status()
            if outputs is None:
                latencies.append(time.perf_counter() - t0)

        def served(outputs=None):
            with ThreadPoolExecutor(a.clients) as pool:
                list(pool.map(lambda b: one(b, outputs), blobs))

        rounds = iter(range(10**6))

        def in_process(**outputs):  # the graph loaded once (its session: timed apart below), as a caller predicting often
            stream_predict(ort_model, [str(f) for f in jobs], "hazelnut", tmp / f"pred{next(rounds)}", batch_size=a.batch,
                           **outputs)

        xs = np.stack([x[i % len(x)] for i in range(a.requests)])
        model_only = [(xs[i:i + a.batch], np.zeros(len(xs[i:i + a.batch]), dtype=np.int64)) for i in range(0, len(xs), a.batch)]
        t = alternate({"exported model": lambda: [ort_model.score(xb, ib) for xb, ib in model_only],
                       "server": served, "server, outputs=none": lambda: served("none"),
                       "in-process predict": in_process,
                       "in-process predict --no-panels --no-maps": lambda: in_process(maps=False, panels=False)},
                      repeats=a.repeats)
        client.close()
    finally:
        proc.terminate()
        proc.wait(20)
    print(f"# {a.requests} images: the exported model alone (preprocessed arrays, batch {a.batch}); the server at "
          f"{a.clients} concurrent clients; in-process predict --model; each with and without maps and panels")
    for name, ts in t.items():
        print(f"{name:42s} {spread(ts)} per round = {a.requests / statistics.median(ts):.1f} images/s")
    for name in [n for n in t if n != "exported model"]:
        r = paired_ratio(t["exported model"], t[name])  # throughput of `name` / the model's = the model's time / its time
        print(f"{name} / the exported model: {statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})")
    lat = sorted(latencies[a.requests:])  # the warm-up round's requests dropped
    print(f"server latency at {a.clients} clients (map and panel): p50 {1000 * lat[len(lat) // 2]:.0f} ms, "
          f"p99 {1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]:.0f} ms (n={len(lat)})")
    load = alternate({"load": lambda: ExportedModel(tmp / "m.onnx", a.threads)}, repeats=a.repeats)["load"]
    print(f"loading the graph (an onnxruntime session, once per `kano predict --model`): {spread(load)}")
    stages(ort_model, files, a, tmp)


def stages(model, files, a, tmp: Path) -> None:
    """Where one image's time goes in predict and serve: each step timed alone over the same images (ms per image,
    median of --repeats rounds), the model's share per image of a batch of --batch."""
    import base64
    import io

    import numpy as np

    from kano.anomaly_data.io import load_image
    from kano.evaluator import predict_files as pf
    from kano.evaluator.visualize import map_to_png16, panel

    pics = [load_image(f) for f in files]
    arrays = [model.preprocess(p) for p in pics]
    maps = [m for i in range(0, len(arrays), a.batch)
            for m in model.score(np.stack(arrays[i:i + a.batch]), np.zeros(len(arrays[i:i + a.batch]), dtype=np.int64))[1]]

    def png_b64(image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue())

    (tmp / "stage" / "maps").mkdir(parents=True, exist_ok=True)
    (tmp / "stage" / "panels").mkdir(parents=True, exist_ok=True)
    steps = {
        "decode (load_image)": lambda: [load_image(f) for f in files],
        "preprocess (resize, normalise)": lambda: [model.preprocess(p) for p in pics],
        "the model (batch share)": lambda: [model.score(np.stack(arrays[i:i + a.batch]), np.zeros(len(arrays[i:i + a.batch]), dtype=np.int64))
                                            for i in range(0, len(arrays), a.batch)],
        "serve: map PNG + base64": lambda: [png_b64(map_to_png16(m)) for m in maps],
        "serve: panel PNG + base64": lambda: [png_b64(panel(p, m, name="hazelnut", score=0.5, threshold=0.5)) for p, m in zip(pics, maps)],
        "predict: map files (npy + png)": lambda: [pf.row(tmp / "stage", str(f), "hazelnut", "hazelnut", f"m{i}", 0.5, m, None, 0.5,
                                                          "given", True, False) for i, (f, m) in enumerate(zip(files, maps))],
        "predict: panel file": lambda: [pf.row(tmp / "stage", str(f), "hazelnut", "hazelnut", f"p{i}", 0.5, m, None, 0.5,
                                               "given", False, True) for i, (f, m) in enumerate(zip(files, maps))],
    }
    t = alternate(steps, repeats=a.repeats)
    print(f"# where one image's time goes ({len(files)} images, ms per image, median of {a.repeats} rounds)")
    for name, ts in t.items():
        print(f"{name:34s} {1000 * statistics.median(ts) / len(files):7.2f} ms")


if __name__ == "__main__":
    main()
