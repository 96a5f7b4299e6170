"""Code, outputs and docs speak of the project as it is: no tracker or session numbers outside CHANGELOG.md.

The rule: no git-tracked file except CHANGELOG.md (where history belongs) and this test names "issue N" or
"session N" (any case, plural, "#", "-" or spaces between). Other projects' trackers are facts about those
projects and stay allowed: the number may follow a repository's name ("anomalib issue #2571", "AnomalyCLIP's
issue #82") or be written as owner/repo#N ("openai/CLIP#123").
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXEMPT = {"CHANGELOG.md", "tests/test_no_history.py"}

HISTORY = re.compile(r"\b(issue|session)s?[\s\-]*#?\d+", re.IGNORECASE)
# The upstream projects whose trackers Kano's sources cite; a match right after one of these names (or its
# possessive) is about that project.
UPSTREAM = ("anomalib", "AnomalyCLIP", "AdaCLIP", "April-GAN", "AprilGAN", "MuSc", "WinCLIP", "open_clip",
            "open-clip", "OpenCLIP", "CLIP", "transformers", "duckdb", "pytorch", "torch", "vllm", "ollama", "onnx",
            "onnxruntime", "openvino", "accelerate", "typer", "fakellm")
_upstream = "|".join(re.escape(u) for u in UPSTREAM)
UPSTREAM_BEFORE = re.compile(rf"(\b({_upstream})('s)?|[\w.-]+/[\w.-]+)\s*$", re.IGNORECASE)


def history_mentions(text: str) -> list[tuple[int, str]]:
    """(line number, matched words) of every tracker or session number not preceded by an upstream name."""
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        for m in HISTORY.finditer(line):
            if not UPSTREAM_BEFORE.search(line[:m.start()]):
                found.append((n, m.group(0)))
    return found


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / p for p in out.decode().split("\0") if p and p not in EXEMPT]


@pytest.mark.parametrize("text, expected", [
    ("see issue 11", ["issue 11"]),
    ("Session 7 shipped", ["Session 7"]),
    ("(issues 12, 13)", ["issues 12"]),
    ("the issue-11 claim", ["issue-11"]),
    ("Kano issue #4", ["issue #4"]),
    ("matches anomalib issue #2571", []),
    ("AnomalyCLIP's issue #82 says", []),
    ("as in openai/CLIP issue #7", []),
    ("an issue with 3 images", []),
    ("a session of 20 minutes", []),
])
def test_the_pattern_on_hand_written_lines(text, expected):
    assert [m for _, m in history_mentions(text)] == expected


def test_no_history_in_tracked_files():
    hits = []
    for path in tracked_files():
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:  # binary (images, weights): nothing a person reads as prose
            continue
        rel = path.relative_to(ROOT)
        hits += [f"{rel}:{n}: {words!r}" for n, words in history_mentions(data.decode("utf-8", "replace"))]
    assert not hits, ("history belongs in CHANGELOG.md; reword these to say what the code does now:\n"
                      + "\n".join(hits))
