"""Progress and log output on stderr (stdout carries results only), silenced by --quiet."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator, TypeVar

if TYPE_CHECKING:
    from rich.console import Console

T = TypeVar("T")


@dataclass
class Reporter:
    """Where a command's progress and logs go: stderr, at a verbosity level (0 quiet, 1 normal, 2 verbose)."""

    verbosity: int = 1

    @functools.cached_property
    def console(self) -> Console:
        """The stderr console, made on first use (rich is imported only by commands that print)."""
        from rich.console import Console

        return Console(stderr=True, highlight=False, soft_wrap=True)

    def log(self, message: str) -> None:
        if self.verbosity >= 1:
            self.console.print(message, markup=False)

    def detail(self, message: str) -> None:
        if self.verbosity >= 2:
            self.console.print(message, markup=False)

    def warn(self, message: str) -> None:
        # warnings show even with --quiet: they change what the user should believe about the output
        self.console.print(f"warning: {message}", markup=False, style="yellow")

    def progress(self, items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
        """Yield items with a progress bar on stderr when not quiet and stderr is a terminal."""
        if self.verbosity < 1 or not _stderr_is_terminal():
            yield from items
            return
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.5)


def _stderr_is_terminal() -> bool:
    # bars in a log file or a pipe are noise: carriage returns, not information
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


QUIET = Reporter(0)
