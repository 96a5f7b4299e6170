"""The shipped micro-CLIP: an open_clip model config (kanoclip/micro/kano-micro.json) plus weights.

The weights file stores every tensor in float16 except the token embedding, of which only the rows that
pretraining changed are stored ("token_embedding.rows" int64 ids, "token_embedding.values"); every other
row is the seeded N(0, 0.02) initialisation, regenerated here from the seed in the file's metadata. Words
the micro-CLIP never read therefore embed exactly as they did before pretraining.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from kano.core.errors import KanoError

MODEL_NAME = "kano-micro"
VOCAB = 49408


def package_dir() -> Path:
    return Path(str(resources.files("kano.kanoclip").joinpath("micro")))


@lru_cache(maxsize=1)
def register() -> str:
    """Make open_clip know the model config; returns its name for open_clip.create_model."""
    import open_clip

    open_clip.add_model_config(package_dir() / f"{MODEL_NAME}.json")
    return MODEL_NAME


def shipped_info() -> dict:
    """kanoclip/micro/config.json: the weights' file name, sha256, size, pretraining record and metrics."""
    path = package_dir() / "config.json"
    if not path.is_file():
        raise KanoError(f"the micro-CLIP record {path} must exist (it ships with the package), got no such file")
    return json.loads(path.read_text())


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def init_token_embedding(width: int, seed: int) -> torch.Tensor:
    """The seeded token-embedding initialisation (VOCAB, width), identical on every machine (CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(VOCAB, width, generator=g) * 0.02


def pack_state_dict(model: torch.nn.Module, token_seed: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """model state -> (tensors for safetensors, metadata). Unchanged embedding rows are left out."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    emb = state.pop("token_embedding.weight").float()
    init = init_token_embedding(emb.shape[1], token_seed)
    rows = torch.nonzero((emb != init).any(1)).flatten()
    out = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    out["token_embedding.rows"] = rows.to(torch.int64).contiguous()
    out["token_embedding.values"] = emb[rows].half().contiguous()
    return out, {"token_seed": str(token_seed), "format": "kano-micro-1"}


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load a packed micro-CLIP file into an open_clip model built from kano-micro.json (float32)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise KanoError(f"micro-CLIP weights must be a readable safetensors file, got {path}: {type(exc).__name__}: {exc}") from None
    if meta.get("format") != "kano-micro-1" or "token_embedding.rows" not in tensors:
        raise KanoError(f"micro-CLIP weights must be written by bench/pretrain_micro.py (format kano-micro-1), got {path}")
    rows, values = tensors.pop("token_embedding.rows"), tensors.pop("token_embedding.values")
    emb = init_token_embedding(values.shape[1], int(meta["token_seed"]))
    emb[rows] = values.float()
    tensors["token_embedding.weight"] = emb
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KanoError(f"micro-CLIP weights must match {MODEL_NAME}.json; missing {missing[:4]}, unexpected {unexpected[:4]}")


def _create(name: str, **kw) -> torch.nn.Module:
    """open_clip's model with random weights, about to be replaced by ours: its "No pretrained weights loaded ...
    initialized randomly" warning would tell the user the opposite of what happens, so it is silenced here."""
    import logging

    import open_clip

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return open_clip.create_model(name, pretrained=None, **kw)
    finally:
        root.setLevel(level)


def build(weights: str | None = None, image_size: int | None = None, pos_resize: str | None = None) -> torch.nn.Module:
    """The micro-CLIP as an open_clip CLIP: shipped weights (digest checked) or a file from the pretraining script."""
    import open_clip

    name = register()
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise KanoError(f"micro-CLIP weights file must exist, got no such file: {path}")
    else:
        info = shipped_info()
        path = package_dir() / info["weights"]
        if not path.is_file():
            raise KanoError(f"the shipped micro-CLIP weights {path} must exist, got no such file (reinstall kano)")
        digest = sha256(path)
        if digest != info["sha256"]:
            raise KanoError(f"the shipped micro-CLIP weights must have sha256 {info['sha256']}, got {digest} (corrupt install?)")
    model = _create(name)
    load_weights(model, path)
    native = model.visual.image_size
    native = int(native[0] if isinstance(native, (tuple, list)) else native)
    if image_size and image_size != native:
        # another image size: resample the positional grid (kanoclip/pos_embed.py); unset, bicubic without
        # antialias, which runs without a recorded pos_resize were made with
        from .pos_embed import resize_visual

        resize_visual(model.visual, image_size, pos_resize or "bicubic")
    return model.eval()
