"""Terminal output shared by the commands: tables and progress bars (stderr, so stdout stays data)."""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

# Not a terminal (a pipe, a log file, CI): a wide fixed width, so tables are never folded.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def print_table(title: str | None, columns: Sequence[str], rows: Iterable[Sequence], console: Console = out) -> None:
    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(str(c), overflow="fold")
    for r in rows:
        table.add_row(*[fmt(v) for v in r])
    console.print(table)


PLAIN_INTERVAL_S = 5.0  # outside a terminal: at most one progress line per this many seconds (plus start and end)


def progress_factory(description: str, interval_s: float | None = None,
                     tty: bool | None = None) -> Callable[[int], tuple[Callable[[int], None], Callable[[], None]]]:
    """Returns f(total) -> (advance(k), close()).

    In a terminal: a live bar on stderr. Elsewhere (a pipe, a log file, CI): plain lines, one when the stage
    starts, then at most one every `interval_s` seconds (default PLAIN_INTERVAL_S), and one when it ends, so
    logs stay short however many batches there are."""
    interval = PLAIN_INTERVAL_S if interval_s is None else float(interval_s)

    def make(total: int):
        is_tty = sys.stderr.isatty() if tty is None else tty
        if is_tty:
            progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                TimeRemainingColumn(), console=err)
            progress.start()
            task = progress.add_task(description, total=total)
            return (lambda k=1: progress.advance(task, k)), progress.stop

        t0 = time.monotonic()
        state = {"done": 0, "last": t0, "closed": False}
        err.print(f"{description}: started, {total} to do")

        def advance(k: int = 1):
            state["done"] += k
            now = time.monotonic()
            if now - state["last"] >= interval and state["done"] < total:
                state["last"] = now
                err.print(f"{description}: {state['done']}/{total} ({now - t0:.0f} s)")

        def close():
            if not state["closed"]:
                state["closed"] = True
                err.print(f"{description}: {state['done']}/{total} done in {time.monotonic() - t0:.1f} s")

        return advance, close

    return make
