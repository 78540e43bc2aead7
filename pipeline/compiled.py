"""``--compile``: ``torch.compile`` of the UNet and the VAE decoder for inference, with the
compilation paid up front by a warm-up so that it is reported apart from the per-image time.

torch.compile compiles lazily, on the first call of each input shape. A sampling run has
two: the guided evaluations (the doubled batch, 2B) and, outside the guidance interval, the
conditional-only ones (batch B); both repeat every step, so each gets a specialised graph
(``dynamic=False``). The weights are shared with the eager modules: same images up to the
reordering of floating-point operations. On a CPU the convolutions are oneDNN either way
(bench/RESULTS.md measured training slower compiled); this is what ``--compile`` measures.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .load import Models


def compile_models(models: Models) -> None:
    """Swap the UNet and the VAE decoder for their compiled versions, in place."""
    unet = models.unet
    unet.model = torch.compile(unet.model, dynamic=False)  # type: ignore[assignment]
    autoencoder = getattr(models.vae, "model", None)  # None: pixel space, nothing to decode
    if autoencoder is not None:
        autoencoder.decoder = torch.compile(autoencoder.decoder, dynamic=False)


def warm_up(run: Callable[[], object]) -> float:
    """Seconds of one call of ``run`` (the same request as the timed one): compilation of
    every shape it meets, plus one run's work."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start
