"""Run directories: trainable weights as safetensors, everything else as JSON. Never pickle."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kano.errors import KanoError

WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
LOG = "train_log.jsonl"
STATE_DIR = "checkpoint"
STATE_FILE = "last.safetensors"
STATE_FORMAT = "kano-train-state/2"


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


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
    os.chmod(tmp, 0o666 & ~_umask())  # like every other file of the run, not the library's private mode
    _fsync(tmp)
    os.replace(tmp, path)


def save_config(run_dir: Path, config: dict) -> None:
    _atomic_write(run_dir / CONFIG, json.dumps(config, indent=1, default=str))


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


RUN_KEYS = ("backbone", "image_size", "stages", "vv_start", "model")


def _read_weights(weights: Path, cfg: dict) -> dict[str, torch.Tensor]:
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
    from kano.kanoclip import TRAINED_METHODS, build_backbone, build_model, model_config

    run_dir = Path(run_dir)
    cfg = read_config(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise KanoError(f"run directory {run_dir} must contain {WEIGHTS} (training not finished?), got no such file")
    method = cfg.get("method", "kanoclip")  # runs made before the peers existed are KAnoCLIP runs
    if method not in TRAINED_METHODS:
        raise KanoError(f"{run_dir / CONFIG}: method must be one of {', '.join(TRAINED_METHODS)}, got {method!r}")
    missing = [k for k in RUN_KEYS if k not in cfg]
    if missing:
        raise KanoError(f"{run_dir / CONFIG} must have the keys {', '.join(RUN_KEYS)} (as `kano train` writes it), "
                        f"got none for {', '.join(missing)}")
    thr = cfg.get("threshold")
    if thr is not None and (isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 <= thr <= 1.0):
        raise KanoError(f"{run_dir / CONFIG}: threshold must be a number in [0, 1] or null, got {thr!r}")
    from kano.kanoclip.pos_embed import MODES

    if cfg.get("pos_resize") is not None and cfg["pos_resize"] not in MODES:
        raise KanoError(f"{run_dir / CONFIG}: pos_resize must be one of {', '.join(MODES)} (or absent), got {cfg['pos_resize']!r}")
    tensors = _read_weights(weights, cfg)
    # a run without a recorded pos_resize: None rebuilds it with each loader's own resize, as it was made
    bb = build_backbone(cfg["backbone"], image_size=cfg["image_size"], device=device, stages=cfg["stages"],
                        vv_start=cfg["vv_start"], pos_resize=cfg.get("pos_resize"))
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
