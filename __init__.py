"""Kano: zero-shot anomaly detection with CLIP (the KAnoCLIP method as a tool).

`import kano` gives the version and the public API; the API's names are imported on first use
(module-level `__getattr__`), so `import kano` itself loads neither torch nor open_clip: a torch-free
runtime may import this package.

    import kano
    det = kano.Detector.load("runs/x")          # a trained run
    res = det("photo.png", class_name="bottle")   # -> kano.Result: score, map (H, W), decision, threshold

This file is the repository's root: `kano.X` is `./X` (kano.cli is ./cli.py, kano.trainer is ./trainer/).
kano.core is the bottom layer: it imports no other Kano package.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it (imported when the name is first read)
_LAZY = {
    "Detector": "kano.api",
    "Result": "kano.api",
    "KanoError": "kano.core.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later reads skip this function
        return value
    raise AttributeError(f"module 'kano' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
