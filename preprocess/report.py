"""What a build did: samples and shards per split, skips per reason, samples per source
group, timings; printed as a plain table at the end of every run."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SplitResult:
    samples: int
    shards: int
    skipped: Counter  # reason -> count (plan-time and decode-time together)
    groups: Counter  # source group -> samples written


@dataclass
class BuildReport:
    splits: dict[str, SplitResult]
    outputs: dict[int, Path]  # resolution -> dataset folder
    image_format: str
    shards_written: int
    shards_reused: int
    scan_seconds: float
    build_seconds: float

    def table(self) -> str:
        splits = list(self.splits)
        rows = [("", *splits, "total")]

        def row(label: str, values: list[int]) -> None:
            rows.append((label, *(str(v) for v in values), str(sum(values))))

        row("samples", [self.splits[s].samples for s in splits])
        row("shards", [self.splits[s].shards for s in splits])
        groups = sorted(set().union(*(self.splits[s].groups for s in splits)) - {""})
        for group in groups:
            row(f"  from {group}", [self.splits[s].groups[group] for s in splits])
        reasons = sorted(set().union(*(self.splits[s].skipped for s in splits)))
        row("skipped", [sum(self.splits[s].skipped.values()) for s in splits])
        for reason in reasons:
            row(f"  {reason}", [self.splits[s].skipped[reason] for s in splits])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
            for r in rows
        ]
        folders = ", ".join(f"{r} px -> {p}" for r, p in self.outputs.items())
        lines += [
            f"{folders} ({self.image_format})",
            f"shards written {self.shards_written}, already done {self.shards_reused}; "
            f"scan {self.scan_seconds:.1f} s, build {self.build_seconds:.1f} s",
        ]
        return "\n".join(lines)
