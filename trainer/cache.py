"""Frozen-feature cache: the backbone's CLIP-VV outputs computed once, reused every epoch.

Without augmentation the frozen backbone returns the same features every epoch, so they are
computed once (fp16), kept in memory or memory-mapped on disk, and training runs on prompts and
heads alone. The disk cache is keyed by backbone weights, image size, stages, V-V switch and the
exact sample files, so any change invalidates it and an unchanged rerun reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from anomaly_data import Sample, SampleDataset, raise_batch_errors
from kanoclip import KAnoCLIP, VisualFeatures


def backbone_fingerprint(model: KAnoCLIP) -> str:
    """Digest of the backbone weights (a random-weight backbone differs on every build)."""
    clip = model.backbone.clip
    h = hashlib.sha256(model.backbone.spec.encode())
    for t in (clip.visual.conv1.weight, clip.visual.proj, clip.visual.transformer.resblocks[-1].attn.in_proj_weight, clip.text_projection):
        if t is not None:
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def cache_key(model: KAnoCLIP, samples: list[Sample]) -> str:
    bb = model.backbone
    files = []
    for s in samples:
        st = os.stat(s.image_path)
        files.append([s.image_path, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"weights": backbone_fingerprint(model), "image_size": bb.image_size, "stages": bb.stages,
                       "vv_start": bb.vv_start, "vv": model.cfg.use_vv, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class FeatureStore:
    """global_feature (N, E) and patch tokens (N, S, L, E), fp16, as tensors or memmaps."""

    global_feature: np.ndarray | torch.Tensor
    patches: np.ndarray | torch.Tensor
    location: str  # "memory" or the cache folder

    def get(self, idx: torch.Tensor, device: torch.device) -> VisualFeatures:
        i = idx.cpu().numpy()
        g = torch.as_tensor(np.asarray(self.global_feature[i])) if isinstance(self.global_feature, np.ndarray) else self.global_feature[idx.cpu()]
        p = torch.as_tensor(np.asarray(self.patches[i])) if isinstance(self.patches, np.ndarray) else self.patches[idx.cpu()]
        g, p = g.to(device).float(), p.to(device).float()
        return VisualFeatures(g, list(p.unbind(1)))


def estimate_bytes(model: KAnoCLIP, n: int) -> int:
    bb = model.backbone
    return n * (len(bb.stages) * bb.grid * bb.grid + 1) * bb.embed_dim * 2


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def choose_mode(mode: str, nbytes: int) -> str:
    if mode != "auto":
        return mode
    return "memory" if nbytes < min(4 << 30, int(0.3 * _available_memory())) else "disk"


def build_feature_store(model: KAnoCLIP, samples: list[Sample], mode: str, cache_dir: Path, device: torch.device,
                        batch_size: int = 8, workers: int = 0, progress: Callable | None = None,
                        shard: tuple[int, int] = (0, 1), barrier: Callable[[], None] = lambda: None) -> FeatureStore:
    """Encode every sample once. `shard` = (rank, world): each process encodes its share (disk mode)."""
    bb = model.backbone
    n, s, l, e = len(samples), len(bb.stages), bb.grid * bb.grid, bb.embed_dim
    rank, world = shard
    if mode == "disk":
        folder = Path(cache_dir) / cache_key(model, samples)
        if (folder / "complete").is_file():
            return FeatureStore(np.load(folder / "global.npy", mmap_mode="r"), np.load(folder / "patches.npy", mmap_mode="r"), str(folder))
        if rank == 0:
            if folder.exists():
                shutil.rmtree(folder)  # an interrupted build: start it again
            folder.mkdir(parents=True)
            np.lib.format.open_memmap(folder / "global.npy", "w+", np.float16, (n, e)).flush()
            np.lib.format.open_memmap(folder / "patches.npy", "w+", np.float16, (n, s, l, e)).flush()
        barrier()
        glob = np.load(folder / "global.npy", mmap_mode="r+")
        patches = np.load(folder / "patches.npy", mmap_mode="r+")
    else:
        glob = torch.empty(n, e, dtype=torch.float16)
        patches = torch.empty(n, s, l, e, dtype=torch.float16)
    mine = list(range(rank, n, world))
    ds = torch.utils.data.Subset(SampleDataset(samples, bb.image_size, bb.mean, bb.std, mask_size=8), mine)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    advance, close = progress(len(mine)) if progress else (lambda k: None, lambda: None)
    try:
        with torch.inference_mode(), _autocast(device):
            for batch in loader:
                raise_batch_errors(batch)
                f = model.encode_images(batch["image"].to(device))
                idx = batch["index"].numpy()
                g = f.global_feature.to(torch.float16).cpu()
                p = torch.stack(f.patch_tokens, 1).to(torch.float16).cpu()
                if mode == "disk":
                    glob[idx] = g.numpy()
                    patches[idx] = p.numpy()
                else:
                    glob[torch.from_numpy(idx)] = g
                    patches[torch.from_numpy(idx)] = p
                advance(len(idx))
    finally:
        close()
    if mode == "disk":
        glob.flush()
        patches.flush()
        barrier()
        if rank == 0:
            (folder / "complete").write_text("ok")
        barrier()
        return FeatureStore(np.load(folder / "global.npy", mmap_mode="r"), np.load(folder / "patches.npy", mmap_mode="r"), str(folder))
    return FeatureStore(glob, patches, "memory")


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)
