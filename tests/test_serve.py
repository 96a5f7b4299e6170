"""kano serve as a real process on a loopback port: concurrent clients, bad uploads, a full queue, the page in chromium."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import KANO, wait_until_serving

httpx = pytest.importorskip("httpx", reason="pip install 'kano[serve]' httpx")
pytest.importorskip("fastapi", reason="pip install 'kano[serve]'")
pytest.importorskip("onnxruntime", reason="pip install 'kano[runtime]'")

CLASSES = ["disc", "weave"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def exported(exported_run) -> Path:
    assert CLASSES == ["disc", "weave"]  # the classes conftest's exported_run exports
    return exported_run[0]


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    """(base URL, process, service folder) of `kano serve --model` on a free loopback port."""
    folder = tmp_path_factory.mktemp("service")
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(tmp_path_factory.mktemp("servicelog") / "stdout.txt", "w")  # a line per request: a file never fills up
    proc = subprocess.Popen([KANO, "serve", "--model", str(exported), "--port", str(port), "--folder", str(folder), "--threads", "1"],
                            stdout=log, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, proc)
    yield url, proc, folder
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def images(synth_root: Path) -> list[tuple[Path, str]]:
    return [(p, c) for c in CLASSES for p in sorted((synth_root / c / "test").rglob("*.png"))]


def post(url: str, path: Path | None, cls: str | None, data: bytes | None = None, name: str = "x.png", ctype: str = "image/png",
         client=httpx):
    files = {"file": (name, data if data is not None else path.read_bytes(), ctype)}
    return client.post(url + "/v1/predict", files=files, data={} if cls is None else {"class": cls}, timeout=60)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_200_requests_from_16_clients_match_in_process_predict(server, trained_run, synth_root, tmp_path, cli):
    url, proc, folder = server
    pics = images(synth_root)
    ref = {}
    for c in CLASSES:  # in-process predict of the run itself (torch), per class
        code, _, err = cli("predict", *sorted((synth_root / c / "test").iterdir()), "--class", c, "--run", trained_run,
                           "--out", tmp_path / c)
        assert code == 0, err
        for line in (tmp_path / c / "predictions.jsonl").read_text().splitlines():
            r = json.loads(line)
            ref[(Path(r["image"]).resolve(), c)] = r
    post(url, *pics[0])  # warm-up, so that the memory figure below is the steady state
    before = rss_kb(proc.pid)
    jobs = [pics[i % len(pics)] for i in range(200)]
    with httpx.Client(limits=httpx.Limits(max_connections=16)) as client, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: post(url, *job, client=client), jobs))
    grown_mb = (rss_kb(proc.pid) - before) / 1024
    assert [a.status_code for a in answers] == [200] * 200, [a.text for a in answers if a.status_code != 200][:3]
    for (path, c), a in zip(jobs, answers):
        j, r = a.json(), ref[(path.resolve(), c)]
        assert abs(j["score"] - r["score"]) <= 1e-4 and j["anomalous"] == r["anomalous"] and j["threshold"] == r["threshold"]
        assert j["class"] == c and j["image_size"] == r["image_size"]
    amap = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(io.BytesIO(base64.b64decode(answers[0].json()["map_png"]))))
    assert amap.dtype == np.uint16 and abs(amap.max() / 65535 - ref[(jobs[0][0].resolve(), jobs[0][1])]["map_max"]) < 0.02
    health = httpx.get(url + "/healthz").json()
    assert health["largest_batch"] > 1 and health["batches"] < 200  # requests arriving together shared forward passes
    assert grown_mb < 200, f"the server grew by {grown_mb:.0f} MB over 200 requests"
    assert list((folder / "uploads").iterdir()) == []  # every upload removed after decoding
    print(f"server RSS growth over 200 requests: {grown_mb:.1f} MB; batches {health['batches']}, largest {health['largest_batch']}")


def png_declaring(w: int, h: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.slow
def test_bad_uploads_get_clear_4xx_and_the_service_goes_on(server, synth_root):
    url, proc, folder = server
    good, cls = images(synth_root)[0]
    data = good.read_bytes()
    cases = {
        "truncated PNG": (post(url, None, cls, data[: len(data) // 2]), 400, "truncated"),
        "100000 x 100000 PNG": (post(url, None, cls, png_declaring(100_000, 100_000)), 413, "pixels"),
        "text named .png": (post(url, None, cls, b"just some text\n", name="notes.png"), 400, "readable image"),
        "empty body": (httpx.post(url + "/v1/predict", content=b"", headers={"content-type": "multipart/form-data; boundary=x"}), 400, "empty"),
        "no body at all": (httpx.post(url + "/v1/predict"), 415, "multipart/form-data"),
        "unknown class": (post(url, good, "bottle"), 422, "class must be one of disc, weave, got 'bottle'"),
        "no class": (post(url, good, None), 422, "field class"),
        "text/plain part": (post(url, good, cls, ctype="text/plain"), 415, "must be an image"),
        "50 MB body": (post(url, None, cls, os.urandom(1024) * (50 * 1024)), 413, "at most"),
    }
    for what, (r, status, words) in cases.items():
        assert r.status_code == status, f"{what}: {r.status_code} {r.text[:300]}"
        assert words in r.json()["error"], f"{what}: {r.json()}"
        assert str(folder) not in r.text  # the service's own paths are not shown
    assert httpx.get(url + "/healthz").status_code == 200 and proc.poll() is None
    assert post(url, good, cls).status_code == 200
    assert list((folder / "uploads").iterdir()) == []


@pytest.mark.slow  # needs the exported run (about 25 s for the first test that asks for it)
def test_a_full_queue_answers_503_with_retry_after(exported, synth_root, tmp_path):
    """In-process uvicorn with the real exported model, its forward pass held on an event so the queue fills."""
    from kano.deploy.serve import Limits, Scorer, create_app

    scorer = Scorer.exported(exported, threads=1)
    gate, entered = threading.Event(), threading.Event()
    real = scorer.score

    def held(x, idx):
        entered.set()
        gate.wait(30)
        return real(x, idx)

    scorer.score = held
    app = create_app(scorer, tmp_path / "svc", Limits(queue_length=2, batch=1, batch_wait_ms=1, timeout_s=60))
    good, cls = images(synth_root)[0]
    with in_thread(app) as url, ThreadPoolExecutor(4) as pool:
        try:
            first = pool.submit(post, url, good, cls)
            assert entered.wait(30)                       # the worker holds image 1
            queued = [pool.submit(post, url, good, cls) for _ in range(2)]
            deadline = time.monotonic() + 30
            while httpx.get(url + "/healthz").json()["queue"] < 2:  # images 2 and 3 wait in the queue
                assert time.monotonic() < deadline
                time.sleep(0.05)
            refused = post(url, good, cls)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "queue is full (2 images waiting)" in refused.json()["error"]
            gate.set()
            assert [f.result().status_code for f in [first, *queued]] == [200, 200, 200]
        finally:
            gate.set()


@contextlib.contextmanager
def in_thread(app):
    """uvicorn serving `app` on a free loopback port in a thread of this process -> its base URL."""
    import uvicorn

    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{srv.config.port}"
    finally:
        srv.should_exit = True
        t.join(10)


def test_serve_run_scores_with_the_torch_model_like_predict(trained_run, synth_root, tmp_path, cli):
    from kano.deploy.serve import Scorer, create_app

    scorer = Scorer.torch_run(trained_run)
    assert scorer.classes == ["disc", "weave"]
    good = sorted((synth_root / "weave" / "test" / "hole").iterdir())
    code, _, err = cli("predict", good[0].parent, "--class", "weave", "--run", trained_run, "--out", tmp_path / "p")
    assert code == 0, err
    ref = [json.loads(line) for line in (tmp_path / "p" / "predictions.jsonl").read_text().splitlines()]
    with in_thread(create_app(scorer, tmp_path / "svc")) as url:
        got = [post(url, f, "weave").json() for f in good]
    assert all(abs(g["score"] - r["score"]) <= 1e-6 for g, r in zip(got, ref)) and len(got) == len(ref)  # the answer has 6 digits
    assert [g["anomalous"] for g in got] == [r["anomalous"] for r in ref]


def test_serve_binds_loopback_unless_told(tmp_path, cli):
    code, _, err = cli("serve", "--model", tmp_path / "m.onnx", "--host", "0.0.0.0")
    assert code == 2 and "--public" in err
    code, _, err = cli("serve", "--model", tmp_path / "m.onnx", "--run", tmp_path)
    assert code == 2 and "exactly one of --run" in err
    code, _, err = cli("serve", "--model", tmp_path / "m.onnx", "--queue", "0")
    assert code == 2 and "--queue must be > 0, got 0" in err


# ------------------------------------------------------------------------------------------- the page, in chromium

def cdp_session(chromium: str, profile: Path):
    """A headless chromium and a DevTools connection to its page -> (process, call(method, **params), events list)."""
    from websockets.sync.client import connect

    proc = subprocess.Popen([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not (port_file.is_file() and port_file.read_text().strip()):
        assert time.monotonic() < deadline and proc.poll() is None, "chromium did not open its DevTools port"
        time.sleep(0.1)
    port = int(port_file.read_text().split()[0])
    pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page"]
    ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
    events: list[dict] = []
    counter = iter(range(1, 10**6))

    def call(method: str, **params):
        i = next(counter)
        ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(ws.recv(timeout=60))
            if msg.get("id") == i:
                assert "error" not in msg, msg
                return msg["result"]
            events.append(msg)

    return proc, ws, call, events


@pytest.mark.slow
def test_page_uploads_through_the_file_input_and_shows_decision_and_panel(server, synth_root, tmp_path):
    from browser import require_chromium

    chromium = require_chromium()
    url, _, _ = server
    good, cls = images(synth_root)[0]  # class disc: the page's first option
    expected = post(url, good, cls).json()
    proc, ws, call, events = cdp_session(chromium, tmp_path / "profile")
    try:
        for domain in ("Runtime", "Log", "Page", "DOM"):
            call(f"{domain}.enable")
        call("Page.navigate", url=url + "/")
        deadline = time.monotonic() + 60
        while not any(e.get("method") == "Page.loadEventFired" for e in events):
            assert time.monotonic() < deadline
            call("Runtime.evaluate", expression="1")
        root = call("DOM.getDocument")["root"]["nodeId"]
        node = call("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
        call("DOM.setFileInputFiles", nodeId=node, files=[str(good.resolve())])
        probe = ("JSON.stringify({d: (document.querySelector('.decision') || {}).textContent || null, "
                 "w: (document.querySelector('img.panel') || {}).naturalWidth || 0, t: document.getElementById('results').innerText})")
        while True:
            seen = json.loads(call("Runtime.evaluate", expression=probe, returnByValue=True)["result"]["value"])
            if seen["d"] and seen["w"] > 0:
                break
            assert time.monotonic() < deadline, seen
            time.sleep(0.2)
    finally:
        ws.close()
        proc.terminate()
        proc.wait(20)
    assert seen["d"] == ("ANOMALOUS" if expected["anomalous"] else "normal")
    assert f"score {expected['score']:.3f}" in seen["t"] and good.name in seen["t"]
    assert seen["w"] > 400  # the panel: image, map, overlay and colour bar side by side
    errors = [e for e in events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert errors == [], errors


def test_an_answer_carries_the_outputs_asked_for(synth_root, tmp_path):
    """The request field `outputs`: map and panel by default, either alone, or none (the score alone); anything
    else is a 422 naming the choices. The scorer is a plain inference interface (score = the mean of the first channel)."""
    from kano.deploy.serve import Scorer, create_app
    from kano.evaluator.inference import FileScoring, Inferencer

    class Mean(FileScoring):
        image_size = 32

        def describe(self):
            return {"kind": "zero-parameter", "name": "mean"}

        def check_class(self, c):
            pass

        def class_word(self, c):
            return c

        def threshold_for(self, c, word=None):
            return 0.5, "command line"

        def pixel_threshold_for(self, c, word=None):
            return None, None

        def preprocess(self, img):
            return np.asarray(img.convert("RGB").resize((32, 32)), np.float32).transpose(2, 0, 1) / 255

        def score(self, x, classes, words=None):
            return x[:, 0].mean((1, 2)), x[:, 0]

    assert isinstance(Mean(), Inferencer)
    scorer = Scorer(Mean(), ["disc"])
    good = images(synth_root)[0][0]
    with in_thread(create_app(scorer, tmp_path / "svc")) as url:
        def ask(outputs):
            data = {"class": "disc"} | ({} if outputs is None else {"outputs": outputs})
            return httpx.post(url + "/v1/predict", files={"file": ("x.png", good.read_bytes(), "image/png")}, data=data, timeout=60)

        keys = {o: set(ask(o).json()) for o in (None, "map", "panel", "none", "")}
        assert {"map_png", "panel_png"} <= keys[None] and "panel_png" not in keys["map"] and "map_png" not in keys["panel"]
        assert not {"map_png", "panel_png", "map_size"} & (keys["none"] | keys[""]) and "score" in keys["none"]
        bad = ask("heatmap")
        assert bad.status_code == 422 and "outputs must be a comma-separated list of map, panel (or none)" in bad.json()["error"]
