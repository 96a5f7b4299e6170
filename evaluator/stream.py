"""Inputs of `kano predict`, read lazily, and how they are dealt out to processes.

An input is an image file, a folder of images (sorted, not recursive), a glob pattern (sorted matches that
are images), a text file of paths (one a line; blank lines and lines starting with '#' skipped), or a
manifest: CSV (header row) or Parquet with a `path` column and optionally a `class` column. Relative paths
in a text file or manifest are relative to the file's folder; each must end in an image suffix. No image is
opened here: one that is missing or unreadable becomes an error row when it is scored.

Sharding: the inputs, in order, are cut into batches of `batch_size`; batch k goes to process k % world.
Every process then scores whole batches of the same images a single process would have put together, so
the per-image results are the same bits (on the CPU, at the same thread count), and the merge interleaves
the parts batch by batch (records.merge_parts).
"""

from __future__ import annotations

import csv
import glob
from pathlib import Path
from typing import Iterator

from kano.anomaly_data import IMAGE_EXTS, is_image_path, list_images
from kano.core.errors import KanoError

TEXT_LISTS = (".txt", ".lst")
MANIFESTS = (".csv", ".parquet")
PATH_COLUMN, CLASS_COLUMN = "path", "class"
_GLOB_CHARS = set("*?[")


def _near(base: Path, raw: str) -> str:
    p = Path(raw)
    return str(p if p.is_absolute() else base / p)


def _image_path(p: Path, where: str, raw: str) -> str:
    """raw checked to name an image file by its suffix (whether it exists is found out when it is scored)."""
    if not is_image_path(Path(raw)):
        raise KanoError(f"{p} {where} must be an image file path ({', '.join(IMAGE_EXTS)}), got {raw[:200]!r}")
    return _near(p.parent, raw)


def _text_list(p: Path) -> Iterator[tuple[str, str | None]]:
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield _image_path(p, f"line {n}", line), None


def _columns_error(p: Path, columns) -> KanoError:
    return KanoError(f"manifest {p} must have a '{PATH_COLUMN}' column (and optionally '{CLASS_COLUMN}'), "
                     f"got columns: {', '.join(map(str, columns)) or 'none'}")


def _csv(p: Path) -> Iterator[tuple[str, str | None]]:
    with open(p, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if PATH_COLUMN not in (reader.fieldnames or []):
            raise _columns_error(p, reader.fieldnames or [])
        for n, row in enumerate(reader, 2):
            if not (row.get(PATH_COLUMN) or "").strip():
                raise KanoError(f"manifest {p} line {n} must give a path, got an empty '{PATH_COLUMN}'")
            yield _image_path(p, f"line {n}", row[PATH_COLUMN].strip()), (row.get(CLASS_COLUMN) or "").strip() or None


def _parquet(p: Path) -> Iterator[tuple[str, str | None]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise KanoError(f"a Parquet manifest ({p}) needs pyarrow, got it not installed: pip install 'pyarrow>=15'") from None
    pf = pq.ParquetFile(p)
    names = pf.schema_arrow.names
    if PATH_COLUMN not in names:
        raise _columns_error(p, names)
    cols = [PATH_COLUMN] + ([CLASS_COLUMN] if CLASS_COLUMN in names else [])
    for batch in pf.iter_batches(batch_size=8192, columns=cols):
        paths = batch.column(0).to_pylist()
        classes = batch.column(1).to_pylist() if len(cols) == 2 else [None] * len(paths)
        for raw, cls in zip(paths, classes):
            if not raw:
                raise KanoError(f"manifest {p} must give a path in every row, got an empty '{PATH_COLUMN}'")
            yield _image_path(p, "row", str(raw)), (str(cls) if cls else None)


def iter_inputs(inputs: list[str]) -> Iterator[tuple[str, str | None]]:
    """(image path, class or None) for every input, in order, read as it goes (see the module docstring)."""
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for f in list_images(p):
                yield str(f), None
        elif p.is_file():
            suffix = p.suffix.lower()
            if suffix in TEXT_LISTS:
                yield from _text_list(p)
            elif suffix == ".csv":
                yield from _csv(p)
            elif suffix == ".parquet":
                yield from _parquet(p)
            elif is_image_path(p):
                yield str(p), None
            else:
                raise KanoError(f"input {p} must be an image file (png, jpg, bmp, tif, webp), a folder, a list of paths "
                                f"({', '.join(TEXT_LISTS)}) or a manifest ({', '.join(MANIFESTS)}), got another file type")
        elif _GLOB_CHARS & set(str(item)):
            matches = [m for m in sorted(glob.glob(str(item), recursive=True)) if is_image_path(Path(m)) and Path(m).is_file()]
            if not matches:
                raise KanoError(f"input pattern {item} must match at least one image file, got none")
            for m in matches:
                yield m, None
        else:
            raise KanoError(f"input {p} must be an existing image file or folder, got no such path")


def batch_sizes(total: int, batch_size: int) -> list[int]:
    """The sizes of the batches the inputs are cut into: all batch_size but the last."""
    return [min(batch_size, total - s) for s in range(0, total, batch_size)]


def shard_size(total: int, batch_size: int, world: int, rank: int) -> int:
    """Images of process `rank` of `world`: those of batches k with k % world == rank."""
    return sum(batch_sizes(total, batch_size)[rank::world])


def shard_batches(items, batch_size: int, world: int = 1, rank: int = 0) -> Iterator[list]:
    """The batches (lists of (global index, item)) of `items` that process `rank` of `world` scores, lazily."""
    batch: list = []
    k = 0
    for i, item in enumerate(items):
        if k % world == rank:
            batch.append((i, item))
        if (i + 1) % batch_size == 0:
            if batch:
                yield batch
            batch, k = [], k + 1
    if batch:
        yield batch
