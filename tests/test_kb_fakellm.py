"""The knowledge-base build against an OpenAI-compatible server that is not ours: fakellm (PyPI)."""

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from kano.knowledge_store import KnowledgeStore

pytestmark = pytest.mark.slow  # a fakellm server process

DATA = Path(__file__).parent / "data" / "hazelnut_toy"
KEY = "sk-fakellm-SECRET-42"

CONFIG = """
rules:
  - name: first_llm_request_is_rate_limited
    when:
      messages_contain: "abnormal image of class (carpet)"
      turn: 1
    respond:
      status: 429
      error: "rate limited (injected)"
  - name: llm_hazelnut
    when:
      messages_contain: "abnormal image of class (hazelnut)"
    respond:
      content: |
        Here are five descriptions:
        1. A hazelnut with a deep crack running across the brown shell.
        2. A hazelnut with a small round hole bored into its surface.
        3. A hazelnut with bright paint marks on one side.
        4. A hazelnut with a missing piece of shell exposing the kernel.
        5. A hazelnut with a dark mouldy discoloured patch.
  - name: llm_carpet
    when:
      messages_contain: "abnormal image of class (carpet)"
    respond:
      content: |
        - A carpet with a hole where the fibres are missing.
        - A carpet with a stain of a different colour.
        - A carpet with a cut through the woven pattern.
        - A carpet with a loose thread lying on top.
        - A carpet with a shiny metal particle in the fibres.
  - name: vqa
    when:
      messages_contain: "Identify anomalies in the input image"
    respond:
      content: "The hazelnut shows a red painted stain on the right side of the shell, irregular, about a fifth of its width."
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fakellm(tmp_path):
    exe = shutil.which("fakellm") or str(Path(sys.executable).parent / "fakellm")
    if not Path(exe).exists():
        pytest.fail("fakellm must be installed for this test: pip install -e '.[test]'")
    cfg = tmp_path / "fakellm.yaml"
    cfg.write_text(CONFIG)
    port = free_port()
    proc = subprocess.Popen([exe, "serve", "--port", str(port), "--config", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_build_against_fakellm(tmp_path, fakellm, cli, monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", fakellm)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    kb = tmp_path / "kb.duckdb"
    args = ["kb", "build", "--classes", "hazelnut,carpet", "--kb", kb, "--llm", "openai:gpt-3.5-turbo", "--vqa",
            "openai:llama3.2-vision", "--vqa-base-url", fakellm, "--images", f"hazelnut={DATA / 'test' / 'colour'}", "--backoff", "0.05"]
    code, out, err = cli(*args)
    assert code == 0, err
    store = KnowledgeStore(kb)
    for cls in ("hazelnut", "carpet"):
        texts = [d.text for d in store.descriptions(cls, ["llm"])]
        assert len(texts) == 5 and len(set(texts)) == 5
    assert len(store.descriptions("hazelnut", ["vqa"])) == 17
    with duckdb.connect(str(kb), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM calls WHERE status = 'error' AND error LIKE 'HTTP 429%'").fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM calls WHERE status = 'ok' AND input_tokens > 0").fetchone()[0] == 19
    assert KEY.encode() not in kb.read_bytes() and KEY not in out + err
    code, out, _ = cli(*args)  # everything stored: the second run asks nothing
    assert code == 0 and "model calls: 0 made (0 answered, 0 failed and were retried, 0 failed for good), 0 reused" in out
