"""Run small CPU decompositions (QR, SVD) on one thread.

LAPACK's QR/SVD make many small parallel steps, each ending at a thread barrier; when the
CPU cores are shared (other processes, data-loader workers) every barrier can wait for a
scheduler time slice. Measured on a busy 2-core machine: the SVD of a 1536 × 384 matrix
takes 7.6 s on 2 threads and 0.06 s on one. The decompositions lorakit runs here are thin
(sketch bases, out × (k + p)) or at most 1024 on a side, so one thread costs little when
the machine is idle. GPU tensors are left alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor


@contextmanager
def one_thread_for(tensor: Tensor, max_side: int | None = None) -> Iterator[None]:
    """One intra-op thread while decomposing ``tensor`` on the CPU (if its smaller side ≤ ``max_side``)."""
    small = max_side is None or min(tensor.shape) <= max_side
    if tensor.device.type != "cpu" or not small or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
