"""Repeated timings for the bench scripts: a warm-up of every case, then >= 3 rounds in alternating order.

Alternating (A B C, C B A, A B C, ...) keeps a slow drift of the machine (other load, clocks, caches) from
favouring whichever case runs first; the ratio between two cases is taken within each round (paired) and
reported as its median with the min-max spread over the rounds.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable


def _sync() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:
        pass


def timed(fn: Callable[[], object]) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


def alternate(cases: dict[str, Callable[[], object]], repeats: int = 3, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per round for each case: warm-up rounds first (discarded), then `repeats` rounds, order reversed every round."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(cases)
    for _ in range(warmup):
        for n in names:
            cases[n]()
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(timed(cases[n]))
    return out


def spread(xs: list[float], unit: str = "s", digits: int = 3) -> str:
    """'median (min-max, n=k)'."""
    return f"{statistics.median(xs):.{digits}f}{unit} ({min(xs):.{digits}f}-{max(xs):.{digits}f}, n={len(xs)})"


def paired_ratio(a: list[float], b: list[float]) -> list[float]:
    return [x / y for x, y in zip(a, b)]
