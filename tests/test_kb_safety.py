"""The knowledge base under concurrency, kills, hostile servers and hostile SQL.

Real parts only: `kano` processes started and killed by signal, the loopback OpenAI-compatible server
(tests/fake_openai.py), real DuckDB files.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import duckdb
import pytest

from kano.knowledge_store import KnowledgeStore
from conftest import KANO
from fake_openai import FakeOpenAI

DATA = Path(__file__).parent / "data" / "hazelnut_toy"
COLOUR = sorted((DATA / "test" / "colour").iterdir())
KEY = "sk-test-SECRET-0123456789abcdef"
VQA_KEY = "sk-vqa-OTHER-9876543210"


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "KANO_VQA_API_KEY",
                                                           "KANO_VQA_BASE_URL")}
    return {**env, **extra}


def image_folder(tmp_path: Path, n: int = 4, identical: int = 1) -> Path:
    """n distinct photos plus `identical` byte-identical copies of the first, under other names."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in COLOUR[:n]:
        shutil.copy(p, folder / p.name)
    for i in range(identical):
        shutil.copy(COLOUR[0], folder / f"copy{i}_{COLOUR[0].name}")
    return folder


def ok_call_without_descriptions(kb: Path) -> int:
    with duckdb.connect(str(kb), read_only=True) as con:
        return con.execute("""SELECT count(*) FROM calls c WHERE c.status = 'ok'
                              AND NOT EXISTS (SELECT 1 FROM descriptions d WHERE d.call_id = c.id)""").fetchone()[0]


def counts(kb: Path) -> dict:
    with duckdb.connect(str(kb), read_only=True) as con:
        q = lambda sql: con.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "llm": q("SELECT count(*) FROM descriptions WHERE source = 'llm'"),
            "llm_distinct": q("SELECT count(DISTINCT (class_name, lower(text))) FROM descriptions WHERE source = 'llm'"),
            "vqa": q("SELECT count(*) FROM descriptions WHERE source = 'vqa'"),
            "vqa_images": q("SELECT count(DISTINCT image_path) FROM descriptions WHERE source = 'vqa'"),
            "dup_ok_calls": q("SELECT count(*) FROM (SELECT call_key FROM calls WHERE status = 'ok' GROUP BY 1 HAVING count(*) > 1)"),
        }


# ---- two builds at once, repeated inputs, identical images ---------------------------------

@pytest.mark.slow
def test_two_builds_at_once_store_and_bill_everything_once(tmp_path):
    folder = image_folder(tmp_path, n=4, identical=1)  # 5 files, 4 distinct contents
    kb = tmp_path / "kb.duckdb"
    with FakeOpenAI(delay_s=0.3) as srv:
        env = clean_env(OPENAI_BASE_URL=srv.url, OPENAI_API_KEY=KEY)
        # the folder given twice: still one image each
        args = [KANO, "kb", "build", "--classes", "hazelnut,carpet", "--kb", str(kb), "--llm", "openai:gpt-3.5-turbo",
                "--vqa", "openai:llama3.2-vision", "--images", f"hazelnut={folder}", "--images", f"hazelnut={folder}",
                "--concurrency", "2"]
        procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert len(srv.calls("llm")) == 2, "one LLM call per class, not one per build"
        assert len(srv.calls("vqa")) == 4, "one VQA call per distinct image content"
    assert any("another `kano kb build` is running" in err for _, err in outs)
    c = counts(kb)
    assert c == {"llm": 10, "llm_distinct": 10, "vqa": 5, "vqa_images": 5, "dup_ok_calls": 0}, c
    assert ok_call_without_descriptions(kb) == 0


def test_identical_images_each_get_a_description_and_a_rerun_asks_nothing(tmp_path, monkeypatch, cli):
    folder = image_folder(tmp_path, n=2, identical=2)  # 4 files, 2 contents
    kb = tmp_path / "kb.duckdb"
    with FakeOpenAI() as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.url)
        args = ["kb", "build", "--classes", "hazelnut", "--kb", kb, "--vqa", "openai:llama3.2-vision",
                "--images", f"hazelnut={folder}", "--concurrency", "1"]
        code, out, err = cli(*args)
        assert code == 0, err
        assert len(srv.calls("vqa")) == 2
        code, out, err = cli(*args)
        assert code == 0 and "still missing" not in err and len(srv.calls("vqa")) == 2
    store = KnowledgeStore(kb)
    vqa = store.descriptions("hazelnut", ["vqa"])
    assert sorted(Path(d.image_path).name for d in vqa) == sorted(p.name for p in folder.iterdir())
    # the two copies of the first photo carry the same answer, from one call
    first = {d.call_id for d in vqa if Path(d.image_path).name.endswith(COLOUR[0].name)}
    assert len(first) == 1


