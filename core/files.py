"""Files every stage writes: atomic replacement, the process umask, the git commit and library versions a
record names, and the manifest (`kano_outputs.json`) by which eval and predict mark a results folder as theirs."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

MANIFEST = "kano_outputs.json"


def git_commit() -> str | None:
    """The commit of the checkout Kano runs from; None outside a git checkout (an installed wheel)."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def library_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("kano", "torch", "open_clip_torch", "duckdb", "transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, text: str) -> None:
    """`text` into `path` through a flushed temporary file and a rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    fsync(tmp)
    os.replace(tmp, path)


def read_manifest(out_dir: Path) -> dict | None:
    """What a folder's MANIFEST says produced it: None when there is none, {} when it cannot be read as an object."""
    mf = Path(out_dir) / MANIFEST
    if not mf.is_file():
        return None
    try:
        got = json.loads(mf.read_text())
    except (OSError, ValueError):
        return {}
    return got if isinstance(got, dict) else {}


def write_manifest(out_dir: Path, command: str, identity: dict, files: list[str], finished: bool = True) -> None:
    tmp = Path(out_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"command": command, "identity": identity, "finished": finished, "files": sorted(files)}, indent=1))
    tmp.replace(Path(out_dir) / MANIFEST)
