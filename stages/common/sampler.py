"""The sample stream and its resumable cursor.

- The stream is the concatenation of epoch permutations (epoch ``e`` shuffled by a generator
  seeded from ``(seed, e)``). Global batch ``g`` is stream positions ``[g*B*W, (g+1)*B*W)``
  and rank ``r`` takes its ``B``-slice: nothing is dropped, batches cross epoch boundaries,
  every sample is seen exactly once per epoch over all ranks.
- The cursor is one integer, ``position`` = samples consumed by all ranks. It is advanced
  only when a batch is handed to the caller, so DataLoader prefetching never leaks into a
  checkpoint; the ordered ``batch_sampler`` keeps batches in order with workers, whose seeds
  come from the cursor.
- With sampling ``weights`` (concept-balanced sampling, ``balance.py``) an epoch is
  ``len(weights)`` draws with replacement instead of a permutation, seeded the same way, so
  the stream is still a pure function of the position; the cursor records the weights'
  digest and refuses to resume under other weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of one epoch, from a generator seeded by a hash of (seed, epoch)."""
    return torch.randperm(num_samples, generator=_epoch_generator(seed, epoch))


def epoch_draws(weights: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """A weighted "epoch": ``len(weights)`` indices drawn with replacement, sample ``i`` with
    probability ``weights[i] / weights.sum()`` (concept-balanced sampling, ``balance.py``).
    Seeded like ``epoch_permutation``, so the stream is still a pure function of the position."""
    # Inverse-CDF draws (torch.multinomial caps the categories at 2**24 samples).
    cdf = torch.cumsum(weights.double(), 0)
    u = torch.rand(len(weights), generator=_epoch_generator(seed, epoch), dtype=torch.float64)
    return torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_max(len(weights) - 1)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    digest = hashlib.sha256(f"minisd-data/{seed}/{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def weights_digest(weights: torch.Tensor | None) -> str:
    """What a checkpointed cursor records of its sampling weights ("uniform" for none)."""
    if weights is None:
        return "uniform"
    data = weights.double().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


class StreamBatchSampler:
    """Infinite batch sampler: rank ``rank``'s slice of each global batch, from ``start``.

    ``lookahead(indices)``, when given, is told the samples of the batch ``ahead`` batches
    past the one being yielded (remote shards are prefetched from it); it never changes
    what is yielded. With ``weights`` (N,) each epoch is ``epoch_draws`` instead of a
    permutation: weighted, with replacement, as resumable."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        start: int,
        lookahead: Callable[[list[int]], None] | None = None,
        ahead: int = 0,
        weights: torch.Tensor | None = None,
    ):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self.lookahead, self.ahead = lookahead, ahead
        self.weights = weights
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)
        self._previous: tuple[int, torch.Tensor] | None = None  # lookahead crosses epochs

    def positions(self, begin: int, end: int) -> list[int]:
        """Dataset indices at stream positions [begin, end), crossing epochs as needed."""
        out: list[int] = []
        while begin < end:
            epoch, offset = divmod(begin, self.num_samples)
            if epoch != self._epoch:
                kept = self._previous
                self._previous = (self._epoch, self._perm)
                if kept is not None and kept[0] == epoch:
                    self._epoch, self._perm = kept
                elif self.weights is not None:
                    self._epoch, self._perm = epoch, epoch_draws(self.weights, self.seed, epoch)
                else:
                    perm = epoch_permutation(self.num_samples, self.seed, epoch)
                    self._epoch, self._perm = epoch, perm
            take = min(end - begin, self.num_samples - offset)
            out += self._perm[offset : offset + take].tolist()
            begin += take
        return out

    def __iter__(self) -> Iterator[list[int]]:
        global_batch = self.batch_size * self.world_size
        begin = self.start + self.rank * self.batch_size
        if self.lookahead is not None:
            for k in range(self.ahead):  # the first batches: from the start
                at = begin + k * global_batch
                self.lookahead(self.positions(at, at + self.batch_size))
        while True:
            batch = self.positions(begin, begin + self.batch_size)
            if self.lookahead is not None and self.ahead:
                at = begin + self.ahead * global_batch
                self.lookahead(self.positions(at, at + self.batch_size))
            yield batch
            begin += global_batch


class ResumableBatches:
    """Infinite, shuffled, rank-split batches over a map-style dataset, resumable exactly.

    ``state_dict()`` counts only the batches already yielded to the caller;
    ``load_state_dict`` makes the next batch the one an uninterrupted pass would yield.
    Call ``load_state_dict`` before iterating: it ends iterators started earlier.
    ``weights`` (N,), non-negative: concept-balanced draws instead of permutations (see
    ``StreamBatchSampler``); the cursor records their digest and refuses other weights.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        lookahead: Callable[[list[int]], None] | None = None,
        ahead: int = 0,
        weights: torch.Tensor | None = None,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        if self.num_samples == 0:
            raise ValueError("cannot batch an empty dataset")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.collate_fn, self.pin_memory = collate_fn, pin_memory
        self.lookahead, self.ahead = lookahead, ahead
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64)
            if weights.shape != (self.num_samples,):
                raise ValueError(f"weights {tuple(weights.shape)} for {self.num_samples} samples")
            if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError("sampling weights must be finite, >= 0 and not all zero")
        self.weights = weights
        self.position = 0  # samples of the stream consumed by all ranks
        self._generation = 0  # bumped by __iter__/load_state_dict: stale iterators stop

    @property
    def epoch(self) -> int:
        return self.position // self.num_samples

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "seed": self.seed,
            "epoch": self.epoch,
            "num_samples": self.num_samples,
            "weights": weights_digest(self.weights),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("num_samples", self.num_samples)) != self.num_samples:
            raise ValueError(
                f"data cursor was saved over {state['num_samples']} samples but the data set "
                f"now has {self.num_samples}: the saved position means nothing here"
            )
        saved = state.get("weights", "uniform")  # cursors saved before weights were uniform
        if saved != weights_digest(self.weights):
            raise ValueError(
                f"data cursor was saved with sampling weights {saved} but this run draws with "
                f"{weights_digest(self.weights)}: the saved position means another stream"
            )
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"data cursor position must be >= 0, got {position}")
        self.position, self.seed = position, int(state["seed"])
        self._generation += 1

    def __iter__(self) -> Iterator[Any]:
        # Claimed now, not at the first next(): the newest iterator is the live one.
        self._generation += 1
        sampler = StreamBatchSampler(
            self.num_samples,
            self.batch_size,
            self.seed,
            self.rank,
            self.world_size,
            self.position,
            self.lookahead,
            self.ahead,
            self.weights,
        )
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            pin_memory=self.pin_memory,
            # Worker seeds from the cursor, not the global generator, so a resumed run's
            # workers draw the same random numbers as an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.position),
        )
        return self._advance(loader, self._generation)

    def _advance(self, loader: DataLoader, generation: int) -> Iterator[Any]:
        batches = iter(loader)
        # Checked before each fetch: a stale iterator (the cursor was reset or a newer
        # iterator took over) stops without reading anything more.
        while generation == self._generation:
            batch = next(batches)  # the sampler is infinite
            self.position += self.batch_size * self.world_size
            yield batch
