"""Where a process computes: the device a run names (`train.device`), bf16 autocast (`train.precision`), and whether
its CPU memory is kept for reuse between steps (`train.reuse_cpu_memory`).

Models live on the CPU between steps (state dicts, deltas and checkpoints are CPU tensors everywhere else);
work that benefits from a GPU moves the model there for its duration (`on_device`) and each batch as it
comes. Inference helpers compute wherever the model is (`model_device`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Literal, get_args

import torch
from torch import nn

Precision = Literal["fp32", "bf16"]
PRECISIONS = get_args(Precision)

# glibc mallopt(3) parameters
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
KEPT_FREE_BYTES = 1 << 30  # free memory a process keeps at the top of its heap: past it, glibc gives back all of it


def resolve_device(name: str) -> torch.device:
    """The device `name` ("auto", "cpu", "cuda", "cuda:1") stands for in this process: "auto" is the first CUDA
    device when one is visible, else the CPU. A CUDA device this process cannot see is an error, not a silent
    fallback (a run asked for a GPU would otherwise train for days on a CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"train.device={name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"train.device={name!r}: geomoe computes on cpu or cuda")
    if device.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= visible:
            raise ValueError(f"train.device={name!r} but this process sees {visible} CUDA device(s)")
    return device


def model_device(model: nn.Module) -> torch.device:
    """Where `model`'s parameters are."""
    return next(model.parameters()).device


@contextmanager
def on_device(device: torch.device, *modules: nn.Module | None) -> Iterator[None]:
    """`modules` moved to `device` for the block and back to where each was after it (also on an error)."""
    homes = [(m, model_device(m)) for m in modules if m is not None and any(True for _ in m.parameters())]
    for module, _ in homes:
        module.to(device)
    try:
        yield
    finally:
        for module, home in homes:
            module.to(home)


def autocast(device: torch.device, precision: Precision):
    """bf16 autocast on `device` for "bf16" (matrix work in bf16, reductions and the loss in fp32), else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def to_device(batch: tuple | list, device: torch.device) -> tuple:
    """A batch's tensors on `device` (non-blocking from pinned memory), other items as they are."""
    return tuple(item.to(device, non_blocking=True) if isinstance(item, torch.Tensor) else item for item in batch)


@functools.cache
def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse in this process (no mmap for large blocks, and up to
    `KEPT_FREE_BYTES` free before the heap shrinks); True where that took effect, False where libc is not glibc.

    Why: a CPU training step at 224 px allocates and frees activations of tens to hundreds of MB. glibc serves each
    from a fresh mmap and unmaps it on free, so every step faults all its activations in again and the kernel's
    share of a step grows large. Keeping freed blocks trades some peak memory for far fewer page faults (the figures:
    docs, Scale and speed, "Freed memory kept for reuse"). At 64 px, where blocks are small, nothing changes. It is
    set once per process, because the setting belongs to the process, not to a model."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, TypeError, AttributeError):  # no libc found, or one without mallopt (musl, macOS)
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, KEPT_FREE_BYTES))
