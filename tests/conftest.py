import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Offline and a private Hugging Face cache before anything imports huggingface_hub (it reads these once, at
# import): a machine with cached weights must behave like CI.
assert "huggingface_hub" not in sys.modules, "conftest must run before huggingface_hub is imported"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="kano-test-hf-")
os.environ.setdefault("KANO_TEST", "1")
# Under pytest-xdist (pyproject's addopts: `-n 2`) the workers split the cores: torch, onnxruntime and the
# `kano` subprocesses read OMP_NUM_THREADS, so each worker stays on its share instead of every worker spinning a
# thread per core (set before torch is imported: it reads the variable once).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
# `kano` is the installed package (an editable install maps it to this repository's root): the root holds no
# folder named `kano`, so nothing on sys.path can shadow it. pytest puts tests/ on sys.path (no __init__.py
# here), so the test helpers import as `from conftest import ...`, `from fake_openai import ...`.
KANO = str(Path(sys.executable).parent / "kano")  # the installed entry point, for subprocess tests


def run_main(args: list) -> int:
    """Run the real `kano` entry point in-process; returns its exit code (what it prints goes to sys.stdout/err)."""
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
    return code


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """Run the real `kano` entry point in-process; returns (exit code, stdout, stderr)."""
    code = run_main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def cli(capsys):
    return lambda *args: run_cli(list(args), capsys)


@pytest.fixture(scope="session")
def tiny_backbone():
    from kano.kanoclip import build_backbone

    return build_backbone("tiny")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from kano.anomaly_data import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, ["disc", "weave"], seed=3, size=128, n_train=1, n_good=3, n_per_defect=2, defects=("hole", "stain"))
    return root


@pytest.fixture(scope="session")
def trained_run(synth_root, tmp_path_factory) -> Path:
    """A finished tiny KAnoCLIP run (1 epoch on synth_root); its knowledge base is run.parent / "kb.duckdb".
    Tests that damage or edit it work on a copy."""
    from kano.kb_builder import BuildConfig, build_knowledge_base
    from kano.knowledge_store import KnowledgeStore
    from kano.trainer import TrainConfig, train

    base = tmp_path_factory.mktemp("trained")
    kb = base / "kb.duckdb"
    build_knowledge_base(KnowledgeStore(kb), BuildConfig(classes=["disc", "weave"]), None, None)
    run = base / "run"
    train(TrainConfig(kb=str(kb), data=f"mvtec:{synth_root}", backbone="tiny", out=str(run), epochs=1, batch_size=4, image_size=96,
                      cache="memory"), log=lambda s: None)
    return run


@pytest.fixture(scope="session")
def exported_run(trained_run, tmp_path_factory) -> tuple[Path, str]:
    """`kano export --run <trained_run> --classes disc,weave` (in-process), once for the tests that score with the
    graph and only read it: (model.onnx, what the command printed)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("exported") / "model.onnx"
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = run_main(["export", "--run", trained_run, "--classes", "disc,weave", "--out", out])
    assert code == 0, errors.getvalue()
    return out, printed.getvalue()


@pytest.fixture(scope="session")
def hazelnut_root(tmp_path_factory) -> Path:
    """../shared's real hazelnut photos (repo copy), placed as a class folder of an MVTec-layout root."""
    root = tmp_path_factory.mktemp("mvtec")
    shutil.copytree(DATA / "hazelnut_toy", root / "hazelnut")
    return root


@pytest.fixture
def fake_openai():
    from fake_openai import FakeOpenAI

    with FakeOpenAI(slow_s=3.0) as srv:
        yield srv


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    """A copy of the finished tiny run that a test may change (calibrate writes into it)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """Nine normal 'disc' images from another seed than the run's training data (never trained on)."""
    from kano.anomaly_data import synthesize

    root = tmp_path_factory.mktemp("heldout")
    synthesize(root, ["disc"], seed=77, size=96, n_train=0, n_good=9, n_per_defect=0, defects=())
    return root / "disc" / "test" / "good"


def wait_until_serving(url: str, proc, timeout: float = 120.0) -> None:
    """Poll URL/healthz until `kano serve` (the process `proc`) answers 200; fail with its stderr if it exits, or
    after `timeout` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, f"kano serve did not answer /healthz within {timeout:.0f} s"
        time.sleep(0.3)


def predictions(out: Path) -> list[dict]:
    """The rows of `kano predict`'s OUT/predictions.jsonl, in order."""
    import json

    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def sigkill_partway_then_rerun(cmd: list, out: Path, env: dict, n_images: int, timeout: float, poll: float) -> None:
    """Start `cmd --out out`, SIGKILL it as soon as its result file holds rows, check that it died partway (0 < rows
    < n_images), then run the same command again and check that it succeeds."""
    import signal
    import subprocess

    proc = subprocess.Popen(cmd + ["--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = out / "predictions.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if result.exists() and result.stat().st_size > 0:
            break
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(result.read_bytes().splitlines())
    assert 0 < done < n_images                                             # killed partway
    again = subprocess.run(cmd + ["--out", str(out)], env=env, capture_output=True, text=True, timeout=timeout)
    assert again.returncode == 0, again.stderr[-2000:]


def pytest_collection_modifyitems(config, items):
    """Files with more slow tests first (stable: the files' own order otherwise). pytest-xdist hands out whole files
    in this order (pyproject's addopts), so the long files start early and the short ones fill the workers' ends."""
    slow: dict[Path, int] = {}
    for item in items:
        slow[item.path] = slow.get(item.path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: -slow[item.path])
