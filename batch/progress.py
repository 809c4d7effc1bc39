"""The job's progress line: items done of all, items/s of this run, ETA, shards; on a terminal it redraws in
place, elsewhere (logs, CI) it prints a line every `interval` seconds."""

from __future__ import annotations

import sys
import time
from typing import IO, Any


def duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    def __init__(self, label: str, total_rows: int, total_shards: int, skipped_rows: int, skipped_shards: int,
                 stream: IO[str] | None = None, interval: float | None = None, quiet: bool = False):
        self.label = label
        self.total_rows, self.total_shards = total_rows, total_shards
        self.skipped_rows, self.skipped_shards = skipped_rows, skipped_shards
        self.rows = self.shards = 0  # done in this run
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.2 if self.tty else 10.0)
        self.quiet = quiet
        self.started = time.monotonic()
        self.first: float | None = None  # when the first shard of this run finished
        self.rows_at_first = 0
        self.last_draw = 0.0
        self.totals: dict[str, float] = {}

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.rows / elapsed if elapsed > 0 else 0.0

    def update(self, stats: dict[str, Any]) -> None:
        self.rows += int(stats["rows"])
        self.shards += 1
        for key in ("read_s", "model_s", "write_s", "bytes"):
            self.totals[key] = self.totals.get(key, 0.0) + float(stats.get(key, 0))
        now = time.monotonic()
        if self.first is None:
            self.first, self.rows_at_first = now, self.rows
        if now - self.last_draw >= self.interval or self.shards + self.skipped_shards == self.total_shards:
            self.last_draw = now
            self.draw()

    def line(self) -> str:
        done = self.rows + self.skipped_rows
        rate = self.rate()
        left = self.total_rows - done
        eta = duration(left / rate) if rate > 0 else "?"
        share = 100.0 * done / self.total_rows if self.total_rows else 100.0
        skipped = f", {self.skipped_shards} done before" if self.skipped_shards else ""
        return (f"{self.label} {done:,}/{self.total_rows:,} ({share:.1f}%)  {rate:,.0f} items/s  ETA {eta}  "
                f"shards {self.shards + self.skipped_shards}/{self.total_shards}{skipped}")

    def draw(self) -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()

    def summary(self) -> dict[str, Any]:
        now = time.monotonic()
        steady = None
        if self.first is not None and now - self.first > 0 and self.rows > self.rows_at_first:
            steady = (self.rows - self.rows_at_first) / (now - self.first)
        work = sum(self.totals.get(k, 0.0) for k in ("read_s", "model_s", "write_s")) or 1.0
        return {
            "rows": self.rows, "shards": self.shards, "skipped_rows": self.skipped_rows,
            "skipped_shards": self.skipped_shards, "seconds": round(now - self.started, 3),
            "items_per_s": round(self.rate(), 1), "steady_items_per_s": None if steady is None else round(steady, 1),
            "bytes": int(self.totals.get("bytes", 0)),
            "time_share": {k[:-2]: round(self.totals.get(k, 0.0) / work, 3) for k in ("read_s", "model_s", "write_s")},
        }
