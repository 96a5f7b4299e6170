"""The trained methods by name, for `kano train --method` and `kanoclip.runs.load_run`: their nn.Module and
config dataclass as the method table (core/registry.py) names them. Every method, trained or not, is listed there."""

from __future__ import annotations

from kano.core.errors import KanoError
from kano.core.registry import DISPLAY_NAMES, KINDS, METHODS, MethodSpec, method_spec, methods_with, resolve  # noqa: F401
from kano.core.registry import DEFAULT_METHOD, TRAINED_METHODS, UNTRAINED_METHOD, check_given, methods_with_option  # noqa: F401
from kano.core.registry import ONE_CLASS_METHODS, RUN_METHODS  # noqa: F401

from .backbone import Backbone, build_backbone


def check_method(method: str, allowed: tuple[str, ...] = RUN_METHODS) -> str:
    if method not in allowed:
        raise ValueError(f"method must be one of {', '.join(allowed)}, got {method!r}")
    return method


def is_one_class(method: str) -> bool:
    """True for a method fitted on normal images only (kanoclip/one_class.py's interface)."""
    return method in ONE_CLASS_METHODS


def model_config(method: str, values: dict | None = None):
    """The method's model config dataclass (its published defaults), updated with `values`."""
    return resolve(METHODS[check_method(method)].config)(**(values or {}))


def published_backbone(method: str) -> tuple:
    """-> (layers, pos_resize): the method's `published_layers(depth) -> (stages, vv_start)` and its position-
    embedding resize (kanoclip/pos_embed.py), each set (with its source) on the method's class."""
    cls = resolve(METHODS[check_method(method)].model)
    return cls.published_layers, cls.pos_resize


def method_backbone(method: str, spec: str, *, image_size: int | None = None, device=None, stages: list[int] | None = None,
                    vv_start: int | None = None, pos_resize: str | None = None, use_vv: bool = True,
                    activation: str | None = None) -> Backbone:
    """The frozen backbone `method` trains on: what is not given (None) is the method's published value.
    use_vv=False (KAnoCLIP's --no-vv ablation) lifts the check that the V-V path starts by the last stage."""
    check_method(method, TRAINED_METHODS)
    layers, default_resize = published_backbone(method)
    cls = resolve(METHODS[method].model)
    if image_size is None:  # a method that publishes its own size for this backbone (MVFA-AD: 240 on ViT-L-14-336)
        image_size = getattr(cls, "published_sizes", {}).get(spec.partition(":")[0])
    bb = build_backbone(spec, image_size=image_size, device=device, pos_resize=pos_resize or default_resize,
                        partial_patches=getattr(cls, "partial_patches", False), activation=activation)
    st, vv = layers(bb.depth)
    bb.set_layers(stages or st, vv_start if vv_start is not None else vv)
    spec_vv = cls.__dict__.get("feature_spec")  # a dict on the peers; KAnoCLIP's follows its config
    if use_vv and (spec_vv["vv"] if isinstance(spec_vv, dict) else True) and bb.vv_start > max(bb.stages):
        raise KanoError(f"the V-V start must be at or before the last stage {max(bb.stages)} (its maps come from the V-V "
                        f"path), got vv_start {bb.vv_start}; pass --vv-start {min(bb.stages)} or later stages")
    return bb


def build_model(method: str, backbone: Backbone, cfg=None):
    """-> the method's nn.Module on a frozen backbone (cfg: its config dataclass, None for the defaults)."""
    return resolve(METHODS[check_method(method, TRAINED_METHODS)].model)(backbone, cfg if cfg is not None else model_config(method))


def build_one_class(method: str, spec: str | None, cfg=None, image_size: int | None = None, device=None,
                    stages: list[int] | None = None):
    """-> the one-class method's nn.Module, not yet fitted (or to be given a run's fitted tensors): its frozen encoder
    built from `spec` (None or "none": no encoder, the method reads pixels only) at the size the class asks for,
    `stages` (None: the backbone's default spread), and `image_size` the working side (None: the class's default)."""
    cls = resolve(METHODS[check_method(method, ONE_CLASS_METHODS)].model)
    cfg = cfg if cfg is not None else model_config(method)
    encoder = None
    if spec and spec != "none":
        encoder = build_backbone(spec, image_size=cls.encoder_image_size(cfg), device=device, stages=stages)
    size = image_size or getattr(cls, "default_image_size", 256)
    return cls(encoder, cfg, size).to(device or "cpu")
