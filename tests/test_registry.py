"""One table of methods (core/registry.py): the CLI help, `kano eval --method`'s error, the demo's table and
docs/methods.md name exactly its methods; the registry's queries; the untrained KAnoCLIP has its own name and
`clip-ac` means only WinCLIP's CLIP-AC; every built method meets the Protocol."""

import re
from pathlib import Path

import pytest
import torch

from kano.core.registry import METHODS, methods_with

ROOT = Path(__file__).resolve().parent.parent
# Written out by hand: the table a newcomer reads. A new method changes this list and the registry, nothing else.
EXPECTED = ["kanoclip", "aprilgan", "anomalyclip", "oneclass", "patchcore", "padim", "kanoclip-untrained", "clip", "clip-ac", "winclip", "retrieval",
            "median_colour", "darkness", "brightness", "local_median", "self_similarity", "self_similarity_randconv",
            "mutual", "musc", "musc_randconv"]


def _flat(text: str) -> str:
    return re.sub(r"-\s+(?=[a-z])", "-", " ".join(text.split()))  # click wraps lines at a hyphen


def _lists(text: str) -> list[list[str]]:
    """The comma-separated lists of method-like names in a help text ("a, b, c")."""
    name = r"[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*"
    return [m.split(", ") for m in re.findall(rf"{name}(?:, {name})+", _flat(text))]


def _named(text: str) -> list[str]:
    """The registry's names that a help text mentions, as whole words, in order of first mention; and every
    comma-separated list that holds one of them must hold nothing else (a stale or misspelt name)."""
    for lst in _lists(text):
        if set(lst) & set(METHODS):
            assert set(lst) <= set(METHODS), lst
    words = re.split(r"[\s,.;:()]+", _flat(text))
    return list(dict.fromkeys(w for w in words if w in METHODS))


def test_the_table_holds_the_methods():
    assert list(METHODS) == EXPECTED
    assert methods_with(references=True) == ("winclip",)
    assert methods_with(kind="trained") == ("kanoclip", "aprilgan", "anomalyclip")
    assert methods_with(needs="aux") == ("retrieval",)
    assert set(methods_with(kind="transductive")) == {"mutual", "musc", "musc_randconv"}
    assert methods_with(kind="one-class") == ("oneclass", "patchcore", "padim")
    with pytest.raises(ValueError, match="kind must be one of trained, one-class, zero-shot"):
        methods_with(kind="few")


def test_eval_help_names_exactly_the_registry(cli):
    code, out, _ = cli("eval", "--help")
    assert code == 0
    method_help = out.split("\n  --method ")[1].split("\n  --aux ")[0]
    assert sorted(_named(method_help)) == sorted(EXPECTED)
    backbone_help = out.split("\n  --backbone ")[1].split("\n  --out ")[0]
    assert _named(backbone_help) == ["kanoclip-untrained", "clip", "clip-ac", "winclip", "retrieval", "mutual", "musc"]


def test_train_help_names_the_trained_methods(cli):
    code, out, _ = cli("train", "--help")
    assert code == 0
    assert _named(out.split("\n  --method ")[1].split("\n  --kb ")[0]) == ["kanoclip", "aprilgan", "anomalyclip", "oneclass", "patchcore", "padim"]


def test_eval_method_error_lists_exactly_the_registry(cli, synth_root, tmp_path):
    code, _, err = cli("eval", "--method", "bogus", "--data", f"mvtec:{synth_root}", "--out", tmp_path / "e")
    assert code == 2 and "Traceback" not in err
    listed = re.search(r"--method must be one of (.*), got 'bogus'", " ".join(err.split())).group(1).split(", ")
    assert listed == EXPECTED
    assert not (tmp_path / "e").exists()


def test_a_trained_method_by_name_points_to_its_run(cli, synth_root, tmp_path):
    code, _, err = cli("eval", "--method", "aprilgan", "--data", f"mvtec:{synth_root}", "--out", tmp_path / "e")
    assert code == 2 and "error: --method aprilgan is a trained method: train it with `kano train --method aprilgan`" in err


def test_the_demo_reads_its_rows_from_the_registry():
    from kano import demo

    assert demo.rows("micro") == [
        ("kanoclip", "KAnoCLIP (trained)", "trained on aux"),
        ("kanoclip-untrained", "KAnoCLIP untrained (fixed prompts)", "untrained"),
        ("clip-ac", "CLIP-AC (zero-shot)", "zero-shot, untrained"),
        ("winclip", "WinCLIP (zero-shot)", "zero-shot, untrained"),
        *[(m, m, "per-image, 0 params") for m in ("median_colour", "darkness", "brightness", "local_median",
                                                   "self_similarity", "self_similarity_randconv")],
        ("mutual", "mutual (micro)", "transductive"),
        ("musc_randconv", "musc_randconv", "transductive"),
    ]
    assert [m for m, _, _ in demo.rows()] == [m for m in EXPECTED if METHODS[m].demo]


def test_the_docs_table_is_the_registry():
    text = (ROOT / "docs" / "methods.md").read_text()
    table = text.split("<!-- methods table")[1].split("<!-- end of methods table")[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines() if line.startswith("| `")]
    assert [r[0].strip("`") for r in rows] == EXPECTED
    for name, kind, needs, refs, source in rows:
        spec = METHODS[name.strip("`")]
        assert (kind, needs, refs == "yes", source) == (spec.kind, ", ".join(spec.needs) or "-", spec.references, spec.source)


def test_the_untrained_kanoclip_has_its_own_name(cli, synth_root, tmp_path):
    import json

    for args, out in (([ "--backbone", "tiny"], "a"), (["--method", "kanoclip-untrained", "--backbone", "tiny"], "b")):
        code, _, err = cli("eval", *args, "--image-size", "64", "--data", f"mvtec:{synth_root}", "--classes", "disc",
                           "--out", tmp_path / out, "--n-overlays", "0")
        assert code == 0, err
    a, b = (json.loads((tmp_path / o / "metrics.json").read_text()) for o in "ab")
    assert a["provenance"]["method"]["name"] == b["provenance"]["method"]["name"] == "kanoclip-untrained"
    assert a["classes"] == b["classes"]  # the same model both ways
    assert "WinCLIP" in METHODS["clip-ac"].source and "kanoclip-untrained" not in METHODS["clip-ac"].source


@pytest.mark.parametrize("name", [m for m in EXPECTED if METHODS[m].kind not in ("trained", "one-class") and m != "retrieval"])
def test_every_method_meets_the_protocol(name):
    """Built as `kano eval --method` builds it: the Protocol's attributes, and a call giving (N,) scores and
    (N, S, S) maps (finite, >= 0)."""
    from kano.evaluator.methods import load_method
    from kano.kanoclip.protocol import Method, Preprocessing

    spec = METHODS[name]
    model, info = load_method(name, None, "tiny" if "backbone" in spec.needs else None, 64, torch.device("cpu"))
    assert isinstance(model, Method) and isinstance(model.backbone, Preprocessing)
    assert model.transductive == (spec.kind == "transductive")
    assert "SimpleNamespace" not in type(model.backbone).__name__
    model.begin_class("disc", "disc")
    s = model.backbone.image_size
    x = torch.rand(3, 3, s, s)
    with torch.no_grad():
        res = model(x, ["disc"] * 3).inference()
    assert res.image_score.shape == (3,) and res.anomaly_map.shape == (3, s, s)
    assert bool(torch.isfinite(res.anomaly_map).all()) and float(res.anomaly_map.min()) >= 0
