"""What a build did: samples and shards per split, skips per reason, samples per source
group, timings; printed as a plain table at the end of every run. Skips of identical renders
(``duplicate_render``) are judged per resolution, so with several resolutions whose counts
differ the table has one block per resolution."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path


@dataclass
class SplitResult:
    samples: int
    shards: int
    skipped: Counter  # reason -> count (plan-time and build-time together)
    groups: Counter  # source group -> samples written


@dataclass
class BuildReport:
    results: dict[int, dict[str, SplitResult]]  # resolution -> split -> result
    outputs: dict[int, Path]  # resolution -> dataset folder
    image_format: str
    shards_written: int
    shards_reused: int
    scan_seconds: float
    build_seconds: float

    @property
    def splits(self) -> dict[str, SplitResult]:
        """The first resolution's results (all of them unless renders were deduplicated)."""
        return next(iter(self.results.values()))

    def table(self) -> str:
        splits = list(self.splits)
        rows = [("", *splits, "total")]

        def row(label: str, values: list[int]) -> None:
            rows.append((label, *(str(v) for v in values), str(sum(values))))

        blocks = list(self.results.items())
        if all(result == blocks[0][1] for _, result in blocks):
            blocks = blocks[:1]
        for resolution, result in blocks:
            if len(blocks) > 1:
                rows.append((f"{resolution} px", *[""] * (len(splits) + 1)))
            row("samples", [result[s].samples for s in splits])
            row("shards", [result[s].shards for s in splits])
            groups = sorted(set().union(*(result[s].groups for s in splits)) - {""})
            for group in groups:
                row(f"  from {group}", [result[s].groups[group] for s in splits])
            reasons = sorted(set().union(*(result[s].skipped for s in splits)))
            row("skipped", [sum(result[s].skipped.values()) for s in splits])
            for reason in reasons:
                row(f"  {reason}", [result[s].skipped[reason] for s in splits])
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
