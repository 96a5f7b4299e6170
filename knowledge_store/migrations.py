"""Ordered, append-only schema migrations for the knowledge base.

Never edit or reorder an entry of MIGRATIONS once released: add a new one at the end.
The database records the number of migrations applied in `schema_version`.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[str, list[str]]] = [
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
]

SCHEMA_VERSION = len(MIGRATIONS)
