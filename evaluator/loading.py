"""The model to evaluate: a trained run, or the untrained KAnoCLIP (fixed prompts, `kanoclip-untrained`) on a backbone."""

from __future__ import annotations

import torch

from kano.core.errors import KanoError
from kano.kanoclip import KAnoCLIP, ModelConfig, build_backbone
from kano.kanoclip.registry import METHODS, UNTRAINED_METHOD


def load_model(run: str | None, backbone: str | None, image_size: int | None = None, device: torch.device | str = "cpu"):
    """Returns (model in eval mode, info dict with backbone, threshold, prompt_names)."""
    if bool(run) == bool(backbone):
        raise KanoError("give exactly one of --run RUN_DIR (a trained model) or --backbone SPEC (the untrained baseline)")
    if run:
        from kano.kanoclip.runs import load_run

        model, cfg = load_run(run, device)
        return model, {"run": str(run), "backbone": cfg["backbone"], "threshold": cfg.get("threshold"),
                       "prompt_names": cfg.get("prompt_names", {}), "config": cfg}
    return load_untrained(UNTRAINED_METHOD, None, backbone, image_size, device)[0], {
        "run": None, "backbone": backbone, "threshold": None, "prompt_names": {}, "config": None}


def load_untrained(method: str, run, backbone: str | None, image_size: int | None = None, device: torch.device | str = "cpu", **_):
    """-> (the untrained KAnoCLIP in eval mode, info) for `--method NAME --backbone SPEC` (and `--backbone` alone;
    load_method has checked the sources)."""
    bb = build_backbone(backbone, image_size=image_size, device=device)
    # fixed "a photo of a normal/abnormal [class]" prompts, plain patch-text similarity, raw global feature
    # Seeded: the linear heads start at identity plus 1e-3 noise, which moved the baseline's image AUROC by a
    # point from one run to the next; the same command must give the same numbers.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = KAnoCLIP(bb, ModelConfig(use_knpl=False, use_bicmci=False, use_adapter=False)).eval()
    return model, {"run": None, "backbone": backbone, "threshold": None, "prompt_names": {}, "method": untrained_info(method, backbone)}


def untrained_info(method: str, backbone: str) -> dict:
    """The provenance "method" of the untrained KAnoCLIP (its kind is the registry's, as for every method)."""
    return {"kind": METHODS[method].kind, "name": method, "method": method, "backbone": backbone,
            "prompts": "a photo of a normal/abnormal [class]", "source": METHODS[method].source}
