"""The engine core process: its main (run_core_process, the target the front spawns) and
its loop. It builds the model itself from the model directory, so only a small CoreSpec
crosses at spawn; it answers with CoreReady, then loops: take what the front sent, step,
send that step's EngineCoreOutputs (one message per step, the stats snapshot inside).

It lives only as long as the front: PR_SET_PDEATHSIG kills it when the front dies (even
by SIGKILL), and an idle core also checks that its parent is still the front. It ignores
SIGINT, which a terminal sends to the whole process group: the front drains first, then
tells the core to stop. A step that raises ends the process (its state, e.g. a half-written
KV cache, cannot be trusted): it reports CoreFailed and exits 1; the front restarts it."""

from __future__ import annotations

import atexit
import ctypes
import logging
import logging.config
import os
import signal
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import zmq

from .config import EngineConfig
from .core import EngineCore
from .core_client import apply_message
from .core_codec import CoreCodec, CoreFailed, CoreReady, Shutdown, ToCore
from .heap import freeze_startup_heap
from .messages import EngineCoreOutputs

if TYPE_CHECKING:
    from ..model.decoder import DecoderModel

logger = logging.getLogger(__name__)

# An idle core wakes this often to check that the front still lives (the death signal
# covers the front's death, this covers a death signal set too late).
IDLE_POLL_MS = 1000
# The last message (CoreFailed) gets this long to leave before the process exits.
EXIT_LINGER_MS = 1000
_PR_SET_PDEATHSIG = 1
# Tensor-parallel ranks load their weights within this long (the front waits as long).
START_TIMEOUT_SECONDS = 600.0


@dataclass(frozen=True)
class CoreSpec:
    """What a core process needs to build itself: paths and settings, nothing large."""

    model_dir: str
    engine_config: EngineConfig
    dtype: str
    device: str
    kernel_backend: str
    prepack_cpu_linears: bool
    # torch.compile the step at start (model/compiled.py).
    compile: bool
    seed: int | None
    # torch intra-op threads; None: torch's default for the CPUs below.
    threads: int | None
    # CPUs the process may run on (sched_setaffinity); None: wherever it was started.
    cpus: tuple[int, ...] | None
    # Ranks of tensor parallelism (tp_worker.py): this process is rank 0 and starts the
    # others; their collectives time out after tp_timeout seconds.
    tensor_parallel_size: int = 1
    tp_timeout: float = 30.0
    # Ranks this core starts on this machine (0..K-1); the others are external workers
    # (`palm-serve tp-worker`) that meet it at MASTER_ADDR:MASTER_PORT. None: all.
    tp_local_ranks: int | None = None
    # logging.config.dictConfig for this process, so that its log lines read as the
    # front's (text or JSON); None: Python's default (warnings and errors as bare text).
    logging_config: dict | None = None
    # With compile: the forward fused in C++ where it serves (model/fused_forward.py), else
    # the graph.
    fused_step: bool = True
    # "none" or "int8": the blocks' linears in int8 (model/quantization.py).
    quantization: str = "none"


@dataclass(frozen=True)
class CoreLink:
    """How one core process reaches its front. The core binds input_address (PULL) and
    connects to output_address (PUSH)."""

    input_address: str
    output_address: str
    parent_pid: int


def run_core_process(spec: CoreSpec, link: CoreLink) -> None:
    """The core process's main. Exits 0 after a Shutdown, 1 on a failure."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.logging_config is not None:
        logging.config.dictConfig(spec.logging_config)
    die_with_parent(link.parent_pid)
    place(spec.cpus, spec.threads)
    context = zmq.Context(io_threads=1)
    inbox = context.socket(zmq.PULL)
    inbox.bind(link.input_address)
    outbox = context.socket(zmq.PUSH)
    outbox.setsockopt(zmq.SNDHWM, 0)  # never block the step loop on a slow reader
    outbox.connect(link.output_address)
    codec = CoreCodec()
    code = 0
    try:
        core = build_engine_core(spec)
        freeze_startup_heap()
        outbox.send_multipart(codec.encode(ready_message(core)))
        code = CoreLoop(core, inbox, outbox, codec, link.parent_pid).run()
    except Exception as exc:  # noqa: BLE001 - whatever it was, the front must hear why
        logger.exception("engine core failed")
        outbox.send_multipart(codec.encode(CoreFailed(f"{type(exc).__name__}: {exc}")))
        code = 1
    finally:
        inbox.close(linger=0)
        outbox.close(linger=EXIT_LINGER_MS)
        context.term()
    exit_now(code)


def exit_now(code: int) -> None:
    """Exit without the interpreter's finalization: its last garbage collection over the
    model's and the compiled step's objects took most of a stop under load (seconds; the
    front kills a core that takes over 5 s; docs/DEPLOY.md). Nothing here needs it: the
    messages are out (the sockets' linger), and the exit handlers (a tensor-parallel
    core's STOP to its workers, logging's flush) still run."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def build_engine_core(spec: CoreSpec) -> EngineCore:
    # Imported here: the factory pulls in the model and kernels, which only the core needs.
    from ..model.tokenizer import load_tokenizer
    from .factory import build_core, load_served_model

    if spec.tensor_parallel_size > 1:
        model = start_ranks(spec)
    else:
        model = load_served_model(
            spec.model_dir,
            dtype=spec.dtype,
            device=spec.device,
            kernel_backend=spec.kernel_backend,
            prepack_cpu_linears=spec.prepack_cpu_linears,
            compile=spec.compile,
            fused_step=spec.fused_step,
            block_size=spec.engine_config.block_size,
            quantization=spec.quantization,
            kv_cache_dtype=spec.engine_config.kv_cache_dtype,
        )
    # For its EOS id when the model's config names none, and structured output's grammars.
    tokenizer = load_tokenizer(spec.model_dir, model.config.vocab_size)
    return build_core(model, spec.engine_config, tokenizer, spec.seed)


