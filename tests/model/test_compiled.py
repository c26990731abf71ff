"""The compiled step (model/compiled.py) against the eager one, as the server sets both up
(the compiled CPU kernels, oneDNN-prepacked linears): hidden states and KV caches equal to
1e-5 relative over a run of batches of every kind (prefill chunks, decodes, a mix, a single
decode) with ONE compilation per model; greedy engine output from the compiled model equals
the dense forward's; and where no C++ compiler exists, the eager twins with one log line.

The compiled kernels and torch.compile must work here: a failure fails these tests, it
never skips them. One compilation per model per module keeps the suite's compile time to
that of two tiny models (a first run fills inductor's cache; later runs load from it)."""

from __future__ import annotations

import contextlib
import logging
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from palm_serve.engine.factory import load_served_model
from palm_serve.kernels import cpu_backend
from palm_serve.model import AttentionMetadata, KVCache, Llama, LlamaConfig, save_model_dir
from palm_serve.model.compiled import CompiledForward, cache_directory, compile_model
from palm_serve.model.cpu_linear import prepack_linears
from palm_serve.model.decoder import DecoderModel

sys.path.insert(0, str(Path(__file__).parent.parent / "engine"))  # the engine tests' helpers

import engine_helpers  # noqa: E402
from conftest import make_config, make_model  # noqa: E402
from engine_helpers import check_greedy, greedy, make_engine, run, tokens_of  # noqa: E402

# autouse: one intra-op thread while these tests run (see engine_helpers)
one_torch_thread = engine_helpers.one_torch_thread

RELATIVE = 1e-5
BLOCK_SIZE = 8  # static in the graph: the size the models are compiled for
# Each step: (sequence, new tokens) pairs; a sequence's first entry is its first chunk.
STEPS = [
    [(0, 13), (1, 1), (2, 6)],  # first chunks, one of a single token
    [(0, 1), (1, 1), (2, 1)],  # decodes
    [(0, 1), (3, 21), (1, 1), (2, 9)],  # decodes among a new prompt and a second chunk
    [(3, 1)],  # one decode: T = S = 1
    [(4, 2)],  # one 2-token prompt
    [(s, 1) for s in range(5)],  # every sequence decodes
]


# Fails, never skips, where the C++ kernels did not build (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_kernels_built")


def as_served(model: DecoderModel) -> DecoderModel:
    """What load_served_model does on a CPU with the kernels built (compile aside)."""
    model.kernels = cpu_backend()
    prepack_linears(model)
    return model


def make_llama(seed: int = 0, max_positions: int = 256) -> Llama:
    """A tiny GQA Llama (4 query heads on 2 K/V heads, untied head) with separated logits."""
    config = LlamaConfig(
        vocab_size=101, dim=64, depth=2, heads=4, n_kv_heads=2, dim_head=16, ff_inner=96,
        max_positions=max_positions,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Llama(config)
    torch.nn.init.normal_(model.embed_tokens.weight, std=1.0)
    with torch.no_grad():
        for layer in model.layers:
            layer.qkv_proj.weight.mul_(3.0)
    return model.eval().requires_grad_(False)


class LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def palm_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """(eager, compiled, log records of the compilation): the PaLM test model (MQA) loaded
    from a model directory by load_served_model, as `palm-serve serve` loads it, then its
    graph compiled (fuse=False: the server runs this model's forward fused in C++ instead,
    tests/model/test_fused_forward.py; the graph serves the models that cannot be fused)."""
    model_dir = tmp_path_factory.mktemp("palm")
    source = make_model(make_config())
    save_model_dir(model_dir, source.config, source.state_dict())
    eager = load_served_model(model_dir, prepack_cpu_linears=True)
    compiled = load_served_model(model_dir, prepack_cpu_linears=True)
    logs = LogRecords()
    logger = logging.getLogger("palm_serve")
    logger.addHandler(logs)
    logger.setLevel(logging.INFO)
    try:
        assert compile_model(compiled, BLOCK_SIZE, progress=False, fuse=False)
    finally:
        logger.removeHandler(logs)
        logger.setLevel(logging.NOTSET)
    yield eager, compiled, logs.records


@pytest.fixture(scope="module")
def llama_pair() -> tuple:
    eager, compiled = as_served(make_llama()), as_served(make_llama())
    assert compile_model(compiled, BLOCK_SIZE, progress=False, fuse=False)  # the graph
    return eager, compiled, []


def step_batches(
    vocab_size: int, steps: list[list[tuple[int, int]]] = STEPS, num_blocks: int = 40
) -> Iterator[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]]:
    """steps as flat batches (ids, positions, metadata) over shuffled, disjoint blocks of a
    pool of num_blocks."""
    rng = random.Random(0)
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables: dict[int, list[int]] = {}
    done: dict[int, int] = {}
    for step in steps:
        ids, positions, q_lens, contexts = [], [], [], []
        for seq, new in step:
            start = done.get(seq, 0)
            done[seq] = start + new
            table = tables.setdefault(seq, [])
            while len(table) * BLOCK_SIZE < done[seq]:
                table.append(pool.pop())
            ids += [rng.randrange(vocab_size) for _ in range(new)]
            positions += range(start, done[seq])
            q_lens.append(new)
            contexts.append(done[seq])
        meta = AttentionMetadata.build([tables[s] for s, _ in step], q_lens, contexts, BLOCK_SIZE)
        yield torch.tensor(ids), torch.tensor(positions), meta


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Max difference within RELATIVE of the expected tensor's largest magnitude."""
    scale = expected.abs().max().item()
    assert (actual - expected).abs().max().item() <= RELATIVE * scale


