"""Progress display: rich bars on a terminal, plain lines otherwise (logs, CI, pipes)."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cilbench.method import Reporter


class ConsoleReporter(Reporter):
    def __init__(self, n_tasks: int, title: str, console: Console | None = None, log_file=None):
        self.console = console or Console(stderr=True)
        self.interactive = self.console.is_terminal and sys.stderr.isatty()
        self.n_tasks, self.title, self.log_file = n_tasks, title, log_file
        self._progress = None
        self._epoch_started = time.time()

    def __enter__(self) -> "ConsoleReporter":
        if self.interactive:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                      console=self.console, transient=False)
            self._progress.start()
            self._tasks = self._progress.add_task(self.title, total=self.n_tasks, status="")
            self._epochs = self._progress.add_task("  epochs", total=1, status="")
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    def start_task(self, t: int) -> None:
        if self._progress is not None:
            self._progress.update(self._tasks, completed=t, status=f"task {t + 1}/{self.n_tasks}")
            self._progress.reset(self._epochs, total=1)

    def epoch(self, epoch: int, epochs: int, loss: float | None = None) -> None:
        status = f"loss {loss:.3f}" if loss is not None else ""
        if self._progress is not None:
            self._progress.update(self._epochs, total=epochs, completed=epoch, status=status)

    def end_task(self, t: int, line: str) -> None:
        if self._progress is not None:
            self._progress.update(self._tasks, completed=t + 1, status=line)
        else:
            print(f"[{self.title}] task {t + 1}/{self.n_tasks} {line}", flush=True)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.log(message)
        else:
            print(message, file=sys.stderr, flush=True)
