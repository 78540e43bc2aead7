"""``python -m pipeline sweep``: text-to-image quality against seconds per image over
sampling settings, and the fastest setting within the measured noise of the best.

The grid is steps x shift x sampler x guidance interval (``SweepConfig``, a preset's
``configs/<preset>/sweep.toml``; the CFG scale is the reference's). Every setting generates
the same ``num_images`` val captions from the same seeds through the pipeline, and
``pipeline.evaluate.measure_prompts`` gives its CLIP score, R-precision, FD and seconds per
image. Its cost is also counted exactly: UNet rows per image (an evaluation inside the
guidance interval runs the doubled batch, 2 rows; outside, 1).

**Noise.** The reference setting (the current defaults, or the flags given) is measured on
a second, disjoint seed set; the difference of each measure between the two sets is its
noise (R-precision's at least one image, 1 / num_images). A setting is *within tolerance*
when each measure is within ``tolerance`` x its noise of the best value any setting reached
(R-precision and CLIP score: >= best - tol, FD: <= best + tol). The **chosen** setting is the
one of those with the fewest UNet rows per image (the work; wall time on a shared machine
swings by several x), ties broken by measured seconds; none within tolerance keeps the
reference. The chosen one is measured on the second seed set too, and the two are timed
alternately (batch ``batch_size`` and batch 1, medians of ``timing_rounds``) for the speed-up.

Written to ``<runs>/<preset>/unet/sweep/``: ``sweep.json`` (everything), ``sweep.md`` (the
table and the choice) and ``sweep.png`` (R-precision, FD and CLIP score against seconds per
image; the reference ringed, the chosen one a square, the tolerance bounds dashed).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.common.files import write_json_atomic
from stages.unet.evaluate import spread
from stages.unet.samplers import (
    SamplerConfig,
    SamplerName,
    check_cfg_interval,
    check_sampling,
    evaluation_times,
    guided_rows,
)

from .evaluate import EvaluateSettings, measure_prompts, real_embeddings
from .plot import Panel, Point, scatter
from .text2image import Text2Image

MEASURES = ("r_precision", "fd", "clip_score")
HIGHER_IS_BETTER = {"r_precision": True, "fd": False, "clip_score": True}


@dataclass(frozen=True)
class SweepConfig:
    """The sweep's grid and budget (a preset's ``sweep.toml`` holds its differences)."""

    steps: tuple[int, ...] = (4, 6, 8, 12, 20)
    shifts: tuple[float, ...] = (1.0, 2.0)
    samplers: tuple[SamplerName, ...] = ("euler", "heun")
    intervals: tuple[tuple[float, float], ...] = ((0.0, 1.0), (0.2, 1.0), (0.2, 0.8))
    num_images: int = 128  # val captions (spread over val) generated per setting
    seed: int = 1234  # image i of the first seed set: seed + i
    noise_seed: int = 51234  # the second, disjoint seed set (the noise)
    tolerance: float = 1.0  # how many noises a setting may fall short of the best
    batch_size: int = 64
    timing_rounds: int = 3  # alternated timings of the reference and the chosen setting

    def settings(self, reference: SamplerConfig) -> list[SamplerConfig]:
        grid = [
            dataclasses.replace(
                reference, steps=n, shift=s, sampler=name, eta=0.0, cfg_interval=tuple(i)
            )
            for name in self.samplers
            for s in self.shifts
            for i in self.intervals
            for n in self.steps
        ]
        for s in grid:
            check_sampling(s.sampler, s.steps, s.eta, s.cfg_interval)
        if self.num_images < 2 or self.tolerance < 0 or self.timing_rounds < 1:
            raise ValueError("sweep: num_images >= 2, tolerance >= 0 and timing_rounds >= 1")
        if abs(self.noise_seed - self.seed) < self.num_images:
            raise ValueError("sweep: the seed sets overlap; move noise_seed further from seed")
        return grid


def label(s: SamplerConfig) -> str:
    lo, hi = s.cfg_interval
    return f"{s.sampler} {s.steps} shift {s.shift:g} cfg [{lo:g}, {hi:g}]"


def group(setting: dict[str, Any]) -> str:
    """The plot's colour: sampler and guidance interval (steps and shift vary along it)."""
    lo, hi = setting["cfg_interval"]
    return f"{setting['sampler']} [{lo:g}, {hi:g}]"


def rows_per_image(pipe: Text2Image, s: SamplerConfig) -> int:
    """UNet rows one image costs with setting ``s`` (exact: counted on the schedule grid)."""
    grid = pipe.models.unet.objective.schedule.grid(s.steps, s.shift, "cpu")
    guided = pipe.conditional and s.cfg_scale != 1.0
    return guided_rows(evaluation_times(s.sampler, grid), s.cfg_interval, guided)


