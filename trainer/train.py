"""The training loop: feature cache, Adam on prompts and heads, per-epoch log and checkpoint, resume."""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kano.anomaly_data import Sample, SampleDataset, image_size, load_dataset, load_mask, mask_to_tensor, prompt_name, raise_batch_errors
from kano.core.curves import f1_threshold
from kano.core.device import resolve_device
from kano.core.errors import KanoError
from kano.core.files import atomic_write, read_manifest
from kano.kanoclip import VisualFeatures, backbone_autocast, build_model, method_backbone
from kano.kanoclip.registry import DEFAULT_METHOD, METHODS
from kano.knowledge_store import KnowledgeStore

from . import checkpoint as ckpt
from .cache import FeatureStore, build_feature_store, choose_mode, estimate_bytes
from .config import TrainConfig, method_model_config
from kano.core.distributed import Dist
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
RESUME_MAY_CHANGE = ("out", "epochs", "cache", "cache_dir", "device", "workers", "recipe")


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
    saved = {"method": DEFAULT_METHOD, **saved}  # runs from before --method are KAnoCLIP runs
    saved.setdefault("aug_rate", 0.0)  # runs from before the mosaic trained without it
    if saved["method"] != DEFAULT_METHOD:  # older peer runs recorded KAnoCLIP's defaults as "model": read as their own
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


@dataclass
class Run:
    """What one training holds between its steps. `phase` words the Ctrl-C message ("interrupted while ...");
    each step sets it as it starts."""

    cfg: TrainConfig
    dist: Dist
    log: Callable[[str], None]
    progress: Callable | None
    run_dir: Path
    phase: str = "while starting"
    started: float = field(default_factory=time.perf_counter)
    samples: list = field(default_factory=list)
    labels: torch.Tensor | None = None
    sample_names: list[str] = field(default_factory=list)
    model: torch.nn.Module | None = None
    image_size: int = 0
    knowledge: dict[str, torch.Tensor] | None = None
    params: list[tuple[str, torch.nn.Parameter]] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    config: dict = field(default_factory=dict)
    masks: torch.Tensor | None = None
    cache_mode: str = "off"
    cache_dir: Path | None = None
    feats: FeatureStore | None = None
    images: SampleDataset | None = None

    @property
    def uses_kb(self) -> bool:
        return "kb" in METHODS[self.cfg.method].needs  # the registry says which methods learn from a knowledge base

    def warn(self, message: str) -> None:  # plain stderr, unwrapped (a path must stay one word), rank 0 only
        if self.dist.main:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()

    def features(self, idx: torch.Tensor) -> VisualFeatures:
        """The frozen backbone's features of samples `idx`: from the cache, or encoded now (--cache off)."""
        if self.feats is not None:
            return self.feats.get(idx, self.dist.device)
        batch = [self.images[int(i)] for i in idx]
        raise_batch_errors({"error": [b["error"] for b in batch]})
        with backbone_autocast(self.dist.device):
            return self.model.encode_images(torch.stack([b["image"] for b in batch]).to(self.dist.device))

    def ensure_cache(self, phase: str | None = "while encoding the feature cache") -> float:
        """Build the feature cache once (seconds it took; 0 when there is one or none is wanted); `phase`: what
        an interruption meanwhile is said to interrupt (None: the current step's)."""
        if self.feats is not None or self.cache_mode == "off":
            return 0.0
        t0 = time.perf_counter()
        self.phase = phase or self.phase
        cfg = self.cfg
        self.feats = build_feature_store(self.model, self.samples, self.cache_mode, self.cache_dir, self.dist.device,
                                         cfg.batch_size, cfg.workers, self.progress("encoding images (once)") if self.progress else None,
                                         self.dist, self.warn)
        return time.perf_counter() - t0


