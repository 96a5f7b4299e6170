import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from kano.knowledge_store import KnowledgeStore, normalise_text
from conftest import KANO

DATA = Path(__file__).parent / "data" / "hazelnut_toy"
KEY = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture
def env(monkeypatch, fake_openai):
    monkeypatch.setenv("OPENAI_BASE_URL", fake_openai.url)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("KANO_VQA_BASE_URL", raising=False)
    monkeypatch.setenv("KANO_VQA_API_KEY", KEY + "-vqa")
    return fake_openai


def build_args(kb, srv, *extra):
    return ["kb", "build", "--classes", "hazelnut,carpet", "--kb", kb, "--llm", "openai:gpt-3.5-turbo",
            "--vqa", "openai:llama3.2-vision", "--vqa-base-url", srv.url, "--images", f"hazelnut={DATA / 'test' / 'colour'}",
            "--backoff", "0.01", *extra]


def assert_complete(kb: Path, n_images: int = 17):
    store = KnowledgeStore(kb)
    for cls in ("hazelnut", "carpet"):
        llm = [d.text for d in store.descriptions(cls, ["llm"])]
        assert len(llm) == 5 and len({normalise_text(t) for t in llm}) == 5
    vqa = store.descriptions("hazelnut", ["vqa"])
    assert len(vqa) == n_images and len({d.image_path for d in vqa}) == n_images
    assert store.descriptions("carpet", ["vqa"]) == []
    with store.connect(read_only=True) as con:
        dup = con.execute("SELECT count(*) FROM (SELECT call_key FROM calls WHERE status = 'ok' GROUP BY 1 HAVING count(*) > 1)").fetchone()[0]
        orphan = con.execute("SELECT count(*) FROM descriptions d LEFT JOIN calls c ON c.id = d.call_id WHERE c.id IS NULL").fetchone()[0]
    assert dup == 0 and orphan == 0


def test_build_from_openai_compatible_servers(tmp_path, env, cli):
    kb = tmp_path / "kb.duckdb"
    code, out, err = cli(*build_args(kb, env))
    assert code == 0, err
    assert_complete(kb)
    llm_reqs, vqa_reqs = env.calls("llm"), env.calls("vqa")
    assert len(llm_reqs) == 2 and len(vqa_reqs) == 17
    assert all("Q: Describe what an abnormal image of class (" in r["messages"][0]["content"] for r in llm_reqs)
    assert {r["messages"][0]["content"].split("(")[1].split(")")[0] for r in llm_reqs} == {"hazelnut", "carpet"}
    vqa_text = vqa_reqs[0]["messages"][0]["content"][0]["text"]
    assert vqa_text == ("Q: Identify anomalies in the input image of the specified class (hazelnut). Describe each anomaly's "
                        "location, color, shape, size, and other characteristics.")
    assert len(env.images) == 17 and env.images[0] == (256, 256)  # each request carried a decodable image
    assert all("temperature" in r for r in env.requests)
    # the LLM and VQA servers get their own keys
    auth = {h.get("authorization") for h in env.headers}
    assert auth == {f"Bearer {KEY}", f"Bearer {KEY}-vqa"}
    # provenance
    with duckdb.connect(str(kb), read_only=True) as con:
        rows = con.execute("SELECT kind, provider, requested_model, served_model, input_tokens > 0, output_tokens > 0, latency_s >= 0, "
                           "options_json, image_sha256 IS NOT NULL FROM calls WHERE status = 'ok'").fetchall()
    assert {r[0] for r in rows} == {"llm", "vqa"}
    assert all(r[3] == r[2] + "-served" and r[4] and r[5] and r[6] for r in rows)
    assert all(json.loads(r[7])["temperature"] in (0.7, 0.2) for r in rows)
    assert all(r[8] == (r[0] == "vqa") for r in rows)
    # the key is nowhere: not in the file, not in the output
    assert KEY.encode() not in kb.read_bytes() and KEY not in out + err
    # a second run makes no call
    n = len(env.requests)
    code, out, _ = cli(*build_args(kb, env))
    assert code == 0 and len(env.requests) == n
    assert_complete(kb)
    # sql: json rows, and refusing writes
    code, out, _ = cli("kb", "sql", "SELECT count(*) AS n FROM descriptions", "--kb", kb, "--format", "json")
    assert code == 0 and json.loads(out) == [{"n": 27}]
    code, out, err = cli("kb", "sql", "DELETE FROM descriptions", "--kb", kb)
    assert code != 0 and "read-only" in err and "Traceback" not in err
    code, out, _ = cli("kb", "sql", "SELECT class_name, source FROM descriptions LIMIT 2", "--kb", kb, "--format", "csv")
    assert out.splitlines()[0] == "class_name,source"
    code, out, _ = cli("kb", "stats", "--kb", kb)
    assert code == 0 and "hazelnut" in out and "estimated cost" in out
    code, out, _ = cli("kb", "export", tmp_path / "kb.jsonl", "--kb", kb)
    assert code == 0 and len((tmp_path / "kb.jsonl").read_text().splitlines()) == 27
    assert KEY not in (tmp_path / "kb.jsonl").read_text()


