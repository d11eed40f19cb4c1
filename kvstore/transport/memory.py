"""Host memory that data moves through: resident from the start, page-locked for DMA on a GPU node."""

from __future__ import annotations

import numpy as np


def host_buffer(nbytes: int, pin: bool = False) -> np.ndarray:
    """A resident uint8 array; page-locked (CUDA's pinned memory, for async DMA) when `pin` and a GPU
    is there. Only engines pin: a shard's pool is registered with NIXL, which pins what it needs."""
    if pin:
        import torch

        if torch.cuda.is_available():  # resident by nature; torch caches freed pinned blocks for reuse
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
    buf = np.empty(nbytes, dtype=np.uint8)
    # Touched now, so the memory is resident from the start and writes take no page faults later
    # (np.zeros alone maps lazy zero pages: RSS would creep up as slots are first written).
    buf.fill(0)
    return buf
