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
from typing import Callable, Iterator, Sequence

import duckdb

from kano.core.errors import KanoError

from .migrations import MIGRATIONS, SCHEMA_VERSION, description_key_v3

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


def _connect(path: Path, read_only: bool, wait_s: float = 15.0, config: dict | None = None) -> duckdb.DuckDBPyConnection:
    """Open the file; while another process holds it (DuckDB allows one writer), retry for up to wait_s."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if read_only:
                return duckdb.connect(str(path), read_only=True, config=config or {})
            return duckdb.connect(str(path), config={"storage_compatibility_version": STORAGE_COMPATIBILITY, **(config or {})})
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower() and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise KanoError(f"cannot open knowledge base {path}: {_first_line(exc)}") from None
        except duckdb.Error as exc:
            raise KanoError(f"{path} must be a DuckDB knowledge base, got an unreadable file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


@contextlib.contextmanager
def database_errors(path: Path) -> Iterator[None]:
    """Turn a DuckDB error while reading or writing the file into a KanoError naming the file.

    A damaged block (bad checksum, truncated file) surfaces only when a query touches it, long after
    the file opened; the user gets one line, not a traceback.
    """
    try:
        yield
    except KanoError:
        raise
    except duckdb.Error as exc:
        msg = _first_line(exc)
        if any(w in msg.lower() for w in ("corrupt", "checksum", "invalidated", "could not read", "truncated", "serializ")):
            raise KanoError(f"knowledge base {path} must be an intact DuckDB file, got a damaged one ({msg}); "
                            "restore it from a copy, or build a new file with `kano kb build`") from None
        raise KanoError(f"knowledge base {path}: database error ({msg})") from None


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
    ).fetchone()[0]
    if not exists:
        return 0
    row = con.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def _check_version(current: int) -> None:
    if current > SCHEMA_VERSION:
        raise KanoError(
            f"knowledge base schema version must be at most {SCHEMA_VERSION} for this Kano, got {current}: upgrade Kano"
        )


def migrate(con: duckdb.DuckDBPyConnection, upto: int | None = None) -> int:
    """Apply the pending migrations in order, each in its own transaction. Returns the version."""
    upto = SCHEMA_VERSION if upto is None else upto
    if schema_version(con) >= upto:  # nothing to do: no write at all (a build holding the file waits less)
        _check_version(schema_version(con))
        return schema_version(con)
    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)")
    current = schema_version(con)
    _check_version(current)
    for number in range(current + 1, upto + 1):
        name, steps = MIGRATIONS[number - 1]
        con.execute("BEGIN TRANSACTION")
        try:
            for step in steps:
                if callable(step):
                    step(con)
                else:
                    con.execute(step)
            con.execute("INSERT INTO schema_version VALUES (?, ?, ?)", [number, name, utcnow()])
            con.execute("COMMIT")
        except Exception:
            con.execute("ROLLBACK")
            raise
    return schema_version(con)


def description_key(d: "Description", call_key: str | None) -> str:
    return description_key_v3(d.source, d.class_name, d.text, d.image_path, call_key)


class BuildLock:
    """An advisory lock beside the KB file (`<kb>.build-lock`): one `kano kb build` per file at a time.

    A build's "is it stored?" check and its insert are seconds apart (the model call lies between), so two
    builds at once would each pay for the same call. The lock is the operating system's (flock): it
    is released when the process ends, even by SIGKILL, so a stale lock file is harmless.
    """

    def __init__(self, kb_path: Path):
        self.path = Path(str(kb_path) + ".build-lock")
        self._fh = None

    def acquire(self, wait: bool = True, on_wait: Callable[[str], None] | None = None) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            if not wait:
                fh.close()
                raise KanoError(f"knowledge base {self.path.with_suffix('')} must not be in use by another build, got one "
                                f"running ({holder}); wait for it, or build into another file") from None
            if on_wait:
                on_wait(holder)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            self._fh.seek(0)
            self._fh.truncate()
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


class KnowledgeStore:
    """Typed access to one knowledge-base file.

    read_only: open without the write lock and without migrating (train reads the KB this way, so it
    works while the file is open elsewhere); writes then fail, except `try_store_text_features`.
    """

    def __init__(self, path: str | os.PathLike, create: bool = True, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        if not self.path.exists():
            if not create or read_only:
                raise KanoError(f"knowledge base {self.path} must exist, got no such file (build one with `kano kb build`)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if read_only:
            with self.connect() as con:
                self.version = schema_version(con)
                _check_version(self.version)
        else:
            with self.connect() as con:
                self.version = migrate(con)

    @contextlib.contextmanager
    def connect(self, read_only: bool | None = None) -> Iterator[duckdb.DuckDBPyConnection]:
        con = _connect(self.path, self.read_only if read_only is None else read_only)
        try:
            with database_errors(self.path):
                yield con
        finally:
            con.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One read-write transaction: what it reads and what it writes are one step for every other writer
        (DuckDB lets one process at a time hold the file read-write; threads of this one are serialised by
        the caller), and the unique keys turn any slip into an error instead of a duplicate."""
        with self.connect(read_only=False) as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise

    def build_lock(self) -> BuildLock:
        return BuildLock(self.path)

    # ---- calls -------------------------------------------------------------------------
    def successful_call(self, call_key: str) -> tuple[int, str] | None:
        """(call id, reply) of the stored successful call with this key, if any."""
        with self.connect() as con:
            row = con.execute(
                "SELECT id, reply FROM calls WHERE call_key = ? AND status = 'ok' ORDER BY id LIMIT 1", [call_key]
            ).fetchone()
        return (int(row[0]), row[1]) if row else None

    def record_call(self, call: CallRecord, descriptions: Sequence[Description] = (), cap: int | None = None) -> tuple[int, int]:
        """Log one call and the descriptions parsed from it in ONE transaction. Returns (call id, descriptions added).

        A successful call whose key is already stored (only possible when two writers raced) is still
        logged (it was made and billed), and its descriptions attach to the first call with that key.
        `cap`: at most this many descriptions of (class, source) in the KB after the insert.
        """
        with self.transaction() as con:
            call_id = self._insert_call(con, call)
            canonical = call_id
            if call.status == "ok":
                row = con.execute("SELECT call_id FROM call_keys WHERE call_key = ?", [call.call_key]).fetchone()
                if row:
                    canonical = int(row[0])
                else:
                    con.execute("INSERT INTO call_keys VALUES (?, ?)", [call.call_key, call_id])
            added = self._insert_descriptions(con, descriptions, canonical, call.call_key, cap) if descriptions else 0
        return canonical, added

    def attach_descriptions(self, call_key: str, descriptions: Sequence[Description], cap: int | None = None) -> int:
        """Add descriptions parsed from the stored successful call `call_key` (a call reused, e.g. for a
        byte-identical image). One transaction; returns how many were new."""
        with self.transaction() as con:
            row = con.execute("SELECT call_id FROM call_keys WHERE call_key = ?", [call_key]).fetchone()
            if row is None:
                raise KanoError(f"no successful call with key {call_key[:12]}... to attach descriptions to")
            return self._insert_descriptions(con, descriptions, int(row[0]), call_key, cap)

    def llm_calls(self, class_name: str, provider: str, model: str) -> int:
        """Successful LLM calls stored for a class with this provider and model (the re-ask budget)."""
        with self.connect() as con:
            return int(con.execute(
                "SELECT count(*) FROM calls WHERE kind = 'llm' AND status = 'ok' AND class_name = ? AND provider = ? "
                "AND requested_model = ?", [class_name, provider, model]).fetchone()[0])

    def described_images(self, class_name: str) -> set[tuple[str, str]]:
        """{(image path, call key)} of the VQA descriptions stored for a class."""
        with self.connect() as con:
            rows = con.execute(
                """SELECT d.image_path, c.call_key FROM descriptions d JOIN calls c ON c.id = d.call_id
                   WHERE d.source = 'vqa' AND d.class_name = ?""", [class_name]).fetchall()
        return {(p, k) for p, k in rows}

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
    def _insert_descriptions(con: duckdb.DuckDBPyConnection, descriptions: Sequence[Description], call_id: int | None,
                             call_key: str | None, cap: int | None = None, skip_any_source: bool = False) -> int:
        """Insert the descriptions not stored yet (by description key), inside the caller's transaction."""
        added = 0
        for d in descriptions:
            if d.source not in SOURCES:
                raise KanoError(f"description source must be one of {', '.join(SOURCES)}, got {d.source!r}")
            if cap is not None:
                have = con.execute("SELECT count(*) FROM descriptions WHERE class_name = ? AND source = ?",
                                   [d.class_name, d.source]).fetchone()[0]
                if have >= cap:
                    break
            key = description_key(d, call_key)
            if con.execute("SELECT 1 FROM description_keys WHERE dedup_key = ?", [key]).fetchone():
                continue
            if skip_any_source and d.source != "vqa":
                others = [description_key(Description(d.class_name, s, d.text), None) for s in SOURCES if s != "vqa"]
                if con.execute(f"SELECT 1 FROM description_keys WHERE dedup_key IN ({', '.join('?' * len(others))})",
                               others).fetchone():
                    continue
            row = con.execute(
                "INSERT INTO descriptions (class_name, source, text, call_id, image_path, created_at) VALUES (?, ?, ?, ?, ?, ?) "
                "RETURNING id", [d.class_name, d.source, d.text, call_id, d.image_path, utcnow()]).fetchone()
            con.execute("INSERT INTO description_keys VALUES (?, ?)", [key, int(row[0])])
            added += 1
        return added

    # ---- descriptions ------------------------------------------------------------------
    def add_descriptions(self, descriptions: Sequence[Description], skip_any_source: bool = False) -> int:
        """Add descriptions without a call (builtin, import), skipping those already stored. Returns how many were new.

        skip_any_source: also skip a text the class already holds under another source (imports)."""
        with self.transaction() as con:
            return self._insert_descriptions(con, descriptions, None, None, skip_any_source=skip_any_source)

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

    def count_descriptions(self, class_name: str, source: str) -> int:
        with self.connect() as con:
            return int(con.execute("SELECT count(*) FROM descriptions WHERE class_name = ? AND source = ?",
                                   [class_name, source]).fetchone()[0])

    def classes(self) -> list[str]:
        with self.connect() as con:
            return [r[0] for r in con.execute("SELECT DISTINCT class_name FROM descriptions ORDER BY 1").fetchall()]

    # ---- text feature cache ------------------------------------------------------------
    def cached_text_features(self, backbone: str, texts: Sequence[str]) -> dict[str, list[float]]:
        keys = {hashlib.sha256(t.encode()).hexdigest(): t for t in texts}
        if not keys:
            return {}
        with self.connect() as con:
            if not con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'text_features'").fetchone()[0]:
                return {}  # a schema-1 file opened read-only: no cache table
            rows = con.execute(
                "SELECT text_sha256, vector FROM text_features WHERE backbone = ? AND text_sha256 IN "
                f"({', '.join('?' * len(keys))})", [backbone, *keys],
            ).fetchall()
        return {keys[k]: list(v) for k, v in rows}

    def store_text_features(self, backbone: str, features: dict[str, Sequence[float]]) -> None:
        with self.transaction() as con:
            self._write_text_features(con, backbone, features)

    def try_store_text_features(self, backbone: str, features: dict[str, Sequence[float]]) -> bool:
        """Cache text features if the file can be written right now; False (and nothing written) when it is
        open elsewhere, read-only on disk, or of an older schema. Training never waits for the write lock."""
        if not features:
            return True
        try:
            con = _connect(self.path, read_only=False, wait_s=0.0)
        except KanoError:
            return False
        try:
            if schema_version(con) < 2:
                return False
            con.execute("BEGIN TRANSACTION")
            self._write_text_features(con, backbone, features)
            con.execute("COMMIT")
            return True
        except duckdb.Error:
            return False
        finally:
            con.close()

    @staticmethod
    def _write_text_features(con, backbone: str, features: dict[str, Sequence[float]]) -> None:
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


def upgrade(path: str | os.PathLike) -> tuple[int, int]:
    """Migrate an existing KB file to the current schema. Returns (version before, version after)."""
    p = Path(path)
    if not p.is_file():
        raise KanoError(f"knowledge base {p} must be an existing DuckDB file, got no such file")
    con = _connect(p, read_only=False)
    try:
        with database_errors(p):
            before = schema_version(con)
            return before, migrate(con)
    finally:
        con.close()
