"""The one build every source goes through: samples -> train/val shard folders per resolution.

Pass one (``plan.py``) fixes which sample goes to which shard. Pass two reads the source
again and sends only the samples of unfinished shards to worker processes (decode, flatten,
resize, encode: ``image.py``) through a bounded window, so memory stays flat whatever the
source size; results come back in source order and go into one open shard per split and
resolution, committed atomically as soon as its last planned sample is in (``writer.py``).
Several resolutions share one decode per sample. Manifests are written last (val before
train, resolutions in the order given), after an outdated one has been removed before any
of its shards is rewritten, so a manifest never lists a shard that is being replaced.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from stages.common.shards import ShardManifest, write_manifest

from .image import ImageFormat, Job, JobResult, process_job, svg_render_size
from .plan import SPLITS, Plan, PlannedShard, image_digest, make_plan, record_digest
from .report import BuildReport, SplitResult
from .sample import RawSample
from .writer import ShardLedger, ShardWriter

SampleSource = Callable[[], Iterable[RawSample]]  # called once per pass: must re-iterate
PIPELINE_VERSION = 2  # bump when the pixels produced for the same input change


class SourceChangedError(RuntimeError):
    """The source gave different samples on the second pass than on the first."""


@dataclass(frozen=True)
class BuildConfig:
    resolutions: tuple[int, ...] = (256,)
    val_fraction: float = 0.03  # share of split keys that go to val (by hash, stable)
    shard_size: int = 1000  # planned samples per shard
    image_format: ImageFormat = "png"
    workers: int = 2  # decoding processes; 0 decodes in this process

    def __post_init__(self) -> None:
        if not self.resolutions or min(self.resolutions) < 1:
            raise ValueError(f"resolutions must be positive, got {self.resolutions}")
        if len(set(self.resolutions)) != len(self.resolutions):
            raise ValueError(f"resolutions repeat: {self.resolutions}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")


@dataclass(frozen=True)
class DatasetInfo:
    """What the manifest says about where the data comes from."""

    source: str
    licence: str = "unknown"
    attribution: str = ""


@dataclass
class _Target:
    """One split folder at one resolution."""

    resolution: int
    folder: Path
    ledger: ShardLedger
    fingerprints: dict[int, str]  # shard index -> fingerprint of its bytes at this resolution
    todo: set[int]  # shard indices to (re)write


@dataclass
class _ShardProgress:
    done: int = 0
    skipped: Counter = field(default_factory=Counter)
    groups: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class _Pending:
    sample: RawSample
    shard: PlannedShard
    image_sha256: str


def _settings_digest(resolution: int, config: BuildConfig) -> str:
    """Everything besides the samples that decides a shard's bytes at one resolution."""
    settings = {
        "resolution": resolution,
        "format": config.image_format,
        "svg_render": svg_render_size(config.resolutions),  # 32 px from 512 != from 128
        "version": PIPELINE_VERSION,
    }
    return json.dumps(settings, sort_keys=True)


def _prepare_target(
    plan: Plan, split: str, resolution: int, folder: Path, config: BuildConfig
) -> _Target:
    folder.mkdir(parents=True, exist_ok=True)
    ledger = ShardLedger(folder)
    settings = _settings_digest(resolution, config)
    fingerprints = {
        s.index: hashlib.sha256(f"{settings}\n{s.fingerprint}".encode()).hexdigest()
        for s in plan.shards[split]
    }
    todo = {
        s.index for s in plan.shards[split] if not ledger.is_finished(s.name, fingerprints[s.index])
    }
    planned = {s.name for s in plan.shards[split]}
    stale = [p for p in folder.glob("shard-*.tar") if p.name not in planned]
    stale += list(folder.glob(".shard-*.tar.tmp"))  # left by an interrupted run
    for path in stale:
        path.unlink()
    if todo or stale:  # the old manifest would list shards that are about to change
        (folder / "manifest.json").unlink(missing_ok=True)
    return _Target(resolution, folder, ledger, fingerprints, todo)


