"""Read-only SQL, statistics, and JSONL/Parquet import/export of a knowledge base."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import duckdb
import jsonlines

from kano.errors import KanoError

from .store import SOURCES, Description, KnowledgeStore, _connect, normalise_text

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


def run_sql(path: str | os.PathLike, sql: str) -> tuple[list[str], list[tuple]]:
    """Run one query against the file opened READ-ONLY. Returns (column names, rows)."""
    con = _connect(_require_file(path), read_only=True)
    try:
        cur = con.execute(sql)
        if cur.description is None:
            return [], []
        cols = [d[0] for d in cur.description]
        rows = [tuple(_plain(v) for v in r) for r in cur.fetchall()]
        return cols, rows
    except duckdb.Error as exc:
        msg = str(exc)
        if "read-only" in msg:
            raise KanoError(f"`kano kb sql` opens the knowledge base read-only: statements that change it are refused ({msg.splitlines()[0]})") from None
        raise KanoError(f"SQL error: {msg.splitlines()[0]}") from None
    finally:
        con.close()


def stats(path: str | os.PathLike) -> dict:
    """Counts per class and source, tokens, estimated cost and failures."""
    store_path = _require_file(path)
    con = _connect(store_path, read_only=True)
    try:
        per_class = con.execute(
            "SELECT class_name, source, count(*) FROM descriptions GROUP BY ALL ORDER BY 1, 2"
        ).fetchall()
        calls = con.execute(
            """SELECT kind, provider, requested_model, count(*) FILTER (WHERE status = 'ok'),
                      count(*) FILTER (WHERE status = 'error'), coalesce(sum(input_tokens), 0),
                      coalesce(sum(output_tokens), 0), coalesce(avg(latency_s), 0)
               FROM calls GROUP BY ALL ORDER BY 1, 2, 3"""
        ).fetchall()
        errors = con.execute(
            "SELECT class_name, kind, coalesce(image_path, ''), error FROM calls WHERE status = 'error' ORDER BY id DESC LIMIT 20"
        ).fetchall()
    finally:
        con.close()
    classes: dict[str, dict[str, int]] = {}
    for cls, src, n in per_class:
        classes.setdefault(cls, {s: 0 for s in SOURCES})[src] = int(n)
    call_rows = []
    total_cost: float | None = 0.0
    for kind, provider, model, ok, err, tin, tout, lat in calls:
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
        call_rows.append({"kind": kind, "provider": provider, "model": model, "ok": int(ok), "failed": int(err),
                          "input_tokens": int(tin), "output_tokens": int(tout), "mean_latency_s": round(float(lat), 3),
                          "cost_usd": None if cost is None else round(cost, 6)})
    return {"classes": classes, "calls": call_rows, "estimated_cost_usd": None if total_cost is None else round(total_cost, 6),
            "recent_failures": [{"class_name": c, "kind": k, "image_path": i, "error": e} for c, k, i, e in errors]}


def export(path: str | os.PathLike, out: str | os.PathLike, fmt: str | None = None) -> int:
    """Write every description (with its call's provider and model) as JSONL or Parquet. Returns the row count."""
    out = Path(out)
    fmt = fmt or ("parquet" if out.suffix == ".parquet" else "jsonl")
    if fmt not in ("jsonl", "parquet"):
        raise KanoError(f"export format must be one of jsonl, parquet, got {fmt!r}")
    query = """SELECT d.class_name, d.source, d.text, d.image_path, c.provider, c.requested_model AS model,
                      c.served_model, d.created_at
               FROM descriptions d LEFT JOIN calls c ON c.id = d.call_id ORDER BY d.id"""
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        con = _connect(_require_file(path), read_only=True)
        try:
            con.execute(f"COPY ({query}) TO '{str(out).replace(chr(39), chr(39) * 2)}' (FORMAT parquet)")
            return int(con.execute("SELECT count(*) FROM descriptions").fetchone()[0])
        finally:
            con.close()
    cols, rows = run_sql(path, query)
    with jsonlines.open(out, "w") as w:
        for r in rows:
            w.write(dict(zip(cols, r)))
    return len(rows)


def import_jsonl(path: str | os.PathLike, src: str | os.PathLike) -> tuple[int, int]:
    """Add descriptions from a JSONL file (keys class_name, text) with source 'import'.

    Lines whose (class, text) already exist are skipped, so importing twice adds nothing.
    Returns (added, skipped).
    """
    src = Path(src)
    if not src.is_file():
        raise KanoError(f"import file {src} must exist, got no such file")
    store = KnowledgeStore(path)
    existing = {(d.class_name, normalise_text(d.text)) for d in store.descriptions()}
    new: list[Description] = []
    skipped = 0
    try:
        with jsonlines.open(src) as r:
            for n, obj in enumerate(r, 1):
                if not isinstance(obj, dict) or not isinstance(obj.get("class_name"), str) or not isinstance(obj.get("text"), str) \
                        or not obj["text"].strip():
                    raise KanoError(f"{src} line {n} must be an object with string keys class_name and text, got {str(obj)[:80]!r}")
                key = (obj["class_name"], normalise_text(obj["text"]))
                if key in existing:
                    skipped += 1
                    continue
                existing.add(key)
                new.append(Description(obj["class_name"], "import", obj["text"].strip(), None, obj.get("image_path")))
    except jsonlines.InvalidLineError as exc:
        raise KanoError(f"{src} must hold one JSON object per line, got an invalid line: {exc}") from None
    store.add_descriptions(new)
    return len(new), skipped
