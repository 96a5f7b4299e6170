"""The training loop: feature cache, Adam on prompts and heads, per-epoch log and checkpoint, resume."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from anomaly_data import Sample, SampleDataset, image_size, load_dataset, load_mask, mask_to_tensor, prompt_name, raise_batch_errors
from kano.errors import KanoError
from kanoclip import KAnoCLIP, VisualFeatures, build_backbone
from knowledge_store import KnowledgeStore

from . import checkpoint as ckpt
from .cache import FeatureStore, build_feature_store, choose_mode, estimate_bytes
from .config import TrainConfig
from .knowledge import fallback_warning, knowledge_vectors


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(device: str | None) -> torch.device:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise KanoError(f"device must be available, got {device} on a machine without CUDA")
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_masks(samples: list[Sample], size: int) -> torch.Tensor:
    out = torch.zeros(len(samples), size, size, dtype=torch.uint8)
    for i, s in enumerate(samples):
        if s.mask_path:
            out[i] = mask_to_tensor(load_mask(s.mask_path, image_size(s.image_path)), size).to(torch.uint8)
    return out


class _Accel:
    """accelerate when launched on several processes (`accelerate launch`), plain single-process otherwise."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.acc = None
        if self.world > 1:
            from accelerate import Accelerator

            self.acc = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no")
            self.device = self.acc.device
        else:
            self.device = device
        self.rank = self.acc.process_index if self.acc else 0

    def barrier(self):
        if self.acc:
            self.acc.wait_for_everyone()

    @property
    def main(self) -> bool:
        return self.rank == 0


