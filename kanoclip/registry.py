"""The trained methods `kano train --method` builds, by name: KAnoCLIP and the trained peers of Table 1."""

from __future__ import annotations

from .anomalyclip import AnomalyCLIP, AnomalyCLIPConfig
from .aprilgan import AprilGAN, AprilGANConfig
from .backbone import Backbone
from .model import KAnoCLIP, ModelConfig

TRAINED_METHODS = ("kanoclip", "aprilgan", "anomalyclip")
DISPLAY_NAMES = {"kanoclip": "KAnoCLIP", "aprilgan": "April-GAN", "anomalyclip": "AnomalyCLIP"}
_CONFIGS = {"kanoclip": ModelConfig, "aprilgan": AprilGANConfig, "anomalyclip": AnomalyCLIPConfig}
_MODELS = {"kanoclip": KAnoCLIP, "aprilgan": AprilGAN, "anomalyclip": AnomalyCLIP}


def check_method(method: str) -> str:
    if method not in TRAINED_METHODS:
        raise ValueError(f"method must be one of {', '.join(TRAINED_METHODS)}, got {method!r}")
    return method


def model_config(method: str, values: dict | None = None):
    """The method's model config dataclass (its published defaults), updated with `values`."""
    return _CONFIGS[check_method(method)](**(values or {}))


def build_model(method: str, backbone: Backbone, cfg=None):
    """-> the method's nn.Module on a frozen backbone (cfg: its config dataclass, None for the defaults)."""
    return _MODELS[check_method(method)](backbone, cfg if cfg is not None else model_config(method))
