"""Pinning torch's intra-op thread count for a block of work.

A CPU float32 matmul's result depends on how many threads split it, so work that must give the
same numbers wherever it runs (a base build, a training run and its resumption after a failure)
fixes its thread count instead of inheriting the process's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the caller's setting."""
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
