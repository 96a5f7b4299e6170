"""`kano eval --method NAME`: the one place that routes a method name to its detector.

- zero-parameter baselines (`evaluator/baselines.py`): median_colour ... musc_randconv;
- zero-shot CLIP methods (`kanoclip/winclip.py`): clip, clip-ac, winclip, on a frozen `--backbone`.

`load_method(method, run, backbone, image_size, device)` -> (model, info), the same info keys as
`evaluator.loading.load_model`; info["method"] is what metrics.json records as provenance "method".
"""

from __future__ import annotations

import torch

from kano.errors import KanoError
from kanoclip.winclip import ZERO_SHOT_METHODS

from .baselines import METHODS as BASELINE_METHODS

ALL_METHODS = BASELINE_METHODS + ZERO_SHOT_METHODS

# Where each zero-shot method comes from (the module docstring of kanoclip/winclip.py has the details).
ZERO_SHOT_SOURCES = {
    "clip": "Radford et al., ICML 2021: CLIP's zero-shot two-class classifier; prompts as Kano's issue 14 defines them "
            "(the KAnoCLIP paper quotes CLIP from AnomalyCLIP's Table 1 without defining it)",
    "clip-ac": "Jeong et al., WinCLIP (CVPR 2023) Sec. 3: the CLIP-AC baseline, states 'normal/anomalous [class]' in "
               "WinCLIP's 21 templates, averaged per state",
    "winclip": "Jeong et al., WinCLIP (CVPR 2023), zero-shot (no WinCLIP+ reference images); constants as anomalib 2.7.0 "
               "WinClipModel, windows encoded on their own as the paper says",
}


def zero_shot_info(model, method: str, backbone: str) -> dict:
    """The provenance "method" of a built zero-shot model (CLIPZeroShot or WinCLIP)."""
    from kanoclip import winclip as W

    info = {"kind": "zero-shot", "name": method, "backbone": backbone, "setting": "per-image",
            "parameters": "frozen backbone, no training", "source": ZERO_SHOT_SOURCES[method],
            "image_size": model.backbone.image_size}
    if method == "clip":
        info["prompts"] = {"normal": W.CLIP_PROMPTS[0][0].format("[class]"), "anomalous": W.CLIP_PROMPTS[1][0].format("[class]")}
    elif method == "clip-ac":
        info["prompts"] = {"normal": "normal [class]", "anomalous": "anomalous [class]",
                           "templates": len(W.WINCLIP_TEMPLATES), "ensemble": "text features averaged per state"}
    else:
        info["prompts"] = {"normal_states": len(W.WINCLIP_NORMAL_STATES), "anomalous_states": len(W.WINCLIP_ANOMALOUS_STATES),
                           "templates": len(W.WINCLIP_TEMPLATES), "ensemble": "states x templates, text features averaged per state"}
        info.update(window_scales=list(model.cfg.scales), window_stride=model.cfg.stride, temperature=model.cfg.temperature)
    if method in ("clip", "clip-ac"):
        info["logit_scale"] = round(model.scale, 4)
        info["map"] = "last block's patch tokens (ln_post, proj) scored like the image, bilinear upsampling"
    else:
        info["map"] = "harmonic mean of the window scales' harmonic window aggregates and the image score, bilinear upsampling"
    return info


def load_zero_shot(method: str, run, backbone: str | None, image_size: int | None, device: torch.device | str = "cpu"):
    """-> (CLIPZeroShot | WinCLIP in eval mode, info) for `kano eval --method clip|clip-ac|winclip`."""
    if method not in ZERO_SHOT_METHODS:
        raise KanoError(f"zero-shot --method must be one of {', '.join(ZERO_SHOT_METHODS)}, got {method!r}")
    if run:
        raise KanoError(f"--method {method} evaluates a zero-shot method on a frozen backbone: give --backbone SPEC, not --run, got --run {run}")
    if not backbone:
        raise KanoError(f"--method {method} needs --backbone SPEC (tiny, micro or MODEL:PRETRAINED)")
    from kanoclip import build_backbone
    from kanoclip.winclip import WinCLIPConfig, build_zero_shot

    bb = build_backbone(backbone, image_size=image_size, device=device)
    if method == "winclip":
        largest = max(WinCLIPConfig().scales)
        if bb.grid < largest:
            raise KanoError(f"--image-size for --method winclip must give a patch grid of at least {largest} x {largest} "
                            f"(its largest window), i.e. >= {largest * bb.patch_size} px with {bb.patch_size} px patches; "
                            f"got {bb.image_size} px -> {bb.grid} x {bb.grid}")
    model = build_zero_shot(method, bb)
    return model, {"run": None, "backbone": backbone, "threshold": None, "prompt_names": {},
                   "method": zero_shot_info(model, method, backbone)}


def load_method(method: str, run, backbone: str | None, image_size: int | None, device: torch.device | str = "cpu"):
    """-> (model, info) for `kano eval --method NAME`: a zero-parameter baseline or a zero-shot CLIP method."""
    if method not in ALL_METHODS:
        raise KanoError(f"--method must be one of {', '.join(ALL_METHODS)}, got {method!r}")
    if method in ZERO_SHOT_METHODS:
        return load_zero_shot(method, run, backbone, image_size, device)
    from .baselines import load_baseline

    return load_baseline(method, run, backbone, image_size, device)