def test_429_500_malformed_refusal_and_empty_replies_are_retried(tmp_path, env, cli):
    env.queue("llm", "429", "500", "malformed", "refuse", "empty")
    env.queue("vqa", "500", "malformed", "429", "refuse")
    kb = tmp_path / "kb.duckdb"
    code, out, err = cli(*build_args(kb, env, "--retries", "6"))
    assert code == 0, err
    assert_complete(kb)
    with duckdb.connect(str(kb), read_only=True) as con:
        errors = [r[0] for r in con.execute("SELECT error FROM calls WHERE status = 'error'").fetchall()]
    assert len(errors) == 9
    assert any("429" in e for e in errors) and any("500" in e for e in errors) and any("malformed" in e for e in errors)
    assert any("refusal" in e for e in errors) and any("empty" in e for e in errors)


def test_timeouts_are_retried(tmp_path, env, cli):
    env.queue("llm", "slow")
    kb = tmp_path / "kb.duckdb"
    code, _, err = cli(*build_args(kb, env, "--timeout", "1"))
    assert code == 0, err
    with duckdb.connect(str(kb), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM calls WHERE error LIKE 'timeout%'").fetchone()[0] == 1
    assert_complete(kb)


def test_exhausted_retries_exit_nonzero_and_rerun_completes(tmp_path, env, cli):
    env.queue("llm", "500", "500", "500", "500")
    kb = tmp_path / "kb.duckdb"
    code, out, err = cli(*build_args(kb, env, "--retries", "1", "--concurrency", "1"))
    assert code == 1 and "still missing" in err and "Traceback" not in err
    code, _, err = cli(*build_args(kb, env))
    assert code == 0, err
    assert_complete(kb)


@pytest.mark.slow
def test_killed_build_resumes_without_duplicates(tmp_path):
    images = tmp_path / "imgs"
    shutil.copytree(DATA / "test" / "colour", images)
    server = subprocess.Popen([sys.executable, "-m", "tests.fake_openai", "0.5"], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parent.parent)
    try:
        url = server.stdout.readline().strip()
        kb = tmp_path / "kb.duckdb"
        env = {**os.environ, "OPENAI_BASE_URL": url, "OPENAI_API_KEY": KEY}
        args = [KANO, "kb", "build", "--classes", "hazelnut,carpet", "--kb", str(kb), "--llm",
                "openai:gpt-3.5-turbo", "--vqa", "openai:llama3.2-vision", "--vqa-base-url", url, "--images",
                f"hazelnut={images}", "--concurrency", "1"]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline, done = time.time() + 60, 0
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
            try:
                with duckdb.connect(str(kb), read_only=True) as con:
                    done = con.execute("SELECT count(*) FROM calls WHERE status = 'ok'").fetchone()[0]
            except duckdb.Error:
                continue  # the writer holds the file for a moment
            if done >= 4:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=30)
        assert 4 <= done < 19, "the build must be killed mid-way"
        rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        assert_complete(kb)
        with duckdb.connect(str(kb), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM calls WHERE status = 'ok'").fetchone()[0] == 19
    finally:
        server.kill()


def test_dry_run_makes_no_call(tmp_path, env, cli):
    code, out, _ = cli(*build_args(tmp_path / "kb.duckdb", env, "--dry-run"))
    assert code == 0 and "planned calls (19)" in out
    assert env.requests == []


def test_builtin_pack_and_generic_fallback(tmp_path, cli):
    kb = tmp_path / "kb.duckdb"
    code, out, err = cli("kb", "build", "--classes", "bottle,fancy_widget", "--kb", kb)
    assert code == 0, err
    store = KnowledgeStore(kb)
    assert len(store.descriptions("bottle", ["builtin"])) == 5
    generic = store.descriptions("fancy_widget", ["builtin"])
    assert len(generic) == 5 and all("fancy widget" in d.text for d in generic)
    cli("kb", "build", "--classes", "bottle", "--kb", kb)
    assert len(store.descriptions("bottle")) == 5


def test_builtin_pack_covers_the_papers_datasets():
    from kano.kb_builder import builtin_classes, builtin_descriptions

    classes = set(builtin_classes())
    mvtec = {"bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
             "toothbrush", "transistor", "wood", "zipper"}
    visa = {"candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum"}
    others = {"bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes", "01", "02", "03", "sdd",
              *{f"Class{i}" for i in range(1, 11)}, "brainmri", "liverct", "resc", "br35h", "covid", "headct"}
    assert mvtec | visa | others <= classes
    for c in classes:
        texts = builtin_descriptions(c)
        assert len(texts) >= 5 and len(set(texts)) == len(texts)


def test_corrupt_image_is_a_recorded_failure_not_a_crash(tmp_path, env, cli):
    images = tmp_path / "imgs"
    images.mkdir()
    shutil.copy(DATA / "test" / "colour" / "00.jpg", images / "00.jpg")
    (images / "01.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    code, out, err = cli("kb", "build", "--classes", "hazelnut", "--kb", tmp_path / "kb.duckdb", "--llm", "openai:gpt-3.5-turbo",
                         "--vqa", "openai:llama3.2-vision", "--vqa-base-url", env.url, "--images", f"hazelnut={images}")
    assert code == 1 and "01.jpg" in err and "readable image" in err and "Traceback" not in err
    assert len(KnowledgeStore(tmp_path / "kb.duckdb").descriptions("hazelnut", ["vqa"])) == 1


@pytest.mark.parametrize("args,message", [
    (["--llm", "gpt-3.5-turbo"], "PROVIDER:MODEL"),
    (["--vqa", "builtin"], "--vqa must be"),
    (["--images", "hazelnut"], "CLASS=DIR"),
    (["--images", "other=/nonexistent/folder"], "must be an existing folder"),
    (["--n-llm", "0"], "--n-llm must be"),
])
def test_bad_options_give_clear_errors(tmp_path, cli, args, message):
    code, out, err = cli("kb", "build", "--classes", "hazelnut", "--kb", tmp_path / "kb.duckdb", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_empty_images_folder(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    code, _, err = cli("kb", "build", "--classes", "hazelnut", "--kb", tmp_path / "kb.duckdb", "--images", f"hazelnut={tmp_path / 'empty'}")
    assert code == 2 and "must contain images" in err


def test_vqa_on_the_anomalous_images_of_a_dataset(tmp_path, env, cli, hazelnut_root):
    kb = tmp_path / "kb.duckdb"
    code, out, err = cli("kb", "build", "--classes", "hazelnut", "--kb", kb, "--vqa", "openai:llama3.2-vision", "--vqa-base-url",
                         env.url, "--data", f"mvtec:{hazelnut_root}")
    assert code == 0, err
    store = KnowledgeStore(kb)
    assert len(store.descriptions("hazelnut", ["builtin"])) == 5
    vqa = store.descriptions("hazelnut", ["vqa"])
    assert len(vqa) == 17 and all("/test/colour/" in d.image_path for d in vqa)
    code, out, err = cli("kb", "build", "--classes", "walnut", "--kb", kb, "--vqa", "openai:llama3.2-vision", "--data",
                         f"mvtec:{hazelnut_root}")
    assert code == 2 and "must be classes of" in err
    code, out, err = cli("kb", "build", "--classes", "hazelnut", "--kb", kb, "--data", f"mvtec:{hazelnut_root}")
    assert code == 2 and "add --vqa" in err
