"""w̄ᵏ (eq. 3) per class from a real KB with two classes and mixed sources: which descriptions feed it."""

import json

import pytest
import torch

from kano.core.errors import KanoError
from kano.kanoclip import KAnoCLIP, tokenize
from kano.knowledge_store import Description, KnowledgeStore
from kano.trainer import TrainConfig
from kano.trainer.knowledge import fallback_warning, knowledge_vectors

TEXTS = {
    ("bottle", "llm"): ["a bottle with a cracked glass neck", "a bottle whose rim is chipped away"],
    ("bottle", "vqa"): ["a dark brown stain covers the lower left of the bottle"],
    ("bottle", "builtin"): ["a bottle with a broken part", "a bottle with contamination on it"],
    ("carpet", "llm"): ["a carpet with a hole torn through its weave"],
    ("carpet", "import"): ["a carpet showing a strand of metal caught in it"],
    ("tile", "builtin"): ["a tile with a crack running across it", "a tile with glue smeared on its glaze"],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = KnowledgeStore(tmp_path_factory.mktemp("kbk") / "kb.duckdb")
    s.add_descriptions([Description(c, src, t) for (c, src), ts in TEXTS.items() for t in ts])
    return s


@pytest.fixture(scope="module")
def model(tiny_backbone):
    return KAnoCLIP(tiny_backbone)


def by_hand(bb, texts):
    """Eq. 3 by hand: open_clip's own encode_text of each sentence, then the plain mean."""
    with torch.no_grad():
        return bb.clip.encode_text(tokenize(texts)).mean(0)


def test_default_is_llm_and_vqa_per_class(model, store, tiny_backbone):
    vec, info = knowledge_vectors(model, store, ["bottle", "carpet"])
    want_bottle = by_hand(tiny_backbone, TEXTS["bottle", "llm"] + TEXTS["bottle", "vqa"])
    want_carpet = by_hand(tiny_backbone, TEXTS["carpet", "llm"])
    torch.testing.assert_close(vec["bottle"], want_bottle, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vec["carpet"], want_carpet, atol=1e-5, rtol=1e-5)
    # each class gets its own: another class's w̄ᵏ is far from it
    assert not torch.allclose(vec["bottle"], want_carpet, atol=1e-3)
    # the built-in pack is not mixed in when LLM/VQA text exists
    assert not torch.allclose(vec["bottle"], by_hand(tiny_backbone, [t for (c, _), ts in TEXTS.items() if c == "bottle" for t in ts]), atol=1e-3)
    assert info["classes"]["bottle"] == {"descriptions": 3, "sources": {"llm": 2, "vqa": 1}, "fallback": False}
    assert info["classes"]["carpet"] == {"descriptions": 1, "sources": {"llm": 1}, "fallback": False}
    assert info["fallback_classes"] == [] and fallback_warning(info) is None


def test_fallback_to_the_builtin_pack_only_for_a_class_without_llm_or_vqa(model, store, tiny_backbone):
    vec, info = knowledge_vectors(model, store, ["bottle", "tile"])
    torch.testing.assert_close(vec["tile"], by_hand(tiny_backbone, TEXTS["tile", "builtin"]), atol=1e-5, rtol=1e-5)
    assert info["classes"]["tile"] == {"descriptions": 2, "sources": {"builtin": 2}, "fallback": True}
    assert info["fallback_classes"] == ["tile"]
    warning = fallback_warning(info)
    assert "tile (builtin 2)" in warning and "bottle" not in warning and "--knowledge-sources" in warning


def test_explicit_sources(model, store, tiny_backbone):
    vec, info = knowledge_vectors(model, store, ["bottle", "carpet"], ["llm", "vqa", "builtin", "import"])
    torch.testing.assert_close(vec["bottle"], by_hand(tiny_backbone, TEXTS["bottle", "llm"] + TEXTS["bottle", "vqa"]
                                                      + TEXTS["bottle", "builtin"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vec["carpet"], by_hand(tiny_backbone, TEXTS["carpet", "llm"] + TEXTS["carpet", "import"]), atol=1e-5, rtol=1e-5)
    assert info["sources"] == ["llm", "vqa", "builtin", "import"] and info["fallback_classes"] == []
    vec, _ = knowledge_vectors(model, store, ["bottle"], ["vqa"])
    torch.testing.assert_close(vec["bottle"], by_hand(tiny_backbone, TEXTS["bottle", "vqa"]), atol=1e-5, rtol=1e-5)
    with pytest.raises(KanoError, match="got none for carpet.*--knowledge-sources"):
        knowledge_vectors(model, store, ["bottle", "carpet"], ["vqa"])   # asked explicitly: no silent fallback
    with pytest.raises(KanoError, match="got none for nothing_here"):
        knowledge_vectors(model, store, ["nothing_here"])


@pytest.mark.parametrize("bad", [[], ["llm", "gpt"]])
def test_config_rejects_unknown_sources(bad):
    with pytest.raises(ValueError, match="knowledge_sources must be a non-empty list of llm, vqa, builtin, import"):
        TrainConfig(data="mvtec:/x", knowledge_sources=bad)


def test_training_records_sources_and_warns_on_fallback(synth_root, tmp_path, cli):
    kb = KnowledgeStore(tmp_path / "kb.duckdb")
    kb.add_descriptions([Description("disc", "llm", "a disc with a round hole punched through it"),
                         Description("disc", "builtin", "a disc with a broken part"),
                         Description("weave", "builtin", "a woven fabric with a hole in it")])
    run = tmp_path / "run"
    code, out, err = cli("train", "--kb", kb.path, "--data", f"mvtec:{synth_root}", "--backbone", "tiny", "--out", run,
                         "--epochs", "1", "--batch-size", "8", "--image-size", "64", "--cache", "memory")
    assert code == 0, err
    note = " ".join(out.split())
    assert "note: no descriptions from an LLM or a VQA model for weave (builtin 1)" in note, note
    assert "w̄ᵏ" not in note and "warning" not in note and "--knowledge-sources builtin" in note
    k = json.loads((run / "config.json").read_text())["kb"]
    assert k["classes"] == {"disc": {"descriptions": 1, "sources": {"llm": 1}, "fallback": False},
                            "weave": {"descriptions": 1, "sources": {"builtin": 1}, "fallback": True}}
    assert k["fallback_classes"] == ["weave"] and k["sources"].startswith("default")
    code, _, err = cli("train", "--kb", kb.path, "--data", f"mvtec:{synth_root}", "--backbone", "tiny", "--out", tmp_path / "r2",
                       "--epochs", "1", "--image-size", "64", "--knowledge-sources", "llm,gpt")
    assert code == 2 and "knowledge_sources must be a non-empty list of llm, vqa, builtin, import, got gpt" in " ".join(err.split())
