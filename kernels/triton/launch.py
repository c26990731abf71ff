"""Where a Triton kernel runs: compiled for CUDA, or through Triton's interpreter on the CPU.

triton 3.9 reads TRITON_INTERPRET (`triton.knobs.runtime.interpret`) when `@triton.jit`
decorates a function, and triton.language's own helpers (tl.max, tl.sum, tl.cdiv, ...) are
decorated when `import triton` runs. So interpretation is decided per process, before
triton is imported: then every kernel here is an InterpretedFunction and runs on CPU
tensors; otherwise they are JITFunctions and need CUDA tensors."""

from __future__ import annotations

from typing import Any

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Fused multiply-add on (triton 3.9's default, which 3.10 flips): pinned so every build of
# these kernels rounds alike, and so triton does not warn about the coming change.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


def interpreter_active() -> bool:
    """Whether this process imported triton with TRITON_INTERPRET=1 (its own @jit helpers,
    like tl.cdiv, are then interpreted too, and so is every kernel here)."""
    return isinstance(tl.cdiv, InterpretedFunction)


def is_interpreted(kernel: Any) -> bool:
    return isinstance(kernel, InterpretedFunction)


def for_device(kernel: Any, device: torch.device) -> Any:
    """`kernel`, after checking it can run on `device`."""
    if device.type != "cuda" and not is_interpreted(kernel):
        raise RuntimeError(
            f"Triton kernels run on CUDA, or on the CPU only when TRITON_INTERPRET=1 was set "
            f"before triton was imported (got a {device} tensor)"
        )
    return kernel


def check_same_device(name: str, tensor: torch.Tensor, **others: torch.Tensor | None) -> None:
    """ValueError naming the first of `others` (None: an optional one left out) not on
    `tensor`'s device. Compiled, Triton only says "cpu tensor?" of a stray host tensor, and
    the interpreter runs one silently."""
    for other_name, other in others.items():
        if other is not None and other.device != tensor.device:
            raise ValueError(
                f"{other_name} is on {other.device} but {name} on {tensor.device}: a kernel's "
                f"tensors must share one device"
            )
