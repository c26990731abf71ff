"""The serving step compiled: DecoderModel.forward through torch.compile (inductor's C++
backend) as ONE graph, so the glue between the matmuls (norms, rotary and the cache write,
SiLU * mul, residual adds) runs as a few fused loops instead of dozens of separate ops.

One compilation serves every batch: the batch's sizes (tokens T, sequences S, block-table
width, and the number of blocks in the KV pool) are unbacked symbols, so the graph is
neither specialised to a batch of one nor to equalities that happen to hold in the batch
it was traced with (dynamic=True would do both: duck sizing tied S to head_dim 32 in a
first attempt). The block size stays static: with it symbolic too, inductor no longer
wrote the cache in place but copied the whole pool in every layer (7x slower steps).
The compilation happens at start-up, on a scratch batch, with a progress bar; inductor's
caches (cache_directory()) make later starts load it instead of compiling again.

It needs the compiled CPU kernels (the "cpu" backend: paged attention is one opaque op
with a fake implementation) and a C++ compiler for inductor; without them the model keeps
its eager forward and one log line says why."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..kernels.kv_cache import scatter_kv_cache
from . import fused_forward
from .attention_metadata import AttentionMetadata
from .decoder import DecoderModel
from .kv_cache import KVCache

logger = logging.getLogger(__name__)

CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"  # inductor's own
# Threads read at run time (omp_get_max_threads), not fixed at compile time: the runner may
# run decode steps on fewer threads than prompt steps. The graph's wrapper in C++ rather
# than Python, and without its checks of every op's output sizes: the step's ~50 kernel and
# op calls then cost no Python per call.
INDUCTOR_OPTIONS = {"cpp.dynamic_threads": True, "cpp_wrapper": True, "size_asserts": False}
# The scratch batches of the warm-up, (new tokens, context) per sequence: a prefill chunk
# among decodes with all sizes distinct, then a single decode (T = S = 1).
WARM_UP_BATCHES = (((5, 1, 3), (21, 9, 40)), ((1,), (3,)))


def cache_directory() -> Path:
    """Where inductor keeps what it compiled: TORCHINDUCTOR_CACHE_DIR where the user set it,
    else palm-serve's cache (XDG_CACHE_HOME or ~/.cache) rather than inductor's /tmp one."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    value = os.environ.get(CACHE_VARIABLE)
    # inductor writes its /tmp default into the variable once anything asks for its cache
    if value and os.path.abspath(value) != os.path.abspath(default_cache_dir()):
        return Path(value)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "palm-serve" / "inductor"


def use_cache_directory() -> str:
    """Point inductor at cache_directory() (it reads the variable whenever it looks)."""
    os.environ[CACHE_VARIABLE] = str(cache_directory())
    return os.environ[CACHE_VARIABLE]


def compiler_problem() -> str | None:
    """None where inductor finds its C++ compiler (CXX, else g++); else why not."""
    use_cache_directory()  # before inductor, which sets its own default on first use
    from torch._inductor import config, cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception:  # inductor's InvalidCxxCompiler, or the search itself failing
        return f"no C++ compiler ({config.cpp.cxx[-1]!r} does not run)"
    return None


