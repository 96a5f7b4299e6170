"""`kano train` under concurrency, damage and interruption, its input checks and help.
Real processes, real signals, real files."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import KANO


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset big enough that encoding it takes a moment, and its knowledge base."""
    from kano.anomaly_data import synthesize
    from kano.kb_builder import BuildConfig, build_knowledge_base
    from kano.knowledge_store import KnowledgeStore

    root = tmp_path_factory.mktemp("rel")
    synthesize(root / "data", ["disc", "weave"], seed=5, size=128, n_train=1, n_good=6, n_per_defect=3, defects=("hole", "stain"))
    kb = root / "kb.duckdb"
    build_knowledge_base(KnowledgeStore(kb), BuildConfig(classes=["disc", "weave"]), None, None)
    return root / "data", kb


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def _args(world, out, cache_dir, *extra, epochs=3, image_size=96):
    data, kb = world
    return [KANO, "train", "--kb", str(kb), "--data", f"mvtec:{data}", "--backbone", "tiny", "--out", str(out),
            "--epochs", str(epochs), "--batch-size", "4", "--image-size", str(image_size), "--cache", "disk",
            "--cache-dir", str(cache_dir), "--device", "cpu", *extra]


def _run(args, timeout=240):
    return subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=timeout)


def _weights(run: Path) -> dict:
    return load_file(str(run / "weights.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _epochs_in_log(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def lone(world, tmp_path_factory):
    """A run alone on its own cache: the reference every other run must reproduce exactly."""
    root = tmp_path_factory.mktemp("lone")
    proc = _run(_args(world, root / "run", root / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


# -- item 1: two runs on one cache directory ----------------------------------------------------------------------
@pytest.mark.slow
def test_two_trains_at_once_on_one_cache_dir_both_train_on_complete_features(world, lone, tmp_path):
    cache = tmp_path / "cache"
    procs = [subprocess.Popen(_args(world, tmp_path / name, cache), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    ref = _weights(lone)
    for name in ("a", "b"):
        assert _same(_weights(tmp_path / name), ref), f"run {name} trained on other features than a lone run"
        cfg = json.loads((tmp_path / name / "config.json").read_text())
        assert cfg["threshold"] == json.loads((lone / "config.json").read_text())["threshold"]
    folders = [p for p in cache.iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "manifest.json").is_file()  # one finished cache, no leftovers
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    assert set(manifest["sha256"]) == {"global.npy", "patches.npy"} and manifest["shapes"]["global.npy"][0] == 24


# -- item 2: a damaged cache is rebuilt, with a warning --------------------------------------------------------------
def _overwrite(p: Path):
    b = bytearray(p.read_bytes())
    mid = len(b) // 2
    b[mid:mid + 4096] = bytes(4096)  # same size, other values: only the checksum can tell
    p.write_bytes(bytes(b))


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage_header(p: Path):
    b = p.read_bytes()
    p.write_bytes(b"\x80\x04garbage" + b[10:])


def _empty(p: Path):
    p.write_bytes(b"")


@pytest.fixture(scope="module")
def pristine(world, tmp_path_factory):
    """A finished disk cache and the weights trained on it (in this process)."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("pristine")

    class _Cap:  # run_cli wants capsys; a module fixture has none
        def readouterr(self):
            return type("R", (), {"out": "", "err": ""})()

    code, _, _ = run_cli(_args(world, root / "run", root / "cache", epochs=1)[1:], _Cap())
    assert code == 0
    (folder,) = [p for p in (root / "cache").iterdir() if p.is_dir()]
    return folder, _weights(root / "run")


@pytest.mark.parametrize("damage", [_overwrite, _truncate, _garbage_header, _empty], ids=["overwritten", "truncated", "garbage", "empty"])
def test_a_damaged_cache_file_is_rebuilt_with_a_warning(world, pristine, tmp_path, damage, cli):
    import hashlib
    import shutil

    source, weights = pristine
    cache = tmp_path / "cache"
    shutil.copytree(source, cache / source.name)
    folder = cache / source.name
    damage(folder / "patches.npy")
    code, out, err = cli(*_args(world, tmp_path / "second", cache, epochs=1)[1:])
    assert code == 0, err
    assert "Traceback" not in out + err
    assert f"warning: feature cache {folder}" in " ".join((out + err).split()) and "rebuilding it" in out + err
    assert _same(_weights(tmp_path / "second"), weights)  # trained on the right features again
    manifest = json.loads((folder / "manifest.json").read_text())  # and the rebuilt cache is whole
    assert manifest["sha256"]["patches.npy"] == hashlib.sha256((folder / "patches.npy").read_bytes()).hexdigest()


# -- item 8: one atomic checkpoint file --------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_checkpoint_is_one_file_holding_its_epoch(world, lone):
    files = sorted(p.name for p in (lone / "checkpoint").iterdir())
    assert files == ["last.safetensors"]
    with safe_open(str(lone / "checkpoint" / "last.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["epoch"] == "3" and [r["epoch"] for r in json.loads(meta["history"])] == [1, 2, 3]


def _checkpoint_epoch(run: Path) -> int:
    p = run / "checkpoint" / "last.safetensors"
    try:
        with safe_open(str(p), framework="pt") as f:
            return int(f.metadata()["epoch"])
    except Exception:
        return 0


@pytest.mark.slow
def test_a_kill_after_a_checkpoint_resumes_without_training_an_epoch_twice(world, lone, tmp_path):
    """SIGKILL (no handler runs) as soon as epoch 1's checkpoint exists; --resume must end where a lone run ends."""
    ref = tmp_path / "ref"
    run = tmp_path / "run"
    p = subprocess.Popen(_args(world, run, tmp_path / "c1"), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 200
    while _checkpoint_epoch(run) < 1 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    p.kill()
    p.wait()
    done = _checkpoint_epoch(run)
    assert 1 <= done < 3, "the run must be killed mid-way"
    # a half-written temporary file from a killed write is never read
    (run / "checkpoint" / ".last.safetensors.99999.tmp").write_bytes(b"partial")
    proc = _run(_args(world, run, tmp_path / "c1", "--resume"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming {run} from epoch {done + 1} of 3" in " ".join((proc.stdout + proc.stderr).split())
    assert _epochs_in_log(run) == [1, 2, 3]
    assert _same(_weights(run), _weights(lone))


# -- item 9: Ctrl-C at any moment ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_while_encoding_the_cache_lets_the_same_command_start_again(world, lone, tmp_path):
    cache = tmp_path / "cache"
    args = _args(world, tmp_path / "run", cache, "--batch-size", "1", epochs=1, image_size=128)
    # SIGINT back to its default in the child: a shell's background job inherits it ignored, and Python then never
    # raises KeyboardInterrupt
    p = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 200
    while not list(cache.glob("*.tmp-*")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert p.poll() is None, "the run must still be encoding"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert "interrupted while encoding the feature cache, before any epoch finished" in err
    assert "run the same command again" in err
    assert not [x for x in cache.iterdir() if x.is_dir()]  # neither a half cache nor a temporary folder is left
    proc = _run(args)  # the same command, unchanged
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "interrupted before its first epoch finished; starting it again" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_kill_during_training_says_resume_and_resume_finishes(world, tmp_path):
    """SIGTERM (`kill`) takes the same path as Ctrl-C (SIGINT, above): a message naming the command to continue."""
    run = tmp_path / "run"
    args = _args(world, run, tmp_path / "cache")
    p = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 200
    while _checkpoint_epoch(run) < 1 and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    p.terminate()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    done = _checkpoint_epoch(run)
    assert 1 <= done < 3
    assert f"epochs 1-{done} of 3 are saved in {run}; continue with the same command and --resume" in " ".join(err.split())
    assert err.strip().splitlines()[-1].strip().endswith("--device cpu --resume")  # the command to type, on one line
    proc = _run(args)  # without --resume: refused, and told what to do
    assert proc.returncode == 2 and "pass --resume to continue it" in proc.stderr
    proc = _run(args + ["--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"from epoch {done + 1} of 3" in proc.stdout + proc.stderr
    assert _epochs_in_log(run) == [1, 2, 3]


# -- the traceback list: bad input is `error: ...`, exit 2 -----------------------------------------------------------
@pytest.mark.parametrize("extra, config, expected", [
    (["--stages", "a,b"], None, "--stages must be comma-separated block numbers (e.g. 6,12,18,24), got 'a,b'"),
    ([], [1, 2], "must hold a JSON object of TrainConfig keys, got a list"),
    ([], {"model": "abc"}, "config key \"model\" must be a JSON object of ModelConfig keys"),
    ([], {"model": {"n_ktx": 3}}, "model config keys must be among"),
    (["--device", "foo"], None, "--device must be cpu, cuda or cuda:N, got 'foo'"),
    (["--image-size", "-8"], None, "image_size must be a positive integer (leave it unset for the backbone's default), got -8"),
    (["--image-size", "0"], None, "image_size must be a positive integer"),
    (["--batch-size", "0"], None, "batch_size must be >= 1, got 0"),
    (["--workers", "-1"], None, "workers must be >= 0"),
    (["--epochs", "0"], None, "epochs must be >= 1, got 0"),
])
def test_bad_train_input_is_an_error_not_a_traceback(world, tmp_path, cli, extra, config, expected):
    data, kb = world
    args = ["train", "--kb", kb, "--data", f"mvtec:{data}", "--backbone", "tiny", "--out", tmp_path / "r", *extra]
    if config is not None:
        (tmp_path / "c.json").write_text(json.dumps(config))
        args += ["--config", tmp_path / "c.json"]
    code, out, err = cli(*args)
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and expected in " ".join(err.split()), err
    assert not (tmp_path / "r").exists()  # nothing written


def test_out_naming_an_existing_file_is_refused(world, tmp_path, cli):
    data, kb = world
    (tmp_path / "f").write_text("keep me")
    code, out, err = cli("train", "--kb", kb, "--data", f"mvtec:{data}", "--backbone", "tiny", "--out", tmp_path / "f")
    assert code == 2 and "--out must be a directory" in err and "got an existing file" in err
    assert (tmp_path / "f").read_text() == "keep me"


# -- help -----------------------------------------------------------------------------------------------
def test_train_help_shows_defaults_and_every_option_has_help():
    import typer.main

    from kano.cli import app

    proc = subprocess.run([KANO, "train", "--help"], env={**_env(), "COLUMNS": "200"}, capture_output=True, text=True, timeout=60)
    text = " ".join(proc.stdout.replace("│", " ").split())
    for needle in ("--kb", "(default: kb.duckdb)", "(default: 111)", "kanoclip and anomalyclip 15", "recipe: 8; mvfa 1)",
                   "recipe: 1e-3; mvfa 1e-4)",
                   "(default: ViT-L-14-336-quickgelu:openai)", "needs CLIP weights downloaded once", "(default: auto)"):
        assert needle in text, needle
    cmd = typer.main.get_command(app).commands["train"]
    undocumented = [p.name for p in cmd.params if not (getattr(p, "help", None) or "").strip()]
    assert undocumented == []
