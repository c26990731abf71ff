"""How far one decode step of the engine is from its matrix multiplies alone.

For each model and batch size B (1-64): the wall time of one engine decode step (scheduler,
runner, model, sampler, detokenizer: `LLMEngine.step()`) with B sequences holding
--prompt-len tokens each, against the time of the same step's weight matmuls alone: the
model's own linear modules called on [B, in] inputs, same threads. The model is set up as
the server sets it up, so with --cpu-prepacked-linears (the default) both sides use the
oneDNN-prepacked weights; --no-prepack compares plain nn.Linear with F.linear. The ratio is
the engine's overhead: attention over the paged cache, rotary, norms, Python. The step is
also split into model.forward and runner.execute, by timing wrappers, and the core's share
(`EngineCore.step()`: all but the front's detokenization and outputs, which the served
engine runs in another process) is given with its own ratio to the matmuls. The engine
plans decodes as the server does, up to num_scheduler_steps forward passes per
`LLMEngine.step()`, so every figure is per forward pass (a token for every sequence): a
step's time over its passes. --scheduler-steps N adds the same steps planned up to N passes
at a time (1: one pass per step), interleaved with them.

With --compile, every batch size is measured on two copies of each model, the eager step
and the compiled one (model/compiled.py, as `palm-serve serve --compile` runs it),
interleaved (eager, compiled, matmuls) --repeats times; each cell is the median over the
repeats of the per-repeat medians. --kv-cache-dtype bfloat16 (or float16) adds the same
steps over a 16-bit KV cache (`palm-serve serve --kv-cache-dtype`), interleaved with them.

    .venv/bin/python bench/roofline.py [--threads 2] [--prompt-len 32] [--profile 32]
        [--compile] [--int8] [--kv-cache-dtype bfloat16] [--repeats 5]
        [--kernel-backend auto] [--clock cpu --threads 1] [--scheduler-steps 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from clocks import CLOCKS, add_clock_argument, chosen_clock
from torch import nn

from palm_serve.engine.config import EngineConfig
from palm_serve.engine.factory import build_llm_engine, load_served_model
from palm_serve.engine.heap import freeze_startup_heap
from palm_serve.engine.llm_engine import LLMEngine
from palm_serve.engine.sampling_params import SamplingParams
from palm_serve.kernels import select_backend
from palm_serve.model import PaLM, PaLMConfig, load_tokenizer
from palm_serve.model.compiled import compile_model
from palm_serve.model.cpu_linear import PrepackedLinear, prepack_linears

REPO = Path(__file__).resolve().parent.parent
clock = CLOCKS["wall"]  # --clock: chosen in main()
BATCHES = (1, 2, 4, 8, 16, 32, 64)
PROMPT_LEN = 32


def models(
    args,
    compile: bool = False,
    quantization: str = "none",
    kv_cache_dtype: str | None = None,
    fuse: bool = True,
) -> dict[str, tuple[nn.Module, object]]:
    """Each model as the server sets it up (kernel backend, prepacked linears, compiled or
    not); fuse=False: the torch.compile graph even where the fused PaLM forward serves."""
    out = {}
    palm_dir = REPO / "model" / "default"
    if (palm_dir / "model.safetensors").is_file():
        out["palm-default"] = _load(palm_dir, args, compile, quantization, kv_cache_dtype, fuse)
    else:  # the colleague's trained default is not there yet: a random PaLM of similar size
        config = PaLMConfig(vocab_size=32000, dim=512, depth=8, heads=8, dim_head=64)
        torch.manual_seed(0)
        backend = select_backend(args.kernel_backend, torch.device("cpu"))
        model = PaLM(config, backend).eval().requires_grad_(False)
        if not args.no_prepack:
            prepack_linears(model)
        if compile:
            cache_dtype = kv_cache_dtype and getattr(torch, kv_cache_dtype)
            compile_model(model, kv_cache_dtype=cache_dtype, fuse=fuse)
        out["palm-random (no model/default)"] = (model, _Ids(32000))
    llama_dir = REPO / "bench" / ".venvs" / "models" / "tiny-llama"
    if (llama_dir / "model.safetensors").is_file():
        out["tiny-llama"] = _load(llama_dir, args, compile, quantization, kv_cache_dtype, fuse)
    return out


def _load(
    path: Path,
    args,
    compile: bool,
    quantization: str = "none",
    kv_cache_dtype: str | None = None,
    fuse: bool = True,
):
    model = load_served_model(
        path,
        kernel_backend=args.kernel_backend,
        prepack_cpu_linears=not args.no_prepack,
        compile=compile,
        fused_step=fuse,
        quantization=quantization,
        kv_cache_dtype=kv_cache_dtype,
    )
    return model.eval().requires_grad_(False), load_tokenizer(path, model.config.vocab_size)


class _Ids:
    """A tokenizer stand-in for a random model: token i decodes to one letter."""

    eos_token_id = bos_token_id = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [ord(c) % self.vocab_size for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def matmuls(model: nn.Module) -> list[tuple[int, object]]:
    """Every matmul a decode step runs, as (in_features, callable): the model's linear
    modules (prepacked or not, as the model holds them; the logits head among them when
    it is a module), else its tied logits matrix."""
    out = []
    for module in model.modules():
        if isinstance(module, PrepackedLinear | nn.Linear):
            out.append((module.in_features, module))
    if model.logits_head is None:  # F.linear on the embedding, as compute_logits does
        weight = model.embedding.weight
        out.append((weight.shape[1], lambda x, w=weight: F.linear(x, w)))
    return out


@torch.inference_mode()
def time_matmuls(model: nn.Module, batch: int, repeats: int) -> float:
    ops = matmuls(model)
    inputs = {n: torch.randn(batch, n) for n, _ in ops}
    for n, op in ops:  # warm-up
        op(inputs[n])
    samples = []
    for _ in range(repeats):
        t0 = clock()
        for n, op in ops:
            op(inputs[n])
        samples.append(clock() - t0)
    return statistics.median(samples)


def _parameters(model: nn.Module) -> int:
    """Parameters, the prepacked weights included (no longer nn.Parameters), a head tied to
    the embedding once."""
    tied = getattr(model.config, "tie_word_embeddings", True)
    return sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features
        for m in model.modules()
        if isinstance(m, PrepackedLinear) and not (tied and m is model.logits_head)
    )


class Timer:
    """Wraps a bound method and adds up its wall time."""

    def __init__(self, obj: object, name: str) -> None:
        self.total, self.fn = 0.0, getattr(obj, name)
        # What to put back: an instance attribute (a compiled forward), else nothing (the
        # class's method).
        self.obj, self.name, self.before = obj, name, vars(obj).get(name)
        setattr(obj, name, self)

    def restore(self) -> None:
        if self.before is None:
            delattr(self.obj, self.name)
        else:
            setattr(self.obj, self.name, self.before)

    def __call__(self, *args, **kwargs):
        t0 = clock()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.total += clock() - t0


def decoding_engine(
    model,
    tokenizer,
    batch: int,
    steps: int,
    prompt_len: int = PROMPT_LEN,
    setup=None,
    kv_cache_dtype: str | None = None,
    num_scheduler_steps: int | None = None,
) -> LLMEngine:
    """An engine whose `batch` sequences (random prompts of prompt_len) are prefilled and
    have taken two decode steps, with room for `steps` more forward passes, planned up to
    num_scheduler_steps at a time (None: the engine's default, as the server plans them);
    setup(engine), if given, is called on the engine before its first request."""
    passes = num_scheduler_steps or EngineConfig.num_scheduler_steps
    blocks_per_seq = (prompt_len + steps + 2 * passes + 8) // 16 + 2
    config = EngineConfig(
        num_blocks=batch * blocks_per_seq + 8,
        max_num_seqs=max(batch, 1),
        max_num_batched_tokens=max(2048, prompt_len),
        kv_cache_dtype=kv_cache_dtype,
        num_scheduler_steps=passes,
    )
    engine = build_llm_engine(model, tokenizer, config, seed=0)
    if setup is not None:
        setup(engine)
    params = SamplingParams(max_tokens=steps + 2 * passes + 8, temperature=0.0, ignore_eos=True)
    gen = torch.Generator().manual_seed(batch)
    for i in range(batch):
        prompt = torch.randint(3, model.config.vocab_size, (prompt_len,), generator=gen)
        engine.add_request(f"r{i}", prompt.tolist(), params)
    while engine.core.scheduler.waiting:  # prefill everyone, then measure pure decode steps
        engine.step()
    for _ in range(2):
        engine.step()
    return engine


def time_engine_step(engine: LLMEngine, steps: int) -> dict[str, float]:
    """Per decode forward pass (a token for every sequence): the median over engine steps
    of a decoding_engine (made with room for `steps` passes) of each step's time over its
    passes, and the mean time per pass in its core, runner, model forward and logits."""
    model = engine.core.runner.model
    counters = engine.core.counters
    core = Timer(engine.core, "step")
    runner = Timer(engine.core.runner, "execute")
    forward = Timer(model, "forward")
    logits = Timer(model, "compute_logits")
    samples = []
    passes = 0
    try:
        while passes < steps:
            before = counters.num_steps
            t0 = clock()
            engine.step()
            elapsed = clock() - t0
            ran = counters.num_steps - before
            samples.append(elapsed / ran)
            passes += ran
    finally:
        forward.restore()
        logits.restore()
    return {
        "step": statistics.median(samples),
        "core": core.total / passes,
        "runner": runner.total / passes,
        "forward": forward.total / passes,
        "logits": logits.total / passes,
    }


def profile_step(
    model,
    tokenizer,
    batch: int,
    prompt_len: int,
    kv_cache_dtype: str | None = None,
    num_scheduler_steps: int | None = None,
) -> str:
    """torch.profiler over a few decode steps: where the non-matmul time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine = decoding_engine(
            model, tokenizer, batch, 5, prompt_len, None, kv_cache_dtype, num_scheduler_steps
        )
        time_engine_step(engine, 5)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    p.add_argument("--prompt-len", type=int, default=PROMPT_LEN, help="tokens per sequence")
    p.add_argument("--no-prepack", action="store_true", help="plain nn.Linear and F.linear")
    p.add_argument("--kernel-backend", default="auto", help="auto, cpu or torch")
    p.add_argument("--compile", action="store_true", help="the compiled step beside the eager")
    p.add_argument(
        "--graph",
        action="store_true",
        help="with --compile: the torch.compile graph too where the fused PaLM forward serves",
    )
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats per batch")
    p.add_argument("--int8", action="store_true", help="the eager step with int8 linears too")
    p.add_argument(
        "--kv-cache-dtype",
        choices=["bfloat16", "float16"],
        help="the steps over a KV cache of this dtype too",
    )
    p.add_argument(
        "--scheduler-steps",
        type=int,
        help="N: the steps planned up to N forward passes at a time too (num_scheduler_steps; "
        "the served default otherwise)",
    )
    add_clock_argument(p)
    p.add_argument("--profile", type=int, default=0, help="profile this batch size too")
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "roofline.json")
    args = p.parse_args()
    global clock
    clock = chosen_clock(p, args)
    torch.set_num_threads(args.threads)
    eager = models(args)
    compiled = models(args, compile=True) if args.compile else {}
    graph = models(args, compile=True, fuse=False) if args.compile and args.graph else {}
    int8 = models(args, quantization="int8") if args.int8 else {}
    kv = args.kv_cache_dtype
    compiled_kv = models(args, compile=True, kv_cache_dtype=kv) if kv and args.compile else {}
    freeze_startup_heap()  # as the served core does once its model is up
    rows = []
    for name, (model, tokenizer) in eager.items():
        # variant: (model, its KV cache's dtype (None: the model's), most passes per plan
        # (None: the served default))
        variants: dict[str, tuple[nn.Module, str | None, int | None]] = {
            "eager": (model, None, None)
        }
        if name in compiled:
            variants["compiled"] = (compiled[name][0], None, None)
        if name in graph and not isinstance(
            graph[name][0].forward, type(compiled[name][0].forward)
        ):
            variants["compiled graph"] = (graph[name][0], None, None)
        if name in int8:
            variants["int8"] = (int8[name][0], None, None)
        if kv:
            variants[f"eager, {kv} KV"] = (model, kv, None)
        if name in compiled_kv:
            variants[f"compiled, {kv} KV"] = (compiled_kv[name][0], kv, None)
        if args.scheduler_steps:
            for variant, (m, cache_dtype, _) in list(variants.items()):
                variants[f"{variant}, {args.scheduler_steps} passes"] = (
                    m,
                    cache_dtype,
                    args.scheduler_steps,
                )
        prepacked = sum(isinstance(m, PrepackedLinear) for m in model.modules())
        params = _parameters(model) / 1e6
        print(
            f"\n## {name}: {params:.1f}M params, {args.threads} threads, decode with "
            f"{args.prompt_len}-token prompts, {prepacked} prepacked linears, "
            f"{model.kernels.name} kernels; medians of {args.repeats} interleaved repeats, "
            f"{args.clock} time"
        )
        print(
            "| batch | step | engine step ms | core.step ms | runner.execute ms "
            "| model.forward ms | compute_logits ms | matmuls ms | step / matmuls "
            "| core / matmuls |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        for batch in map(int, args.batches.split(",")):
            runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
            floors = []
            for _ in range(args.repeats):
                for variant, (m, cache_dtype, passes) in variants.items():
                    runs[variant].append(
                        time_engine_step(
                            decoding_engine(
                                m,
                                tokenizer,
                                batch,
                                args.steps,
                                args.prompt_len,
                                kv_cache_dtype=cache_dtype,
                                num_scheduler_steps=passes,
                            ),
                            args.steps,
                        )  # fmt: skip
                    )
                floors.append(time_matmuls(model, batch, max(args.steps, 10)))
            mm = statistics.median(floors)
            for variant, samples in runs.items():
                t = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
                ratios = sorted(s["step"] / f for s, f in zip(samples, floors, strict=True))
                rows.append(
                    {"model": name, "step_kind": variant, "batch": batch,
                     "prompt_len": args.prompt_len, **t, "matmuls": mm, "ratios": ratios}
                )  # fmt: skip
                cells = [t["step"], t["core"], t["runner"], t["forward"], t["logits"], mm]
                spread = f" ({', '.join(f'{r:.2f}' for r in ratios)})" if len(ratios) > 1 else ""
                print(
                    f"| {batch} | {variant} | "
                    + " | ".join(f"{c * 1e3:.1f}" for c in cells)
                    + f" | {t['step'] / mm:.2f}x{spread} | {t['core'] / mm:.2f}x |",
                    flush=True,
                )
        if args.profile:
            for variant, (m, cache_dtype, passes) in variants.items():
                print(f"\n### {name}, {variant}: torch.profiler, batch {args.profile}\n```")
                print(
                    profile_step(m, tokenizer, args.profile, args.prompt_len, cache_dtype, passes)
                )
                print("```")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
