"""`kano serve`: an HTTP service on FastAPI + uvicorn (`pip install 'kano[serve]'`).

    POST /v1/predict   multipart: file (the image), class (its class name), optional outputs (comma-separated of
                       map, panel; default "map,panel"; "none": the score alone) -> JSON: score, anomalous, threshold
                       (the class's), class, image_size, latency_ms, and as asked: map_png (base64 PNG, 16-bit grey,
                       65535 = 1.0, at the model's S x S), panel_png (base64 PNG: the labelled panel of `kano predict`)
    GET  /healthz      {"status": "ok", "classes", "method", "queue": length now, "limits"}
    GET  /             a page: drop images, pick a class, see the panel and the decision

Requests that arrive together are scored together: one worker thread takes up to `batch` queued images, or
whatever is queued after waiting at most `batch_wait_ms` for the first, and runs them as one batch. Limits
(Limits below; each refusal is a 4xx or 503 JSON {"error": "..."}): upload size (413), pixel count
($KANO_MAX_PIXELS, anomaly_data.io: 413), content type (415), unreadable image (400), unknown class (422),
queue length (503 with Retry-After), request timeout (504). Uploads are written into the service's own
folder (FOLDER/uploads, a random name each, deleted after decoding), never under a name from the request.

Scoring: through the one inference interface (kano.evaluator.inference.Inferencer, wrapped by Scorer): the
exported graph (kano.deploy.runtime; no torch) with --model, or the run's torch model (kano.evaluator.detector)
with --run. create_app is built in steps: start, add_request_log, add_error_answers, add_pages, add_predict.
The server is bound to 127.0.0.1 unless --host names another address and --public says so.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request) at definition time
import base64
import io
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kano.core.errors import KanoError

LOOPBACK = ("127.0.0.1", "::1", "localhost")
IMAGE_TYPES = {"image/png": ".png", "image/jpeg": ".jpg", "image/bmp": ".bmp", "image/tiff": ".tif", "image/webp": ".webp"}
OUTPUTS = ("map", "panel")  # what an answer may carry besides the score; each costs time (docs/deploy.md)


def parse_outputs(value: str | None) -> tuple[str, ...]:
    """The request's `outputs` field -> the outputs asked for (default: all; "none" or "": the score alone)."""
    if value is None:
        return OUTPUTS
    asked = tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip() and v.strip() != "none"))
    bad = [v for v in asked if v not in OUTPUTS]
    if bad:
        raise HTTPError(422, f"outputs must be a comma-separated list of {', '.join(OUTPUTS)} (or none), got {value!r}")
    return asked


@dataclass
class Limits:
    """What one request may ask of the service. Defaults: an 8-megapixel photo as PNG is about 20 MB."""

    max_upload_bytes: int = 20 * 1024 * 1024  # a 20 MB body (larger bodies: 413 before they are read in full)
    queue_length: int = 64                    # images waiting for the worker; more: 503 + Retry-After
    timeout_s: float = 30.0                   # from arrival to answer; past it: 504
    batch: int = 8                            # images per forward pass
    batch_wait_ms: float = 5.0                # how long the worker waits for a batch to fill

    def __post_init__(self):
        for k, v in asdict(self).items():
            if not v > 0:
                raise KanoError(f"{LIMIT_FLAGS[k]} must be > 0, got {v}")


