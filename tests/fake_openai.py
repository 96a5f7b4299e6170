"""A scripted loopback server speaking the OpenAI chat-completions API (text and vision), for tests.

Behaviours are queued per request kind ("llm" = text only, "vqa" = with an image):
  "ok"        a good answer (numbered list for llm, one paragraph for vqa)
  "429"/"500" that HTTP status with an OpenAI-style error body
  "malformed" HTTP 200 with a body that is not a chat completion
  "refuse"    a polite refusal
  "empty"     an empty message
  "slow"      sleeps `slow_s` before answering (client timeouts)
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
    def __init__(self, slow_s: float = 5.0, delay_s: float = 0.0):
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
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
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
            behaviour = self.script[kind].popleft() if self.script[kind] else "ok"
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
        if behaviour == "malformed":
            return 200, b'{"this is": "not a chat completion"'
        if behaviour == "slow":
            time.sleep(self.slow_s)
        cls = (re.search(r"class \(([^)]*)\)", text) or re.search(r"class \(([^)]*)\)", text)).group(1)
        if behaviour == "refuse":
            content = "I'm sorry, but I can't help with that request."
        elif behaviour == "empty":
            content = ""
        elif kind == "llm":
            k = int((re.search(r"Give (\d+) different", text) or [0, 5])[1])
            content = "Here are the descriptions:\n" + "\n".join(
                f"{i + 1}. An abnormal {cls} shows defect pattern number {n}-{i} with an irregular dark region." for i in range(k))
        else:
            content = f"The {cls} has a small irregular dark spot near the upper left, about 5% of the area, reply {n}."
        return 200, {
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()), "model": body["model"] + "-served",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 20 + len(text) // 4, "completion_tokens": 10 + len(content) // 4,
                      "total_tokens": 30 + (len(text) + len(content)) // 4},
        }


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
    with srv:
        print(srv.url, flush=True)
        while True:
            time.sleep(1)
