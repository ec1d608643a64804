"""Triton kernels behind the `prunec::` ops, one file per kernel, each beside its torch reference.

Ops dispatch here for CUDA tensors when Triton is importable; everything else (CPU, or no Triton)
runs the torch implementation, with the same results. A spec's `backend:` narrows that while its
module runs (`backend()`): `torch` never takes a kernel; `triton` also takes them on CPU when
Triton's interpreter is on (validation has checked every stage has kernels); `auto` is the default. On a machine without a GPU the kernels run
under Triton's interpreter (`TRITON_INTERPRET=1`, set before triton is imported), which is how the
tests check them, and compile ahead of time for Hopper (`tests/test_kernels.py`).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")
_BACKEND = contextvars.ContextVar("prunec_backend", default="auto")


@contextlib.contextmanager
def backend(mode: str):
    """Dispatch ops by `mode` (auto | torch | triton) inside the block."""
    if mode not in BACKENDS:
        raise ValueError(f"unknown backend {mode!r}; known: {', '.join(BACKENDS)}")
    token = _BACKEND.set(mode)
    try:
        yield
    finally:
        _BACKEND.reset(token)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Take the Triton kernel: every tensor on a CUDA device (or, with backend `triton`, Triton's
    CPU interpreter on) and Triton importable; never with backend `torch`."""
    mode = _BACKEND.get()
    if mode == "torch":
        return False
    on_device = all(t.is_cuda for t in tensors) or (mode == "triton" and os.environ.get("TRITON_INTERPRET") == "1")
    return on_device and triton_available()


def kernel_gaps(method: str, params: dict) -> list[str]:
    """The methods in a stage (a fusion's terms included) whose scoring or selection has no Triton
    kernel (`MethodInfo.kernel`); empty when backend `triton` can run the stage."""
    from ..methods import get_method, terms

    info = get_method(method)
    if info.kind == "fusion":
        return [gap for name, term_params, _ in terms(method, params) for gap in kernel_gaps(name, term_params)]
    return [] if info.kernel else [method]


class WithBackend(torch.nn.Module):
    """An emitted module run under its spec's backend."""

    def __init__(self, module: torch.nn.Module, mode: str):
        super().__init__()
        self.module, self.mode = module, mode

    def forward(self, *args, **kwargs):
        with backend(self.mode):
            return self.module(*args, **kwargs)