def train(cfg: TrainConfig, resume: bool = False, progress: Callable | None = None, log: Callable[[str], None] = print,
          allow_missing_masks: bool = False) -> dict:
    """Train a run into cfg.out. Returns a summary {run_dir, epochs, threshold, log}. allow_missing_masks: an
    anomalous image without a mask (its class having masks) is a warning, not an error (see load_dataset)."""
    t_start = time.perf_counter()
    run_dir = Path(cfg.out)
    if (run_dir / ckpt.CONFIG).exists() and not resume:
        raise KanoError(f"run directory {run_dir} must be new (or pass --resume to continue it), got an existing run")
    seed_everything(cfg.seed)
    acc = _Accel(resolve_device(cfg.device))
    device = acc.device
    dataset = load_dataset(cfg.data, missing_masks="warn" if allow_missing_masks else "error")
    classes = cfg.classes or dataset.classes
    samples = dataset.samples(cfg.split, classes)
    if not samples:
        raise KanoError(f"{cfg.data} must have {cfg.split} images for {', '.join(classes)}, got none")
    labels = torch.tensor([s.label for s in samples], dtype=torch.float32)
    store = KnowledgeStore(cfg.kb, create=False, read_only=True)  # no write lock: works while the KB is open elsewhere

    bb = build_backbone(cfg.backbone, image_size=cfg.image_size, device=device, stages=cfg.stages, vv_start=cfg.vv_start)
    seed_everything(cfg.seed)  # heads initialised identically whatever the backbone build consumed
    model = KAnoCLIP(bb, cfg.model)
    folder_vectors, kinfo = knowledge_vectors(model, store, classes, cfg.knowledge_sources)
    if cfg.model.use_knpl and (warning := fallback_warning(kinfo)):
        log(warning)
    names = {c: cfg.model.prompt_class or prompt_name(c) for c in classes}
    grouped: dict[str, list[torch.Tensor]] = {}
    for c, v in folder_vectors.items():  # folders sharing a prompt word (pcb1..pcb4) share one w̄ᵏ
        grouped.setdefault(names[c], []).append(v)
    knowledge = {k: torch.stack(v).mean(0) for k, v in grouped.items()}
    sample_names = [names[s.class_name] for s in samples]

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    param_names = [n for n, _ in params]
    optimizer = torch.optim.Adam([p for _, p in params], lr=cfg.lr, betas=cfg.betas)
    start_epoch, history = 0, []
    if resume:
        state = ckpt.load_training_state(run_dir, optimizer, param_names)
        if state is None:
            raise KanoError(f"--resume needs {run_dir}/{ckpt.STATE_DIR} from an earlier run, got none")
        start_epoch, model_state = state
        saved = ckpt.read_config(run_dir)
        now = json.loads(json.dumps(cfg.to_dict(), default=str))
        if saved["train"] | {"out": None, "epochs": None} != now | {"out": None, "epochs": None}:
            raise KanoError(f"--resume must use the configuration of {run_dir} (only --epochs may change), got a different one")
        model.load_trainable_state_dict(model_state)
        if (run_dir / ckpt.LOG).is_file():
            history = [json.loads(l) for l in (run_dir / ckpt.LOG).read_text().splitlines() if l.strip()][:start_epoch]
    run_dir.mkdir(parents=True, exist_ok=True)

    config = {
        "kano_version": ckpt.library_versions()["kano"], "backbone": cfg.backbone, "image_size": bb.image_size, "stages": bb.stages,
        "vv_start": bb.vv_start, "model": cfg.model.to_dict(), "train": cfg.to_dict(),
        "kb": {"path": str(Path(cfg.kb).resolve()), "digest": store.digest(), **kinfo}, "train_classes": classes,
        "prompt_names": names, "data": cfg.data, "n_samples": len(samples), "git_commit": ckpt.git_commit(), "seed": cfg.seed,
        "versions": ckpt.library_versions(), "threshold": None, "status": "training",
    }
    if acc.main:
        ckpt.save_config(run_dir, config)

    masks = _load_masks(samples, bb.image_size)
    cache_mode = choose_mode(cfg.cache, estimate_bytes(model, len(samples)))
    if acc.world > 1 and cache_mode == "memory":
        cache_mode = "disk"  # processes share one memory-mapped cache, each computing its shard
    cache_dir = Path(cfg.cache_dir or Path.home() / ".cache" / "kano" / "features")
    feats: FeatureStore | None = None
    if acc.acc is not None:
        model = acc.acc.prepare(model)
        optimizer = acc.acc.prepare(optimizer)
    core = model.module if hasattr(model, "module") else model

    gen_images = SampleDataset(samples, bb.image_size, bb.mean, bb.std, mask_size=8)

    def features(idx: torch.Tensor) -> VisualFeatures:
        if feats is not None:
            return feats.get(idx, device)
        batch = [gen_images[int(i)] for i in idx]
        errs = {"error": [b["error"] for b in batch]}
        raise_batch_errors(errs)
        return core.encode_images(torch.stack([b["image"] for b in batch]).to(device))

    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        cache_s = 0.0
        if feats is None and cache_mode != "off":
            feats = build_feature_store(core, samples, cache_mode, cache_dir, device, cfg.batch_size, cfg.workers,
                                        progress("encoding images (once)") if progress else None, (acc.rank, acc.world), acc.barrier)
            cache_s = time.perf_counter() - t0
        model.train()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(samples), generator=g)[acc.rank::acc.world]
        sums = {"total": 0.0, "kd": 0.0, "global": 0.0, "local": 0.0}
        n_batches = 0
        batches = list(order.split(cfg.batch_size))
        advance, close = progress(f"epoch {epoch + 1}/{cfg.epochs}")(len(batches)) if progress else (lambda k: None, lambda: None)
        for idx in batches:
            f = features(idx)
            with amp:
                out = core.forward_features(f, [sample_names[i] for i in idx.tolist()], bb.image_size)
            terms = core.loss(out, masks[idx].to(device).float(), labels[idx].to(device), knowledge if cfg.model.use_knpl else None)
            optimizer.zero_grad(set_to_none=True)
            (acc.acc.backward(terms["total"]) if acc.acc else terms["total"].backward())
            optimizer.step()
            for k in sums:
                sums[k] += float(terms[k].detach())
            n_batches += 1
            advance(1)
        close()
        row = {"epoch": epoch + 1, "loss": sums["total"] / n_batches, "loss_kd": sums["kd"] / n_batches,
               "loss_global": sums["global"] / n_batches, "loss_local": sums["local"] / n_batches,
               "seconds": round(time.perf_counter() - t0, 3), "cache_seconds": round(cache_s, 3),
               "cache": cache_mode}
        history.append(row)
        if acc.main:
            ckpt.save_training_state(run_dir, epoch + 1, core.trainable_state_dict(), optimizer, param_names)
            (run_dir / ckpt.LOG).write_text("".join(json.dumps(r) + "\n" for r in history))
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.4f} (kd {row['loss_kd']:.4f}, global {row['loss_global']:.4f}, "
            f"local {row['loss_local']:.4f}) in {row['seconds']:.1f}s")
    acc.barrier()

    # decision threshold from the auxiliary data (never from target test data): the F1-best image score
    model.eval()
    scores = []
    with torch.inference_mode():
        for idx in torch.arange(len(samples)).split(cfg.batch_size):
            f = features(idx)
            with amp:
                scores.append(core.forward_features(f, [sample_names[i] for i in idx.tolist()], bb.image_size).image_score.float().cpu())
    scores_t = torch.cat(scores)
    threshold = _f1_threshold(labels, scores_t)
    if acc.main:
        ckpt.save_weights(run_dir / ckpt.WEIGHTS, core.trainable_state_dict())
        config.update(threshold=threshold, status="finished", epochs_done=cfg.epochs,
                      feature_cache={"mode": cache_mode, "location": feats.location if feats else None},
                      seconds=round(time.perf_counter() - t_start, 2))
        ckpt.save_config(run_dir, config)
    return {"run_dir": str(run_dir), "epochs": cfg.epochs, "threshold": threshold, "log": history}


def _f1_threshold(labels: torch.Tensor, scores: torch.Tensor) -> float:
    """The score threshold with the best F1 on the given (auxiliary) data."""
    y = labels > 0
    if y.all() or (~y).all():
        return 0.5
    order = torch.argsort(scores, descending=True, stable=True)
    s, t = scores[order], y[order].double()
    tp = torch.cumsum(t, 0)
    pp = torch.arange(1, len(s) + 1, dtype=torch.float64)
    f1 = 2 * tp / (pp + y.sum())
    last = torch.ones_like(s, dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    f1 = torch.where(last, f1, torch.zeros_like(f1))
    j = int(torch.argmax(f1))
    nxt = s[j + 1:][s[j + 1:] < s[j]]
    return float((s[j] + nxt[0]) / 2) if len(nxt) else float(s[j])
