import json

import duckdb
import pytest

from kano.core.errors import KanoError
from kano.knowledge_store import (SCHEMA_VERSION, CallRecord, Description, KnowledgeStore, export, import_jsonl, migrate, run_sql,
                             schema_version, stats, upgrade)


def columns(con, table):
    return [r[0] for r in con.execute(f"SELECT column_name FROM information_schema.columns WHERE table_name = '{table}' ORDER BY ordinal_position").fetchall()]


def test_migrations_create_the_exact_schema(tmp_path):
    store = KnowledgeStore(tmp_path / "kb.duckdb")
    with store.connect(read_only=True) as con:
        assert schema_version(con) == SCHEMA_VERSION == 3
        assert columns(con, "descriptions") == ["id", "class_name", "source", "text", "call_id", "image_path", "created_at"]
        assert columns(con, "calls") == ["id", "call_key", "kind", "provider", "requested_model", "served_model", "class_name",
                                         "prompt", "image_path", "image_sha256", "options_json", "reply", "input_tokens",
                                         "output_tokens", "latency_s", "status", "error", "created_at", "attempts"]
        assert columns(con, "text_features") == ["backbone", "text_sha256", "dim", "vector", "created_at"]
        assert columns(con, "call_keys") == ["call_key", "call_id"]
        assert columns(con, "description_keys") == ["dedup_key", "description_id"]
        # no named index: DuckDB 1.1 cannot open a renamed copy of a file that has one
        assert con.execute("SELECT count(*) FROM duckdb_indexes()").fetchone()[0] == 0


