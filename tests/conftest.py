import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("KANO_TEST", "1")
DATA = Path(__file__).parent / "data"


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the real `kano` entry point in-process; returns (exit code, stdout, stderr)."""
    from kano.cli import main

    old = sys.argv
    sys.argv = ["kano", *map(str, args)]
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def cli(capsys):
    return lambda *args: run_cli(list(args), capsys)


@pytest.fixture(scope="session")
def tiny_backbone():
    from kanoclip import build_backbone

    return build_backbone("tiny")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from anomaly_data import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, ["disc", "weave"], seed=3, size=128, n_train=1, n_good=3, n_per_defect=2, defects=("hole", "stain"))
    return root


@pytest.fixture(scope="session")
def hazelnut_root(tmp_path_factory) -> Path:
    """../shared's real hazelnut photos (repo copy), placed as a class folder of an MVTec-layout root."""
    root = tmp_path_factory.mktemp("mvtec")
    shutil.copytree(DATA / "hazelnut_toy", root / "hazelnut")
    return root


@pytest.fixture
def fake_openai():
    from tests.fake_openai import FakeOpenAI

    with FakeOpenAI(slow_s=3.0) as srv:
        yield srv
