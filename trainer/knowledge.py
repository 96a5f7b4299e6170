"""w̄ᵏ per class (eq. 3) from the knowledge base, with text features cached in the KB itself when it can be written.

Eq. 3 averages the LLM and VQA descriptions of a class. Which stored descriptions feed it is explicit:
by default only `llm` and `vqa`; the built-in pack and imported text only for a class that has no LLM or
VQA description at all (a warned fallback), or when asked (`sources`).
"""

from __future__ import annotations

import torch

from kano.core.errors import KanoError
from kano.kanoclip import KAnoCLIP, knowledge_vector
from kano.knowledge_store import KnowledgeStore

from .cache import backbone_fingerprint

KNOWLEDGE_SOURCES = ("llm", "vqa", "builtin", "import")
DEFAULT_SOURCES = ("llm", "vqa")          # eq. 3: the LLM and VQA descriptions
FALLBACK_SOURCES = ("builtin", "import")  # used for a class only when it has none of the default ones


def check_sources(sources) -> tuple[str, ...] | None:
    """None (the default rule) or a non-empty tuple of known sources; ValueError otherwise."""
    if sources is None:
        return None
    sources = tuple(sources)
    bad = [s for s in sources if s not in KNOWLEDGE_SOURCES]
    if not sources or bad:
        raise ValueError(f"knowledge_sources must be a non-empty list of {', '.join(KNOWLEDGE_SOURCES)}, got "
                         f"{', '.join(bad) if bad else 'an empty list'}")
    return sources


def select_descriptions(store: KnowledgeStore, cls: str, sources: tuple[str, ...] | None) -> tuple[dict[str, list[str]], bool]:
    """The texts feeding w̄ᵏ for one class, per source, and whether the default rule fell back to builtin/import."""
    asked = sources or DEFAULT_SOURCES
    by_source = {s: [d.text for d in store.descriptions(cls, [s])] for s in asked}
    fallback = False
    if sources is None and not any(by_source.values()):
        by_source = {s: [d.text for d in store.descriptions(cls, [s])] for s in FALLBACK_SOURCES}
        fallback = any(by_source.values())
    return {s: t for s, t in by_source.items() if t}, fallback


def knowledge_vectors(model: KAnoCLIP, store: KnowledgeStore, classes: list[str],
                      sources: list[str] | tuple[str, ...] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """class -> w̄ᵏ (E,) on the model's device, and what fed it.

    sources None: `llm` + `vqa`, falling back to `builtin` + `import` for a class without either.
    A list: exactly those sources (a class with none of them is an error).
    Info: {"sources": requested or "default", "classes": {class: {"descriptions": n, "sources": {src: n}, "fallback": bool}},
    "fallback_classes": [...], "encoded": k, "from_cache": j}.
    Text features are cached per (backbone weights, text) in the KB's text_features table, so a
    second run with the same backbone encodes nothing. The KB is read without the write lock; the cache
    is written only if the file can be written at that moment (not open elsewhere, not read-only), so
    training never waits for nor fails on the lock.
    """
    sources = check_sources(sources)
    key = f"{model.backbone.spec}#{backbone_fingerprint(model)}"
    texts_per_class: dict[str, list[str]] = {}
    counts: dict[str, dict] = {}
    missing = []
    for cls in classes:
        by_source, fallback = select_descriptions(store, cls, sources)
        texts = [t for ts in by_source.values() for t in ts]
        if not texts:
            missing.append(cls)
        texts_per_class[cls] = texts
        counts[cls] = {"descriptions": len(texts), "sources": {s: len(t) for s, t in by_source.items()}, "fallback": fallback}
    if missing:
        which = ", ".join(sources) if sources else "llm, vqa, builtin or import"
        raise KanoError(
            f"knowledge base {store.path} must hold descriptions ({which}) for every training class, got none for "
            f"{', '.join(missing)}; add them with: kano kb build --classes {','.join(missing)} --kb {store.path} (add --llm "
            "openai:gpt-3.5-turbo for LLM descriptions; the default is the offline built-in pack)"
            + ("" if sources is None else "; or choose other --knowledge-sources"))
    all_texts = sorted({t for ts in texts_per_class.values() for t in ts})
    cached = store.cached_text_features(key, all_texts)
    todo = [t for t in all_texts if t not in cached]
    if todo:
        feats = model.prompts.tower.encode(todo).float().cpu()
        new = {t: f.tolist() for t, f in zip(todo, feats)}
        cached_now = store.try_store_text_features(key, new)
        cached.update(new)
    else:
        cached_now = True
    dev = model.backbone.device
    # eq. 3: the mean over the selected descriptions, LLM and VQA alike
    vectors = {c: knowledge_vector(torch.tensor([cached[t] for t in ts], dtype=torch.float32)).to(dev) for c, ts in texts_per_class.items()}
    return vectors, {"sources": list(sources) if sources else "default (llm, vqa; builtin, import only as fallback)",
                     "classes": counts, "fallback_classes": [c for c in classes if counts[c]["fallback"]],
                     "encoded": len(todo), "from_cache": len(all_texts) - len(todo), "cache_written": cached_now}


def fallback_warning(info: dict) -> str | None:
    """The note training prints when a class's knowledge vector came from the built-in pack or imports (in plain
    words: what happened, that it is the offline path, and what each choice changes)."""
    fb = info.get("fallback_classes") or []
    if not fb:
        return None
    detail = ", ".join(f"{c} ({', '.join(f'{s} {n}' for s, n in info['classes'][c]['sources'].items())})" for c in fb[:8])
    return (f"note: no descriptions from an LLM or a VQA model for {detail}{', ...' if len(fb) > 8 else ''}: training "
            "uses the descriptions listed instead (builtin: the generic defect descriptions `kano kb build --llm builtin` "
            "stores for any class; offline, this is the way, and it trains as usual). Pass --knowledge-sources builtin to choose this "
            "yourself (and drop this note); with network, `kano kb build --llm openai:MODEL` adds descriptions written "
            "for the class.")