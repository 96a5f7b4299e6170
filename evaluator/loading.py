"""The model to evaluate: a trained run, or the untrained CLIP-AC zero-shot baseline on a backbone."""

from __future__ import annotations

import torch

from kano.errors import KanoError
from kano.kanoclip import KAnoCLIP, ModelConfig, build_backbone


def load_model(run: str | None, backbone: str | None, image_size: int | None = None, device: torch.device | str = "cpu"):
    """Returns (model in eval mode, info dict with backbone, threshold, prompt_names)."""
    if bool(run) == bool(backbone):
        raise KanoError("give exactly one of --run RUN_DIR (a trained model) or --backbone SPEC (the untrained baseline)")
    if run:
        from kano.trainer.checkpoint import load_run

        model, cfg = load_run(run, device)
        return model, {"run": str(run), "backbone": cfg["backbone"], "threshold": cfg.get("threshold"),
                       "prompt_names": cfg.get("prompt_names", {}), "config": cfg}
    bb = build_backbone(backbone, image_size=image_size, device=device)
    # CLIP-AC: fixed "a photo of a normal/abnormal [class]" prompts, plain patch-text similarity, raw global feature
    # Seeded: the linear heads start at identity plus 1e-3 noise, which moved the baseline's image AUROC by a
    # point from one run to the next; the same command must give the same numbers.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = KAnoCLIP(bb, ModelConfig(use_knpl=False, use_bicmci=False, use_adapter=False)).eval()
    return model, {"run": None, "backbone": backbone, "threshold": None, "prompt_names": {}, "config": None}
