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
EXPECTED = ["kanoclip", "aprilgan", "anomalyclip", "mvfa", "oneclass", "patchcore", "padim", "kanoclip-untrained", "clip", "clip-ac", "winclip", "retrieval",
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
    assert methods_with(kind="trained") == ("kanoclip", "aprilgan", "anomalyclip", "mvfa")
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
    assert _named(out.split("\n  --method ")[1].split("\n  --kb ")[0]) == ["kanoclip", "aprilgan", "anomalyclip", "mvfa", "oneclass", "patchcore", "padim"]


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
    for name, kind, needs, takes, source in rows:
        spec = METHODS[name.strip("`")]
        assert (kind, needs, "references" in takes.split(", "), source) == (
            spec.kind, ", ".join(spec.needs) or "-", spec.references, spec.source)
        assert ("export" in takes.split(", "), "prompts" in takes.split(", ")) == (spec.exportable, spec.prompts)


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


def _string_constants(path: Path) -> list[tuple[int, str]]:
    """(line, value) of every string constant in a Python file, except dict keys (a provenance field such as
    "mutual": True names a field, not a method)."""
    import ast

    tree = ast.parse(path.read_text())
    keys = {id(k) for node in ast.walk(tree) if isinstance(node, ast.Dict) for k in node.keys if k is not None}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in keys]


def _source(module: str) -> Path:
    """The source file of a Kano module in this tree (kano.X is ./X), whether the package is installed or editable."""
    path = ROOT.joinpath(*module.split(".")[1:])
    return (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).resolve()


def test_no_method_name_outside_the_registry_and_its_own_modules():
    """The rule: a string constant equal to a method's name appears only in the registry and in the modules its
    entry names (build, model, config, modules). The CLI, the API, the evaluator, export, the trainer and the demo
    read names from the table. tests/, bench/ (benchmarks choose what they compare) and tools/ are not the package."""

    registry = _source("kano.core.registry")
    files = [p.resolve() for p in ROOT.rglob("*.py")
             if not {"tests", "bench", "tools", "build"} & set(p.relative_to(ROOT).parts)
             and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]  # .venv*, .git
    assert len(files) > 40 and registry in files
    constants = {f: _string_constants(f) for f in files}
    found = []
    for name, spec in METHODS.items():
        own = {registry} | {_source(m) for m in spec.own_modules()}
        found += [f"{f.relative_to(ROOT)}:{line}: {name!r}" for f in files if f not in own
                  for line, value in constants[f] if value == name]
    assert not found, "method names outside the registry and their own modules:\n" + "\n".join(found)


def test_the_grep_rule_catches_a_name(tmp_path):
    """The rule above on a file that names a method: found; in a docstring or as a dict key: not."""
    f = tmp_path / "m.py"
    f.write_text('"""Uses winclip."""\nX = {"winclip": 1}\nif method == "winclip":\n    pass\n')
    assert [(line, v) for line, v in _string_constants(f) if v in METHODS] == [(3, "winclip")]


def test_docs_api_lists_are_the_registry():
    from kano.core.registry import markdown_list

    text = (ROOT / "docs" / "api.md").read_text()
    listed = text.split("<!-- api methods:")[1].split("-->", 1)[1].split("<!-- end of api methods")[0]
    assert listed.strip().rstrip(".") == markdown_list(methods_with(per_image=True))
    refs = text.split("<!-- api references:")[1].split("-->", 1)[1].split("<!-- end of api references")[0]
    assert refs == markdown_list(methods_with(references=True))


def test_one_kind_vocabulary_from_registry_to_provenance():
    """Every method built by name records its registry kind (and name) in its provenance."""
    from kano.evaluator.methods import load_method
    from kano.core.registry import KINDS

    for name, spec in METHODS.items():
        if spec.trained or "run" in spec.needs or "aux" in spec.needs:  # from a run or from labelled data: not by name
            continue
        _, info = load_method(name, None, "tiny" if "backbone" in spec.needs else None, 64, torch.device("cpu"))
        assert (info["method"]["kind"], info["method"]["method"]) == (spec.kind, name) and spec.kind in KINDS


def test_the_untrained_models_misspelt_class_word_warns(cli, tmp_path):
    """The untrained KAnoCLIP scores with prompts: kano predict --backbone and kano eval --backbone warn about a
    class word no pack describes, as for a run (its kind is the registry's "zero-shot", not a floor's)."""
    image = ROOT / "tests" / "data" / "hazelnut_toy" / "test" / "good" / "04.jpg"
    code, _, err = cli("predict", image, "--class", "hazlenut", "--backbone", "tiny", "--image-size", "32", "--out",
                       tmp_path / "p", "--no-panels", "--no-maps")
    assert code == 0, err
    assert "warning:" in err and "did you mean 'hazelnut'" in " ".join(err.split())
    code, _, err = cli("predict", image, "--class", "hazlenut", "--method", "median_colour", "--out", tmp_path / "q",
                       "--no-panels", "--no-maps")
    assert code == 0 and "warning:" not in err  # a floor uses no prompts
