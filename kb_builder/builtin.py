"""The offline pack: hand-written anomaly descriptions for the classes of the paper's 12 datasets."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def _pack() -> dict:
    return json.loads(resources.files("kano.kb_builder").joinpath("builtin_pack.json").read_text())


def builtin_classes() -> list[str]:
    return sorted(_pack()["classes"])


def builtin_descriptions(class_name: str, n: int | None = None) -> list[str]:
    """Descriptions for a class; classes outside the pack get the generic ones with the name filled in."""
    pack = _pack()
    texts = pack["classes"].get(class_name) or pack["classes"].get(class_name.lower())
    if texts is None:
        name = class_name.replace("_", " ")
        texts = [t.format(name=name) for t in pack["generic"]]
    return list(texts if n is None else texts[:n])