def train(cfg: TrainConfig, resume: bool = False, progress: Callable | None = None, log: Callable[[str], None] = print,
          allow_missing_masks: bool = False) -> dict:
    """Train a run into cfg.out (one run over all processes of a torchrun/accelerate launch): prepare, the
    epochs, calibrate the threshold, save.

    Returns a summary {run_dir, epochs, threshold, log, world_size}. Ctrl-C / SIGTERM raise
    TrainInterrupted saying what is saved and whether `--resume` continues it. allow_missing_masks: an
    anomalous image without a mask (its class having masks) is a warning, not an error (see load_dataset).
    """
    dist = Dist.from_env(cfg.device, resolve_device)
    run = Run(cfg, dist, log if dist.main else (lambda s: None), progress if dist.main else None, Path(cfg.out))
    try:
        prepare(run, resume, allow_missing_masks)
        for epoch in range(run.start_epoch, cfg.epochs):
            train_epoch(run, epoch)
        threshold = calibrate(run)
        save(run, threshold)
        return {"run_dir": str(run.run_dir), "epochs": cfg.epochs, "threshold": threshold, "log": run.history,
                "world_size": dist.world}
    except KeyboardInterrupt:
        try:
            done = ckpt.read_checkpoint_epoch(run.run_dir) or 0
        except KanoError:
            done = 0
        if done:
            msg = (f"interrupted {run.phase}: epochs 1-{done} of {cfg.epochs} are saved in {run.run_dir}; "
                   "continue with the same command and --resume")
        else:
            msg = (f"interrupted {run.phase}, before any epoch finished: nothing to resume in {run.run_dir}; "
                   "run the same command again to start over")
        raise TrainInterrupted(msg, done, bool(done)) from None
    finally:
        dist.close()


def prepare(run: Run, resume: bool, allow_missing_masks: bool = False) -> None:
    """Check the run folder, read the data and the knowledge base, build the model and the optimiser (restored
    from the checkpoint on --resume), write config.json, and choose the feature cache."""
    cfg, dist, log = run.cfg, run.dist, run.log
    run.start_epoch = _run_state(run.run_dir, cfg, resume, log)
    dist.barrier()  # every process checked run_dir before rank 0 writes into it
    seed_everything(cfg.seed)
    device = dist.device
    run.phase = "while loading the data"
    dataset = load_dataset(cfg.data, missing_masks="warn" if allow_missing_masks else "error")
    classes, samples = dataset.split_classes(cfg.split, cfg.classes, run.warn)
    if not samples:
        raise KanoError(f"{cfg.data} must have {cfg.split} images for {', '.join(classes)}, got none")
    run.samples = samples
    run.labels = torch.tensor([s.label for s in samples], dtype=torch.float32)
    uses_kb = run.uses_kb
    store = KnowledgeStore(cfg.kb, create=False, read_only=True) if uses_kb else None  # no write lock: works while the KB is open elsewhere

    run.phase = "while building the model"
    bb = method_backbone(cfg.method, cfg.backbone, image_size=cfg.image_size, device=device, stages=cfg.stages,
                         vv_start=cfg.vv_start, pos_resize=cfg.pos_resize, use_vv=getattr(cfg.model, "use_vv", True),
                         activation=cfg.activation)
    seed_everything(cfg.seed)  # heads initialised identically whatever the backbone build consumed
    model = run.model = build_model(cfg.method, bb, cfg.model)
    run.image_size = bb.image_size
    word = (lambda c: c) if cfg.class_words == "folder" else prompt_name
    names = {c: (cfg.model.prompt_class if uses_kb else None) or word(c) for c in classes}
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
        run.knowledge = {k: torch.stack(v).mean(0) for k, v in grouped.items()}
        kb_info = {"path": str(Path(cfg.kb).resolve()), "digest": store.digest(), **kinfo}
    run.sample_names = [names[s.class_name] for s in samples]

    run.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    run.optimizer = torch.optim.Adam([p for _, p in run.params], lr=cfg.lr, betas=cfg.betas)
    if run.start_epoch:
        done, model_state, history = ckpt.load_training_state(run.run_dir, run.optimizer, [n for n, _ in run.params])
        model.load_trainable_state_dict(model_state)
        run.history = history[:done]
    dist.broadcast_params([p for _, p in run.params])  # identical replicas from the first step on

    run.config = {
        "kano_version": ckpt.library_versions()["kano"], "backbone": cfg.backbone, "image_size": bb.image_size, "stages": bb.stages,
        "vv_start": bb.vv_start, "pos_resize": bb.pos_resize, "activation": bb.activation, "class_words": cfg.class_words,
        "method": cfg.method, "model": model.cfg.to_dict(),
        "model_used": model.describe() if hasattr(model, "describe") else {}, "train": cfg.to_dict(),
        "kb": kb_info, "train_classes": classes,
        "prompt_names": names, "data": cfg.data, "n_samples": len(samples), "git_commit": ckpt.git_commit(), "seed": cfg.seed,
        "versions": ckpt.library_versions(), "world_size": dist.world, "threshold": None, "status": "training",
        # the CPU's float sums are ordered by the thread count, so a run repeats bit for bit only with the same count
        "torch_threads": torch.get_num_threads(),
    }
    if dist.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.save_config(run.run_dir, run.config)

    run.masks = _load_masks(samples, bb.image_size)
    run.cache_mode = choose_mode(cfg.cache, estimate_bytes(model, len(samples)))
    if not getattr(model, "cacheable", True):  # trainable parts inside the stream (MVFA-AD): encode every batch
        run.cache_mode = "off"
    if dist.world > 1 and run.cache_mode == "memory":
        run.cache_mode = "disk"  # processes share one memory-mapped cache, each computing its shard
    run.cache_dir = Path(cfg.cache_dir or Path.home() / ".cache" / "kano" / "features")
    run.images = SampleDataset(samples, bb.image_size, bb.mean, bb.std, mask_size=8)