def pick(
    results: list[dict[str, Any]], noise: dict[str, float], tolerance: float, reference: int
) -> tuple[int, dict[str, float], list[int]]:
    """(index of the chosen row, the best value of each measure, indices within tolerance).

    ``results`` rows hold the measures, ``rows`` (UNet rows per image) and
    ``seconds_per_image``; ``noise`` each measure's noise; ``reference`` the row kept when
    none is within tolerance."""
    best = {m: (max if HIGHER_IS_BETTER[m] else min)(r[m] for r in results) for m in MEASURES}

    def within(r: dict[str, Any]) -> bool:
        return all(
            r[m] >= best[m] - tolerance * noise[m]
            if HIGHER_IS_BETTER[m]
            else r[m] <= best[m] + tolerance * noise[m]
            for m in MEASURES
        )

    inside = [i for i, r in enumerate(results) if within(r)]
    if not inside:
        return reference, best, inside
    chosen = min(inside, key=lambda i: (results[i]["rows"], results[i]["seconds_per_image"]))
    return chosen, best, inside


class Sweep:
    """One export, its real statistics and prompts; ``measure(setting, seed)`` per setting."""

    def __init__(
        self, pipe: Text2Image, embedder: Any, evaluate: EvaluateSettings, config: SweepConfig
    ):
        self.pipe, self.embedder, self.config = pipe, embedder, config
        self.base = dataclasses.replace(evaluate, batch_size=config.batch_size)
        self.real, captions = real_embeddings(embedder, self.base)
        self.prompts = spread(captions, config.num_images)

    def measure(self, s: SamplerConfig, seed: int) -> dict[str, Any]:
        settings = dataclasses.replace(
            self.base,
            seed=seed,
            steps=s.steps,
            cfg_scale=s.cfg_scale,
            sampler=s.sampler,
            shift=s.shift,
            cfg_interval=s.cfg_interval,
        )
        seeds = [seed + i for i in range(len(self.prompts))]
        metrics = measure_prompts(
            self.pipe, self.embedder, self.prompts, seeds, self.real, settings
        )
        return {**metrics, "rows": rows_per_image(self.pipe, s)}

    def _time(self, s: SamplerConfig, prompts: list[str]) -> float:
        start = time.perf_counter()
        self.pipe.generate(
            prompts,
            seed=self.config.seed,
            steps=s.steps,
            cfg_scale=s.cfg_scale,
            sampler=s.sampler,
            shift=s.shift,
            cfg_interval=s.cfg_interval,
        )
        return (time.perf_counter() - start) / len(prompts)

    def timing(self, a: SamplerConfig, b: SamplerConfig) -> dict[str, dict[str, float]]:
        """Seconds per image of ``a`` and ``b``, alternated (ABBA) in rounds; at the sweep's
        batch and at batch 1 (8 single images per round). Medians of the rounds."""
        out = {}
        batches = {
            f"batch {self.config.batch_size}": [self.prompts[: self.config.batch_size]],
            "batch 1": [[p] for p in self.prompts[:8]],
        }
        for name, calls in batches.items():
            times: dict[str, list[float]] = {"reference": [], "chosen": []}
            for r in range(self.config.timing_rounds):
                order = [("reference", a), ("chosen", b)][:: 1 if r % 2 == 0 else -1]
                for key, s in order:
                    times[key].append(statistics.mean(self._time(s, c) for c in calls))
            out[name] = {k: statistics.median(v) for k, v in times.items()}
        return out


