"""Read-only SQL, statistics, and JSONL/Parquet import/export of a knowledge base."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from pathlib import Path
from typing import Any

import duckdb
import jsonlines

from kano.core.errors import KanoError

from .store import SOURCES, Description, KnowledgeStore, _connect, database_errors

# USD per million tokens (input, output), for the estimate in `kano kb stats`; local models cost 0.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-3.5-turbo": (0.50, 1.50),
    "gpt-3.5-turbo-0125": (0.50, 1.50),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
}
LOCAL_PROVIDERS = {"transformers"}


def _require_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise KanoError(f"knowledge base {p} must be an existing DuckDB file, got no such file")
    return p


def _plain(v: Any) -> Any:
    if isinstance(v, (dt.datetime, dt.date)):
        return v.isoformat()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


# `kano kb sql` runs on a file someone may have sent you, with a query pasted from somewhere: DuckDB is
# opened read-only, with no access to other files or the network, no extension installing or loading,
# and the configuration locked so the query cannot turn any of it back on.
SANDBOX = {"enable_external_access": False, "autoinstall_known_extensions": False, "autoload_known_extensions": False,
           "lock_configuration": True}
READ_PRAGMAS = ("table_info", "show_tables", "show_tables_expanded", "show", "database_size", "storage_info", "version",
                "metadata_info", "functions", "collations")
READ_KINDS = "SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN (of those), PRAGMA " + ", ".join(READ_PRAGMAS[:4])


def _check_read_statement(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Exactly one statement, of a kind that only reads. Raises KanoError naming what it got."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise KanoError(f"SQL error: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise KanoError(f"`kano kb sql` runs exactly one statement, got {len(statements)}")
    st = statements[0]
    kind = st.type.name
    text = st.query.strip().rstrip(";").strip()
    if kind == "EXPLAIN":  # EXPLAIN ANALYZE runs its statement: that statement must be a read too
        inner = re.sub(r"^\s*EXPLAIN\s+(ANALY[SZ]E\s+)?", "", text, flags=re.IGNORECASE)
        inner_kinds = [s.type.name for s in con.extract_statements(inner)] if inner else []
        if inner_kinds != ["SELECT"]:
            raise KanoError(f"`kano kb sql` runs read-only statements ({READ_KINDS}), got EXPLAIN of "
                            f"{'/'.join(inner_kinds) or 'nothing'}")
        return
    if kind == "PRAGMA":
        name = re.match(r"^\s*PRAGMA\s+(\w+)", text, flags=re.IGNORECASE)
        if name and name.group(1).lower() in READ_PRAGMAS:
            return
        raise KanoError(f"`kano kb sql` runs read-only statements ({READ_KINDS}), got PRAGMA {name.group(1) if name else ''}")
    if kind != "SELECT":
        word = text.split(None, 1)[0].upper() if text else kind
        raise KanoError(f"`kano kb sql` runs read-only statements ({READ_KINDS}), got {word} ({kind})")


def run_sql(path: str | os.PathLike, sql: str) -> tuple[list[str], list[tuple]]:
    """Run ONE read statement against the file opened read-only in a sandbox. Returns (column names, rows)."""
    store_path = _require_file(path)
    con = _connect(store_path, read_only=True, config=SANDBOX)
    try:
        _check_read_statement(con, sql)
        with database_errors(store_path):
            try:
                cur = con.execute(sql)
                if cur.description is None:
                    return [], []
                cols = [d[0] for d in cur.description]
                rows = [tuple(_plain(v) for v in r) for r in cur.fetchall()]
                return cols, rows
            except duckdb.Error as exc:
                msg = str(exc).splitlines()[0]
                low = msg.lower()
                if "read-only" in low:
                    raise KanoError(f"`kano kb sql` opens the knowledge base read-only: statements that change it are refused ({msg})") from None
                if "external access" in low or "permission" in low or "disabled" in low:
                    raise KanoError(f"`kano kb sql` reads only the knowledge base: no other file, network or extension ({msg})") from None
                if any(w in low for w in ("corrupt", "checksum", "invalidated", "could not read", "serializ")):
                    raise
                raise KanoError(f"SQL error: {msg}") from None
    finally:
        con.close()


def stats(path: str | os.PathLike) -> dict:
    """Counts per class and source, tokens, estimated cost and failures.

    An error row whose call key later succeeded is "failed then succeeded" (a retried 429, say); one whose
    key never succeeded is "still failing", and only those are listed as failures.
    """
    store_path = _require_file(path)
    con = _connect(store_path, read_only=True)
    try:
        with database_errors(store_path):
            per_class = con.execute(
                "SELECT class_name, source, count(*) FROM descriptions GROUP BY ALL ORDER BY 1, 2"
            ).fetchall()
            # works on every schema version (no call_keys table needed): a key "succeeded" if it has an ok row
            base = """WITH ok_keys AS (SELECT DISTINCT call_key FROM calls WHERE status = 'ok'),
                      c AS (SELECT calls.*, calls.call_key IN (SELECT call_key FROM ok_keys) AS key_ok FROM calls)"""
            calls = con.execute(
                base + """ SELECT kind, provider, requested_model, count(*) FILTER (WHERE status = 'ok'),
                          count(*) FILTER (WHERE status = 'error' AND key_ok), count(*) FILTER (WHERE status = 'error' AND NOT key_ok),
                          coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0),
                          coalesce(avg(latency_s) FILTER (WHERE status = 'ok'), 0)
                   FROM c GROUP BY ALL ORDER BY 1, 2, 3"""
            ).fetchall()
            errors = con.execute(
                base + """ SELECT class_name, kind, coalesce(image_path, ''), error, created_at FROM c
                   WHERE status = 'error' AND NOT key_ok
                   QUALIFY row_number() OVER (PARTITION BY call_key ORDER BY id DESC) = 1
                   ORDER BY id DESC LIMIT 20"""
            ).fetchall()
    finally:
        con.close()
    classes: dict[str, dict[str, int]] = {}
    for cls, src, n in per_class:
        classes.setdefault(cls, {s: 0 for s in SOURCES})[src] = int(n)
    call_rows = []
    total_cost: float | None = 0.0
    for kind, provider, model, ok, err_ok, err_open, tin, tout, lat in calls:
        if provider in LOCAL_PROVIDERS:
            cost: float | None = 0.0
        elif model in PRICES_PER_MTOK:
            pin, pout = PRICES_PER_MTOK[model]
            cost = (tin * pin + tout * pout) / 1e6
        else:
            cost = None  # unknown price: say so rather than guess
        if cost is None:
            total_cost = None
        elif total_cost is not None:
            total_cost += cost
        call_rows.append({"kind": kind, "provider": provider, "model": model, "ok": int(ok),
                          "failed_then_succeeded": int(err_ok), "still_failing": int(err_open),
                          "failed": int(err_ok) + int(err_open),
                          "input_tokens": int(tin), "output_tokens": int(tout), "mean_latency_s": round(float(lat), 3),
                          "cost_usd": None if cost is None else round(cost, 6)})
    return {"classes": classes, "calls": call_rows, "estimated_cost_usd": None if total_cost is None else round(total_cost, 6),
            "recent_failures": [{"class_name": c, "kind": k, "image_path": i, "error": e, "at": _plain(t)}
                                for c, k, i, e, t in errors]}


FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
EXPORT_QUERY = """SELECT d.class_name, d.source, d.text, d.image_path, c.provider, c.requested_model AS model,
                         c.served_model, d.created_at
                  FROM descriptions d LEFT JOIN calls c ON c.id = d.call_id ORDER BY d.id"""


def _format_of(path: Path, what: str) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise KanoError(f"{what} file must end in .jsonl or .parquet, got {path.name!r}")
    return fmt


def export(path: str | os.PathLike, out: str | os.PathLike, fmt: str | None = None) -> int:
    """Write every description (with its call's provider and model) as JSONL or Parquet. Returns the row count.

    The format comes from the extension (.jsonl, .parquet); anything else is refused.
    """
    out = Path(out)
    if out.is_dir():
        raise KanoError(f"export target must be a file ending in .jsonl or .parquet, got the folder {out}")
    fmt = fmt or _format_of(out, "export")
    if fmt not in ("jsonl", "parquet"):
        raise KanoError(f"export format must be one of jsonl, parquet, got {fmt!r}")
    store_path = _require_file(path)
    con = _connect(store_path, read_only=True)
    try:
        with database_errors(store_path):
            cur = con.execute(EXPORT_QUERY)
            cols = [d[0] for d in cur.description]
            rows = [tuple(_plain(v) for v in r) for r in cur.fetchall()]
    finally:
        con.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    if fmt == "parquet":
        # our own in-memory DuckDB writes the file (the KB connection above stays read-only)
        mem = duckdb.connect()
        try:
            mem.execute("CREATE TABLE d (class_name VARCHAR, source VARCHAR, text VARCHAR, image_path VARCHAR, provider VARCHAR, "
                        "model VARCHAR, served_model VARCHAR, created_at VARCHAR)")
            if rows:
                mem.executemany("INSERT INTO d VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [list(r) for r in rows])
            mem.execute(f"COPY d TO '{_sql_str(tmp)}' (FORMAT parquet)")
        finally:
            mem.close()
    else:
        with jsonlines.open(tmp, "w") as w:
            for r in rows:
                w.write(dict(zip(cols, r)))
    os.replace(tmp, out)  # a reader never sees half a file
    return len(rows)


def _sql_str(p: Path) -> str:
    return str(p).replace("'", "''")


def _read_import(src: Path) -> list[tuple[str, str, str | None]]:
    """(class_name, text, image_path) rows of a JSONL or Parquet file, all checked before anything is written."""
    fmt = _format_of(src, "import")
    rows: list[tuple[str, str, str | None]] = []

    def check(n: int, obj) -> None:
        if not isinstance(obj, dict) or not isinstance(obj.get("class_name"), str) or not obj["class_name"].strip() \
                or not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise KanoError(f"{src} {'line' if fmt == 'jsonl' else 'row'} {n} must be an object with string keys class_name and "
                            f"text, got {str(obj)[:80]!r}")
        ip = obj.get("image_path")
        rows.append((obj["class_name"], obj["text"].strip(), ip if isinstance(ip, str) else None))

    if fmt == "jsonl":
        try:
            raw = src.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            line = src.read_bytes()[: exc.start].count(b"\n") + 1
            raise KanoError(f"{src} must be UTF-8 JSONL, got invalid UTF-8 at line {line} (byte {exc.start})") from None
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KanoError(f"{src} must hold one JSON object per line, got an invalid line {n}: {exc.msg}") from None
            check(n, obj)
        return rows
    mem = duckdb.connect()
    try:
        try:
            cur = mem.execute(f"SELECT * FROM read_parquet('{_sql_str(src)}')")
        except duckdb.Error as exc:
            raise KanoError(f"{src} must be a Parquet file, got an unreadable one ({str(exc).splitlines()[0]})") from None
        cols = [d[0] for d in cur.description]
        if "class_name" not in cols or "text" not in cols:
            raise KanoError(f"{src} must have columns class_name and text, got {', '.join(cols)}")
        for n, r in enumerate(cur.fetchall(), 1):
            check(n, dict(zip(cols, r)))
    finally:
        mem.close()
    return rows


def import_descriptions(path: str | os.PathLike, src: str | os.PathLike, create: bool = False) -> tuple[int, int]:
    """Add descriptions from a JSONL or Parquet file (keys class_name, text; what `kano kb export` writes)
    with source 'import'.

    A (class, text) the KB already holds under any source is skipped, so importing twice adds nothing.
    The whole file is read and checked first: a bad file writes nothing. The KB must exist unless
    `create` (a mistyped --kb must not start a new file). Returns (added, skipped).
    """
    src = Path(src)
    if not src.is_file():
        raise KanoError(f"import file {src} must exist, got {'a folder' if src.is_dir() else 'no such file'}")
    rows = _read_import(src)
    path = Path(path)
    if not path.exists() and not create:
        raise KanoError(f"knowledge base {path} must exist, got no such file; to start a new one from {src.name}, add --create")
    store = KnowledgeStore(path)
    added = store.add_descriptions([Description(c, "import", t, None, ip) for c, t, ip in rows], skip_any_source=True)
    return added, len(rows) - added


def import_jsonl(path: str | os.PathLike, src: str | os.PathLike) -> tuple[int, int]:
    """Kept for callers of the old name: import_descriptions(path, src, create=True)."""
    return import_descriptions(path, src, create=True)