LOSS_TERMS = ("total", "kd", "global", "local")


def train_epoch(run: Run, epoch: int) -> dict:
    """One epoch (0-based `epoch`) over this process's shard; the checkpoint and the log after it. -> its log row."""
    cfg, dist, model, optimizer = run.cfg, run.dist, run.model, run.optimizer
    t0 = time.perf_counter()
    cache_s = run.ensure_cache()
    run.phase = f"during epoch {epoch + 1}"
    model.train()
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
    order = torch.randperm(len(run.samples), generator=g)
    mine = order[dist.rank::dist.world]  # disjoint shards covering the data
    n_steps = -(-len(order[0::dist.world]) // cfg.batch_size)  # rank 0's shard is the largest
    batches = list(mine.split(cfg.batch_size))
    batches += [mine[:0]] * (n_steps - len(batches))  # a shorter shard: empty steps keep the collectives aligned
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    advance, close = run.progress(f"epoch {epoch + 1}/{cfg.epochs}")(len(batches)) if run.progress else (lambda k: None, lambda: None)
    train_params = [p for _, p in run.params]
    knowledge = run.knowledge if run.uses_kb and cfg.model.use_knpl else None
    plan = mosaic_plan(run, epoch)
    for idx in batches:
        optimizer.zero_grad(set_to_none=True)
        stats = [0.0] * len(LOSS_TERMS)
        if len(idx):
            feats, masks, labels = run.features(idx), run.masks[idx].to(dist.device).float(), run.labels[idx].to(dist.device)
            if plan:
                feats, masks, labels = with_mosaics(run, idx, plan, feats, masks, labels)
            out = model.forward_features(feats, [run.sample_names[i] for i in idx.tolist()], run.image_size)
            terms = model.loss(out, masks, labels, knowledge)
            terms["total"].backward()
            stats = [float(terms[k].detach()) for k in LOSS_TERMS]
        _, stats = dist.reduce_step(train_params, len(idx), stats)
        optimizer.step()
        for k, v in zip(LOSS_TERMS, stats):
            sums[k] += v
        advance(1)
    close()
    shards = dist.gather(mine.tolist())
    row = {"epoch": epoch + 1, "loss": sums["total"] / n_steps, "loss_kd": sums["kd"] / n_steps,
           "loss_global": sums["global"] / n_steps, "loss_local": sums["local"] / n_steps,
           "seconds": round(time.perf_counter() - t0, 3), "cache_seconds": round(cache_s, 3),
           "cache": run.cache_mode, "world_size": dist.world, "samples_per_rank": [len(x) for x in shards],
           "mosaics": len(plan)}
    if dist.world > 1:
        row["shard_indices"] = shards
    run.history.append(row)
    if dist.main:
        ckpt.save_training_state(run.run_dir, epoch + 1, model.trainable_state_dict(), optimizer, [n for n, _ in run.params],
                                 run.history)
        _write_log(run.run_dir, run.history)
    run.log(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.4f} (kd {row['loss_kd']:.4f}, global {row['loss_global']:.4f}, "
            f"local {row['loss_local']:.4f}) in {row['seconds']:.1f}s")
    return row


def mosaic_plan(run: Run, epoch: int) -> dict[int, list[int]]:
    """Which samples become 2 x 2 mosaics this epoch (April-GAN's --aug_rate, its dataset.py:138-144): each with
    probability aug_rate, made of four samples of its class, each drawn as the code does: a defect type (folder)
    uniformly, then one of its images uniformly. -> {sample index: the four sample indices}. Seeded by seed and
    epoch, identical on every process."""
    rate = run.cfg.aug_rate
    if not rate:
        return {}
    g = torch.Generator().manual_seed(run.cfg.seed * 1000 + epoch + 500)
    by_class: dict[str, dict[str, list[int]]] = {}
    for i, s in enumerate(run.samples):
        by_class.setdefault(s.class_name, {}).setdefault(s.defect, []).append(i)
    plan = {}
    draws = torch.rand(len(run.samples), generator=g)
    for i in torch.nonzero(draws < rate).flatten().tolist():
        kinds = by_class[run.samples[i].class_name]
        names = sorted(kinds)
        four = []
        for _ in range(4):
            pool = kinds[names[int(torch.randint(len(names), (1,), generator=g))]]
            four.append(pool[int(torch.randint(len(pool), (1,), generator=g))])
        plan[i] = four
    return plan


def with_mosaics(run: Run, idx: torch.Tensor, plan: dict[int, list[int]], feats: VisualFeatures, masks: torch.Tensor,
                 labels: torch.Tensor) -> tuple[VisualFeatures, torch.Tensor, torch.Tensor]:
    """The batch with its planned samples replaced by their mosaics (encoded now: a mosaic is never cached);
    a mosaic's label is 1 when any of its four images is anomalous."""
    from kano.anomaly_data.torch_data import mosaic_sample

    pos = [k for k, i in enumerate(idx.tolist()) if i in plan]
    if not pos:
        return feats, masks, labels
    made = [mosaic_sample([run.samples[j] for j in plan[int(idx[k])]], run.image_size, run.images.mean, run.images.std)
            for k in pos]
    dev = run.dist.device
    with backbone_autocast(dev):
        new = run.model.encode_images(torch.stack([m[0] for m in made]).to(dev))
    where = torch.tensor(pos, device=dev)
    glob = feats.global_feature.clone()
    glob[where] = new.global_feature.to(glob.dtype)
    patches = []
    for t, nt in zip(feats.patch_tokens, new.patch_tokens):
        t = t.clone()
        t[where] = nt.to(t.dtype)
        patches.append(t)
    masks, labels = masks.clone(), labels.clone()
    masks[where] = torch.stack([m[1] for m in made]).to(dev, masks.dtype)
    labels[where] = torch.tensor([float(m[2]) for m in made], device=dev, dtype=labels.dtype)
    return VisualFeatures(glob, patches), masks, labels


def calibrate(run: Run) -> float:
    """The decision threshold from the auxiliary data (never from target test data): the F1-best image score,
    in float32 like every score evaluation reports; each process scores its shard, the sums assemble all."""
    run.phase = "while calibrating the decision threshold"
    run.ensure_cache(phase=None)
    dist = run.dist
    run.model.eval()
    scores = torch.zeros(len(run.samples), dtype=torch.float32)
    with torch.no_grad():
        for idx in torch.arange(dist.rank, len(run.samples), dist.world).split(run.cfg.batch_size):
            out = run.model.forward_features(run.features(idx), [run.sample_names[i] for i in idx.tolist()], run.image_size)
            scores[idx] = out.image_score.float().cpu()
    return f1_threshold(run.labels, dist.all_sum(scores))


def save(run: Run, threshold: float) -> None:
    """The weights, the log and the finished config.json (threshold, every rank's weights digest, the cache)."""
    dist, state = run.dist, run.model.trainable_state_dict()
    ranks = [{"rank": r, "weights_sha256": d} for r, d in enumerate(dist.gather(ckpt.weights_digest(state)))]
    encoded = dist.gather(run.feats.encoded if run.feats else 0)
    if dist.main:
        run.phase = "while saving the run"
        ckpt.save_weights(run.run_dir / ckpt.WEIGHTS, state)
        _write_log(run.run_dir, run.history)
        run.config.update(threshold=threshold, status="finished", epochs_done=run.cfg.epochs, ranks=ranks,
                          feature_cache={"mode": run.cache_mode, "location": run.feats.location if run.feats else None,
                                         "encoded_per_rank": encoded},
                          seconds=round(time.perf_counter() - run.started, 2))
        ckpt.save_config(run.run_dir, run.config)
    dist.barrier()


def _write_log(run_dir: Path, history: list[dict]) -> None:
    """train_log.jsonl from the checkpoint's own rows (rewritten whole: a resumed run never repeats an epoch)."""
    atomic_write(run_dir / ckpt.LOG, "".join(json.dumps(r) + "\n" for r in history))
