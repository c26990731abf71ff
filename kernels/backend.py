"""The kernel backend, chosen once at start and passed to the model (never a global)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .argmax import argmax_rows as twin_argmax_rows
from .int8_linear import Int8Matmul, twin_int8_matmul

logger = logging.getLogger(__name__)

BackendName = Literal["auto", "torch", "triton", "cpu"]


@dataclass(frozen=True)
class KernelBackend:
    """The three kernels the model calls, all with the torch twins' signatures, the
    per-step plan paged_attention takes (plan_paged_attention's signature; None where the
    implementation needs none), the weight-only int8 linear of a quantized model, and the
    row argmax the sampler's greedy choice runs."""

    name: str
    rotary_embedding: Callable[..., None]
    write_kv_cache: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    plan_paged_attention: Callable[..., object | None]
    int8_matmul: Int8Matmul
    argmax_rows: Callable[[torch.Tensor], torch.Tensor] = twin_argmax_rows


def torch_backend() -> KernelBackend:
    from .kv_cache import write_kv_cache
    from .paged_attention import paged_attention, plan_paged_attention
    from .rotary import rotary_embedding

    return KernelBackend(
        "torch",
        rotary_embedding,
        write_kv_cache,
        paged_attention,
        plan_paged_attention,
        twin_int8_matmul(),
    )


def triton_backend() -> KernelBackend:
    from .triton import paged_attention, rotary_embedding, triton_int8_matmul, write_kv_cache

    return KernelBackend(
        "triton", rotary_embedding, write_kv_cache, paged_attention, _no_plan, triton_int8_matmul()
    )


def cpu_backend() -> KernelBackend:
    """The compiled C++ kernels (kernels/cpu/): one op per kernel where the twins run many."""
    from . import cpu

    return KernelBackend(
        "cpu",
        cpu.rotary_embedding,
        cpu.write_kv_cache,
        cpu.paged_attention,
        _no_plan,
        cpu.cpu_int8_matmul(),
        cpu.argmax_rows,
    )


def _no_plan(*args: object) -> None:
    """The Triton and C++ kernels read the tables themselves: nothing to prepare."""
    return None


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA, or on the CPU only through its interpreter. triton reads
    TRITON_INTERPRET when it is imported (kernels/triton/launch.py), so ask triton whether
    it is interpreting rather than reading the variable now."""
    if device.type == "cuda":
        return True
    try:
        from .triton.launch import interpreter_active
    except ImportError:  # no triton on this platform
        return False
    return interpreter_active()


def select_backend(name: BackendName, device: torch.device) -> KernelBackend:
    """'auto' picks Triton on CUDA, else the compiled CPU kernels where they build here, else
    the torch twins (saying why, once); 'triton', 'cpu' or 'torch' forces one."""
    if name == "torch":
        return torch_backend()
    if name == "triton":
        if not triton_usable(device):
            raise ValueError(
                "the triton backend needs a CUDA device, or on the CPU TRITON_INTERPRET=1 "
                "set before triton is imported"
            )
        return triton_backend()
    if name == "cpu":
        return _checked_cpu_backend(device)
    if name == "auto":
        if device.type == "cuda":
            return triton_backend()
        if device.type == "cpu":
            from . import cpu

            if cpu.available():
                return cpu_backend()
            logger.warning(
                "compiled CPU kernels unavailable (%s): using the torch twins",
                cpu.unavailable_reason(),
            )
        return torch_backend()
    raise ValueError(f"unknown kernel backend {name!r}: expected auto, torch, triton or cpu")


def _checked_cpu_backend(device: torch.device) -> KernelBackend:
    from . import cpu

    if device.type != "cpu":
        raise ValueError(f"the cpu backend runs on the CPU, not on {device}")
    if not cpu.available():
        raise ValueError(f"the cpu backend did not build here: {cpu.unavailable_reason()}")
    return cpu_backend()
