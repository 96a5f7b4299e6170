"""The trained methods by name, for `kano train --method` and `kanoclip.runs.load_run`: their nn.Module and
config dataclass as the method table (kano/registry.py) names them. Every method, trained or not, is listed there."""

from __future__ import annotations

from kano.registry import DISPLAY_NAMES, KINDS, METHODS, MethodSpec, method_spec, methods_with, resolve  # noqa: F401
from kano.registry import TRAINED_METHODS

from .backbone import Backbone


def check_method(method: str) -> str:
    if method not in TRAINED_METHODS:
        raise ValueError(f"method must be one of {', '.join(TRAINED_METHODS)}, got {method!r}")
    return method


def model_config(method: str, values: dict | None = None):
    """The method's model config dataclass (its published defaults), updated with `values`."""
    return resolve(METHODS[check_method(method)].config)(**(values or {}))


def build_model(method: str, backbone: Backbone, cfg=None):
    """-> the method's nn.Module on a frozen backbone (cfg: its config dataclass, None for the defaults)."""
    return resolve(METHODS[check_method(method)].model)(backbone, cfg if cfg is not None else model_config(method))
