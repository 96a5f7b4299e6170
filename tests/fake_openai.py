"""A scripted loopback server speaking the OpenAI chat-completions API (text and vision), for tests.

Behaviours are queued per request kind ("llm" = text only, "vqa" = with an image):
  "ok"        a good answer (numbered list for llm, one paragraph for vqa)
  "429"/"500" that HTTP status with an OpenAI-style error body
  "malformed" HTTP 200 with a body that is not a chat completion
  "refuse"    a polite refusal
  "empty"     an empty message
  "slow"      sleeps `slow_s` before answering (client timeouts)
  "trickle"   a good answer sent one byte every `trickle_s` seconds (a per-read timeout never fires)
  "401echo"   HTTP 401 whose message echoes the bearer token it was sent (as some servers do)
  "four"      (llm) always the same four descriptions, whatever was asked
When a kind's queue is empty, `default[kind]` ("ok" unless set) answers.
Every request body and its headers are recorded.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


class FakeOpenAI:
    def __init__(self, slow_s: float = 5.0, delay_s: float = 0.0, trickle_s: float = 0.2):
        self.default = {"llm": "ok", "vqa": "ok"}
        self.trickle_s = trickle_s
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.images: list[tuple[int, int]] = []
        self.script: dict[str, deque] = {"llm": deque(), "vqa": deque()}
        self.slow_s, self.delay_s = slow_s, delay_s
        self.counter = itertools.count(1)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                status, payload = server.handle(self.path, body, {k.lower(): v for k, v in self.headers.items()})
                trickle = isinstance(payload, tuple)
                if trickle:
                    payload = payload[1]
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if not trickle:
                        self.wfile.write(data)
                        return
                    for i in range(len(data)):
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                        time.sleep(server.trickle_s)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def queue(self, kind: str, *behaviours: str) -> None:
        self.script[kind].extend(behaviours)

    def calls(self, kind: str | None = None) -> list[dict]:
        return [r for r in self.requests if kind is None or _kind(r) == kind]

    def handle(self, path: str, body: dict, headers: dict):
        if not path.endswith("/chat/completions"):
            return 404, {"error": {"message": f"no route {path}", "type": "not_found"}}
        kind = _kind(body)
        with self.lock:
            self.requests.append(body)
            self.headers.append(headers)
            behaviour = self.script[kind].popleft() if self.script[kind] else self.default[kind]
            n = next(self.counter)
        if self.delay_s:
            time.sleep(self.delay_s)
        text = _text(body)
        if kind == "vqa":
            url = body["messages"][0]["content"][1]["image_url"]["url"]
            raw = base64.b64decode(url.split(",", 1)[1])
            with Image.open(io.BytesIO(raw)) as im:
                im.load()
                with self.lock:
                    self.images.append(im.size)
        if behaviour in ("429", "500"):
            return int(behaviour), {"error": {"message": f"injected {behaviour}", "type": "server_error", "code": behaviour}}
        if behaviour == "401echo":
            token = headers.get("authorization", "").removeprefix("Bearer ")
            return 401, {"error": {"message": f"Incorrect API key provided: {token}. You can find your key at ...",
                                   "type": "invalid_request_error", "code": "invalid_api_key"}}
        if behaviour == "malformed":
            return 200, b'{"this is": "not a chat completion"'
        if behaviour == "slow":
            time.sleep(self.slow_s)
        cls = (re.search(r"class \(([^)]*)\)", text) or re.search(r"class \(([^)]*)\)", text)).group(1)
        if behaviour == "refuse":
            content = "I'm sorry, but I can't help with that request."
        elif behaviour == "empty":
            content = ""
        elif kind == "llm" and behaviour == "four":
            content = "\n".join(f"{i + 1}. An abnormal {cls} shows the same fixed defect number {i} every time." for i in range(4))
        elif kind == "llm":
            k = int((re.search(r"Give (\d+) different", text) or [0, 5])[1])
            content = "Here are the descriptions:\n" + "\n".join(
                f"{i + 1}. An abnormal {cls} shows defect pattern number {n}-{i} with an irregular dark region." for i in range(k))
        else:
            content = f"The {cls} has a small irregular dark spot near the upper left, about 5% of the area, reply {n}."
        reply = {
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()), "model": body["model"] + "-served",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20 + len(text) // 4, "completion_tokens": 10 + len(content) // 4,
                      "total_tokens": 30 + (len(text) + len(content)) // 4},
        }
        return 200, (("trickle", reply) if behaviour == "trickle" else reply)


def _kind(body: dict) -> str:
    content = body["messages"][0]["content"]
    return "vqa" if isinstance(content, list) and any(p.get("type") == "image_url" for p in content) else "llm"


def _text(body: dict) -> str:
    content = body["messages"][0]["content"]
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if p.get("type") == "text")


if __name__ == "__main__":  # a standalone server for the kill-and-rerun test
    import sys

    srv = FakeOpenAI(delay_s=float(sys.argv[1]) if len(sys.argv) > 1 else 0.0)
    for kind_behaviour in sys.argv[2:]:  # e.g. llm=401echo: that kind's default behaviour
        k, _, b = kind_behaviour.partition("=")
        srv.default[k] = b
    with srv:
        print(srv.url, flush=True)
        while True:
            time.sleep(1)