def _new_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def _crashed(job: Job) -> JobResult:
    return JobResult(job.index, None, None, reason="decoder_crashed", error="worker process died")


def _ordered_map(
    fn: Callable[[Job], JobResult], jobs: Iterable[Job], workers: int
) -> Iterator[JobResult]:
    """``map`` over worker processes, in order, with at most a few jobs in flight per worker.

    A worker that dies (OOM killer, decoder segfault) breaks the whole pool: every job then
    in flight fails with ``BrokenProcessPool``. Those are run again one at a time in a fresh
    pool, so only the one that kills its worker again is skipped (``decoder_crashed``) and
    the build goes on; a re-run does not die on the same file either."""
    if workers <= 0:
        yield from map(fn, jobs)
        return
    window = 16 * workers
    pool = _new_pool(workers)

    def alone(job: Job) -> JobResult:
        nonlocal pool
        try:
            return pool.submit(fn, job).result()
        except BrokenProcessPool:
            pool.shutdown(wait=True, cancel_futures=True)
            pool = _new_pool(workers)
            return _crashed(job)

    def take(pending: deque) -> JobResult:
        nonlocal pool
        job, future = pending.popleft()
        try:
            return future.result()
        except BrokenProcessPool:
            pass
        pool.shutdown(wait=True)  # every in-flight future is now settled
        pool = _new_pool(workers)
        retried = deque()
        for other, other_future in pending:
            if other_future.cancelled() or other_future.exception() is not None:
                other_future = Future()
                other_future.set_result(alone(other))
            retried.append((other, other_future))
        pending.clear()
        pending.extend(retried)
        return alone(job)

    try:
        pending: deque = deque()
        for job in jobs:
            pending.append((job, pool.submit(fn, job)))
            if len(pending) >= window:
                yield take(pending)
        while pending:
            yield take(pending)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _Builder:
    def __init__(
        self, plan: Plan, targets: dict[tuple[int, str], _Target], config: BuildConfig
    ) -> None:
        self.plan = plan
        self.targets = targets
        self.config = config
        self.pending: dict[int, _Pending] = {}
        self.progress: dict[tuple[str, int], _ShardProgress] = {}
        self.writers: dict[tuple[int, str], ShardWriter] = {}
        self.written = 0

    def todo_resolutions(self, shard: PlannedShard) -> list[int]:
        return [
            r for r in self.config.resolutions if shard.index in self.targets[r, shard.split].todo
        ]

    def jobs(self, samples: Iterable[RawSample]) -> Iterator[Job]:
        taken: set[str] = set()
        for sample in samples:
            shard = self.plan.assignment.get(sample.key)
            if shard is None or sample.key in taken:
                continue
            taken.add(sample.key)
            if not self.todo_resolutions(shard):
                continue
            if record_digest(sample) != self.plan.records[sample.key]:
                raise SourceChangedError(f"sample {sample.key!r} changed between the two passes")
            index = len(taken)
            self.pending[index] = _Pending(sample, shard, image_digest(sample.data))
            yield Job(
                index, sample.data, sample.kind, self.config.resolutions, self.config.image_format
            )

    def _writer(self, resolution: int, shard: PlannedShard) -> ShardWriter:
        key = (resolution, shard.split)
        writer = self.writers.get(key)
        if writer is None:
            folder = self.targets[key].folder
            writer = self.writers[key] = ShardWriter(folder, shard.name, self.config.image_format)
        return writer

    def consume(self, result: JobResult) -> None:
        pending = self.pending.pop(result.index)
        sample, shard = pending.sample, pending.shard
        progress = self.progress.setdefault((shard.split, shard.index), _ShardProgress())
        if result.images is None:
            progress.skipped[result.reason] += 1
        else:
            width, height = result.size
            for resolution in self.todo_resolutions(shard):
                meta = {
                    **sample.meta,
                    "key": sample.key,
                    "caption": sample.caption,
                    "width": resolution,
                    "height": resolution,
                    "original_width": width,
                    "original_height": height,
                    "sha256": pending.image_sha256,
                }
                writer = self._writer(resolution, shard)
                writer.write(sample.key, result.images[resolution], sample.caption, meta)
            progress.groups[sample.group] += 1
        progress.done += 1
        if progress.done == len(shard.keys):
            self.commit(shard, progress)

    def commit(self, shard: PlannedShard, progress: _ShardProgress) -> None:
        for resolution in self.todo_resolutions(shard):
            target = self.targets[resolution, shard.split]
            writer = self._writer(resolution, shard)  # an empty shard still gets its file
            del self.writers[resolution, shard.split]
            info = writer.commit()
            fingerprint = target.fingerprints[shard.index]
            target.ledger.record(info, fingerprint, progress.skipped, progress.groups)
            target.todo.discard(shard.index)
            self.written += 1

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
        self.writers.clear()


