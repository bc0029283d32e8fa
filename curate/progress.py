"""What a stage tells its user while it works. Stages never print; the CLI draws this with rich."""

from __future__ import annotations


class Reporter:
    """The silent default. `start`/`advance` drive one progress bar at a time; `log` is a line of text."""

    def log(self, message: str) -> None:
        pass

    def start(self, label: str, total: int | None, unit: str = "rows") -> None:
        pass

    def advance(self, done: int, tokens: int = 0) -> None:
        """`done` units (rows) so far, and `tokens` so far (for a tokens/s rate), both cumulative."""

    def finish(self) -> None:
        pass
