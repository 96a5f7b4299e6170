"""Training state: the checkpoint after each finished epoch (weights, Adam moments, epoch and log in one
safetensors file) for --resume. The finished run's own format is kanoclip/runs.py."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from kano.core.errors import KanoError
from kano.core.files import atomic_write, git_commit, library_versions  # noqa: F401  (the records a run writes)
from kano.kanoclip.runs import CONFIG, RUN_KEYS, WEIGHTS, load_run, read_config, save_config, save_weights, weights_digest  # noqa: F401

LOG = "train_log.jsonl"
STATE_DIR = "checkpoint"
STATE_FILE = "last.safetensors"
STATE_FORMAT = "kano-train-state/2"


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / STATE_DIR / STATE_FILE


def save_training_state(run_dir: Path, epoch: int, model_state: dict, optimizer: torch.optim.Optimizer, names: list[str],
                        history: list[dict]) -> None:
    """After a finished epoch: weights, Adam moments, the epoch and the log so far, in ONE file.

    The epoch, Adam's step counts and the log rows sit in the safetensors metadata, so the weights
    and the epoch they belong to can never disagree (a kill leaves the previous file or the new one).
    """
    d = Path(run_dir) / STATE_DIR
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in model_state.items()}
    steps = {}
    for name, p in zip(names, optimizer.param_groups[0]["params"]):
        st = optimizer.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                tensors[f"opt.{name}.{key}"] = st[key]
        if "step" in st:
            steps[name] = float(st["step"])
    meta = {"format": STATE_FORMAT, "epoch": str(epoch), "steps": json.dumps(steps), "history": json.dumps(history)}
    save_weights(d / STATE_FILE, tensors, meta)


def read_checkpoint_epoch(run_dir: Path) -> int | None:
    """The last finished epoch recorded in the run's checkpoint, None without one."""
    p = checkpoint_path(run_dir)
    if not p.is_file():
        return None
    return int(_read_meta(p)["epoch"])


def _read_meta(p: Path) -> dict:
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"format must be {STATE_FORMAT}, got {meta.get('format')!r}")
        int(meta["epoch"])
        return meta
    except Exception as exc:
        raise KanoError(f"checkpoint {p} must be a Kano training checkpoint, got an unreadable file "
                        f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); delete the run directory to start again") from None


def load_training_state(run_dir: Path, optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[int, dict, list[dict]] | None:
    """-> (last finished epoch, trainable state, log rows up to it), or None when no epoch finished."""
    p = checkpoint_path(run_dir)
    if not p.is_file():
        return None
    meta = _read_meta(p)
    tensors = load_file(str(p))
    steps = json.loads(meta["steps"])
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    for name, p_ in zip(names, optimizer.param_groups[0]["params"]):
        if f"opt.{name}.exp_avg" in tensors:
            optimizer.state[p_] = {
                "step": torch.tensor(steps.get(name, 0.0)),
                "exp_avg": tensors[f"opt.{name}.exp_avg"].to(p_.device),
                "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"].to(p_.device),
            }
    return int(meta["epoch"]), model_state, json.loads(meta["history"])