# ---- a call and its descriptions are one transaction ----------------------------------------

KILL_HOOK = '''
import os, signal, duckdb
_connect = duckdb.connect
class _Con:
    """Kills this process (SIGKILL) when it is about to write its first LLM description."""
    def __init__(self, con): self._con = con
    def __getattr__(self, name): return getattr(self._con, name)
    def __enter__(self): return self
    def __exit__(self, *exc): return self._con.__exit__(*exc)
    def execute(self, sql, *args):
        if sql.lstrip().startswith("INSERT INTO descriptions") and args and "llm" in list(args[0]):
            os.kill(os.getpid(), signal.SIGKILL)
        return self._con.execute(sql, *args)
duckdb.connect = lambda *a, **k: _Con(_connect(*a, **k))
'''


@pytest.mark.slow
def test_a_build_killed_between_a_call_and_its_descriptions_leaves_no_call_without_them(tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(KILL_HOOK)
    kb = tmp_path / "kb.duckdb"
    with FakeOpenAI() as srv:
        env = clean_env(OPENAI_BASE_URL=srv.url, OPENAI_API_KEY=KEY)
        args = [KANO, "kb", "build", "--classes", "hazelnut", "--kb", str(kb), "--llm", "openai:gpt-3.5-turbo"]
        killed = subprocess.run(args, env={**env, "PYTHONPATH": str(hook)}, capture_output=True, text=True, timeout=120)
        assert killed.returncode == -9, killed.stderr  # the hook fired: killed at the first description's insert
        assert len(srv.calls("llm")) == 1
        assert ok_call_without_descriptions(kb) == 0
        rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
    assert counts(kb)["llm"] == 5 and ok_call_without_descriptions(kb) == 0


# ---- each key to its own server; no key anywhere ------------------------------------

def test_each_provider_sends_only_its_own_key(tmp_path, monkeypatch, cli):
    folder = image_folder(tmp_path, n=1, identical=0)
    with FakeOpenAI() as llm_srv, FakeOpenAI() as vqa_srv:
        monkeypatch.setenv("OPENAI_BASE_URL", llm_srv.url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.delenv("KANO_VQA_API_KEY", raising=False)
        monkeypatch.delenv("KANO_VQA_BASE_URL", raising=False)
        args = ["kb", "build", "--classes", "hazelnut", "--llm", "openai:gpt-3.5-turbo", "--vqa", "openai:llama3.2-vision",
                "--vqa-base-url", vqa_srv.url, "--images", f"hazelnut={folder}"]
        code, _, err = cli(*args, "--kb", tmp_path / "a.duckdb")
        assert code == 0, err
        assert {h.get("authorization") for h in llm_srv.headers} == {f"Bearer {KEY}"}
        assert len(vqa_srv.headers) == 1 and all(KEY not in json.dumps(h) for h in vqa_srv.headers)
        monkeypatch.setenv("KANO_VQA_API_KEY", VQA_KEY)
        code, _, err = cli(*args, "--kb", tmp_path / "b.duckdb")
        assert code == 0, err
        assert {h.get("authorization") for h in vqa_srv.headers[1:]} == {f"Bearer {VQA_KEY}"}
        assert {h.get("authorization") for h in llm_srv.headers} == {f"Bearer {KEY}"}


def test_a_server_echoing_the_key_gets_it_stored_and_printed_nowhere(tmp_path, monkeypatch, cli):
    kb = tmp_path / "kb.duckdb"
    with FakeOpenAI() as srv:
        srv.default["llm"] = "401echo"
        monkeypatch.setenv("OPENAI_BASE_URL", srv.url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        code, out, err = cli("kb", "build", "--classes", "hazelnut", "--kb", kb, "--llm", "openai:gpt-3.5-turbo")
        assert srv.calls("llm")
    assert code == 1 and "HTTP 401" in err and "<redacted>" in err  # the failure is shown, the key is not
    texts = {"build": out + err}
    for name, args in {"stats": ["kb", "stats"], "stats_json": ["kb", "stats", "--json"],
                       "sql": ["kb", "sql", "SELECT error, reply, prompt FROM calls", "--format", "json"]}.items():
        c, o, e = cli(*args, "--kb", kb)
        assert c == 0, e
        texts[name] = o + e
    assert "HTTP 401" in texts["stats"] and "HTTP 401" in texts["sql"]
    for fmt in ("jsonl", "parquet"):
        c, _, e = cli("kb", "export", tmp_path / f"out.{fmt}", "--kb", kb)
        assert c == 0, e
        texts[fmt] = (tmp_path / f"out.{fmt}").read_bytes().decode("latin-1")
    texts["kb file"] = b"".join(p.read_bytes() for p in tmp_path.glob("kb.duckdb*")).decode("latin-1")
    for name, text in texts.items():
        assert KEY not in text, f"the key leaked into {name}"


# ---- kb sql is a sandbox ------------------------------------------------------------------

def test_kb_sql_refuses_every_write_and_file_access_and_still_answers_select(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where DuckDB would install extensions
    kb = tmp_path / "kb.duckdb"
    assert cli("kb", "build", "--classes", "bottle", "--kb", kb)[0] == 0
    before = kb.read_bytes()
    target = tmp_path / "written"
    attacks = {
        f"COPY (SELECT * FROM descriptions) TO '{target}.csv'": "COPY",
        f"ATTACH '{target}.duckdb' AS x (READ_WRITE); CREATE TABLE x.t AS SELECT 1": "one statement",
        f"ATTACH '{target}.duckdb' AS x (READ_WRITE)": "ATTACH",
        f"EXPORT DATABASE '{target}_dir'": "EXPORT",
        "SELECT * FROM read_text('/etc/passwd')": "file",
        "SELECT 1; SELECT 2": "one statement",
        "INSTALL httpfs": "INSTALL",
        "LOAD httpfs": "LOAD",
        "SET enable_external_access = true": "SET",
        f"SELECT * FROM read_csv('{tmp_path}/*.csv')": "file",
        "PRAGMA enable_profiling": "PRAGMA",
        f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{target}.x'": "EXPLAIN",
    }
    for sql, word in attacks.items():
        code, out, err = cli("kb", "sql", sql, "--kb", kb)
        assert code == 2 and "Traceback" not in err, (sql, out, err)
        assert word in err, (sql, err)
        assert "root:" not in out
    assert not list(tmp_path.glob("written*")) and not (tmp_path / "home").exists()
    assert kb.read_bytes() == before
    for sql in ("SELECT count(*) AS n FROM descriptions", "WITH t AS (SELECT 1 AS a) SELECT a FROM t", "DESCRIBE descriptions",
                "SHOW TABLES", "EXPLAIN SELECT 1", "PRAGMA table_info('calls')", "SELECT 1;"):
        code, out, err = cli("kb", "sql", sql, "--kb", kb, "--format", "json")
        assert code == 0, (sql, err)
    assert json.loads(cli("kb", "sql", "SELECT count(*) AS n FROM descriptions", "--kb", kb, "--format", "json")[1]) == [{"n": 5}]


# ---- --timeout bounds the whole request -----------------------------------------------------------

@pytest.mark.slow
def test_timeout_bounds_a_trickling_reply(tmp_path):
    kb = tmp_path / "kb.duckdb"
    with FakeOpenAI(trickle_s=0.1) as srv:  # a reply of ~600 bytes at 10 bytes/s: about a minute
        srv.default["llm"] = "trickle"
        env = clean_env(OPENAI_BASE_URL=srv.url, OPENAI_API_KEY=KEY)
        t0 = time.monotonic()
        run = subprocess.run([KANO, "kb", "build", "--classes", "hazelnut", "--kb", str(kb), "--llm", "openai:gpt-3.5-turbo",
                              "--timeout", "2", "--retries", "1", "--backoff", "0.01"], env=env, capture_output=True, text=True,
                             timeout=40)
        elapsed = time.monotonic() - t0
    assert run.returncode == 1 and "timeout" in run.stderr, run.stderr
    assert elapsed < 25, f"two tries of 2 s each (plus start-up) took {elapsed:.1f} s"
    with duckdb.connect(str(kb), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM calls WHERE status = 'error' AND error LIKE 'timeout%'").fetchone()[0] == 2


# ---- tracebacks become `error: ...` ----------------------------------------------------------------

def damaged_copies(kb: Path, tmp_path: Path):
    """(copy, fails_at_connect) for copies of kb with the first bytes after one block's checksum overwritten,
    where a plain DuckDB client fails to read descriptions or calls (the others hold unused space)."""
    data = kb.read_bytes()
    header, block = 3 * 4096, 262144  # DuckDB's file headers, then 256 KiB blocks each starting with a checksum
    for i, start in enumerate(range(header, len(data), block)):
        bad = bytearray(data)
        bad[start + 8:start + 264] = b"\xa5" * 256
        copy = tmp_path / f"damaged{i}.duckdb"
        copy.write_bytes(bytes(bad))
        try:
            con = duckdb.connect(str(copy), read_only=True)
        except duckdb.Error:
            yield copy, True
            continue
        try:
            con.execute("SELECT * FROM descriptions").fetchall()
            con.execute("SELECT * FROM calls").fetchall()
        except duckdb.Error:
            yield copy, False
        finally:
            con.close()


def test_a_damaged_kb_is_an_error_not_a_traceback(tmp_path, cli, synth_root):
    kb = tmp_path / "kb.duckdb"
    assert cli("kb", "build", "--classes", "disc,weave,bottle,cable,capsule,carpet,grid,hazelnut", "--kb", kb)[0] == 0
    (tmp_path / "in.jsonl").write_text('{"class_name": "bottle", "text": "a bottle with a long crack"}\n')
    seen = {True: 0, False: 0}
    for copy, at_connect in damaged_copies(kb, tmp_path):
        seen[at_connect] += 1
        for args in (["kb", "stats"], ["kb", "export", tmp_path / "x.parquet"], ["kb", "import", tmp_path / "in.jsonl"],
                     ["kb", "build", "--classes", "bottle"], ["kb", "sql", "SELECT * FROM descriptions"],
                     ["train", "--data", f"mvtec:{synth_root}", "--backbone", "tiny", "--out", tmp_path / "run"]):
            code, out, err = cli(*args, "--kb", copy)
            assert code == 2 and "Traceback" not in err, (copy.name, args, code, err)
            assert "damaged" in err or "unreadable" in err, (copy.name, args, err)
    assert seen[False] >= 1, "a block that fails only when read (not at open) must be among those tried"
    assert not (tmp_path / "run").exists()


def test_import_and_export_refuse_bad_files_and_write_nothing(tmp_path, cli):
    kb = tmp_path / "kb.duckdb"
    assert cli("kb", "build", "--classes", "bottle", "--kb", kb)[0] == 0
    (tmp_path / "bad.jsonl").write_bytes(b'{"class_name": "bottle", "text": "a bottle \xff\xfe broken"}\n')
    (tmp_path / "folder").mkdir()
    (tmp_path / "x.csv").write_text("class_name,text\nbottle,a bottle\n")
    for args, message in [
        (["kb", "import", tmp_path / "bad.jsonl", "--kb", kb], "UTF-8"),
        (["kb", "import", tmp_path / "x.csv", "--kb", kb], ".jsonl or .parquet"),
        (["kb", "export", tmp_path / "folder", "--kb", kb], "folder"),
        (["kb", "export", tmp_path / "kb.csv", "--kb", kb], ".jsonl or .parquet"),
        (["kb", "import", tmp_path / "missing.jsonl", "--kb", kb], "must exist"),
    ]:
        code, out, err = cli(*args)
        assert code == 2 and message in err and "Traceback" not in err, (args, err)
    assert not (tmp_path / "kb.csv").exists() and list((tmp_path / "folder").iterdir()) == []
    # importing into a mistyped KB path creates nothing
    assert cli("kb", "export", tmp_path / "ok.jsonl", "--kb", kb)[0] == 0
    code, _, err = cli("kb", "import", tmp_path / "ok.jsonl", "--kb", tmp_path / "kb.duckbd")
    assert code == 2 and "--create" in err and not (tmp_path / "kb.duckbd").exists()
    # a dry run writes no KB file, and leaves an existing one untouched
    code, out, _ = cli("kb", "build", "--classes", "bottle", "--kb", tmp_path / "new" / "kb.duckdb", "--dry-run")
    assert code == 0 and not (tmp_path / "new").exists()


def test_export_and_import_are_symmetric_in_both_formats(tmp_path, cli):
    kb = tmp_path / "kb.duckdb"
    assert cli("kb", "build", "--classes", "bottle,cable", "--kb", kb)[0] == 0
    for fmt in ("jsonl", "parquet"):
        out = tmp_path / f"d.{fmt}"
        code, stdout, err = cli("kb", "export", out, "--kb", kb)
        assert code == 0 and "exported 10 descriptions" in stdout, err
        other = tmp_path / f"other_{fmt}.duckdb"
        code, stdout, err = cli("kb", "import", out, "--kb", other, "--create")
        assert code == 0 and "imported 10 descriptions" in stdout, err
        code, stdout, err = cli("kb", "import", out, "--kb", other)
        assert code == 0 and "imported 0 descriptions" in stdout and "10 already present" in stdout
        store = KnowledgeStore(other)
        assert sorted(d.text for d in store.descriptions()) == sorted(d.text for d in KnowledgeStore(kb).descriptions())
        assert {d.source for d in store.descriptions()} == {"import"}


# ---- honest accounting ------------------------------------------------------------------------

def test_accounting_counts_every_request_once(tmp_path, monkeypatch, cli):
    kb = tmp_path / "kb.duckdb"
    with FakeOpenAI() as srv:
        srv.queue("llm", "429", "429")
        monkeypatch.setenv("OPENAI_BASE_URL", srv.url)
        code, out, err = cli("kb", "build", "--classes", "hazelnut", "--kb", kb, "--llm", "openai:gpt-3.5-turbo",
                             "--backoff", "0.01")
        assert code == 0, err
        assert len(srv.requests) == 3
    assert "model calls: 3 made (1 answered, 2 failed and were retried, 0 failed for good), 0 reused" in out
    code, out, _ = cli("kb", "stats", "--kb", kb, "--json")
    s = json.loads(out)
    assert s["calls"][0]["ok"] == 1 and s["calls"][0]["failed_then_succeeded"] == 2 and s["calls"][0]["still_failing"] == 0
    assert s["recent_failures"] == []
    # no server at all: 1 + 2 retries, each one row, one logical call failed for good
    kb2 = tmp_path / "kb2.duckdb"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    code, out, err = cli("kb", "build", "--classes", "hazelnut", "--kb", kb2, "--llm", "openai:gpt-3.5-turbo", "--retries", "2",
                         "--backoff", "0.01")
    assert code == 1
    assert "model calls: 3 made (0 answered, 2 failed and were retried, 1 failed for good), 0 reused" in out
    with duckdb.connect(str(kb2), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM calls").fetchone()[0] == 3
    s = json.loads(cli("kb", "stats", "--kb", kb2, "--json")[1])
    assert s["calls"][0]["still_failing"] == 3 and s["calls"][0]["failed_then_succeeded"] == 0
    assert len(s["recent_failures"]) == 1


def test_reasking_stops_after_a_bounded_number_of_calls(tmp_path, monkeypatch, cli):
    kb = tmp_path / "kb.duckdb"
    with FakeOpenAI() as srv:
        srv.default["llm"] = "four"
        monkeypatch.setenv("OPENAI_BASE_URL", srv.url)
        args = ["kb", "build", "--classes", "hazelnut", "--kb", kb, "--llm", "openai:gpt-3.5-turbo", "--max-rounds", "3"]
        code, out, err = cli(*args)
        assert code == 1 and "the model gave only 4 of 5" in err and "run the same command again" not in err, err
        assert len(srv.requests) == 3
        code, out, err = cli(*args)  # a re-run asks nothing more
        assert code == 1 and "the model gave only 4 of 5" in err and len(srv.requests) == 3
    assert counts(kb)["llm"] == 4


def test_vqa_without_images_says_so(tmp_path, cli):
    code, _, err = cli("kb", "build", "--classes", "hazelnut", "--kb", tmp_path / "kb.duckdb", "--vqa", "openai:llama3.2-vision")
    assert code == 2 and "--images" in err and "--data" in err
    assert not (tmp_path / "kb.duckdb").exists()