def unavailable_reason(model: DecoderModel) -> str | None:
    """None where the model's step can be compiled here; else why not, in a few words."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        return f"the compiled step is for the CPU, not {device}"
    if model.kernels.name != "cpu":
        return f"it needs the compiled CPU kernels, not the {model.kernels.name} backend"
    return compiler_problem()


class CompiledForward:
    """Stands in for model.forward (same signature): the compiled graph, traced on its first
    call with the batch's dimensions marked unbacked. `compilations` counts the graphs
    inductor built; `on_compile(stage)` hears "compiling" and "compiled" around each.

    The graph keeps no guards (as vLLM's compiled step keeps none): checking them and
    marking every call's tensors cost ~0.1 ms a step, and one graph serves every batch
    anyway. What a guard would have caught that can differ between calls is the pool: its
    block size is static in the graph and its dtype fixed, so a pool unlike the traced one
    is refused here (ValueError) instead of running the wrong graph.

    Having no guards to check, later calls need nothing of dynamo's frame evaluation either:
    they run the bytecode dynamo made of forward (which gathers the graph's inputs and calls
    the compiled graph) as a plain function, as vLLM's compiled models dispatch to theirs.
    Where that bytecode was not seen (another torch), calls go through torch.compile."""

    def __init__(
        self, model: DecoderModel, on_compile: Callable[[str], None] | None = None
    ) -> None:
        self.compilations = 0
        self.on_compile = on_compile
        eager = type(model).forward.__get__(model)
        # (torch.compile's typed overloads omit isolate_recompiles; the function takes it)
        self._compiled = torch.compile(  # type: ignore[call-overload]
            eager,
            backend=self._backend,
            fullgraph=True,
            isolate_recompiles=True,  # this model's graphs only: others' never match
            options={"guard_filter_fn": torch.compiler.skip_all_guards_unsafe},
        )
        # (block size, dtype) of the pool the graph was traced with; None: not traced yet.
        self._pool: tuple[int, torch.dtype] | None = None
        self._model = model
        self._forward_code = eager.__func__.__code__
        self._forward_globals = eager.__func__.__globals__
        # forward's bytecode as dynamo rewrote it for this model's graph, as a function of
        # (model, *forward's arguments); None until the trace (or where it was not seen).
        self._direct: Callable[..., torch.Tensor] | None = None

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        pool = (kv_cache.block_size, kv_cache.k[0].dtype)
        if self._pool is None:
            _mark_batch(input_ids, positions, kv_cache, meta)
            hook = torch._dynamo.convert_frame.register_bytecode_hook(self._keep_bytecode)
            try:
                hidden = self._compiled(input_ids, positions, kv_cache, meta)
            finally:
                hook.remove()
            self._pool = pool
            return hidden
        if pool != self._pool:
            raise ValueError(
                f"the step was compiled for a KV pool of {self._pool[0]}-token blocks of "
                f"{self._pool[1]}, not {pool[0]}-token blocks of {pool[1]}"
            )
        if self._direct is not None:
            return self._direct(self._model, input_ids, positions, kv_cache, meta)
        return self._compiled(input_ids, positions, kv_cache, meta)

    def _backend(self, graph: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
        from torch._inductor.compile_fx import compile_fx

        self.compilations += 1
        if self.on_compile is not None:
            self.on_compile("compiling")
        compiled = compile_fx(graph, list(example_inputs), config_patches=INDUCTOR_OPTIONS)
        if self.on_compile is not None:
            self.on_compile("compiled")
        return compiled

    def _keep_bytecode(self, code: types.CodeType, new_code: types.CodeType) -> None:
        """dynamo's bytecode hook, registered for the trace only: keep the rewritten
        forward, which calls the graph this object's backend compiled."""
        if code is not self._forward_code:
            return
        if new_code.co_freevars:  # forward has no closure: not the rewrite expected
            return
        # dynamo put the graph's callable among forward's module globals, where the
        # rewritten bytecode looks it up.
        self._direct = types.FunctionType(new_code, self._forward_globals, "compiled_forward")


def _mark_batch(
    input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata
) -> None:
    """T tokens, S sequences, W blocks per table, NB blocks in the pool: unbacked, so never
    specialised to 0 or 1 and never tied to another dimension that happens to be equal."""
    from torch._dynamo.decorators import mark_unbacked

    for t in (input_ids, positions, meta.slot_mapping):
        mark_unbacked(t, 0, shape_id="tokens")
    mark_unbacked(meta.context_lens, 0, shape_id="seqs")
    mark_unbacked(meta.block_tables, 0, shape_id="seqs")
    mark_unbacked(meta.block_tables, 1)
    mark_unbacked(meta.query_start_loc, 0)
    for cache in (*kv_cache.k, *kv_cache.v):  # (NB, BS, Hkv, D): NB
        mark_unbacked(cache, 0, shape_id="blocks")


def compile_model(
    model: DecoderModel,
    block_size: int = 16,
    progress: bool = True,
    kv_cache_dtype: torch.dtype | None = None,
    fuse: bool = True,
) -> bool:
    """Compile the model's serving step in place (model.forward becomes a CompiledForward)
    for KV caches of block_size tokens per block and kv_cache_dtype (None: the model's
    dtype), and run it on scratch batches, so that the compilation happens now, behind a
    progress bar that ends with its time, and not in the first request. Returns False,
    having logged one line saying why, where the model keeps its eager forward.

    fuse: where the forward fused in C++ serves the model (model/fused_forward.py: PaLM and
    Llama as the server sets them up), it becomes model.forward instead, with nothing to
    compile; fuse=False compiles the graph."""
    reason = unavailable_reason(model)
    if reason is not None:
        logger.warning("the step runs eagerly: %s", reason)
        return False
    if fuse and fused_forward.unavailable_reason(model) is None:
        model.forward = fused_forward.FusedForward(model)  # type: ignore[method-assign]
        logger.info("step fused: the forward runs as one C++ call (palm_cpu::decoder_forward)")
        return True
    cache_dir = use_cache_directory()
    eager_kernels = model.kernels
    # The engine never sends slot -1, so the cache write needs no check (which would be a
    # data-dependent branch, and a graph break).
    model.kernels = dataclasses.replace(eager_kernels, write_kv_cache=scatter_kv_cache)
    started, hits_before = time.perf_counter(), _cache_hits()
    try:
        with _ProgressBar(progress) as bar:
            compiled = _warm_up(model, block_size, kv_cache_dtype, bar)
            how = "loaded from the cache" if _cache_hits() > hits_before else "compiled"
            seconds = time.perf_counter() - started
            bar.finish(f"step {how} in {seconds:.1f} s")
    except Exception as error:  # a compiler error, a graph break: serve eagerly, say why
        model.kernels = eager_kernels
        first = (str(error).strip().splitlines() or [""])[0]
        logger.warning(
            "the step runs eagerly: torch.compile failed (%s: %s)", type(error).__name__, first
        )
        return False
    model.forward = compiled  # type: ignore[method-assign]
    logger.info(
        "step %s in %.1f s (torch.compile, one graph for every batch; cache %s)",
        how,
        seconds,
        cache_dir,
    )
    return True


class _ProgressBar:
    """tqdm over the compilation's three stages: tracing (dynamo), code generation and the
    C++ build (inductor: most of a first start), then a check on a second batch shape."""

    STAGES = ("tracing the step", "inductor: generating and building C++", "checking")

    def __init__(self, enabled: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=len(self.STAGES),
            desc=f"torch.compile: {self.STAGES[0]}",
            unit="stage",
            file=sys.stderr,
            disable=not enabled,
        )

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def stage(self, event: str) -> None:
        """CompiledForward's on_compile: "compiling", then "compiled"."""
        self.bar.update(1)
        self.bar.set_description(f"torch.compile: {self.STAGES[min(self.bar.n, 2)]}")

    def finish(self, message: str) -> None:
        self.bar.update(self.bar.total - self.bar.n)
        self.bar.set_description(f"torch.compile: {message}")


def _warm_up(
    model: DecoderModel, block_size: int, kv_cache_dtype: torch.dtype | None, bar: _ProgressBar
) -> CompiledForward:
    """The compiled forward, having run on every WARM_UP_BATCHES batch with one compilation."""
    compiled = CompiledForward(model, bar.stage)
    param = next(model.parameters())
    num_blocks = sum(-(-n // block_size) for _, contexts in WARM_UP_BATCHES for n in contexts)
    # Allocated outside inference mode, as the engine allocates its pool.
    dtype = kv_cache_dtype or param.dtype
    cache = KVCache.allocate(model.config, num_blocks, block_size, dtype, param.device)
    # automatic_dynamic_shapes off: a model compiled earlier in this process (same code,
    # other weights) must not make this one's weight shapes dynamic.
    with torch.inference_mode(), torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for q_lens, contexts in WARM_UP_BATCHES:
            compiled(*_scratch_batch(list(q_lens), list(contexts), cache))
    if compiled.compilations != 1:
        raise RuntimeError(f"{compiled.compilations} compilations for the warm-up, not one")
    compiled.on_compile = None  # the progress bar is done; no guard can ask for another
    return compiled


def _scratch_batch(
    q_lens: list[int], contexts: list[int], cache: KVCache
) -> tuple[torch.Tensor, torch.Tensor, KVCache, AttentionMetadata]:
    """A batch as ModelRunner.prepare makes one (same dtypes), over consecutive blocks."""
    bs, tables, first = cache.block_size, [], 0
    for n in contexts:
        tables.append(list(range(first, first + -(-n // bs))))
        first += len(tables[-1])
    device = cache.k[0].device
    meta = AttentionMetadata.build(tables, q_lens, contexts, bs, device)
    positions = [p for q, n in zip(q_lens, contexts, strict=True) for p in range(n - q, n)]
    ids = torch.zeros(len(positions), dtype=torch.long, device=device)
    return ids, torch.tensor(positions, dtype=torch.long, device=device), cache, meta


def _cache_hits() -> int:
    """inductor's and AOTAutograd's cache hits so far in this process."""
    from torch._dynamo.utils import counters

    return sum(
        counters[group][key]
        for group, key in (
            ("inductor", "fxgraph_cache_hit"),
            ("aot_autograd", "autograd_cache_hit"),
        )
    )