@pytest.mark.parametrize("pair", ["palm_pair", "llama_pair"])
def test_compiled_step_equals_eager_with_one_compilation(
    pair: str, request: pytest.FixtureRequest
) -> None:
    eager, compiled, _ = request.getfixturevalue(pair)
    assert isinstance(compiled.forward, CompiledForward)
    config = eager.config
    # The pools are allocated outside inference mode, as the engine allocates its pool.
    caches = [KVCache.allocate(config, 40, BLOCK_SIZE) for _ in range(2)]
    for cache in caches:
        for t in (*cache.k, *cache.v):
            t.fill_(float("nan"))  # slots never written must never be read
    with torch.inference_mode():
        for ids, positions, meta in step_batches(config.vocab_size):
            expected = eager(ids, positions, caches[0], meta)
            actual = compiled(ids, positions, caches[1], meta)
            assert actual.shape == expected.shape
            assert_close(actual, expected)
            rows = meta.last_token_indices()
            assert_close(
                compiled.compute_logits(actual[rows]), eager.compute_logits(expected[rows])
            )
    written = ~caches[0].k[0].isnan()
    for ours, theirs in zip(caches[1].k + caches[1].v, caches[0].k + caches[0].v, strict=True):
        assert_close(ours[written], theirs[written])  # written in place, where eager writes
    assert compiled.forward.compilations == 1, "one graph for every batch"