def start_ranks(spec: CoreSpec) -> DecoderModel:
    """Tensor parallelism: this core is rank 0; the workers start and load beside it."""
    from .tp_launch import RankSpec, rendezvous_address, start_tensor_parallel

    if spec.compile:
        logger.warning("the step runs eagerly: torch.compile is off under tensor parallelism")
    rank0 = RankSpec(
        rank=0,
        world=spec.tensor_parallel_size,
        address=rendezvous_address(),
        model_dir=spec.model_dir,
        dtype=spec.dtype,
        device=spec.device,
        kernel_backend=spec.kernel_backend,
        prepack_cpu_linears=spec.prepack_cpu_linears,
        timeout=spec.tp_timeout,
        start_timeout=START_TIMEOUT_SECONDS,
        cpus=spec.cpus,
        engine_config=spec.engine_config,
        local_ranks=spec.tp_local_ranks,
    )
    # The runner uses what a model offers it (config, kernels, parameters, forward,
    # compute_logits); the proxy offers exactly that, sending each call to the workers.
    return cast("DecoderModel", start_tensor_parallel(rank0))


def ready_message(core: EngineCore) -> CoreReady:
    from .factory import served_weight_bytes

    bm = core.block_manager
    return CoreReady(
        pid=os.getpid(),
        max_model_len=core.max_model_len,
        num_blocks=bm.num_blocks,
        block_size=bm.block_size,
        backend_name=core.runner.model.kernels.name,
        num_threads=torch.get_num_threads(),
        cpus=sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [],
        weight_bytes=served_weight_bytes(core.runner.model),
    )


class CoreLoop:
    """Drain the inbox, step, send the step's outputs; sleep on the socket when idle."""

    def __init__(
        self,
        core: EngineCore,
        inbox: zmq.Socket[bytes],
        outbox: zmq.Socket[bytes],
        codec: CoreCodec,
        parent_pid: int,
    ) -> None:
        self.core, self.inbox, self.outbox, self.codec = core, inbox, outbox, codec
        self.parent_pid = parent_pid

    def run(self) -> int:
        core = self.core
        while True:
            busy = core.has_unfinished()
            if not busy and not self.inbox.poll(IDLE_POLL_MS):
                if os.getppid() != self.parent_pid:
                    return 0  # the front is gone: nobody to serve
                continue
            received = self._receive()
            if received is None:
                core.finish_all("abort")
                return 0
            if not (received or core.has_unfinished()):
                continue
            try:
                outputs = core.step(self._message_waiting) if core.has_unfinished() else []
            except Exception as exc:  # noqa: BLE001 - any failure ends the core, see module doc
                logger.exception("engine step failed")
                self._send_failure(f"engine step failed: {type(exc).__name__}: {exc}")
                return 1
            self.outbox.send_multipart(self.codec.encode(EngineCoreOutputs(outputs, core.stats())))

    def _message_waiting(self) -> bool:
        return bool(self.inbox.poll(0))

    def _receive(self) -> int | None:
        """Apply every message waiting; their count, or None after a Shutdown."""
        count = 0
        while True:
            try:
                frames = self.inbox.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return count
            message: ToCore = self.codec.decode_to_core(frames)
            if isinstance(message, Shutdown):
                return None
            apply_message(self.core, message)
            count += 1

    def _send_failure(self, message: str) -> None:
        try:
            self.core.finish_all("error", message)
        except Exception:  # noqa: BLE001 - the front must still hear of it
            logger.exception("cleanup after the failed step failed too")
        self.outbox.send_multipart(self.codec.encode(CoreFailed(message)))


# ---- the process's place on the machine --------------------------------------------------


def die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this process when the thread that spawned it dies (the front is gone,
    however it died). Elsewhere the idle loop's parent check is all there is."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent_pid:  # the front died before the signal was armed
        os._exit(0)


def place(cpus: tuple[int, ...] | None, threads: int | None) -> None:
    """Pin the process (threads created from now on inherit it) and size torch's pool."""
    if cpus is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    if threads is not None:
        torch.set_num_threads(threads)