def test_upgrade_from_the_first_schema_keeps_data(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    assert migrate(con, upto=1) == 1
    con.execute("INSERT INTO descriptions (class_name, source, text, created_at) VALUES ('bottle', 'builtin', 'a cracked bottle', now())")
    con.close()
    store = KnowledgeStore(path)  # opening upgrades
    with store.connect(read_only=True) as con:
        assert schema_version(con) == 3
        assert [r[0] for r in con.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()] == [1, 2, 3]
    assert [d.text for d in store.descriptions("bottle")] == ["a cracked bottle"]
    KnowledgeStore(path)  # idempotent
    with store.connect(read_only=True) as con:
        assert con.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 3


def test_source_is_checked(tmp_path):
    store = KnowledgeStore(tmp_path / "kb.duckdb")
    with pytest.raises(KanoError, match="source must be one of"):
        store.add_descriptions([Description("a", "web", "text here now")])


def test_sql_is_read_only_and_formats(tmp_path):
    store = KnowledgeStore(tmp_path / "kb.duckdb")
    store.add_descriptions([Description("bottle", "builtin", "a bottle with a crack in the rim")])
    cols, rows = run_sql(store.path, "SELECT count(*) AS n FROM descriptions")
    assert cols == ["n"] and rows == [(1,)]
    with pytest.raises(KanoError, match="read-only"):
        run_sql(store.path, "DELETE FROM descriptions")
    with pytest.raises(KanoError, match="read-only"):
        run_sql(store.path, "DROP TABLE descriptions")
    assert run_sql(store.path, "SELECT count(*) FROM descriptions")[1] == [(1,)]
    with pytest.raises(KanoError, match="must be an existing DuckDB file"):
        run_sql(tmp_path / "missing.duckdb", "SELECT 1")


def test_stats_counts_tokens_and_cost(tmp_path):
    store = KnowledgeStore(tmp_path / "kb.duckdb")
    call = CallRecord("k1", "llm", "openai", "gpt-3.5-turbo", "gpt-3.5-turbo-0125", "bottle", "Q", None, None, {"temperature": 0.7},
                      "1. x", 1000, 2000, 0.5, "ok", None)
    store.record_call(call, [])
    store.record_call(CallRecord("k2", "llm", "openai", "gpt-3.5-turbo", None, "bottle", "Q", None, None, {}, None, None, None, 0.1,
                                 "error", "HTTP 429", 1))
    s = stats(store.path)
    assert s["calls"][0]["ok"] == 1 and s["calls"][0]["failed"] == 1
    assert s["estimated_cost_usd"] == pytest.approx((1000 * 0.5 + 2000 * 1.5) / 1e6)
    assert s["recent_failures"][0]["error"] == "HTTP 429"


def test_export_import_roundtrip(tmp_path):
    store = KnowledgeStore(tmp_path / "kb.duckdb")
    store.add_descriptions([Description("bottle", "builtin", "a bottle with a crack in the rim"),
                            Description("cable", "builtin", "a cable with a missing wire inside")])
    assert export(store.path, tmp_path / "d.jsonl") == 2
    assert export(store.path, tmp_path / "d.parquet") == 2
    rows = [json.loads(l) for l in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert {r["class_name"] for r in rows} == {"bottle", "cable"}
    assert duckdb.connect().execute(f"SELECT count(*) FROM '{tmp_path / 'd.parquet'}'").fetchone()[0] == 2
    other = tmp_path / "other.duckdb"
    assert import_jsonl(other, tmp_path / "d.jsonl") == (2, 0)
    assert import_jsonl(other, tmp_path / "d.jsonl") == (0, 2)
    assert {d.source for d in KnowledgeStore(other).descriptions()} == {"import"}
    (tmp_path / "bad.jsonl").write_text('{"class_name": "x"}\n')
    with pytest.raises(KanoError, match="line 1 must be an object"):
        import_jsonl(other, tmp_path / "bad.jsonl")


def test_text_feature_cache(tmp_path):
    store = KnowledgeStore(tmp_path / "kb.duckdb")
    store.store_text_features("tiny#abc", {"a crack": [0.5, 1.5], "a hole": [1.0, 2.0]})
    got = store.cached_text_features("tiny#abc", ["a crack", "a hole", "a stain"])
    assert got == {"a crack": [0.5, 1.5], "a hole": [1.0, 2.0]}
    assert store.cached_text_features("other", ["a crack"]) == {}


def test_not_a_duckdb_file(tmp_path):
    bad = tmp_path / "x.duckdb"
    bad.write_text("hello, not a database")
    with pytest.raises(KanoError, match="x.duckdb"):
        KnowledgeStore(bad)


def test_migration_3_removes_the_duplicates_an_older_kano_stored(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    migrate(con, upto=2)
    ins_call = ("INSERT INTO calls (call_key, kind, provider, requested_model, class_name, prompt, image_path, options_json, "
                "status, created_at) VALUES (?, ?, 'openai', 'm', 'nut', 'Q', ?, '{}', ?, now()) RETURNING id")
    llm1 = con.execute(ins_call, ["L", "llm", None, "ok"]).fetchone()[0]
    llm2 = con.execute(ins_call, ["L", "llm", None, "ok"]).fetchone()[0]   # the same call made by a second build
    v1 = con.execute(ins_call, ["V", "vqa", "a.png", "ok"]).fetchone()[0]
    v2 = con.execute(ins_call, ["V", "vqa", "a.png", "ok"]).fetchone()[0]
    con.execute(ins_call, ["E", "llm", None, "error"])
    ins = "INSERT INTO descriptions (class_name, source, text, call_id, image_path, created_at) VALUES ('nut', ?, ?, ?, ?, now())"
    for args in (["llm", "A nut with a crack.", llm1, None], ["llm", "a nut  with a CRACK", llm2, None],
                 ["llm", "A nut with a hole", llm2, None], ["vqa", "first answer", v1, "a.png"], ["vqa", "second answer", v2, "a.png"],
                 ["builtin", "a nut with a stain", None, None], ["builtin", "A nut with a stain.", None, None]):
        con.execute(ins, args)
    con.close()
    assert upgrade(path) == (2, 3)
    store = KnowledgeStore(path)
    assert [(d.source, d.text) for d in store.descriptions()] == [
        ("llm", "A nut with a crack."), ("llm", "A nut with a hole"), ("vqa", "first answer"), ("builtin", "a nut with a stain")]
    with store.connect(read_only=True) as con:
        assert con.execute("SELECT call_key, call_id FROM call_keys ORDER BY 1").fetchall() == [("L", llm1), ("V", v1)]
        assert con.execute("SELECT count(*) FROM description_keys").fetchone()[0] == 4
        assert con.execute("SELECT count(*) FROM calls").fetchone()[0] == 5  # the call log itself is kept whole
    # the keys now hold: the same text again adds nothing
    assert store.add_descriptions([Description("nut", "builtin", "A NUT with a stain")]) == 0
