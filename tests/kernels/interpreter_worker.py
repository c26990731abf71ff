"""A child process that runs the Triton kernels through Triton's interpreter, for tests.

Why a process: triton 3.9 reads TRITON_INTERPRET when @triton.jit decorates a function,
and triton.language's own helpers (tl.max, tl.sum, tl.cdiv) are decorated at `import
triton`. So a process either interprets every kernel or compiles every kernel, decided
before triton is imported. The pytest process must compile (the AOT tests) and the rest of
the suite never interprets, so the interpreted calls go to one spawned worker whose
environment alone carries TRITON_INTERPRET=1. Calls and results cross the pipe as
torch.save bytes (bf16 included); the worker returns the call's result and its (possibly
mutated, for the in-place kernels) arguments.

On a CUDA machine, PALM_TRITON_DEVICE=cuda makes worker() a NativeRunner instead: the same
calls, in this process, compiled for the GPU, tensors moved there and back (bench/gpu_check.sh
runs tests/kernels that way)."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import io
import multiprocessing
import os
import traceback
from collections.abc import Iterator
from typing import Any

import torch

# The interpreter runs tl.dot as numpy matmuls of small tiles; a multi-threaded OpenBLAS
# on a busy machine spins its threads and makes each one ~1000x slower (40 ms vs 40 us).
CALL_TIMEOUT_S = 300
CHILD_ENV = {"TRITON_INTERPRET": "1", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)


def _serve(conn: Any) -> None:
    """The worker's loop: (module, function, args, kwargs) in, (result, args) out."""
    from palm_serve.kernels.triton import launch, paged_attention

    kernel = importlib.import_module(paged_attention.__module__)._paged_attention_kernel
    conn.send(launch.is_interpreted(kernel))  # the handshake: did the knob take effect?
    while (request := conn.recv()) is not None:
        module, name, payload = request
        try:
            args, kwargs = _loads(payload)
            result = getattr(importlib.import_module(module), name)(*args, **kwargs)
            conn.send((True, _dumps((result, args))))
        except Exception:  # noqa: BLE001 - reported to the test, which fails with it
            conn.send((False, traceback.format_exc()))


class InterpreterWorker:
    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no triton yet
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child,), daemon=True)
        with _environment(CHILD_ENV):  # inherited by the child at spawn, then restored
            self._process.start()
        child.close()
        if not self._conn.recv():
            raise RuntimeError("the worker's kernels are not interpreted")

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def call(self, module: str, name: str, *args: Any, **kwargs: Any) -> tuple[Any, tuple]:
        """module.name(*args, **kwargs) in the worker -> (result, args after the call).

        A worker that hangs (say a kernel loop that never ends) is killed after
        CALL_TIMEOUT_S and one that dies (a wild pointer) is replaced by the next worker()."""
        try:
            self._conn.send((module, name, _dumps((args, kwargs))))
            if not self._conn.poll(CALL_TIMEOUT_S):
                self._process.kill()
                raise AssertionError(f"{module}.{name} did not return in {CALL_TIMEOUT_S} s")
            ok, payload = self._conn.recv()
        except (EOFError, OSError):
            raise AssertionError(f"the interpreter worker died in {module}.{name}") from None
        if not ok:
            raise AssertionError(f"{module}.{name} failed in the interpreter worker:\n{payload}")
        return _loads(payload)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a worker that already died
            self._conn.send(None)
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()


class NativeRunner:
    """The worker's interface, natively on a CUDA device: tensors in the arguments go to the
    device, the call runs with the device as torch's default (what it builds lands there
    too), and the result and the arguments after the call come back to the CPU."""

    alive = True

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)

    def call(self, module: str, name: str, *args: Any, **kwargs: Any) -> tuple[Any, tuple]:
        moved_args, moved_kwargs = _to(self.device, (args, kwargs))
        with self.device:
            result = getattr(importlib.import_module(module), name)(*moved_args, **moved_kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return _to(torch.device("cpu"), (result, moved_args))

    def close(self) -> None:
        pass


def _to(device: torch.device, obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(device, x) for x in obj)
    if isinstance(obj, dict):
        return {key: _to(device, value) for key, value in obj.items()}
    return obj


def native_device() -> str | None:
    """PALM_TRITON_DEVICE (e.g. cuda): run the Triton tests natively there."""
    return os.environ.get("PALM_TRITON_DEVICE") or None


_worker: InterpreterWorker | NativeRunner | None = None


def worker() -> InterpreterWorker | NativeRunner:
    """The worker, started on first use and shared by every interpreted test of the run
    (a module-level singleton rather than a session fixture in tests/kernels/conftest.py:
    a second rootless conftest.py would shadow tests/conftest.py as the module `conftest`
    that other test directories import helpers from)."""
    global _worker
    if _worker is None and native_device() is not None:
        _worker = NativeRunner(native_device())
    if _worker is None or not _worker.alive:
        _worker = InterpreterWorker()
        atexit.register(_worker.close)
    return _worker
