"""w̄ᵏ per class (eq. 3) from the knowledge base, with text features cached in the KB itself when it can be written."""

from __future__ import annotations

import torch

from kano.errors import KanoError
from kanoclip import KAnoCLIP, knowledge_vector
from knowledge_store import KnowledgeStore

from .cache import backbone_fingerprint


def knowledge_vectors(model: KAnoCLIP, store: KnowledgeStore, classes: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """class -> w̄ᵏ (E,) on the model's device, and counts {class: {"descriptions": n, "encoded": k}}.

    Text features are cached per (backbone weights, text) in the KB's text_features table, so a
    second run with the same backbone encodes nothing. The KB is read without the write lock; the cache
    is written only if the file can be written at that moment (not open elsewhere, not read-only), so
    training never waits for nor fails on the lock.
    """
    key = f"{model.backbone.spec}#{backbone_fingerprint(model)}"
    texts_per_class: dict[str, list[str]] = {}
    missing = []
    for cls in classes:
        texts = [d.text for d in store.descriptions(cls)]
        if not texts:
            missing.append(cls)
        texts_per_class[cls] = texts
    if missing:
        raise KanoError(
            f"knowledge base {store.path} must hold descriptions for every training class, got none for {', '.join(missing)}; "
            f"add them with: kano kb build --classes {','.join(missing)} --kb {store.path} (add --llm openai:gpt-3.5-turbo "
            "for LLM descriptions; the default is the offline built-in pack)")
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
    vectors = {c: knowledge_vector(torch.tensor([cached[t] for t in ts], dtype=torch.float32)).to(dev) for c, ts in texts_per_class.items()}
    counts = {c: {"descriptions": len(ts)} for c, ts in texts_per_class.items()}
    return vectors, {"classes": counts, "encoded": len(todo), "from_cache": len(all_texts) - len(todo),
                     "cache_written": cached_now}
