"""What a person sees of a stage: the console (stderr), progress bars, the end-of-stage summary."""

from __future__ import annotations

import time
import typing
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)


LOG_EVERY_S = 30.0  # where the console is no terminal (a log file, DVC, a batch job): a line this often


@contextmanager
def progress_bar(description: str, total: int, log_every: float = LOG_EVERY_S,
                 clock: typing.Callable[[], float] = time.monotonic) -> Iterator[typing.Callable[[int], None]]:
    """A rich progress bar; yields ``advance(n, info)`` (``completed=k`` sets the count instead).
    Where the console is no terminal, rich draws nothing until the end, so a plain line
    (``description k/total, elapsed, info``) is printed at most every ``log_every`` seconds, and
    after the first and the last update: a killed job's log still says how far it got."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    started = clock()
    last_line = [None]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n: int = 1, info: str = "", completed: int | None = None) -> None:
            if completed is not None:
                progress.update(task, completed=completed, info=info)
            else:
                progress.update(task, advance=n, info=info)
            if console.is_terminal:
                return
            now, done = clock(), int(progress.tasks[0].completed)
            if last_line[0] is None or now - last_line[0] >= log_every or done >= total:
                last_line[0] = now
                console.print(f"{description} {done}/{total}, {now - started:.0f} s" + (f", {info}" if info else ""),
                              highlight=False, markup=False)

        yield advance


def summary_table(title: str, row: dict) -> None:
    table = Table(title=title)
    for key in row:
        table.add_column(str(key))
    table.add_row(*[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()])
    console.print(table)
