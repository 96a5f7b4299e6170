"""Run directories: trainable weights as safetensors, everything else as JSON. Never pickle."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kano.errors import KanoError

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
LOG = "train_log.jsonl"
STATE_DIR = "checkpoint"


def git_commit() -> str | None:
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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def save_config(run_dir: Path, config: dict) -> None:
    _atomic_write(run_dir / CONFIG, json.dumps(config, indent=1, default=str))


def read_config(run_dir: Path) -> dict:
    p = Path(run_dir) / CONFIG
    if not p.is_file():
        raise KanoError(f"run directory {run_dir} must contain {CONFIG} (made by `kano train`), got no such file")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise KanoError(f"{p} must be JSON, got {exc}") from None


def save_training_state(run_dir: Path, epoch: int, model_state: dict, optimizer: torch.optim.Optimizer, names: list[str]) -> None:
    """Weights + Adam moments after a finished epoch (for --resume)."""
    d = run_dir / STATE_DIR
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
    save_weights(d / "state.safetensors", tensors)
    _atomic_write(d / "state.json", json.dumps({"epoch": epoch, "steps": steps}))


def load_training_state(run_dir: Path, optimizer: torch.optim.Optimizer, names: list[str]) -> tuple[int, dict] | None:
    d = run_dir / STATE_DIR
    if not (d / "state.json").is_file():
        return None
    meta = json.loads((d / "state.json").read_text())
    tensors = load_file(str(d / "state.safetensors"))
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    for name, p in zip(names, optimizer.param_groups[0]["params"]):
        if f"opt.{name}.exp_avg" in tensors:
            optimizer.state[p] = {
                "step": torch.tensor(meta["steps"].get(name, 0.0)),
                "exp_avg": tensors[f"opt.{name}.exp_avg"].to(p.device),
                "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"].to(p.device),
            }
    return int(meta["epoch"]), model_state


def load_run(run_dir: str | os.PathLike, device: str | torch.device | None = None):
    """Rebuild the model of a finished run. Returns (KAnoCLIP, config dict)."""
    from kanoclip import KAnoCLIP, ModelConfig, build_backbone

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise KanoError(f"run directory {run_dir} must contain {WEIGHTS} (training not finished?), got no such file")
    bb = build_backbone(cfg["backbone"], image_size=cfg["image_size"], device=device, stages=cfg["stages"], vv_start=cfg["vv_start"])
    model = KAnoCLIP(bb, ModelConfig(**cfg["model"]))
    try:
        model.load_trainable_state_dict(load_file(str(weights), device=str(bb.device)))
    except ValueError as exc:
        raise KanoError(f"{weights} does not fit the model described by its config.json: {exc}") from None
    model.eval()
    return model, cfg
