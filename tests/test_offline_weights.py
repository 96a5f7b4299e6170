"""A pretrained tag missing from the cache fails fast and cleanly offline.

Real processes with a private, empty Hugging Face cache; "no network" is a real endpoint that refuses
connections or one that accepts and never answers (a loopback socket that is never read)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys, time
    import open_clip  # imported before the clock starts: every backbone pays for it, it is not the lookup
    from kano.core.errors import KanoError
    from kano.kanoclip import build_backbone
    t = time.perf_counter()
    try:
        build_backbone("ViT-B-16-quickgelu:openai")
        msg = None
    except KanoError as exc:
        msg = str(exc)
    print(json.dumps({"s": time.perf_counter() - t, "msg": msg}))
""")


def _run(tmp_path, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
    e.update(HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1", **env)
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=e, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1]), p.stderr


def _check_message(msg: str, cache: str):
    assert msg is not None
    assert cache in msg                                                    # where it looked
    assert "open_clip.create_model('ViT-B-16-quickgelu', pretrained='openai')" in msg   # how to get them once
    assert "--backbone ViT-B-16-quickgelu:/path/to/open_clip_model.safetensors" in msg  # or a local file
    assert "..." not in msg and "Last error" not in msg                     # no embedded, cut-off library text


@pytest.mark.slow
def test_offline_env_fails_fast_with_one_message(tmp_path):
    res, err = _run(tmp_path, HF_HUB_OFFLINE="1")
    assert res["s"] < 2.0, res
    _check_message(res["msg"], str(tmp_path / "hf" / "hub"))
    assert "HF_HUB_OFFLINE" in res["msg"]
    assert "Failed to download" not in err and "ERROR" not in err, err     # open_clip's own log line is not printed


@pytest.mark.parametrize("server", ["refuses", "silent"])
@pytest.mark.slow
def test_no_network_fails_fast_without_retry_chatter(tmp_path, server):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if server == "silent":
        sock.listen(16)            # the kernel completes the handshake; nobody ever reads or answers
    else:
        sock.close()               # nothing listens: connection refused
    try:
        res, err = _run(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}")
    finally:
        sock.close()
    assert res["s"] < 2.0, res
    _check_message(res["msg"], str(tmp_path / "hf" / "hub"))
    assert "does not answer" in res["msg"]
    assert "Retrying" not in err and "thrown while requesting" not in err, err


def test_cached_weights_are_found_without_the_network(tmp_path, monkeypatch):
    """The lookup finds a file laid out as the Hub cache does (refs/main -> snapshots/<rev>/file)."""
    from huggingface_hub import constants

    from kano.kanoclip.pretrained import _weight_source

    # a private cache: an entry left in the session's shared one would make later in-process lookups find an
    # empty "weights" file (tests/test_backbone.py's "must be in the cache" case then read it and failed)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = constants.HF_HUB_CACHE + "/models--timm--vit_base_patch16_clip_224.openai"
    os.makedirs(repo + "/refs", exist_ok=True)
    os.makedirs(repo + "/snapshots/abc123", exist_ok=True)
    with open(repo + "/refs/main", "w") as f:
        f.write("abc123")
    cached, url, where = _weight_source("ViT-B-16-quickgelu", "openai")
    assert cached is None and url.endswith("/timm/vit_base_patch16_clip_224.openai/resolve/main/open_clip_pytorch_model.bin")
    open(repo + "/snapshots/abc123/open_clip_model.safetensors", "wb").close()
    cached, _, _ = _weight_source("ViT-B-16-quickgelu", "openai")
    assert cached == repo + "/snapshots/abc123/open_clip_model.safetensors"
