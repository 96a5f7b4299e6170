"""The DuckDB knowledge base: typed reads and writes in short transactions.

Every public method opens the file, does its work in one transaction and closes it again, so a
killed process loses nothing already written and other processes can read between writes
(DuckDB lets only one process hold a read-write handle).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import duckdb

from kano.errors import KanoError

from .migrations import MIGRATIONS, SCHEMA_VERSION

SOURCES = ("llm", "vqa", "builtin", "import")
# Written so that DuckDB 1.1 and newer (CLI or library) can open the file.
STORAGE_COMPATIBILITY = "v1.1.0"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def normalise_text(text: str) -> str:
    """Key used to decide that two descriptions are the same sentence."""
    return " ".join(text.lower().split()).rstrip(".! ")


@dataclass(frozen=True)
class CallRecord:
    """One finished LLM or VQA call, as logged."""

    call_key: str
    kind: str
    provider: str
    requested_model: str
    served_model: str | None
    class_name: str
    prompt: str
    image_path: str | None
    image_sha256: str | None
    options: dict
    reply: str | None
    input_tokens: int | None
    output_tokens: int | None
    latency_s: float | None
    status: str
    error: str | None
    attempts: int = 1


@dataclass(frozen=True)
class Description:
    class_name: str
    source: str
    text: str
    call_id: int | None = None
    image_path: str | None = None


def _connect(path: Path, read_only: bool, wait_s: float = 15.0) -> duckdb.DuckDBPyConnection:
    """Open the file; while another process holds it (DuckDB allows one writer), retry for up to wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if read_only:
                return duckdb.connect(str(path), read_only=True)
            return duckdb.connect(str(path), config={"storage_compatibility_version": STORAGE_COMPATIBILITY})
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower() and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise KanoError(f"cannot open knowledge base {path}: {exc}") from None
        except duckdb.Error as exc:
            raise KanoError(f"{path} must be a DuckDB knowledge base, got an unreadable file ({exc})") from None


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
    ).fetchone()[0]
    if not exists:
        return 0
    row = con.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(con: duckdb.DuckDBPyConnection, upto: int | None = None) -> int:
    """Apply the pending migrations in order, each in its own transaction. Returns the version."""
    upto = SCHEMA_VERSION if upto is None else upto
    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)")
    current = schema_version(con)
    if current > SCHEMA_VERSION:
        raise KanoError(
            f"knowledge base schema version must be at most {SCHEMA_VERSION} for this Kano, got {current}: upgrade Kano"
        )
    for number in range(current + 1, upto + 1):
        name, statements = MIGRATIONS[number - 1]
        con.execute("BEGIN TRANSACTION")
        try:
            for sql in statements:
                con.execute(sql)
            con.execute("INSERT INTO schema_version VALUES (?, ?, ?)", [number, name, utcnow()])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
    return schema_version(con)


