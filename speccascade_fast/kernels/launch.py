"""Host-side helpers of the launchers (each launcher sits next to its kernel): grid and block
sizes, the device's multiprocessor count, and the check that CPU tensors run under Triton's
interpreter."""
from __future__ import annotations

import functools
import os

import torch

#: programs per multiprocessor that the narrower slices of small batches aim for (:func:`spread`)
PROGRAMS_PER_SM = 2


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def slice_size(V: int) -> int:
    """Vocabulary slice per program: about V/32, a power of two in [1024, 8192] (V=262,144: 32
    slices of 8192; V=151,936: 19 of 8192; V=32,000: 32 of 1024), or the whole of a small V."""
    return min(max(next_pow2(-(-V // 32)), 1024), 8192, next_pow2(V))


def spread(V: int, rows: int, sms: int) -> int:
    """The power-of-two slice width (at least 1024) at which ``rows`` rows of V tokens make
    about PROGRAMS_PER_SM programs per multiprocessor."""
    want = -(-PROGRAMS_PER_SM * sms // max(rows, 1))  # programs per row
    return max(1024, next_pow2(-(-V // want)))


@functools.cache
def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 1 on the CPU (the interpreter: slices stay as wide as
    the defaults unless a test asks otherwise)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def warps(block: int) -> int:
    """16 elements per thread at most: 8192-wide blocks get 16 warps."""
    return max(4, min(16, block // 512))


def check_mode(kernel, device: torch.device) -> None:
    """A clear error unless ``kernel`` can run on ``device``: CUDA, or the CPU when the kernels
    were decorated for Triton's interpreter and ``TRITON_INTERPRET=1`` is still set."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    # triton.jit reads TRITON_INTERPRET when it decorates: our kernels and triton's own helpers
    # (tl.max, ...) must both have been decorated with it set, i.e. at triton's first import
    interpreted = all(isinstance(f, InterpretedFunction) for f in (kernel, tl.max))
    if device.type == "cpu" and not (interpreted and os.environ.get("TRITON_INTERPRET") == "1"):
        raise RuntimeError(
            "the Triton backend got CPU tensors: that needs Triton's interpreter, i.e. "
            "TRITON_INTERPRET=1 set before triton is first imported (by anything) and while "
            "the kernels run")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the Triton backend runs on CUDA (or CPU when interpreted), got {device}")