def test_later_steps_run_the_graph_without_torch_compile(
    palm_pair: tuple, llama_pair: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its trace, a step runs dynamo's rewrite of forward as a plain function, not
    through torch.compile's frame evaluation. With both models compiled in this process
    (PaLM and Llama share DecoderModel.forward's code), each must run its own graph: equal
    to its eager twin with torch.compile's entry point taken away."""
    for eager, compiled, _ in (palm_pair, llama_pair):

        def through_torch_compile(*args: object) -> None:
            raise AssertionError("a later step went through torch.compile")

        monkeypatch.setattr(compiled.forward, "_compiled", through_torch_compile)
        caches = [KVCache.allocate(eager.config, 40, BLOCK_SIZE) for _ in range(2)]
        with torch.inference_mode():
            for ids, positions, meta in step_batches(eager.config.vocab_size):
                expected = eager(ids, positions, caches[0], meta)
                assert_close(compiled(ids, positions, caches[1], meta), expected)
        assert compiled.forward.compilations == 1


def _proc_status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def test_the_compiled_step_writes_the_pool_in_place(palm_pair: tuple) -> None:
    """The cache write is fused into the rotary kernel and writes the pool's tensors in
    place: no copy of the pool (a symbolic block size once made inductor copy every layer's
    K and V, 7x slower steps). The process's peak RSS, reset before the step, must not grow
    by a pool tensor's size (32 MiB here)."""
    _, compiled, _ = palm_pair
    pool = KVCache.allocate(compiled.config, 65536, BLOCK_SIZE)
    with torch.inference_mode():
        meta = AttentionMetadata.build([[5, 9]], [3], [12], BLOCK_SIZE)
        ids, positions = torch.tensor([1, 2, 3]), torch.tensor([9, 10, 11])
        compiled(ids, positions, pool, meta)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = _proc_status_bytes("VmRSS")
        compiled(ids, positions, pool, meta)
        growth = _proc_status_bytes("VmHWM") - before
    assert growth < pool.k[0].nbytes // 4, f"the step's peak memory grew by {growth} bytes"
    assert compiled.forward.compilations == 1


def test_a_pool_unlike_the_compiled_one_is_refused(palm_pair: tuple) -> None:
    """The graph keeps no guards, so the block size and dtype it was compiled for are
    checked by the call: another pool gets a ValueError naming both, and never runs (a
    graph of 8-token blocks over 16-token blocks would read the wrong slots)."""
    _, compiled, _ = palm_pair
    config = compiled.config
    meta = AttentionMetadata.build([[1]], [3], [3], 2 * BLOCK_SIZE)
    ids, positions = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    for block_size, dtype in ((2 * BLOCK_SIZE, torch.float32), (BLOCK_SIZE, torch.bfloat16)):
        pool = KVCache.allocate(config, 4, block_size, dtype)
        with torch.inference_mode(), pytest.raises(ValueError) as refused:
            compiled(ids, positions, pool, meta)
        assert f"{BLOCK_SIZE}-token blocks of torch.float32" in str(refused.value)
        assert f"{block_size}-token blocks of {dtype}" in str(refused.value)
        assert all(t.eq(0).all() for t in (*pool.k, *pool.v)), "the refused step wrote"
    assert compiled.forward.compilations == 1


def test_start_up_states_the_compilation_and_its_time(palm_pair: tuple) -> None:
    _, compiled, records = palm_pair
    assert compiled.kernels.name == "cpu"
    lines = [r.getMessage() for r in records if r.name == "palm_serve.model.compiled"]
    assert len(lines) == 1, lines
    assert lines[0].startswith(("step compiled in ", "step loaded from the cache in "))
    assert " s (torch.compile" in lines[0]


def check_engine_greedy(model: DecoderModel) -> None:
    """Random prompts (chunked prefill, decodes, late arrivals) through the engine on the
    model: every token is the dense forward's greedy choice."""
    engine = make_engine(
        model, num_blocks=256, block_size=BLOCK_SIZE, max_num_batched_tokens=64, max_num_seqs=6
    )
    rng = random.Random(3)
    arrivals: dict[int, list] = {}
    prompts = {}
    for i in range(8):
        prompt = [rng.randrange(97) for _ in range(rng.randint(1, 90))]
        prompts[f"r{i}"] = prompt
        arrivals.setdefault(rng.randrange(6), []).append((f"r{i}", prompt, greedy(12)))
    outputs = run(engine, arrivals)
    assert set(outputs) == set(prompts)
    for request_id, outs in outputs.items():
        check_greedy(model, prompts[request_id], tokens_of(outs))


def test_engine_greedy_output_with_the_compiled_model(palm_pair: tuple) -> None:
    """check_engine_greedy on the compiled model; still one graph."""
    _, compiled, _ = palm_pair
    check_engine_greedy(compiled)
    assert compiled.forward.compilations == 1


@contextlib.contextmanager
def _no_compiler(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """CXX pointing to a missing binary, for inductor (which read CXX when imported) and
    for the kernels' build. Inductor's setting through its own patch: monkeypatch would
    delete it on undo (it restores what the proxy's __dict__ held: nothing), which hides it
    from every later reader in the process."""
    from torch._inductor import config

    missing = "/nonexistent/c++"
    monkeypatch.setenv("CXX", missing)
    with config.patch({"cpp.cxx": (None, missing)}):
        yield


def test_no_cxx_compiler_serves_the_eager_twins_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_model(make_config())
    save_model_dir(tmp_path, source.config, source.state_dict())
    with _no_compiler(monkeypatch), caplog.at_level(logging.INFO, logger="palm_serve"):
        model = load_served_model(tmp_path, prepack_cpu_linears=True, compile=True)
    assert model.kernels.name == "torch"
    assert "forward" not in vars(model)  # the eager forward
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "no C++ compiler" in lines[0] and "eager" in lines[0]
    ids, positions, meta = next(step_batches(model.config.vocab_size))
    cache = KVCache.allocate(model.config, 40, BLOCK_SIZE)
    with torch.inference_mode():
        hidden = model(ids, positions, cache, meta)
    assert hidden.shape == (len(ids), model.config.dim)


def test_a_backend_without_the_compiled_kernels_stays_eager_with_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = make_model(make_config())  # the torch twins
    with caplog.at_level(logging.INFO, logger="palm_serve"):
        assert not compile_model(model, progress=False)
    assert "forward" not in vars(model)
    assert [r.getMessage() for r in caplog.records] == [
        "the step runs eagerly: it needs the compiled CPU kernels, not the torch backend"
    ]


def test_the_cache_lives_in_palm_serves_cache_unless_the_user_chose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    ours = tmp_path / "palm-serve" / "inductor"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert cache_directory() == ours
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # inductor's own /tmp
    assert cache_directory() == ours
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_directory() == tmp_path / "mine"
