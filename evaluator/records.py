"""The result rows of `kano predict` on disk: append-only JSON Lines that survive a kill, read back lazily.

Imports no torch (nor anything that does), so that a torch-free runtime writes and reads the same rows.

A row is one JSON object on one line. Rows are appended a batch at a time in one write, then flushed and
fsync'ed: after a kill (SIGKILL, power loss) the file holds whole rows, and at most a last line without its
newline (a torn row), which `repair` cuts off before anything appends again. A row always has "image",
"class", "threshold", "score", "anomalous" and "error" (null, or why the image was not scored).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from kano.core.errors import KanoError

RESULT = "predictions.jsonl"
PARQUET = "predictions.parquet"
SUMMARY = "summary.json"
# the columns of predictions.parquet: the fields every row has, then the files written when maps or panels are asked for
PARQUET_COLUMNS = (("image", "string"), ("class", "string"), ("score", "float64"), ("anomalous", "bool_"),
                   ("threshold", "float64"), ("error", "string"), ("map_npy", "string"), ("map_png", "string"),
                   ("panel_png", "string"), ("map_max", "float64"))
_CHUNK = 1 << 20


def decision(score: float | None, threshold: float | None) -> bool | None:
    """Anomalous when score >= threshold; None without a threshold or a score."""
    if score is None or threshold is None:
        return None
    return bool(score >= threshold)


def repair(path: Path) -> int:
    """Cut a torn last line (no newline: the write was killed) off `path`; -> the number of whole rows left.
    A missing file has none."""
    path = Path(path)
    if not path.exists():
        return 0
    rows, size, last_newline = 0, 0, -1
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            k = chunk.rfind(b"\n")
            if k >= 0:
                last_newline = size + k
            rows += chunk.count(b"\n")
            size += len(chunk)
    if last_newline + 1 != size:
        with open(path, "r+b") as f:
            f.truncate(last_newline + 1)
            os.fsync(f.fileno())
    return rows


def keep_rows(path: Path, n: int) -> None:
    """Cut `path` after its first n whole rows."""
    offset, seen = 0, 0
    with open(path, "r+b") as f:
        while seen < n and (line := f.readline()):
            if not line.endswith(b"\n"):
                break
            offset += len(line)
            seen += 1
        f.truncate(offset)
        os.fsync(f.fileno())


class RowWriter:
    """Appends rows to a JSON Lines file; each `append` is one write, flushed and fsync'ed."""

    def __init__(self, path: Path, fresh: bool = False):
        """fresh: start the file empty; otherwise append after its whole rows (a torn last line is cut off)."""
        self.path = Path(path)
        if not fresh:
            repair(self.path)
        self._f = open(self.path, "wb" if fresh else "ab")

    def append(self, rows: Iterable[dict]) -> None:
        data = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
        if data:
            self._f.write(data)
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_rows(path: Path) -> Iterator[dict]:
    """The whole rows of a JSON Lines file, one at a time (a torn last line is skipped)."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                return
            try:
                yield json.loads(line)
            except ValueError:
                raise KanoError(f"{path} line {n} must be a JSON object, got {line[:80]!r}") from None


class ResultRows:
    """The rows of a result file as a read-only sequence that reads the file when asked (nothing is held):
    iterate it, take len() or an index."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._len: int | None = None

    def __iter__(self) -> Iterator[dict]:
        return read_rows(self.path)

    def __len__(self) -> int:
        if self._len is None:
            self._len = sum(1 for _ in read_rows(self.path))
        return self._len

    def __getitem__(self, i: int) -> dict:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} of {n}")
        i %= n
        for k, row in enumerate(self):
            if k == i:
                return row
        raise IndexError(i)


def worst_first(rows: Iterable[dict], n: int) -> list[dict]:
    """The n rows a person should see first: the flagged ones, then the other scored ones, each by score from
    the highest, then those not scored; ties in input order. Streams: memory for n rows, whatever the run's length."""
    import heapq

    def key(ir):
        i, r = ir
        if r.get("error") or r.get("score") is None:
            return (2, 0.0, i)
        return (0 if r.get("anomalous") else 1, -float(r["score"]), i)

    return [r for _, r in heapq.nsmallest(n, enumerate(rows), key=key)]


# rows printed in the terminal by `kano predict`; all of them are in the result file
PRINT_ROWS = 20