class KnowledgeStore:
    """Typed access to one knowledge-base file."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise KanoError(f"knowledge base {self.path} must exist, got no such file (build one with `kano kb build`)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as con:
            migrate(con)

    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        con = _connect(self.path, read_only)
        try:
            yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    # ---- calls -------------------------------------------------------------------------
    def successful_call(self, call_key: str) -> tuple[int, str] | None:
        """(call id, reply) of a stored successful call with this key, if any."""
        with self.connect() as con:
            row = con.execute(
                "SELECT id, reply FROM calls WHERE call_key = ? AND status = 'ok' ORDER BY id LIMIT 1", [call_key]
            ).fetchone()
        return (int(row[0]), row[1]) if row else None

    def record_call(self, call: CallRecord, descriptions: Sequence[Description] = ()) -> int:
        """Log one call and the descriptions parsed from it, atomically. Returns the call id."""
        with self.transaction() as con:
            call_id = self._insert_call(con, call)
            for d in descriptions:
                self._insert_description(con, Description(d.class_name, d.source, d.text, call_id, d.image_path))
        return call_id

    def add_descriptions_for_call(self, call_id: int, descriptions: Sequence[Description]) -> None:
        with self.transaction() as con:
            for d in descriptions:
                self._insert_description(con, Description(d.class_name, d.source, d.text, call_id, d.image_path))

    @staticmethod
    def _insert_call(con: duckdb.DuckDBPyConnection, c: CallRecord) -> int:
        row = con.execute(
            """INSERT INTO calls (call_key, kind, provider, requested_model, served_model, class_name, prompt,
                   image_path, image_sha256, options_json, reply, input_tokens, output_tokens, latency_s,
                   status, error, created_at, attempts)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id""",
            [c.call_key, c.kind, c.provider, c.requested_model, c.served_model, c.class_name, c.prompt,
             c.image_path, c.image_sha256, json.dumps(c.options, sort_keys=True), c.reply, c.input_tokens,
             c.output_tokens, c.latency_s, c.status, c.error, utcnow(), c.attempts],
        ).fetchone()
        return int(row[0])

    @staticmethod
    def _insert_description(con: duckdb.DuckDBPyConnection, d: Description) -> None:
        if d.source not in SOURCES:
            raise KanoError(f"description source must be one of {', '.join(SOURCES)}, got {d.source!r}")
        con.execute(
            "INSERT INTO descriptions (class_name, source, text, call_id, image_path, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            [d.class_name, d.source, d.text, d.call_id, d.image_path, utcnow()],
        )

    # ---- descriptions ------------------------------------------------------------------
    def add_descriptions(self, descriptions: Sequence[Description]) -> int:
        with self.transaction() as con:
            for d in descriptions:
                self._insert_description(con, d)
        return len(descriptions)

    def descriptions(self, class_name: str | None = None, sources: Sequence[str] | None = None,
                     image_path: str | None = None) -> list[Description]:
        sql = "SELECT class_name, source, text, call_id, image_path FROM descriptions WHERE 1=1"
        args: list = []
        if class_name is not None:
            sql += " AND class_name = ?"
            args.append(class_name)
        if sources:
            sql += f" AND source IN ({', '.join('?' * len(sources))})"
            args.extend(sources)
        if image_path is not None:
            sql += " AND image_path = ?"
            args.append(image_path)
        with self.connect() as con:
            rows = con.execute(sql + " ORDER BY id", args).fetchall()
        return [Description(*r) for r in rows]

    def classes(self) -> list[str]:
        with self.connect() as con:
            return [r[0] for r in con.execute("SELECT DISTINCT class_name FROM descriptions ORDER BY 1").fetchall()]

    # ---- text feature cache ------------------------------------------------------------
    def cached_text_features(self, backbone: str, texts: Sequence[str]) -> dict[str, list[float]]:
        keys = {hashlib.sha256(t.encode()).hexdigest(): t for t in texts}
        if not keys:
            return {}
        with self.connect() as con:
            rows = con.execute(
                "SELECT text_sha256, vector FROM text_features WHERE backbone = ? AND text_sha256 IN "
                f"({', '.join('?' * len(keys))})", [backbone, *keys],
            ).fetchall()
        return {keys[k]: list(v) for k, v in rows}

    def store_text_features(self, backbone: str, features: dict[str, Sequence[float]]) -> None:
        with self.transaction() as con:
            for text, vec in features.items():
                con.execute(
                    "INSERT OR REPLACE INTO text_features VALUES (?, ?, ?, ?, ?)",
                    [backbone, hashlib.sha256(text.encode()).hexdigest(), len(vec), [float(x) for x in vec], utcnow()],
                )

    def digest(self) -> str:
        """SHA-256 over the descriptions (class, source, text), order-independent; names a KB's content."""
        h = hashlib.sha256()
        with self.connect() as con:
            rows = con.execute("SELECT class_name, source, text FROM descriptions ORDER BY 1, 2, 3").fetchall()
        for r in rows:
            h.update("\x1f".join(r).encode() + b"\x1e")
        return h.hexdigest()
