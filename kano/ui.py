"""Terminal output shared by the commands: tables and progress bars (stderr, so stdout stays data)."""

from __future__ import annotations

import sys
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


def progress_factory(description: str) -> Callable[[int], tuple[Callable[[int], None], Callable[[], None]]]:
    """Returns f(total) -> (advance(k), close()) drawing a bar on stderr (plain lines when not a TTY)."""

    def make(total: int):
        progress = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TimeRemainingColumn(), console=err, disable=not sys.stderr.isatty())
        progress.start()
        task = progress.add_task(description, total=total)
        state = {"done": 0}

        def advance(k: int = 1):
            progress.advance(task, k)
            state["done"] += k
            if not sys.stderr.isatty() and (state["done"] == total or state["done"] % max(1, total // 10) == 0):
                err.print(f"{description}: {state['done']}/{total}")

        return advance, progress.stop

    return make

