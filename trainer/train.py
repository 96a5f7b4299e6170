"""The training loop: feature cache, Adam on prompts and heads, per-epoch log and checkpoint, resume."""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kano.anomaly_data import Sample, SampleDataset, image_size, load_dataset, load_mask, mask_to_tensor, prompt_name, raise_batch_errors
from kano.curves import f1_threshold
from kano.device import resolve_device
from kano.errors import KanoError
from kano.files import atomic_write, read_manifest
from kano.kanoclip import VisualFeatures, backbone_autocast, build_backbone, build_model
from kano.knowledge_store import KnowledgeStore

from . import checkpoint as ckpt
from .cache import FeatureStore, build_feature_store, choose_mode, estimate_bytes
from .config import TrainConfig, method_model_config
from .distributed import Dist
from .knowledge import fallback_warning, knowledge_vectors


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_masks(samples: list[Sample], size: int) -> torch.Tensor:
    out = torch.zeros(len(samples), size, size, dtype=torch.uint8)
    for i, s in enumerate(samples):
        if s.mask_path:
            out[i] = mask_to_tensor(load_mask(s.mask_path, image_size(s.image_path)), size).to(torch.uint8)
    return out


class TrainInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during `train`: what is saved and how to continue (`message`)."""

    def __init__(self, message: str, epochs_done: int, resumable: bool):
        super().__init__(message)
        self.message, self.epochs_done, self.resumable = message, epochs_done, resumable


# keys of the saved train config that may differ on --resume: they change where and how fast, not what is learned
RESUME_MAY_CHANGE = ("out", "epochs", "cache", "cache_dir", "device", "workers")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, now: dict) -> list[str]:
    """'key: saved -> now' for every train-config key (model.* flattened) that differs, except RESUME_MAY_CHANGE."""
    saved = {"method": "kanoclip", **saved}  # runs from before --method are KAnoCLIP runs
    if saved["method"] != "kanoclip":  # older peer runs recorded KAnoCLIP's defaults as "model": read as their own
        try:
            saved["model"] = json.loads(json.dumps(method_model_config(saved["method"], saved.get("model")).to_dict()))
        except (KeyError, ValueError):
            pass
    a, b = _flat(saved), _flat(now)
    keys = sorted((set(a) | set(b)) - set(RESUME_MAY_CHANGE))
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in keys if a.get(k) != b.get(k)]


def _run_state(run_dir: Path, cfg: TrainConfig, resume: bool, log: Callable[[str], None]) -> int:
    """Check what `run_dir` holds against --resume; -> the number of finished epochs to continue from."""
    if run_dir.exists() and not run_dir.is_dir():
        raise KanoError(f"--out must be a directory (a new one, or a run to --resume), got an existing file {run_dir}")
    results = read_manifest(run_dir)  # what eval and predict write into their folders
    if results is not None:  # a run written among another command's results would mix the two
        raise KanoError(f"--out {run_dir} must be a new folder or a run to --resume, got the results of "
                        f"`kano {results.get('command', '?')}`; pass another --out")
    has_config = (run_dir / ckpt.CONFIG).is_file()
    saved = ckpt.read_config(run_dir) if has_config else None
    done = ckpt.read_checkpoint_epoch(run_dir)
    finished = bool(saved) and saved.get("status") == "finished" and (run_dir / ckpt.WEIGHTS).is_file()
    if not resume:
        if finished or done is not None:
            what = "a finished run" if finished else f"a run with {done} of {saved.get('train', {}).get('epochs', '?') if saved else '?'} epochs done"
            raise KanoError(f"run directory {run_dir} must be new (or pass --resume to continue it), got {what}")
        if has_config:
            log(f"note: {run_dir} holds a run interrupted before its first epoch finished; starting it again")
        return 0
    if saved is None:
        raise KanoError(f"--resume needs a run started by `kano train` in {run_dir}, got no {ckpt.CONFIG} there "
                        "(drop --resume to start a new run)")
    now = json.loads(json.dumps(cfg.to_dict(), default=str))
    diff = config_differences(saved.get("train", {}), now)
    if diff:
        raise KanoError(f"--resume must use the configuration of {run_dir} (only --epochs may change, and "
                        f"{', '.join(k for k in RESUME_MAY_CHANGE if k not in ('out', 'epochs'))}), got different {'; '.join(diff)}")
    if done is None:
        log(f"resuming {run_dir}: no epoch had finished, starting from epoch 1 of {cfg.epochs}")
        return 0
    if done > cfg.epochs:
        raise KanoError(f"--epochs must be >= the {done} epochs {run_dir} has already trained, got {cfg.epochs}")
    log(f"resuming {run_dir} from epoch {done + 1} of {cfg.epochs} (checkpoint after epoch {done})"
        if done < cfg.epochs else f"resuming {run_dir}: all {done} epochs are trained; finishing the run (threshold, weights)")
    return done


def train(cfg: TrainConfig, resume: bool = False, progress: Callable | None = None, log: Callable[[str], None] = print,
          allow_missing_masks: bool = False) -> dict:
    """Train a run into cfg.out (one run over all processes of a torchrun/accelerate launch).

    Returns a summary {run_dir, epochs, threshold, log, world_size}. Ctrl-C / SIGTERM raise
    TrainInterrupted saying what is saved and whether `--resume` continues it. allow_missing_masks: an
    anomalous image without a mask (its class having masks) is a warning, not an error (see load_dataset).
    """
    dist = Dist.from_env(cfg.device, resolve_device)
    phase = {"now": "while starting", "run_dir": Path(cfg.out)}
    try:
        return _train(cfg, resume, progress if dist.main else None, log if dist.main else (lambda s: None), dist, phase,
                      allow_missing_masks)
    except KeyboardInterrupt:
        run_dir = phase["run_dir"]
        try:
            done = ckpt.read_checkpoint_epoch(run_dir) or 0
        except KanoError:
            done = 0
        if done:
            msg = (f"interrupted {phase['now']}: epochs 1-{done} of {cfg.epochs} are saved in {run_dir}; "
                   "continue with the same command and --resume")
        else:
            msg = (f"interrupted {phase['now']}, before any epoch finished: nothing to resume in {run_dir}; "
                   "run the same command again to start over")
        raise TrainInterrupted(msg, done, bool(done)) from None
    finally:
        dist.close()


def _train(cfg: TrainConfig, resume: bool, progress: Callable | None, log: Callable[[str], None], dist: Dist, phase: dict,
           allow_missing_masks: bool = False) -> dict:
    t_start = time.perf_counter()
    run_dir = Path(cfg.out)

    def warn(message: str) -> None:  # plain stderr, unwrapped (a path must stay one word), rank 0 only
        if dist.main:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()

    start_epoch = _run_state(run_dir, cfg, resume, log)
    dist.barrier()  # every process checked run_dir before rank 0 writes into it
    seed_everything(cfg.seed)
    device = dist.device
    phase["now"] = "while loading the data"
    dataset = load_dataset(cfg.data, missing_masks="warn" if allow_missing_masks else "error")
    classes, samples = dataset.split_classes(cfg.split, cfg.classes, warn)
    if not samples:
        raise KanoError(f"{cfg.data} must have {cfg.split} images for {', '.join(classes)}, got none")
    labels = torch.tensor([s.label for s in samples], dtype=torch.float32)
    uses_kb = cfg.method == "kanoclip"  # the peers (April-GAN, AnomalyCLIP) use no knowledge base
    store = KnowledgeStore(cfg.kb, create=False, read_only=True) if uses_kb else None  # no write lock: works while the KB is open elsewhere

    phase["now"] = "while building the model"
    bb = build_backbone(cfg.backbone, image_size=cfg.image_size, device=device, stages=cfg.stages, vv_start=cfg.vv_start)
    seed_everything(cfg.seed)  # heads initialised identically whatever the backbone build consumed
    model = build_model(cfg.method, bb, cfg.model)
    names = {c: (cfg.model.prompt_class if uses_kb else None) or prompt_name(c) for c in classes}
    knowledge: dict[str, torch.Tensor] | None = None
    kb_info = None
    if uses_kb:
        # rank 0 encodes and caches the knowledge texts first; the others then read them from the cache
        if dist.main:
            folder_vectors, kinfo = knowledge_vectors(model, store, classes, cfg.knowledge_sources)
        dist.barrier()
        if not dist.main:
            folder_vectors, kinfo = knowledge_vectors(model, store, classes, cfg.knowledge_sources)
        if dist.main and cfg.model.use_knpl and (warning := fallback_warning(kinfo)):
            log(warning)
        grouped: dict[str, list[torch.Tensor]] = {}
        for c, v in folder_vectors.items():  # folders sharing a prompt word (pcb1..pcb4) share one w̄ᵏ
            grouped.setdefault(names[c], []).append(v)
        knowledge = {k: torch.stack(v).mean(0) for k, v in grouped.items()}
        kb_info = {"path": str(Path(cfg.kb).resolve()), "digest": store.digest(), **kinfo}
    sample_names = [names[s.class_name] for s in samples]

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    param_names = [n for n, _ in params]
    train_params = [p for _, p in params]
    optimizer = torch.optim.Adam(train_params, lr=cfg.lr, betas=cfg.betas)
    history: list[dict] = []
    if start_epoch:
        done, model_state, history = ckpt.load_training_state(run_dir, optimizer, param_names)
        model.load_trainable_state_dict(model_state)
        history = history[:done]
    dist.broadcast_params(train_params)  # identical replicas from the first step on

    config = {
        "kano_version": ckpt.library_versions()["kano"], "backbone": cfg.backbone, "image_size": bb.image_size, "stages": bb.stages,
        "vv_start": bb.vv_start, "method": cfg.method, "model": model.cfg.to_dict(),
        "model_used": model.describe() if hasattr(model, "describe") else {}, "train": cfg.to_dict(),
        "kb": kb_info, "train_classes": classes,
        "prompt_names": names, "data": cfg.data, "n_samples": len(samples), "git_commit": ckpt.git_commit(), "seed": cfg.seed,
        "versions": ckpt.library_versions(), "world_size": dist.world, "threshold": None, "status": "training",
    }
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.save_config(run_dir, config)

    masks = _load_masks(samples, bb.image_size)
    cache_mode = choose_mode(cfg.cache, estimate_bytes(model, len(samples)))
    if dist.world > 1 and cache_mode == "memory":
        cache_mode = "disk"  # processes share one memory-mapped cache, each computing its shard
    cache_dir = Path(cfg.cache_dir or Path.home() / ".cache" / "kano" / "features")
    feats: FeatureStore | None = None
    gen_images = SampleDataset(samples, bb.image_size, bb.mean, bb.std, mask_size=8)

    def features(idx: torch.Tensor) -> VisualFeatures:
        if feats is not None:
            return feats.get(idx, device)
        batch = [gen_images[int(i)] for i in idx]
        errs = {"error": [b["error"] for b in batch]}
        raise_batch_errors(errs)
        with backbone_autocast(device):
            return model.encode_images(torch.stack([b["image"] for b in batch]).to(device))

    keys = ("total", "kd", "global", "local")
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        cache_s = 0.0
        if feats is None and cache_mode != "off":
            phase["now"] = "while encoding the feature cache"
            feats = build_feature_store(model, samples, cache_mode, cache_dir, device, cfg.batch_size, cfg.workers,
                                        progress("encoding images (once)") if progress else None, dist, warn)
            cache_s = time.perf_counter() - t0
        phase["now"] = f"during epoch {epoch + 1}"
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(samples), generator=g)
        mine = order[dist.rank::dist.world]  # disjoint shards covering the data
        n_steps = -(-len(order[0::dist.world]) // cfg.batch_size)  # rank 0's shard is the largest
        batches = list(mine.split(cfg.batch_size))
        batches += [mine[:0]] * (n_steps - len(batches))  # a shorter shard: empty steps keep the collectives aligned
        sums = dict.fromkeys(keys, 0.0)
        advance, close = progress(f"epoch {epoch + 1}/{cfg.epochs}")(len(batches)) if progress else (lambda k: None, lambda: None)
        for idx in batches:
            optimizer.zero_grad(set_to_none=True)
            stats = [0.0] * len(keys)
            if len(idx):
                out = model.forward_features(features(idx), [sample_names[i] for i in idx.tolist()], bb.image_size)
                terms = model.loss(out, masks[idx].to(device).float(), labels[idx].to(device),
                                   knowledge if uses_kb and cfg.model.use_knpl else None)
                terms["total"].backward()
                stats = [float(terms[k].detach()) for k in keys]
            _, stats = dist.reduce_step(train_params, len(idx), stats)
            optimizer.step()
            for k, v in zip(keys, stats):
                sums[k] += v
            advance(1)
        close()
        shards = dist.gather(mine.tolist())
        row = {"epoch": epoch + 1, "loss": sums["total"] / n_steps, "loss_kd": sums["kd"] / n_steps,
               "loss_global": sums["global"] / n_steps, "loss_local": sums["local"] / n_steps,
               "seconds": round(time.perf_counter() - t0, 3), "cache_seconds": round(cache_s, 3),
               "cache": cache_mode, "world_size": dist.world, "samples_per_rank": [len(x) for x in shards]}
        if dist.world > 1:
            row["shard_indices"] = shards
        history.append(row)
        if dist.main:
            ckpt.save_training_state(run_dir, epoch + 1, model.trainable_state_dict(), optimizer, param_names, history)
            _write_log(run_dir, history)
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.4f} (kd {row['loss_kd']:.4f}, global {row['loss_global']:.4f}, "
            f"local {row['loss_local']:.4f}) in {row['seconds']:.1f}s")

    # decision threshold from the auxiliary data (never from target test data): the F1-best image score, in float32
    # like every score evaluation reports; each process scores its shard, the sums assemble all of them
    phase["now"] = "while calibrating the decision threshold"
    if feats is None and cache_mode != "off":
        feats = build_feature_store(model, samples, cache_mode, cache_dir, device, cfg.batch_size, cfg.workers,
                                    progress("encoding images (once)") if progress else None, dist, warn)
    model.eval()
    scores_t = torch.zeros(len(samples), dtype=torch.float32)
    with torch.no_grad():
        for idx in torch.arange(dist.rank, len(samples), dist.world).split(cfg.batch_size):
            out = model.forward_features(features(idx), [sample_names[i] for i in idx.tolist()], bb.image_size)
            scores_t[idx] = out.image_score.float().cpu()
    scores_t = dist.all_sum(scores_t)
    threshold = f1_threshold(labels, scores_t)
    state = model.trainable_state_dict()
    ranks = [{"rank": r, "weights_sha256": d} for r, d in enumerate(dist.gather(ckpt.weights_digest(state)))]
    encoded = dist.gather(feats.encoded if feats else 0)
    if dist.main:
        phase["now"] = "while saving the run"
        ckpt.save_weights(run_dir / ckpt.WEIGHTS, state)
        _write_log(run_dir, history)
        config.update(threshold=threshold, status="finished", epochs_done=cfg.epochs, ranks=ranks,
                      feature_cache={"mode": cache_mode, "location": feats.location if feats else None,
                                     "encoded_per_rank": encoded},
                      seconds=round(time.perf_counter() - t_start, 2))
        ckpt.save_config(run_dir, config)
    dist.barrier()
    return {"run_dir": str(run_dir), "epochs": cfg.epochs, "threshold": threshold, "log": history, "world_size": dist.world}


def _write_log(run_dir: Path, history: list[dict]) -> None:
    """train_log.jsonl from the checkpoint's own rows (rewritten whole: a resumed run never repeats an epoch)."""
    atomic_write(run_dir / ckpt.LOG, "".join(json.dumps(r) + "\n" for r in history))
