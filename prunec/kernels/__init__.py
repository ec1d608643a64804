"""Triton kernels behind the `prunec::` ops, one file per kernel, each beside its torch reference.

Ops dispatch here for CUDA tensors when Triton is importable; everything else (CPU, or no Triton)
runs the torch implementation, with the same results. On a machine without a GPU the kernels run
under Triton's interpreter (`TRITON_INTERPRET=1`, set before triton is imported), which is how the
tests check them, and compile ahead of time for Hopper (`tests/test_kernels.py`).
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on a CUDA device and Triton can be imported."""
    return all(t.is_cuda for t in tensors) and triton_available()
