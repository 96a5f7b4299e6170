"""The KB file and other clients: DuckDB 1.1 opens it under any name, and training
reads it while another process has it open read-only."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from kano.knowledge_store import KnowledgeStore, migrate
from fake_openai import FakeOpenAI

pytestmark = pytest.mark.slow  # a side venv with duckdb 1.1 and a second process holding the KB

DUCKDB11 = os.environ.get("KANO_DUCKDB11_PYTHON")  # .ci/run: a venv holding duckdb==1.1.3

READ_ALL = """
import duckdb, json, sys
out = {}
for path in sys.argv[1:]:
    con = duckdb.connect(path, read_only=True)
    tables = [r[0] for r in con.execute("SHOW TABLES").fetchall()]
    out[path] = {"version": duckdb.__version__, **{t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}}
    con.close()
print(json.dumps(out))
"""


def test_duckdb_1_1_opens_the_kb_under_any_name(tmp_path, cli, monkeypatch):
    if not DUCKDB11:
        pytest.skip("set KANO_DUCKDB11_PYTHON to a Python with duckdb==1.1.3 (.ci/run does)")
    kb = tmp_path / "kb.duckdb"
    with FakeOpenAI() as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.url)
        assert cli("kb", "build", "--classes", "bottle", "--kb", kb, "--llm", "openai:gpt-3.5-turbo")[0] == 0
    KnowledgeStore(kb).store_text_features("tiny#x", {"a crack": [0.5, 1.5]})
    # a file an older Kano wrote (schema 2, with the named index DuckDB 1.1 trips on), upgraded by opening it
    old = tmp_path / "old.duckdb"
    con = duckdb.connect(str(old), config={"storage_compatibility_version": "v1.1.0"})
    migrate(con, upto=2)
    con.close()
    code, out, err = cli("kb", "upgrade", "--kb", old)
    assert code == 0 and "schema version 2 -> 3" in out, err
    copies = [shutil.copy(kb, tmp_path / "renamed copy.duckdb"), shutil.copy(old, tmp_path / "old-renamed.duckdb")]
    run = subprocess.run([DUCKDB11, "-c", READ_ALL, str(kb), *map(str, copies)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout)
    for path in (str(kb), str(copies[0])):
        assert got[path] == {"version": "1.1.3", "calls": 1, "descriptions": 5, "text_features": 1, "schema_version": 3,
                             "call_keys": 1, "description_keys": 5}
    assert got[str(copies[1])]["schema_version"] == 3


HOLD = """
import duckdb, sys, time
con = duckdb.connect(sys.argv[1], read_only=True)
con.execute("SELECT count(*) FROM descriptions").fetchone()
print("open", flush=True)
time.sleep(120)
"""


def test_train_works_while_the_kb_is_open_read_only_elsewhere(tmp_path, cli, synth_root):
    kb = tmp_path / "kb.duckdb"
    assert cli("kb", "build", "--classes", "disc,weave", "--kb", kb)[0] == 0
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(kb)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        code, out, err = cli("train", "--kb", kb, "--data", f"mvtec:{synth_root}", "--backbone", "tiny", "--out",
                             tmp_path / "run", "--epochs", "1", "--image-size", "64", "--batch-size", "4")
        assert code == 0, err
        assert holder.poll() is None  # the other reader kept the file open all along
    finally:
        holder.kill()
        holder.wait()
    info = json.loads((tmp_path / "run" / "config.json").read_text())["kb"]
    assert info["encoded"] > 0 and info["cache_written"] is False  # the cache waits for a moment the file is free
    KnowledgeStore(kb)  # the file is intact and writable again