# the `kano serve` option of each limit, for messages
LIMIT_FLAGS = {"max_upload_bytes": "--max-upload-mb", "queue_length": "--queue", "timeout_s": "--timeout", "batch": "--batch",
               "batch_wait_ms": "--batch-wait-ms"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclass
class Scorer:
    """What the service scores with: an inference interface (kano.evaluator.inference.Inferencer: the exported graph
    or the torch model) and the classes the service accepts, their thresholds read once. score: (images (N, 3, S, S),
    class_index (N,) into `classes`) -> (image_score (N,), anomaly_map (N, S, S))."""

    inferencer: object
    classes: list

    def __post_init__(self):
        inf = self.inferencer
        self.classes = list(self.classes)
        for c in self.classes:
            inf.check_class(c)
        self.image_size = inf.image_size
        self.method = inf.describe()
        self.thresholds = {c: inf.threshold_for(c)[0] for c in self.classes}
        self.pixel_thresholds = {c: inf.pixel_threshold_for(c)[0] for c in self.classes}

    def preprocess(self, image) -> np.ndarray:
        return self.inferencer.preprocess(image)

    def score(self, x: np.ndarray, idx) -> tuple[np.ndarray, np.ndarray]:
        return self.inferencer.score(x, [self.classes[i] for i in np.asarray(idx).tolist()])

    @staticmethod
    def exported(model_path: str | Path, threads: int | None = None, classes: list[str] | None = None) -> "Scorer":
        """An exported graph (kano.deploy.runtime); classes: the exported classes the service accepts (default: all)."""
        from .runtime import ExportedModel

        m = ExportedModel(model_path, threads)
        unknown = [c for c in classes or [] if c not in m.classes]
        if unknown:
            raise KanoError(f"--classes must be among the exported classes {', '.join(m.classes)}, got {', '.join(unknown)}")
        return Scorer(m, classes or list(m.classes))

    @staticmethod
    def torch_run(run: str | Path, classes: list[str] | None = None, calibration: str | None = None,
                  threads: int | None = None) -> "Scorer":
        """A trained run scored by its torch model (CPU), words and thresholds as `kano predict --run` resolves
        them (kano.evaluator.detector.Detector, the API's); classes: the names the service accepts (default: the run's
        classes); threads: torch's intra-op threads (default: torch's own)."""
        import torch

        if threads is not None:
            if threads < 1:
                raise KanoError(f"--threads must be an integer >= 1, got {threads}")
            torch.set_num_threads(threads)

        from kano.evaluator.detector import Detector

        det = Detector.load(run, device="cpu", calibration=calibration)
        names = classes or sorted(det.run_words)
        if not names:
            raise KanoError(f"kano serve --run {run} needs --classes a,b (the run names no classes)")
        return Scorer(det, names)


class Batcher:
    """A bounded queue and one worker thread that scores up to `batch` images per call."""

    def __init__(self, scorer: Scorer, limits: Limits):
        self.scorer, self.limits = scorer, limits
        self.q: queue.Queue = queue.Queue(maxsize=limits.queue_length)
        self.n_batches, self.largest = 0, 0  # batches run and the largest (/healthz reports them)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="kano-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, x: np.ndarray, idx: int) -> Future:
        fut: Future = Future()
        try:
            self.q.put_nowait((x, idx, fut, time.monotonic()))
        except queue.Full:
            raise HTTPError(503, f"the queue is full ({self.limits.queue_length} images waiting); retry later",
                            {"Retry-After": "1"}) from None
        return fut

    def _work(self) -> None:
        lim = self.limits
        while not self._stop.is_set():
            try:
                items = [self.q.get(timeout=0.2)]
            except queue.Empty:
                continue
            deadline = time.monotonic() + lim.batch_wait_ms / 1000
            while len(items) < lim.batch:
                left = deadline - time.monotonic()
                try:
                    items.append(self.q.get(timeout=left) if left > 0 else self.q.get_nowait())
                except queue.Empty:
                    break
            now = time.monotonic()
            live = [it for it in items if now - it[3] < lim.timeout_s and it[2].set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                s, m = self.scorer.score(np.stack([it[0] for it in live]), np.array([it[1] for it in live], dtype=np.int64))
                self.n_batches, self.largest = self.n_batches + 1, max(self.largest, len(live))
                for k, it in enumerate(live):
                    it[2].set_result((float(s[k]), m[k]))
            except Exception as exc:  # one failed batch answers its requests with 500, the worker goes on
                for it in live:
                    it[2].set_exception(exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def _png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _shown_name(filename: str | None) -> str | None:
    """The upload's own file name as the panel's title shows it: the last path part, printable, at most 80
    characters (it is shown, never used as a path)."""
    if not filename:
        return None
    name = "".join(ch for ch in filename.replace("\\", "/").rsplit("/", 1)[-1] if ch.isprintable())[:80]
    return name or None


def _log_line(method: str, path: str, status: int, ms: float, client: str | None, note: str | None) -> str:
    """One request's line in the service's log: when, who, what, the answer and how long it took."""
    import datetime as _dt

    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return f"{when} {client or '-'} {method} {path} {status} {ms:.0f} ms" + (f" {note}" if note else "")


@dataclass
class Service:
    """What the application's steps share: the scorer, the limits, the upload folder, the worker, the log."""

    scorer: Scorer
    limits: Limits
    uploads: Path
    batcher: Batcher
    pixel_limit: int
    log: Callable[[str], None]


def create_app(scorer: Scorer, folder: str | Path, limits: Limits | None = None, log: Callable[[str], None] | None = None):
    """The FastAPI application: the service started, then its request log, its error answers, its pages and its
    scoring endpoint, each added by a step below. folder: the service's own folder (uploads are decoded there).
    log: where each request's line goes (default: standard output, flushed at once)."""
    FastAPI = _fastapi()
    svc = start(scorer, Path(folder), limits or Limits(), log or (lambda line: print(line, flush=True)))
    app = FastAPI(title="Kano", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher = svc.batcher
    app.router.add_event_handler("shutdown", svc.batcher.close)
    add_request_log(app, svc)
    add_error_answers(app)
    add_pages(app, svc)
    add_predict(app, svc)
    return app


def _fastapi():
    try:
        from fastapi import FastAPI
    except ImportError:
        raise KanoError("kano serve needs FastAPI and uvicorn: pip install 'kano[serve]'") from None
    return FastAPI


def start(scorer: Scorer, folder: Path, limits: Limits, log: Callable[[str], None]) -> Service:
    """The upload folder made and the worker thread started."""
    from kano.anomaly_data.io import max_pixels

    uploads = folder / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    return Service(scorer, limits, uploads, Batcher(scorer, limits), max_pixels(), log)


def add_request_log(app, svc: Service) -> None:
    """One line per request (_log_line), whatever its answer: a plain ASGI middleware (Starlette's
    BaseHTTPMiddleware costs a task group and a stream per request, about a millisecond of the event loop's time)."""

    class RequestLog:
        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            t0 = time.monotonic()
            status = [500]  # an exception before the answer started: ServerErrorMiddleware answers 500 outside

            async def sent(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await self.inner(scope, receive, sent)
            finally:
                client = scope.get("client")
                svc.log(_log_line(scope["method"], scope["path"], status[0], 1000 * (time.monotonic() - t0),
                                  client[0] if client else None, (scope.get("state") or {}).get("note")))

    app.add_middleware(RequestLog)


def add_error_answers(app) -> None:
    """An HTTPError raised anywhere answers JSON {"error": ...} with its status and headers."""
    from fastapi.responses import JSONResponse

    @app.exception_handler(HTTPError)
    async def _http_error(request, exc: HTTPError):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


def add_pages(app, svc: Service) -> None:
    """GET /healthz (the service's state) and GET / (the page to drop images on)."""
    from fastapi.responses import HTMLResponse

    scorer, batcher = svc.scorer, svc.batcher

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "method": scorer.method, "classes": scorer.classes, "thresholds": scorer.thresholds,
                "queue": batcher.q.qsize(), "batches": batcher.n_batches, "largest_batch": batcher.largest,
                "limits": {**asdict(svc.limits), "max_pixels": svc.pixel_limit}}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.replace("__CLASSES__", "".join(f"<option>{_esc(c)}</option>" for c in scorer.classes))


def add_predict(app, svc: Service) -> None:
    """POST /v1/predict: read the form, check the class, decode and preprocess (a thread), score (the worker's
    batch), draw what was asked (a thread), answer."""
    import asyncio

    from fastapi import Request
    from fastapi.responses import JSONResponse

    scorer, limits = svc.scorer, svc.limits

    @app.post("/v1/predict")
    async def predict(request: Request):
        t0 = time.monotonic()
        data, ctype, cls, filename, outputs = await read_form(request, svc)
        request.state.note = f"class {cls!r} file {filename!r}"
        check_class(scorer, cls)
        loop = asyncio.get_running_loop()
        img, x = await loop.run_in_executor(None, decode_and_preprocess, svc, data, ctype)
        fut = svc.batcher.submit(x, scorer.classes.index(cls))
        try:
            score, amap = await asyncio.wait_for(asyncio.wrap_future(fut), timeout=max(0.01, limits.timeout_s - (time.monotonic() - t0)))
        except asyncio.TimeoutError:
            fut.cancel()
            raise HTTPError(504, f"the request took longer than the service's timeout of {limits.timeout_s:g} s") from None
        thr = scorer.thresholds.get(cls)
        drawn = await loop.run_in_executor(None, draw, scorer, outputs, img, amap, cls, filename, score) if outputs else {}
        return JSONResponse({"class": cls, "score": round(score, 6), "anomalous": None if thr is None else bool(score >= thr),
                             "threshold": thr, "image_size": list(img.size), **drawn,
                             "latency_ms": round(1000 * (time.monotonic() - t0), 1)})


async def read_form(request, svc: Service) -> tuple[bytes, str, str, str | None, tuple[str, ...]]:
    """-> (file bytes, content type, class, the upload's file name to show, outputs asked for); refuses before
    reading more than the upload limit."""
    limits, scorer = svc.limits, svc.scorer
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise HTTPError(415, f"the request must be multipart/form-data with fields file and class, got content type {ctype or 'none'!r}")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_upload_bytes + 64 * 1024:
        raise HTTPError(413, f"the upload must be at most {limits.max_upload_bytes:,} bytes, got {int(declared):,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.max_upload_bytes + 64 * 1024:  # the form's own fields and boundaries: < 64 KB
            raise HTTPError(413, f"the upload must be at most {limits.max_upload_bytes:,} bytes, got more")
    if not body:
        raise HTTPError(400, "the request body is empty: send multipart/form-data with fields file (an image) and class")
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def one():
        yield bytes(body)

    try:
        form = await MultiPartParser(request.headers, one(), max_files=1, max_fields=4, max_part_size=1024).parse()
    except MultiPartException as exc:
        raise HTTPError(400, f"the body must be multipart/form-data with fields file and class, got {exc.message}") from None
    f, cls = form.get("file"), form.get("class")
    if not isinstance(f, UploadFile):
        raise HTTPError(400, "the form must have a field file holding the image, got none")
    if not isinstance(cls, str) or not cls:
        raise HTTPError(422, f"the form must have a field class, one of {', '.join(scorer.classes)}, got none")
    data = await f.read()
    if not data:
        raise HTTPError(400, "the file field must hold an image, got an empty file")
    asked = form.get("outputs")
    return data, (f.content_type or ""), cls, _shown_name(f.filename), parse_outputs(asked if isinstance(asked, str) else None)


def check_class(scorer: Scorer, cls: str) -> None:
    """422 for a class the service does not accept, with the nearest one it does."""
    if cls not in scorer.classes:
        from kano.anomaly_data.names import closest

        meant = closest(cls, scorer.classes)
        raise HTTPError(422, f"class must be one of {', '.join(scorer.classes)}, got {cls!r}"
                        + (f"; did you mean {meant!r}?" if meant else ""))


def decode_and_preprocess(svc: Service, data: bytes, ctype: str):
    """bytes -> (PIL RGB through anomaly_data.io.load_image, its checks: format, truncation, pixel limit; the
    scorer's (3, S, S) array), in one worker thread."""
    from kano.anomaly_data.io import _open as io_open
    from kano.anomaly_data.io import load_image

    ext = IMAGE_TYPES.get(ctype.split(";")[0].strip().lower())
    if ext is None:
        raise HTTPError(415, f"the file must be an image ({', '.join(IMAGE_TYPES)}), got content type {ctype or 'none'!r}")
    path = svc.uploads / f"{uuid.uuid4().hex}{ext}"  # our name, in our folder: nothing from the request reaches the path

    def clean(exc: KanoError) -> str:  # the service's own paths stay out of its answers
        return str(exc).replace(f"image {path}", "the uploaded image").replace(str(path), "the uploaded file")

    try:
        path.write_bytes(data)
        try:  # the header alone, with the pixel limit checked first (anomaly_data.io's own opening step)
            io_open(path, "image", svc.pixel_limit)[0].close()
        except KanoError as exc:
            raise HTTPError(413, clean(exc)) from None
        except Exception:  # unreadable: load_image names what is wrong (400 below)
            pass
        try:
            img = load_image(path, svc.pixel_limit)
        except KanoError as exc:
            raise HTTPError(400, clean(exc)) from None
    finally:
        path.unlink(missing_ok=True)
    return img, svc.scorer.preprocess(img)


def draw(scorer: Scorer, outputs: tuple[str, ...], img, amap: np.ndarray, cls: str, filename: str | None, score: float) -> dict:
    """The answer's map (base64 16-bit PNG at S x S) and panel (base64 PNG: `kano predict`'s panel), as asked."""
    from kano.evaluator.visualize import map_to_png16, panel

    out = {}
    if "map" in outputs:
        out.update(map_size=list(amap.shape[::-1]), map_png=_png_b64(map_to_png16(amap)))
    if "panel" in outputs:
        title = f"{cls} / {filename}" if filename else cls  # as `kano predict` titles its panels
        out["panel_png"] = _png_b64(panel(img, amap, name=title, score=score, threshold=scorer.thresholds.get(cls),
                                          pixel_threshold=(scorer.pixel_thresholds or {}).get(cls)))
    return out


def _esc(s: str) -> str:
    import html

    return html.escape(str(s), quote=True)


def serve(*, run: str | None, model: str | None, host: str = "127.0.0.1", port: int = 8000, public: bool = False,
          folder: str | None = None, classes: list[str] | None = None, limits: Limits | None = None,
          threads: int | None = None, calibration: str | None = None) -> None:
    """Run the service until interrupted (uvicorn, one process). calibration: with --run, a calibration file of
    the run's mode (default RUN/calibration.json)."""
    if bool(run) == bool(model):
        raise KanoError("kano serve needs exactly one of --run RUN (torch) or --model PATH (an exported .onnx / .xml)")
    if host not in LOOPBACK and not public:
        raise KanoError(f"--host {host} would serve beyond this machine: add --public to mean it (default host: 127.0.0.1)")
    if not 0 < port < 65536:
        raise KanoError(f"--port must be in 1..65535, got {port}")
    try:
        import uvicorn
    except ImportError:
        raise KanoError("kano serve needs FastAPI and uvicorn: pip install 'kano[serve]'") from None
    if calibration and model:
        raise KanoError(f"--calibration goes with --run (an exported --model carries the thresholds it was exported with), "
                        f"got --model {model} --calibration {calibration}")
    scorer = Scorer.exported(model, threads, classes) if model else Scorer.torch_run(run, classes, calibration, threads)
    made = folder is None  # a folder the service made is the service's to remove; one it was given is not
    folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="kano-serve-"))
    # uvicorn stops gracefully on SIGTERM, then raises the signal again under the handler found at start: this one
    # turns it into an exception, so that the folder below is removed (the default action ends the process at once)
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if previous is not None:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        app = create_app(scorer, folder, limits)
        print(f"kano serve: http://{host}:{port}/  (classes {', '.join(scorer.classes)}; folder {folder}); one line per request "
              "follows", flush=True)
        uvicorn.run(app, host=host, port=port, log_level=os.environ.get("KANO_SERVE_LOG", "warning"),
                    limit_concurrency=(limits or Limits()).queue_length * 4)
    except _Terminated:
        pass
    finally:
        if made:
            shutil.rmtree(folder, ignore_errors=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class _Terminated(Exception):
    """SIGTERM reached `kano serve` after uvicorn's graceful stop."""


def _terminated(signum, frame):
    raise _Terminated()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Kano</title><link rel="icon" href="data:,">
<style>
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}
#drop{border:2px dashed #888;border-radius:8px;padding:2em;text-align:center;color:#555}
#drop.over{background:#eef}
.res{margin:1em 0;padding:.5em;border-bottom:1px solid #ddd}
.yes{color:#c00;font-weight:bold}.no{color:#082;font-weight:bold}.err{color:#a40}
img.panel{max-width:100%}
</style></head><body>
<h1>Kano anomaly detection</h1>
<p>Class: <select id="cls">__CLASSES__</select></p>
<div id="drop">Drop images here, or <input type="file" id="file" accept="image/*" multiple></div>
<div id="results"></div>
<script>
"use strict";
const results = document.getElementById("results");
async function send(file) {
  const box = document.createElement("div");
  box.className = "res";
  box.textContent = file.name + ": scoring...";
  results.prepend(box);
  const form = new FormData();
  form.append("file", file);
  form.append("class", document.getElementById("cls").value);
  try {
    const r = await fetch("/v1/predict", {method: "POST", body: form});
    const j = await r.json();
    box.textContent = "";
    const head = document.createElement("div");
    if (!r.ok) { head.className = "err"; head.textContent = file.name + ": " + j.error; box.append(head); return; }
    const dec = document.createElement("span");
    dec.className = "decision " + (j.anomalous ? "yes" : "no");
    dec.textContent = j.anomalous === null ? "no threshold" : (j.anomalous ? "ANOMALOUS" : "normal");
    head.append(file.name + ": score " + j.score.toFixed(3) + (j.threshold === null ? "" : " (threshold " + j.threshold.toFixed(3) + "): "), dec);
    const img = document.createElement("img");
    img.className = "panel";
    img.alt = "panel of " + file.name;
    img.src = "data:image/png;base64," + j.panel_png;
    box.append(head, img);
  } catch (e) { box.className = "res err"; box.textContent = file.name + ": " + e; }
}
document.getElementById("file").addEventListener("change", e => { for (const f of e.target.files) send(f); });
const drop = document.getElementById("drop");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => { e.preventDefault(); drop.classList.remove("over"); for (const f of e.dataTransfer.files) send(f); });
</script></body></html>
"""