def run_sweep(
    pipe: Text2Image,
    embedder: Any,
    evaluate: EvaluateSettings,
    config: SweepConfig,
    reference: SamplerConfig,
    out: Path,
    log: Any = print,
) -> dict[str, Any]:
    """Measure every setting, pick, confirm and time the choice; write the files to ``out``."""
    reference = dataclasses.replace(
        reference, cfg_interval=check_cfg_interval(reference.cfg_interval)
    )
    grid = config.settings(reference)
    if reference not in grid:
        grid.insert(0, reference)
    sweep = Sweep(pipe, embedder, evaluate, config)
    results = []
    for i, s in enumerate(grid):
        row = {"setting": dataclasses.asdict(s), "label": label(s), **sweep.measure(s, config.seed)}
        results.append(row)
        log(
            f"[{i + 1}/{len(grid)}] {row['label']}: R-precision {row['r_precision']:.3f} "
            f"FD {row['fd']:.4f} CLIP {row['clip_score']:.2f} rows {row['rows']} "
            f"{row['seconds_per_image'] * 1e3:.1f} ms/image"
        )
    ref_index = grid.index(reference)
    second = sweep.measure(reference, config.noise_seed)
    noise = {m: abs(results[ref_index][m] - second[m]) for m in MEASURES}
    noise["r_precision"] = max(noise["r_precision"], 1 / config.num_images)
    chosen, best, inside = pick(results, noise, config.tolerance, ref_index)
    confirm = sweep.measure(grid[chosen], config.noise_seed)
    timing = sweep.timing(reference, grid[chosen])
    record = {
        "config": dataclasses.asdict(config),
        "reference": {"index": ref_index, "label": label(reference), "second_seed_set": second},
        "noise": noise,
        "best": best,
        "within_tolerance": inside,
        "chosen": {
            "index": chosen,
            "label": label(grid[chosen]),
            "setting": dataclasses.asdict(grid[chosen]),
            "second_seed_set": confirm,
        },
        "timing": timing,
        "results": results,
        "device": str(pipe.device),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sweep.json", record)
    (out / "sweep.md").write_text(report(record))
    plot(record, out / "sweep.png")
    return record


def recommended_toml(setting: dict[str, Any]) -> str:
    lo, hi = setting["cfg_interval"]
    return (
        f'steps = {setting["steps"]}\nsampler = "{setting["sampler"]}"\n'
        f"shift = {setting['shift']:g}\ncfg_interval = [{lo:g}, {hi:g}]\n"
    )


def report(record: dict[str, Any]) -> str:
    """The sweep as Markdown: the choice, the noise, the timing and the whole table."""
    ref, chosen = record["reference"], record["chosen"]
    results, noise = record["results"], record["noise"]
    config = record["config"]
    r0, c0 = results[ref["index"]], results[chosen["index"]]
    lines = [
        f"# Sampling sweep ({len(results)} settings, {config['num_images']} val captions, "
        f"device {record['device']})",
        "",
        f"- reference: **{ref['label']}**; chosen: **{chosen['label']}** "
        f"({r0['rows']} -> {c0['rows']} UNet rows per image)",
        f"- noise (reference, seeds {config['seed']}+ vs {config['noise_seed']}+): "
        + ", ".join(f"{m} {noise[m]:.4f}" for m in MEASURES)
        + f"; tolerance {config['tolerance']:g} x noise of the best "
        + ", ".join(f"{m} {record['best'][m]:.4f}" for m in MEASURES),
        f"- within tolerance: {len(record['within_tolerance'])} of {len(results)}",
        "",
        "| | seeds | R-precision | FD | CLIP score |",
        "|---|---|---:|---:|---:|",
    ]
    for name, first, second_set in (
        ("reference", r0, ref["second_seed_set"]),
        ("chosen", c0, chosen["second_seed_set"]),
    ):
        for seeds, m in ((f"{config['seed']}+", first), (f"{config['noise_seed']}+", second_set)):
            lines.append(
                f"| {name} | {seeds} | {m['r_precision']:.3f} | {m['fd']:.4f} "
                f"| {m['clip_score']:.2f} |"
            )
    lines += ["", "| timing (alternated) | reference s/image | chosen s/image | speed-up |"]
    lines.append("|---|---:|---:|---:|")
    for name, t in record["timing"].items():
        lines.append(
            f"| {name} | {t['reference']:.4f} | {t['chosen']:.4f} "
            f"| **{t['reference'] / t['chosen']:.2f}x** |"
        )
    lines += [
        "",
        "Recorded defaults (`configs/<preset>/sample.toml` and the `[sample]` of `unet.toml`):",
        "",
        "```toml",
        recommended_toml(chosen["setting"]).rstrip(),
        "```",
        "",
        "| setting | UNet rows/image | ms/image | R-precision | FD | CLIP score | within |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    inside = set(record["within_tolerance"])
    for i, r in sorted(enumerate(results), key=lambda x: (x[1]["rows"], x[1]["label"])):
        mark = " (reference)" if i == ref["index"] else ""
        mark += " **(chosen)**" if i == chosen["index"] else ""
        lines.append(
            f"| {r['label']}{mark} | {r['rows']} | {r['seconds_per_image'] * 1e3:.1f} "
            f"| {r['r_precision']:.3f} | {r['fd']:.4f} | {r['clip_score']:.2f} "
            f"| {'yes' if i in inside else ''} |"
        )
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> Path:
    results = record["results"]
    ref, chosen = record["reference"]["index"], record["chosen"]["index"]
    tolerance = record["config"]["tolerance"]
    panels = []
    for m, title in (("r_precision", "R-precision"), ("fd", "FD"), ("clip_score", "CLIP score")):
        sign = -1 if HIGHER_IS_BETTER[m] else 1
        points = [
            Point(
                r["seconds_per_image"] * 1e3,
                r[m],
                group(r["setting"]),
                "square" if i == chosen else "ring" if i == ref else "dot",
            )
            for i, r in enumerate(results)
        ]
        threshold = record["best"][m] + sign * tolerance * record["noise"][m]
        better = "higher" if HIGHER_IS_BETTER[m] else "lower"
        panels.append(Panel(f"{title} ({better} is better)", m, points, threshold, "ms per image"))
    note = (
        f"ring: reference {record['reference']['label']}; square: chosen "
        f"{record['chosen']['label']}; dashed: tolerance bound"
    )
    return scatter(panels, path, note)
