"""The run format, beside the factory that builds its model: a run folder holds weights.safetensors (the
trainable tensors, never pickle) and config.json (what `kano train` resolved: the backbone, image size, stages,
V-V start, the method and its model config, the threshold, the weights' digest). `load_run` rebuilds the model."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kano.core.errors import KanoError
from kano.core.files import atomic_write, fsync, umask

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
RUN_KEYS = ("backbone", "image_size", "stages", "vv_start", "model")
ONE_CLASS_RUN_KEYS = ("backbone", "image_size", "model")


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the trainable tensors (sorted names, float32 bytes): equal digests, equal weights."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors written to a temporary name, flushed, then renamed over `path` (atomic)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.chmod(tmp, 0o666 & ~umask())  # like every other file of the run, not the library's private mode
    fsync(tmp)
    os.replace(tmp, path)


def save_config(run_dir: Path, config: dict) -> None:
    atomic_write(run_dir / CONFIG, json.dumps(config, indent=1, default=str))


def read_config(run_dir: Path) -> dict:
    p = Path(run_dir) / CONFIG
    if not p.is_file():
        raise KanoError(f"run directory {run_dir} must contain {CONFIG} (made by `kano train`), got no such file")
    try:
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KanoError(f"{p} must be JSON, got {exc}") from None
    if not isinstance(cfg, dict):
        raise KanoError(f"{p} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def read_weights(weights: Path, cfg: dict) -> dict[str, torch.Tensor]:
    """The run's tensors on the CPU, checked: a readable safetensors file, finite numbers, and (runs since the
    digest was recorded) the digest `kano train` wrote into config.json beside it."""
    retrain = "train the run again (`kano train ... --out` a new folder), or restore the file from a copy"
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise KanoError(f"{weights} must be a complete safetensors file written by `kano train`, got "
                        f"{type(exc).__name__}: {exc}; {retrain}") from None
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise KanoError(f"{weights} must hold finite numbers, got NaN or inf in {', '.join(sorted(bad)[:3])}"
                        f"{' and more' if len(bad) > 3 else ''} (a damaged file); {retrain}")
    ranks = cfg.get("ranks")
    want = ranks[0].get("weights_sha256") if isinstance(ranks, list) and ranks and isinstance(ranks[0], dict) else None
    if isinstance(want, str) and (got := weights_digest(tensors)) != want:
        raise KanoError(f"{weights} must hold the weights recorded in its config.json (digest {want[:16]}...), got "
                        f"different ones (digest {got[:16]}...): the file changed after training; {retrain}")
    return tensors


def load_run(run_dir: str | os.PathLike, device: str | torch.device | None = None):
    """Rebuild the model of a finished run (KAnoCLIP or the trained peer its config.json names). Returns (model, config dict)."""
    from .backbone import build_backbone
    from .registry import METHODS, RUN_METHODS, build_model, is_one_class, model_config, resolve

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise KanoError(f"run directory {run_dir} must contain {WEIGHTS} (training not finished?), got no such file")
    method = cfg.get("method", "kanoclip")  # runs made before the peers existed are KAnoCLIP runs
    if method not in RUN_METHODS:
        raise KanoError(f"{run_dir / CONFIG}: method must be one of {', '.join(RUN_METHODS)}, got {method!r}")
    one_class = is_one_class(method)
    missing = [k for k in (ONE_CLASS_RUN_KEYS if one_class else RUN_KEYS) if k not in cfg]
    if missing:
        raise KanoError(f"{run_dir / CONFIG} must have the keys {', '.join(RUN_KEYS)} (as `kano train` writes it), "
                        f"got none for {', '.join(missing)}")
    thr = cfg.get("threshold")
    if thr is not None and (isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 <= thr <= 1.0):
        raise KanoError(f"{run_dir / CONFIG}: threshold must be a number in [0, 1] or null, got {thr!r}")
    from .pos_embed import MODES

    if cfg.get("pos_resize") is not None and cfg["pos_resize"] not in MODES:
        raise KanoError(f"{run_dir / CONFIG}: pos_resize must be one of {', '.join(MODES)} (or absent), got {cfg['pos_resize']!r}")
    tensors = read_weights(weights, cfg)
    if one_class:
        return _load_one_class(run_dir, method, cfg, tensors, device), cfg
    # a run without a recorded pos_resize: None rebuilds it with each loader's own resize, as it was made
    bb = build_backbone(cfg["backbone"], image_size=cfg["image_size"], device=device, stages=cfg["stages"],
                        vv_start=cfg["vv_start"], pos_resize=cfg.get("pos_resize"),
                        partial_patches=getattr(resolve(METHODS[method].model), "partial_patches", False),
                        activation=(cfg.get("train") or {}).get("activation"))
    try:
        model = build_model(method, bb, model_config(method, cfg["model"]))
    except (TypeError, ValueError) as exc:
        raise KanoError(f"{run_dir / CONFIG}: \"model\" must hold {method}'s model config, got {exc}") from None
    try:
        model.load_trainable_state_dict({k: v.to(bb.device) for k, v in tensors.items()})
    except ValueError as exc:
        raise KanoError(f"{weights} does not fit the model described by its config.json: {exc}") from None
    model.eval()
    return model, cfg


def _load_one_class(run_dir: Path, method: str, cfg: dict, tensors: dict[str, torch.Tensor], device):
    """A one-class run (kanoclip/one_class.py): the module built by name, its fitted tensors restored."""
    from .registry import build_one_class, model_config

    size = cfg["image_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise KanoError(f"{run_dir / CONFIG}: image_size must be an integer >= 8, got {size!r}")
    try:
        mcfg = model_config(method, cfg["model"])
    except (TypeError, ValueError) as exc:
        raise KanoError(f"{run_dir / CONFIG}: \"model\" must hold {method}'s model config, got {exc}") from None
    model = build_one_class(method, cfg["backbone"], mcfg, size, device, stages=cfg.get("stages"))
    try:
        model.load_trainable_state_dict({k: v for k, v in tensors.items()})
    except ValueError as exc:
        raise KanoError(f"{run_dir / WEIGHTS} does not fit the model described by its config.json: {exc}") from None
    return model.eval()
