"""The package layers, read from the source with `ast` (imports inside functions included): the trainer and
the evaluator do not import each other (what both need lives below them: core/files.py, core/device.py,
core/curves.py, kanoclip/runs.py), and the nn.Module files of kanoclip/ do no file or network I/O (weight
resolution is kanoclip/pretrained.py, the run format kanoclip/runs.py)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURE = ("model", "backbone", "bicmci", "adapter", "prompts", "losses", "anomalyclip", "aprilgan", "winclip", "musc",
        "retrieval", "protocol", "one_class", "oneclass", "patchcore", "padim")
NO_IO = ("huggingface_hub", "urllib", "requests", "http", "socket", "threading", "safetensors", "json", "pathlib",
         "shutil", "tempfile", "subprocess", "io", "duckdb", "PIL", "open_clip.pretrained")


def imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute names (relative ones resolved within the kano namespace)."""
    pkg = "kano" if path.parent == ROOT else "kano." + path.parent.name
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def _under(mods: set[str], prefix: str) -> set[str]:
    return {m for m in mods if m == prefix or m.startswith(prefix + ".")}


@pytest.mark.parametrize("folder, other", [("evaluator", "kano.trainer"), ("trainer", "kano.evaluator")])
def test_trainer_and_evaluator_do_not_import_each_other(folder, other):
    bad = {f.name: sorted(_under(imports(f), other)) for f in sorted((ROOT / folder).glob("*.py"))}
    assert {k: v for k, v in bad.items() if v} == {}


@pytest.mark.parametrize("name", PURE)
def test_the_module_files_do_no_file_or_network_io(name):
    path = ROOT / "kanoclip" / f"{name}.py"
    mods = imports(path)
    assert sorted(m for m in mods for p in NO_IO if m == p or m.startswith(p + ".")) == []
    tree = ast.parse(path.read_text())
    # the factory (backbone.build_backbone) is the one place that reaches weight files, through pretrained.py
    # and micro_clip.py, imported inside it when a backbone is built
    factory = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "build_backbone" for n in ast.walk(f)}
    io_modules = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and id(n) not in factory
                  and (n.module or "").split(".")[-1] in ("pretrained", "runs", "micro_clip")]
    io_modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and id(n) not in factory and n.level
                   for a in n.names if a.name in ("pretrained", "runs", "micro_clip")]
    assert io_modules == []
    opens = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "open"]
    os_uses = sorted({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                      and n.value.id == "os"} - {"environ"})  # reading a setting is not I/O
    assert opens == [] and os_uses == []


def test_the_import_reader_sees_lazy_and_relative_imports(tmp_path):
    """The reader itself: an import inside a function and a relative one are both found."""
    d = tmp_path / "evaluator"
    d.mkdir()
    f = d / "x.py"
    f.write_text("def f():\n    from kano.trainer.train import train\n    from ..trainer import checkpoint\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        assert _under(imports(f), "kano.trainer") == {"kano.trainer.train", "kano.trainer.train.train", "kano.trainer",
                                                     "kano.trainer.checkpoint"}
    finally:
        ROOT = old


STAGES = ("knowledge_store", "kb_builder", "kanoclip", "anomaly_data", "trainer", "evaluator", "deploy")


def test_no_stage_package_imports_the_public_api():
    """kano.api sits on top (it re-exports evaluator/detector.py): the stages and the bottom layer never import it."""
    bad = {f"{folder}/{f.name}": sorted(_under(imports(f), "kano.api")) for folder in (*STAGES, "core")
           for f in sorted((ROOT / folder).glob("*.py"))}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_bottom_layer_helpers_import_no_stage():
    for path in sorted((ROOT / "core").glob("*.py")):
        mods = imports(path)
        stages = [m for m in mods for s in ("trainer", "evaluator", "kanoclip", "anomaly_data", "kb_builder", "knowledge_store")
                  if m.startswith(f"kano.{s}")]
        assert stages == [], path.name


def test_every_module_of_the_tree_is_kano_dot_its_path():
    """The repository root is the `kano` package: `kano.X` is `./X` for every module of the packages, nothing
    remapped (the installed file of each dotted name sits at the same relative path as the source file)."""
    import importlib.util

    import kano

    installed = Path(kano.__file__).resolve().parent
    folders = [ROOT] + [p for p in sorted(ROOT.iterdir()) if (p / "__init__.py").is_file()]
    checked = 0
    for folder in folders:
        for f in sorted(folder.glob("*.py")):
            rel = f.relative_to(ROOT)
            parts = ["kano", *rel.parent.parts] + ([] if f.stem == "__init__" else [f.stem])
            spec = importlib.util.find_spec(".".join(parts))
            assert spec is not None and spec.origin is not None, ".".join(parts)
            assert Path(spec.origin).resolve().relative_to(installed) == rel, (".".join(parts), spec.origin)
            checked += 1
    assert checked > 50 and (ROOT / "cli.py").is_file() and (ROOT / "core" / "registry.py").is_file()
