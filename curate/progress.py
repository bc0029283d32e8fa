"""What a stage tells its user while it works. Stages never print: the CLI draws a rich progress bar in a
terminal, and plain progress lines (`LineReporter`) where the output goes to a log."""

from __future__ import annotations

import time


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


class LineReporter(Reporter):
    """Progress as plain lines, for output that is not a terminal (Slurm, Ray, nohup, CI logs), where a bar shows
    nothing until it ends: a line every `interval` seconds, an early time estimate once the first work is done
    (after `early` seconds), and a last line with the totals. `write` prints one line; `clock` is for tests."""

    def __init__(self, write, interval: float = 30.0, early: float = 5.0, clock=time.monotonic):
        self.write, self.interval, self.early, self.clock = write, interval, early, clock
        self.label = ""

    def log(self, message: str) -> None:
        self.write(message)

    def start(self, label: str, total: int | None, unit: str = "rows") -> None:
        self.label, self.total, self.unit = label, total, unit
        self.t0 = self.last = self.clock()
        self.first: tuple[int, int] | None = None  # (done, tokens) when this run began: resumed work is no rate
        # (done, tokens, time) after the first piece of work, which paid for the warm-up (loading a model, the first
        # batch): estimates measure the rate from there, or a 25-minute run is first announced as 3 hours
        self.warm: tuple[int, int, float] | None = None
        self.now_done, self.now_tokens, self.estimated = 0, 0, False

    def advance(self, done: int, tokens: int = 0) -> None:
        if not self.label:
            return
        now = self.clock()
        if self.first is None:
            self.first = (done, tokens)
        elif self.warm is None and done > self.first[0]:
            self.warm = (done, tokens, now)
        self.now_done, self.now_tokens = done, tokens
        if not self.estimated and self.warm and done > self.warm[0] and now - self.t0 >= self.early:
            self.estimated, self.last = True, now
            self.write(self.line(now, "estimate: "))
        elif now - self.last >= self.interval:
            self.last = now
            self.write(self.line(now))

    def finish(self) -> None:
        if self.label:
            self.write(self.line(self.clock(), "done: "))
            self.label = ""

    def line(self, now: float, prefix: str = "") -> str:
        """`score: 1,024/4,096 rows (25%), 51.2 rows/s, 9,800 tokens/s, ETA 1m 0s`."""
        elapsed = max(now - self.t0, 1e-9)
        done0, tokens0 = self.first or (self.now_done, self.now_tokens)
        if prefix != "done: " and self.warm and now > self.warm[2]:  # the steady rate, after the warm-up
            done0, tokens0, since = self.warm
            elapsed = now - since
        rate = (self.now_done - done0) / elapsed
        of = f"/{self.total:,}" if self.total else ""
        share = f" ({self.now_done / self.total:.0%})" if self.total else ""
        text = f"{self.label}: {prefix}{self.now_done:,}{of} {self.unit}{share}, {rate:,.1f} {self.unit}/s"
        if self.now_tokens:
            text += f", {(self.now_tokens - tokens0) / elapsed:,.0f} tokens/s"
        if prefix == "done: ":
            return text + f", {duration(now - self.t0)}"
        if self.total and rate > 0:
            text += f", ETA {duration((self.total - self.now_done) / rate)}"
        return text


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h {m}m" if h else f"{m}m {s}s" if m else f"{s}s"
