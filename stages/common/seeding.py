"""Seeds and every random-number-generator state, as plain data that survives a checkpoint.

A resumed run equals an uninterrupted one only if it draws the same random numbers, so the
trainer saves the Python, NumPy, torch CPU and torch CUDA (the rank's own device) states of
each rank and restores them last, after the modules and the loader are built. ``rng_state()``
returns JSON-able values plus uint8 tensors (the torch states), which the checkpoint code
splits into JSON and safetensors; nothing is pickled. ``preserve_rng()`` lets validation,
previews and the loader draw random numbers without moving the training streams, so
changing ``train.val_every`` never changes what training computes.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of parts (``derive_seed(seed, "train", rank)``)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    """Every generator's state: Python and NumPy as JSON-able lists, torch as uint8 tensors."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss},
        "numpy": {
            "name": name,
            "keys": keys.tolist(),  # 624 uint32 words of the Mersenne twister
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [torch.cuda.get_rng_state()]  # this rank's device only
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned (CUDA states only where the devices exist)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["name"],
            np.asarray(npy["keys"], dtype=np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():  # saved on a GPU, resumed on one: same stream
        torch.cuda.set_rng_state(cuda[0])


@contextmanager
def preserve_rng() -> Iterator[None]:
    """Run a block without moving any random stream (validation, previews, batch fetches).

    Holds the native state objects (no JSON conversion): cheap enough to wrap every batch.
    """
    python, numpy_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
