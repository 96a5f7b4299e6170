"""Ordered, append-only schema migrations for the knowledge base.

Never edit or reorder an entry of MIGRATIONS once released: add a new one at the end.
The database records the number of migrations applied in `schema_version`.
A step is a SQL statement or a function of the open connection (for data that SQL alone cannot key).
Each migration runs in one transaction.
"""

from __future__ import annotations

from typing import Callable, Union

import duckdb

Step = Union[str, Callable[[duckdb.DuckDBPyConnection], None]]


def _norm_v3(text: str) -> str:
    # Frozen copy of store.normalise_text as of migration 3: the keys written here must stay what they were.
    return " ".join(text.lower().split()).rstrip(".! ")


def description_key_v3(source: str, class_name: str, text: str, image_path: str | None, call_key: str | None) -> str:
    """Uniqueness key of a description (migration 3 on): a VQA description is one per (image, call); any
    other is one per (source, class, normalised text)."""
    if source == "vqa":
        return "\x1f".join(["vqa", class_name, image_path or "", call_key or ""])
    return "\x1f".join([source, class_name, _norm_v3(text)])


def _key_descriptions_v3(con: duckdb.DuckDBPyConnection) -> None:
    """Fill description_keys; a duplicate that an older Kano stored (two builds at once) is deleted, the first kept."""
    rows = con.execute(
        """SELECT d.id, d.source, d.class_name, d.text, d.image_path, c.call_key
           FROM descriptions d LEFT JOIN calls c ON c.id = d.call_id ORDER BY d.id"""
    ).fetchall()
    keep: dict[str, int] = {}
    drop: list[int] = []
    for did, source, cls, text, image_path, ck in rows:
        key = description_key_v3(source, cls, text, image_path, ck if ck is not None else f"#{did}")
        if key in keep:
            drop.append(did)
        else:
            keep[key] = did
    if drop:
        con.executemany("DELETE FROM descriptions WHERE id = ?", [[d] for d in drop])
    if keep:
        con.executemany("INSERT INTO description_keys VALUES (?, ?)", [[k, v] for k, v in keep.items()])


MIGRATIONS: list[tuple[str, list[Step]]] = [
    (
        "calls and descriptions",
        [
            "CREATE SEQUENCE calls_id_seq START 1",
            """CREATE TABLE calls (
                id BIGINT PRIMARY KEY DEFAULT nextval('calls_id_seq'),
                call_key VARCHAR NOT NULL,
                kind VARCHAR NOT NULL CHECK (kind IN ('llm', 'vqa')),
                provider VARCHAR NOT NULL,
                requested_model VARCHAR NOT NULL,
                served_model VARCHAR,
                class_name VARCHAR NOT NULL,
                prompt VARCHAR NOT NULL,
                image_path VARCHAR,
                image_sha256 VARCHAR,
                options_json VARCHAR NOT NULL,
                reply VARCHAR,
                input_tokens INTEGER,
                output_tokens INTEGER,
                latency_s DOUBLE,
                status VARCHAR NOT NULL CHECK (status IN ('ok', 'error')),
                error VARCHAR,
                created_at TIMESTAMP NOT NULL
            )""",
            "CREATE INDEX calls_key_idx ON calls (call_key)",
            "CREATE SEQUENCE descriptions_id_seq START 1",
            """CREATE TABLE descriptions (
                id BIGINT PRIMARY KEY DEFAULT nextval('descriptions_id_seq'),
                class_name VARCHAR NOT NULL,
                source VARCHAR NOT NULL CHECK (source IN ('llm', 'vqa', 'builtin', 'import')),
                text VARCHAR NOT NULL,
                call_id BIGINT,
                image_path VARCHAR,
                created_at TIMESTAMP NOT NULL
            )""",
        ],
    ),
    (
        "text feature cache",
        [
            # CLIP text features of descriptions, keyed by backbone and exact text, so that a
            # second training run with the same backbone encodes nothing again.
            """CREATE TABLE text_features (
                backbone VARCHAR NOT NULL,
                text_sha256 VARCHAR NOT NULL,
                dim INTEGER NOT NULL,
                vector FLOAT[] NOT NULL,
                created_at TIMESTAMP NOT NULL,
                PRIMARY KEY (backbone, text_sha256)
            )""",
            "ALTER TABLE calls ADD COLUMN attempts INTEGER DEFAULT 1",
        ],
    ),
    (
        "unique keys for successful calls and descriptions; no named index",
        [
            # DuckDB 1.1 records a CREATE INDEX's dependency under the catalog name (the file's stem), so a
            # renamed copy of the file failed to open there; primary keys carry no such record.
            "DROP INDEX IF EXISTS calls_key_idx",
            # One successful call per key: "do we have it?" and the insert are one transaction, and this
            # key makes a second insert fail instead of storing the call twice.
            "CREATE TABLE call_keys (call_key VARCHAR PRIMARY KEY, call_id BIGINT NOT NULL)",
            "INSERT INTO call_keys SELECT call_key, min(id) FROM calls WHERE status = 'ok' GROUP BY call_key",
            # One row per description key (description_key_v3): no duplicates from repeated inputs or
            # concurrent builds.
            "CREATE TABLE description_keys (dedup_key VARCHAR PRIMARY KEY, description_id BIGINT NOT NULL)",
            _key_descriptions_v3,
        ],
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)
