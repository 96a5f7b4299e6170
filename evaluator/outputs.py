"""Where results go: file names made from data, and who owns an `--out` folder.

Names: class, defect and file stem come from datasets and meta.json files, i.e. from anyone. `safe_name`
keeps letters, digits, '.', '_' and '-' (everything else, path separators included, becomes '_'), never
starts with a dot, and is at most 80 characters; `unique_names` then makes a list of names distinct
(case-insensitively, for case-insensitive file systems). Every file is written as OUT/<subfolder>/<safe name>,
so nothing lands outside `--out`.

Folders: `kano eval` and `kano predict` record in OUT/kano_outputs.json what produced the folder's results
(the command, the method, the data or inputs) and the files they wrote. Writing into a folder that holds
results is allowed only when they come from the same command with the same identity (they are replaced by
the new ones, and the files of the old listing are removed first, so nothing old is mixed in), or with
`force` (the old results are removed). Anything else is refused with the differing keys named. Files in
OUT that Kano did not write are never touched.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from kano.core.errors import KanoError
from kano.core.files import MANIFEST, read_manifest, write_manifest  # noqa: F401  (train refuses a results folder too)

# What Kano writes into an --out folder: recognised in folders from before the manifest existed.
OWNED_FILES = ("metrics.json", "metrics.csv", "metrics.md", "scores.csv", "report.html", "predictions.jsonl", "index.html",
               "predictions.parquet", "summary.json", "predictions.jsonl.tmp", "predictions.parquet.tmp")
OWNED_DIRS = ("overlays", "maps", "panels", "parts")
MAX_NAME = 80


def safe_name(text: str, fallback: str = "item") -> str:
    """A file-name part from arbitrary text: '../../../x' -> 'x' ('.._.._.._x' stripped of leading dots and
    separators), 'a/b c' -> 'a_b_c'. Never empty, never '.', '..' or hidden, at most MAX_NAME characters."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text))
    s = re.sub(r"_{2,}", "_", s)
    s = re.sub(r"^[._-]+", "", s)
    s = re.sub(r"(?<=_)[._-]+|[._-]+(?=_)", "", s)  # '_.._' runs left by '/../' collapse to one '_'
    s = s.strip("._-")[:MAX_NAME].rstrip("._-")
    return s or fallback


def unique_names(candidates: list[list[str]]) -> list[str]:
    """One distinct name per item. Each item gives its name parts from the most specific on (e.g. stem,
    parent folder, grandparent...): the name is the first part alone, and only items that collide take in
    more parts ('x_001', then 'b_x_001'); if the parts run out, a counter ('001-2') settles it."""
    k = [1] * len(candidates)
    parts = [[safe_name(p) for p in c] or ["item"] for c in candidates]
    name = lambda i: "_".join(reversed(parts[i][: k[i]]))
    while True:
        groups: dict[str, list[int]] = {}
        for i in range(len(parts)):
            groups.setdefault(name(i).lower(), []).append(i)
        grow = [i for g in groups.values() if len(g) > 1 for i in g if k[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            k[i] += 1
    out, seen = [], set()
    for i in range(len(parts)):
        base = name(i)[:MAX_NAME]
        n, cand = 1, base
        while cand.lower() in seen:
            n += 1
            cand = f"{base}-{n}"
        seen.add(cand.lower())
        out.append(cand)
    return out


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def claim(out_dir: Path, command: str, identity: dict, force: bool = False) -> None:
    """Make `out_dir` ready for the results of `command` with `identity` (JSON-able), or refuse.

    Removes the previous results first when they are the same run's (or with force); records the identity
    at once, so that an interrupted run is recognised as the same run when it is repeated."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise KanoError(f"--out must be a folder, got an existing file: {out_dir}")
    identity = json.loads(json.dumps(identity, default=str))
    old = read_manifest(out_dir)
    present = [n for n in OWNED_FILES if (out_dir / n).exists()] + [n for n in OWNED_DIRS if (out_dir / n).is_dir() and any((out_dir / n).iterdir())]
    if old is not None or present:
        same = old is not None and old.get("command") == command and old.get("identity") == identity
        if not same and not force:
            if old is None:
                why = f"results without a record of what produced them ({', '.join(present)})"
            elif old.get("command") != command:
                why = f"the results of `kano {old.get('command')}`"
            else:
                why = f"the results of another {command} (differs in: {', '.join(_differences(old.get('identity') or {}, identity))})"
            raise KanoError(f"--out {out_dir} must be a new folder or hold the results of this same {command}, got {why}; "
                            f"pass another --out, or --force to replace them")
        _remove_previous(out_dir, (old or {}).get("files", []))
    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(out_dir, command, identity, [], finished=False)


def _remove_previous(out_dir: Path, files: list[str]) -> None:
    root = out_dir.resolve()
    for rel in files:
        p = (out_dir / rel).resolve()
        if root in p.parents and p.is_file():  # only what the listing names, and only inside the folder
            p.unlink()
    for n in OWNED_FILES:
        if (out_dir / n).is_file():
            (out_dir / n).unlink()
    for n in OWNED_DIRS:  # Kano's own subfolders: an interrupted run may have left files the listing lacks
        if (out_dir / n).is_dir():
            shutil.rmtree(out_dir / n)


def inside(out_dir: Path, path: Path) -> Path:
    """`path`, after checking that it resolves inside `out_dir` (a last guard behind safe_name)."""
    root, p = Path(out_dir).resolve(), Path(path).resolve()
    if root not in p.parents:
        raise KanoError(f"output file must stay inside --out {out_dir}, got {path}")
    return Path(path)
