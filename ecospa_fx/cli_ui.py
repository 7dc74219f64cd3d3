"""Output modes of the command line: normal (tables, progress bars on stderr), ``--quiet`` (only the one-line
result) and ``--json`` (one JSON object on stdout, nothing else there)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Ui:
    """Where each kind of output goes. Progress bars and spinners go to stderr, only on a terminal and
    never under ``--quiet`` or ``--json``; tables and notes go to stdout unless quiet or json."""

    def __init__(self, quiet: bool = False, json_mode: bool = False):
        self.quiet, self.json = quiet, json_mode
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False)

    @property
    def live(self) -> bool:
        return not (self.quiet or self.json) and self.err.is_terminal

    def show(self, renderable: Any) -> None:
        """Tables and details: normal mode only."""
        if not (self.quiet or self.json):
            self.out.print(renderable, markup=False)

    def note(self, line: str) -> None:
        if not (self.quiet or self.json):
            self.out.print(line, markup=False)

    def result(self, line: str, payload: dict[str, Any]) -> None:
        """The outcome: ``line`` in normal and quiet mode, ``payload`` (plus ``ok``) as JSON in json mode."""
        if self.json:
            print(json.dumps({"ok": True, **payload}, default=str))
        else:
            self.out.print(line, markup=False)

    @property
    def streaming(self) -> bool:
        """Generated text is printed as it comes on a terminal in normal mode."""
        return not (self.quiet or self.json) and self.out.is_terminal

    def stream_start(self, label: str) -> Callable[[str], None]:
        self.out.print(f"[{label}]", markup=False)
        return lambda text: self.out.print(text, end="", markup=False)

    def stream_end(self) -> None:
        self.out.print()

    def show_text(self, label: str, text: str) -> None:
        """Generated text, not streamed (no terminal): the label, then the text."""
        if not (self.quiet or self.json):
            self.out.print(f"[{label}]\n{text}", markup=False)

    @contextlib.contextmanager
    def stage(self, description: str) -> Iterator[Callable[[str], None]]:
        """A spinner with elapsed time for a step of unknown length; yields ``update(description)``."""
        if not self.live:
            yield lambda _text: None
            return
        with _progress(self.err, bar=False) as progress:
            task = progress.add_task(description, total=None)
            yield lambda text: progress.update(task, description=text)

    @contextlib.contextmanager
    def bar(self, description: str) -> Iterator[Callable[[int, int], None]]:
        """A progress bar; yields ``advance(done, total)``."""
        if not self.live:
            yield lambda _done, _total: None
            return
        with _progress(self.err, bar=True) as progress:
            task = progress.add_task(description, total=None)
            yield lambda done, total: progress.update(task, completed=done, total=total)


def _progress(console: Console, bar: bool) -> Progress:
    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if bar:
        columns += [BarColumn(), MofNCompleteColumn()]
    return Progress(*columns, TimeElapsedColumn(), console=console, transient=True)
