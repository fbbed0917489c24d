"""Progress on a terminal (rich) for the long steps of reading, downloading and converting weights."""
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

__all__ = ['byte_progress', 'step']


def _progress_console() -> Optional[Any]:
    """A rich console on stderr when it is a terminal (live progress), else None."""
    from rich.console import Console
    console = Console(stderr=True)
    return console if console.is_terminal else None


@contextmanager
def byte_progress(description: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over ``total`` bytes on a terminal; yields ``advance(n)``."""
    console = _progress_console() if enabled else None
    if console is None:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
    with Progress(TextColumn('{task.description}'), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


@contextmanager
def step(description: str, enabled: bool) -> Iterator[None]:
    """A spinner with the elapsed time while a long step runs (on a terminal); then one line with its time."""
    if not enabled:
        yield
        return
    start = time.perf_counter()
    console = _progress_console()
    if console is None:
        yield
    else:
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
        with Progress(SpinnerColumn(), TextColumn('{task.description}'), TimeElapsedColumn(), console=console,
                      transient=True) as bar:
            bar.add_task(description, total=None)
            yield
    print(f'done: {description} ({time.perf_counter() - start:.1f} s)', file=sys.stderr)
