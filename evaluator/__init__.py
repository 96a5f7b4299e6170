"""Metrics, the evaluation loop, prediction, reports and visualisations. Defines no model layers.

The names below are imported on first use: the loops and metrics need torch, while visualize, outputs and
report do not, and the torch-free runtime (kano.deploy) imports those through this package."""

import importlib
import sys
import types

_WHERE = {"evaluate": "evaluate", "run_inference": "evaluate", "write_reports": "evaluate", "load_model": "loading",
          "predict": "predict", **{k: "metrics" for k in ("METRIC_KEYS", "all_metrics", "aupro", "aupro_200", "average_precision",
                                                          "f1_max", "image_auroc", "pixel_ap", "pixel_auroc", "pixel_f1_max",
                                                          "pixel_metrics", "ranking_metrics")}}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # Importing a submodule binds it on the package; `evaluate` and `predict` name the functions here (as
        # when this file imported them eagerly), so the modules of the same name do not replace them.
        if name in _WHERE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