def print_worst(rows, subject: str) -> None:
    """`kano predict`'s table: the PRINT_ROWS rows a person must look at first (worst_first), titled by `subject`
    (what scored which class). rows: ResultRows (its summary counts the images)."""
    from kano.core import ui

    n = rows.summary["images"]
    title = (f"predictions ({subject}), flagged first, by score"
             + ("" if n <= PRINT_ROWS else f": the {PRINT_ROWS} highest of {n}"))
    ui.print_table(title, ["image", "score", "anomalous"],
                   [(Path(r["image"]).name, "-" if r["score"] is None else round(r["score"], 6),
                     "error" if r["error"] else ("-" if r["anomalous"] is None else ("yes" if r["anomalous"] else "no")))
                    for r in worst_first(rows, PRINT_ROWS)])


def print_written(rows, out, fmt: str, maps: bool, panels: bool, extra: Iterable[str] = ()) -> None:
    """`kano predict`'s last lines: the first PRINT_ROWS images not scored, the counts, and the files written into
    `out` (`extra`: more entries for that list)."""
    from kano.core import ui

    errors = 0
    for r in rows:
        if r["error"]:
            errors += 1
            if errors <= PRINT_ROWS:
                ui.err.print(f"not scored: {r['error']}")
    s = rows.summary
    ui.out.print(f"{s['images']} images: {s['scored']} scored ({s['anomalous']} anomalous, {s['normal']} normal), {s['errors']} not scored")
    files = ["index.html", "predictions.jsonl", "summary.json"] + (["predictions.parquet"] if fmt == "parquet" else [])
    files += (["maps/ (npy and 16-bit png)"] if maps else []) + (["panels/"] if panels else []) + list(extra)
    ui.out.print(f"written to {out}: {', '.join(files)}")


def summarize(rows: Iterable[dict]) -> dict:
    """Counts over rows: images, scored, errors, anomalous and normal (decisions need a threshold)."""
    s = {"images": 0, "scored": 0, "errors": 0, "anomalous": 0, "normal": 0}
    for r in rows:
        s["images"] += 1
        if r.get("error"):
            s["errors"] += 1
            continue
        s["scored"] += 1
        if r.get("anomalous") is True:
            s["anomalous"] += 1
        elif r.get("anomalous") is False:
            s["normal"] += 1
    return s


def merge_parts(parts: list[Path], batch_sizes: Iterable[int], dest: Path) -> int:
    """Interleave per-process parts into one file in input order: batch k of the input is the next
    batch_sizes[k] rows of parts[k % len(parts)] (how `shard_batches` deals batches out). Written to a
    temporary file, fsync'ed and renamed over `dest`; -> the number of rows."""
    readers = [read_rows(p) for p in parts]
    tmp = Path(dest).with_name(Path(dest).name + ".tmp")
    n = 0
    with RowWriter(tmp, fresh=True) as w:
        for k, size in enumerate(batch_sizes):
            rows = []
            for _ in range(size):
                row = next(readers[k % len(parts)], None)
                if row is None:
                    raise KanoError(f"part {parts[k % len(parts)]} must hold the rows of its batches, got fewer (batch {k}): "
                                    "its process did not finish; run the same command again to resume")
                rows.append(row)
            w.append(rows)
            n += size
    tmp.replace(dest)
    return n


def to_parquet(src: Path, dest: Path, rows_per_group: int = 65536) -> None:
    """predictions.parquet from a JSON Lines result file, a row group at a time (PARQUET_COLUMNS)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise KanoError("--format parquet needs pyarrow, got it not installed: pip install 'pyarrow>=15'") from None
    schema = pa.schema([(name, getattr(pa, typ)()) for name, typ in PARQUET_COLUMNS])
    tmp = Path(dest).with_name(Path(dest).name + ".tmp")
    with pq.ParquetWriter(tmp, schema) as w:
        group: list[dict] = []
        for row in read_rows(src):
            group.append({name: row.get(name) for name, _ in PARQUET_COLUMNS})
            if len(group) >= rows_per_group:
                w.write_table(pa.Table.from_pylist(group, schema=schema))
                group = []
        if group:
            w.write_table(pa.Table.from_pylist(group, schema=schema))
    tmp.replace(dest)
