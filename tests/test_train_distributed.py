"""Several processes are one run: a real `torchrun` with two gloo processes on CPU."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import KANO

pytestmark = pytest.mark.slow  # two torchrun processes

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _digest(path: Path) -> str:
    """Written here, not imported: SHA-256 over the saved tensors (sorted names, float32 bytes)."""
    tensors = load_file(str(path))
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].float().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_torchrun_two_processes_train_one_run(synth_root, tmp_path, cli):
    from kano.kb_builder import BuildConfig, build_knowledge_base
    from kano.knowledge_store import KnowledgeStore

    kb = tmp_path / "kb.duckdb"
    build_knowledge_base(KnowledgeStore(kb), BuildConfig(classes=["disc", "weave"]), None, None)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "--no-python", KANO, "train", "--kb", str(kb),
           "--data", f"mvtec:{synth_root}", "--backbone", "tiny", "--out", "run", "--epochs", "2", "--batch-size", "4",
           "--image-size", "64", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in work.iterdir()) == ["run"]  # one run directory, written once
    run = work / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["status"] == "finished"
    n = config["n_samples"]
    assert n == 14  # two classes: 3 good + 2 hole + 2 stain test images each

    # every rank ended with identical weights, equal to the saved ones
    saved = _digest(run / "weights.safetensors")
    assert [r["rank"] for r in config["ranks"]] == [0, 1]
    assert [r["weights_sha256"] for r in config["ranks"]] == [saved, saved]

    # each epoch: two disjoint shards that together cover the data
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(r["world_size"] == 2 for r in log)
    for r in log:
        a, b = (set(s) for s in r["shard_indices"])
        assert not a & b and a | b == set(range(n)) and r["samples_per_rank"] == [7, 7]
    assert log[0]["shard_indices"] != log[1]["shard_indices"]  # reshuffled every epoch

    # the feature cache was computed sharded, half the images each
    assert config["feature_cache"]["mode"] == "disk" and config["feature_cache"]["encoded_per_rank"] == [7, 7]

    code, out, err = cli("eval", "--run", run, "--data", f"mvtec:{synth_root}", "--out", tmp_path / "eval")
    assert code == 0, err
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["mean"]["image_auroc"] is not None
