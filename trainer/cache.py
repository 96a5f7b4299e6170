"""Frozen-feature cache: the backbone's CLIP-VV outputs computed once, reused every epoch.

Without augmentation the frozen backbone returns the same features every epoch, so they are
computed once (fp16, in `backbone_autocast`), kept in memory or memory-mapped on disk, and training
runs on prompts and heads alone (upcast to float32 before them). The disk cache is keyed by backbone
weights, image size, stages, V-V switch and the exact sample files, so any change invalidates it and
an unchanged rerun reuses it; it is written atomically under a lock and verified on load.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from kano.anomaly_data import Sample, SampleDataset, raise_batch_errors
from kano.core.errors import KanoError
from kano.core.files import umask
from kano.kanoclip import KAnoCLIP, VisualFeatures, backbone_autocast

from kano.core.distributed import Dist


def backbone_fingerprint(model: KAnoCLIP) -> str:
    """Digest of the backbone weights (a backbone file replaced under the same spec changes it)."""
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
    spec = model.feature_spec
    key = {"weights": backbone_fingerprint(model), "image_size": bb.image_size, "stages": bb.stages,
           "vv_start": bb.vv_start, "pos_resize": bb.pos_resize, "vv": spec["vv"], "files": files}
    if spec["tokens"] != "projected":  # (projected tokens keep the key they had before raw ones existed)
        key["tokens"] = spec["tokens"]
    if getattr(bb, "activation_set", False):  # a replaced activation changes the features, not the weights
        key["activation"] = bb.activation
    blob = json.dumps(key, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class FeatureStore:
    """global_feature (N, E) and patch tokens (N, S, L, D), fp16, as tensors or memmaps (D: the model's patch_dim)."""

    global_feature: np.ndarray | torch.Tensor
    patches: np.ndarray | torch.Tensor
    location: str  # "memory" or the cache folder
    encoded: int = 0  # images this process encoded to build it (0: reused from disk)

    def get(self, idx: torch.Tensor, device: torch.device) -> VisualFeatures:
        i = idx.cpu().numpy()
        g = torch.as_tensor(np.asarray(self.global_feature[i])) if isinstance(self.global_feature, np.ndarray) else self.global_feature[idx.cpu()]
        p = torch.as_tensor(np.asarray(self.patches[i])) if isinstance(self.patches, np.ndarray) else self.patches[idx.cpu()]
        g, p = g.to(device).float(), p.to(device).float()
        return VisualFeatures(g, list(p.unbind(1)))


def estimate_bytes(model: KAnoCLIP, n: int) -> int:
    bb = model.backbone
    return n * (len(bb.stages) * bb.grid * bb.grid * model.patch_dim + bb.embed_dim) * 2


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


MANIFEST = "manifest.json"
FILES = ("global.npy", "patches.npy")


def build_feature_store(model: KAnoCLIP, samples: list[Sample], mode: str, cache_dir: Path, device: torch.device,
                        batch_size: int = 8, workers: int = 0, progress: Callable | None = None, dist: Dist | None = None,
                        warn: Callable[[str], None] = print) -> FeatureStore:
    """Encode every sample once; in disk mode reuse a valid cache or build one.

    Disk mode: the cache folder `cache_dir/KEY` is only ever created by renaming a finished private
    temporary folder into place, while holding an exclusive lock (fcntl) on `cache_dir/KEY.lock`; so
    two runs sharing `cache_dir` never see each other's unfinished features (the second waits, then
    reuses the first's). Its manifest records shapes, dtype and a SHA-256 per file; a missing,
    truncated, overwritten or unreadable cache is rebuilt with a warning. Several processes (`dist`)
    each encode their shard (rank::world) into the same temporary folder; rank 0 holds the lock,
    checks, finalises and renames.
    """
    dist = dist or Dist(device)
    bb = model.backbone
    n, s, l, e, d = len(samples), len(bb.stages), bb.grid * bb.grid, bb.embed_dim, model.patch_dim
    shapes = {"global.npy": [n, e], "patches.npy": [n, s, l, d]}
    if mode != "disk":
        if dist.world > 1:
            raise ValueError("several processes share the feature cache through disk mode, got memory mode")
        glob = torch.empty(n, e, dtype=torch.float16)
        patches = torch.empty(n, s, l, d, dtype=torch.float16)
        _encode(model, samples, list(range(n)), device, batch_size, workers, progress, glob, patches)
        return FeatureStore(glob, patches, "memory", n)

    cache_dir = Path(cache_dir)
    key = cache_key(model, samples)
    final = cache_dir / key
    lock = None
    tmp = None
    encoded = 0
    try:
        if dist.main:
            cache_dir.mkdir(parents=True, exist_ok=True)
            lock = _lock(cache_dir / f"{key}.lock", warn)
            problem = _check(final, key, shapes, verify=True) if final.exists() else "missing"
            if problem is not None:
                if problem != "missing":
                    warn(f"warning: feature cache {final} {problem}; rebuilding it")
                    shutil.rmtree(final, ignore_errors=True)
                for stale in cache_dir.glob(f"{key}.tmp-*"):  # left by a killed build (we hold the lock: nobody else builds)
                    shutil.rmtree(stale, ignore_errors=True)
                tmp = Path(tempfile.mkdtemp(prefix=f"{key}.tmp-", dir=cache_dir))
                os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's private 0700 would outlive the rename
                for name, shape in shapes.items():
                    np.lib.format.open_memmap(tmp / name, "w+", np.float16, tuple(shape)).flush()
        tmp_name = dist.broadcast(str(tmp) if tmp else None)
        if tmp_name is not None:
            glob = np.load(Path(tmp_name) / "global.npy", mmap_mode="r+")
            patches = np.load(Path(tmp_name) / "patches.npy", mmap_mode="r+")
            mine = list(range(dist.rank, n, dist.world))
            _encode(model, samples, mine, device, batch_size, workers, progress if dist.main else None, glob, patches)
            encoded = len(mine)
            glob.flush()
            patches.flush()
            del glob, patches
            dist.barrier()
            if dist.main:
                manifest = {"key": key, "dtype": "float16", "shapes": shapes,
                            "sha256": {name: _sha256(tmp / name) for name in FILES}, "n_samples": n}
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
                _fsync_tree(tmp)
                os.rename(tmp, final)  # atomic: readers see no folder or a finished one
                tmp = None
                _fsync_dir(cache_dir)
        dist.barrier()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            lock.close()
    problem = None if dist.main else _check(final, key, shapes, verify=False)  # rank 0 just verified or wrote it
    if problem is not None:
        raise KanoError(f"feature cache {final} must be readable by every process, got: {problem} (is cache_dir on a shared disk?)")
    return FeatureStore(np.load(final / "global.npy", mmap_mode="r"), np.load(final / "patches.npy", mmap_mode="r"), str(final),
                        encoded)


def _encode(model: KAnoCLIP, samples: list[Sample], mine: list[int], device: torch.device, batch_size: int, workers: int,
            progress: Callable | None, glob, patches) -> None:
    """Backbone features of samples[mine] (in `backbone_autocast`) into glob (N, E) / patches (N, S, L, E), fp16."""
    bb = model.backbone
    ds = torch.utils.data.Subset(SampleDataset(samples, bb.image_size, bb.mean, bb.std, mask_size=8), mine)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    advance, close = progress(len(mine)) if progress else (lambda k: None, lambda: None)
    try:
        with torch.inference_mode(), backbone_autocast(device):
            for batch in loader:
                raise_batch_errors(batch)
                f = model.encode_images(batch["image"].to(device))
                idx = batch["index"].numpy()
                g = f.global_feature.to(torch.float16).cpu()
                p = torch.stack(f.patch_tokens, 1).to(torch.float16).cpu()
                if isinstance(glob, np.ndarray):
                    glob[idx] = g.numpy()
                    patches[idx] = p.numpy()
                else:
                    glob[torch.from_numpy(idx)] = g
                    patches[torch.from_numpy(idx)] = p
                advance(len(idx))
    finally:
        close()


def _check(folder: Path, key: str, shapes: dict, verify: bool) -> str | None:
    """None when `folder` is a complete cache for `key`, else what is wrong (any read error counts)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        if not isinstance(manifest, dict) or manifest.get("key") != key:
            return "has a manifest for another key"
        if manifest.get("shapes") != shapes or manifest.get("dtype") != "float16":
            return f"must hold float16 arrays of shapes {shapes}, got {manifest.get('dtype')} {manifest.get('shapes')}"
        for name in FILES:
            arr = np.load(folder / name, mmap_mode="r")
            if list(arr.shape) != shapes[name] or arr.dtype != np.float16:
                return f"file {name} must be float16 {shapes[name]}, got {arr.dtype} {list(arr.shape)}"
            del arr
            if verify and _sha256(folder / name) != manifest["sha256"][name]:
                return f"file {name} does not match its checksum (changed after it was written)"
    except FileNotFoundError as exc:
        return f"is incomplete ({Path(exc.filename or '?').name} missing)"
    except Exception as exc:  # truncated, garbage header, empty, not JSON: all mean "build it again"
        return f"is unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
    return None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _lock(path: Path, warn: Callable[[str], None]):
    """An exclusive fcntl lock held as long as the returned file stays open (released by the OS if we die)."""
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        warn(f"waiting for another process that is building the feature cache ({path})")
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


def _fsync_tree(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