def _write_manifests(
    plan: Plan, targets: dict[tuple[int, str], _Target], config: BuildConfig, info: DatasetInfo
) -> dict[str, SplitResult]:
    results: dict[str, SplitResult] = {}
    for resolution in config.resolutions:
        for split in ("val", "train"):  # train last: its manifest marks the set complete
            target = targets[resolution, split]
            shards = [target.ledger.info(s.name) for s in plan.shards[split]]
            entries = [target.ledger.entries[s.name] for s in plan.shards[split]]
            skipped = Counter(plan.skipped[split])
            groups: Counter = Counter()
            for entry in entries:
                skipped.update(entry.skipped)
                groups.update(entry.groups)
            manifest = ShardManifest(
                split=split,
                resolution=resolution,
                shards=tuple(shards),
                source=info.source,
                licence=info.licence,
                attribution=info.attribution,
                extra={
                    "skipped": dict(sorted(skipped.items())),
                    "groups": dict(sorted(groups.items())),
                    "image_format": config.image_format,
                    "val_fraction": config.val_fraction,
                    "shard_size": config.shard_size,
                },
            )
            write_manifest(target.folder, manifest)
            results[split] = SplitResult(manifest.num_samples, len(shards), skipped, groups)
    return results


def build_shards(
    samples: SampleSource,
    outputs: Mapping[int, Path],
    config: BuildConfig,
    info: DatasetInfo,
) -> BuildReport:
    """Write ``outputs[resolution]/{train,val}/`` shards and manifests from ``samples()``."""
    if set(outputs) != set(config.resolutions):
        raise ValueError(f"outputs {sorted(outputs)} do not match {config.resolutions}")
    start = time.perf_counter()
    plan = make_plan(samples(), config.val_fraction, config.shard_size)
    targets = {
        (r, split): _prepare_target(plan, split, r, Path(outputs[r]) / split, config)
        for r in config.resolutions
        for split in SPLITS
    }
    scanned = time.perf_counter()

    builder = _Builder(plan, targets, config)
    total = sum(
        len(s.keys) for split in SPLITS for s in plan.shards[split] if builder.todo_resolutions(s)
    )
    try:
        with tqdm(total=total, desc="build", unit=" img", mininterval=1.0) as bar:
            for result in _ordered_map(process_job, builder.jobs(samples()), config.workers):
                builder.consume(result)
                bar.update()
    except BaseException:
        builder.abort()
        raise
    unfinished = [(r, s) for (r, s), t in targets.items() if t.todo]
    if unfinished:
        raise SourceChangedError(
            f"the source lost samples between the two passes (unfinished: {unfinished})"
        )
    splits = _write_manifests(plan, targets, config, info)
    return BuildReport(
        splits=splits,
        outputs={r: Path(outputs[r]) for r in config.resolutions},
        image_format=config.image_format,
        shards_written=builder.written,
        shards_reused=sum(len(plan.shards[s]) for s in SPLITS) * len(config.resolutions)
        - builder.written,
        scan_seconds=scanned - start,
        build_seconds=time.perf_counter() - scanned,
    )
