"""The backend switch: the compiled kernels (cpu) on the CPU unless forced; Triton on the
CPU only in a process that imported triton with TRITON_INTERPRET=1 (the worker), never in
the test process."""

from __future__ import annotations

import pytest
import torch

from palm_serve.kernels import select_backend
from palm_serve.kernels.triton.launch import interpreter_active

from interpreter_worker import native_device, worker


def test_cpu_process_without_interpreter_refuses_triton() -> None:
    cpu = torch.device("cpu")
    assert select_backend("auto", cpu).name == "cpu"
    assert select_backend("torch", cpu).name == "torch"
    if interpreter_active():
        pytest.skip("this pytest process was started with TRITON_INTERPRET=1")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        select_backend("triton", cpu)


@pytest.mark.skipif(
    native_device() is not None,
    reason="PALM_TRITON_DEVICE: the kernels run natively, no interpreter",
)
def test_interpreting_process_can_force_triton() -> None:
    names, _ = worker().call("triton_cases", "selected_backends")
    assert names == ("cpu", "triton")
