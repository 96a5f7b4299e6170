"""The package as a user installs it: the entry point, the version, package data, imports from the install."""

import json
import subprocess
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

from conftest import KANO, ROOT


def _editable() -> bool:
    dist = next(metadata.distributions(name="kano", path=[sysconfig.get_paths()["purelib"]]))
    text = dist.read_text("direct_url.json")
    return bool(text) and json.loads(text).get("dir_info", {}).get("editable", False)


@pytest.mark.slow  # two fresh `kano` processes: over 8 s on two cores
def test_entry_point_runs_outside_the_source_tree(tmp_path):
    res = subprocess.run([KANO, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    from kano import __version__

    assert res.stdout.strip() == f"kano {__version__}"
    res = subprocess.run([KANO, "demo", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--out" in res.stdout, res.stderr


def test_imports_come_from_the_installed_package():
    from kano import cli
    from kano import kb_builder
    pack = Path(kb_builder.__file__).parent / "builtin_pack.json"
    assert pack.is_file(), "package data missing from the install"
    if _editable():
        pytest.skip("editable install: modules map to the source tree by design")
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    for mod in (cli, kb_builder):  # the venv may sit inside the checkout: ask for site-packages, not "outside ROOT"
        assert site in Path(mod.__file__).resolve().parents, f"{mod.__name__} imported from {mod.__file__}, not {site}"


def test_bottom_layer_imports_nothing_above_it():
    """core/errors.py and core/ui.py are the bottom layer: they import no other Kano package."""
    import kano

    for name in ("errors.py", "ui.py"):
        text = (Path(kano.__file__).parent / "core" / name).read_text()
        for pkg in ("cli", "demo", "knowledge_store", "kb_builder", "kanoclip", "anomaly_data", "trainer", "evaluator"):
            assert f"kano.{pkg}" not in text and f"from kano import {pkg}" not in text, f"{name} imports {pkg} upward"


@pytest.mark.slow
def test_wheel_installs_only_kano_into_a_fresh_venv(tmp_path):
    """Build the wheel, install it (no dependencies) into a new venv: the top of site-packages gains `kano` and
    its dist-info only, bin/ gains the `kano` script, and `import kano` answers with the version."""
    import sys
    import venv

    from kano import __version__

    wheels = tmp_path / "wheels"
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (wheel,) = wheels.glob("kano-*.whl")
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True,
                               text=True, check=True).stdout.strip())
    before, bin_before = {p.name for p in site.iterdir()}, {p.name for p in (env / "bin").iterdir()}
    res = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    added = {p.name for p in site.iterdir()} - before
    assert added == {"kano", f"kano-{__version__}.dist-info"}, sorted(added)
    assert {p.name for p in (env / "bin").iterdir()} - bin_before == {"kano"}
    for sub in ("core", "evaluator", "kanoclip", "trainer", "kb_builder", "knowledge_store", "anomaly_data", "deploy"):
        assert (site / "kano" / sub / "__init__.py").is_file(), f"kano/{sub} missing from the wheel"
    assert {"cli.py", "api.py", "demo.py", "__init__.py"} <= {p.name for p in (site / "kano").glob("*.py")}
    assert not {"tests", "bench", "tools", "docs"} & {p.name for p in (site / "kano").iterdir()}, "only the packages install"
    res = subprocess.run([str(py), "-c", "import kano; print(kano.__version__)"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == __version__, res.stderr
