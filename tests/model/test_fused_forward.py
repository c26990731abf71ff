"""The forward fused in C++ (model/fused_forward.py, kernels/cpu/decoder_forward.cpp)
against the eager forward over the same kernels, as the server sets both up: hidden states,
logits and the KV caches written equal to 1e-5 relative over batches of every kind (prefill
chunks, decodes, a mix, a single decode) into NaN-poisoned pools, at one thread and at four
(where long contexts split across threads and every layer's splits merge), on the MQA PaLM
test model, on a GQA PaLM with xPos and the "gamma_plus_one" norms, and on a GQA Llama;
over a 16-bit cache; greedy engine output against the dense forward; which models it
refuses; bad input refused with the field named. The AVX2 paths run again in a process of
their own where the CPU has AVX-512. The compiled kernels must have built here: a failure
fails, never skips."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from palm_serve.engine.factory import load_served_model
from palm_serve.model import AttentionMetadata, KVCache, save_model_dir
from palm_serve.model.compiled import CompiledForward
from palm_serve.model.config import PaLMConfig
from palm_serve.model.decoder import DecoderModel
from palm_serve.model.fused_forward import FusedForward, unavailable_reason

sys.path.insert(0, str(Path(__file__).parent.parent / "engine"))  # the engine tests' helpers
sys.path.insert(0, str(Path(__file__).parent.parent / "kernels"))

from avx2_paths import run_on_the_avx2_paths  # noqa: E402
from test_compiled import as_served, check_engine_greedy, make_llama, step_batches  # noqa: E402

import engine_helpers  # noqa: E402
from conftest import make_config, make_model  # noqa: E402

# autouse: one intra-op thread while these tests run, unless a test sets more (see
# engine_helpers)
one_torch_thread = engine_helpers.one_torch_thread
pytestmark = pytest.mark.usefixtures("cpu_kernels_built")

RELATIVE = 1e-5
BLOCK_SIZE = 8
# Each step: (sequence, new tokens); a sequence's first entry is its first chunk. Sequence 5
# grows past 300 tokens, enough for its attention to split across threads.
STEPS = [
    [(0, 13), (1, 1), (2, 6)],
    [(0, 1), (1, 1), (2, 1)],
    [(0, 1), (3, 21), (1, 1), (2, 9)],
    [(3, 1)],
    [(4, 2)],
    [(5, 290), (0, 1)],
    [(s, 1) for s in range(6)],
    [(5, 17), (4, 1), (3, 5)],
]


def gqa_xpos_config() -> PaLMConfig:
    """4 query heads on 2 K/V heads, xPos, weight + 1 norms, odd sizes (dim 40, head_dim 10:
    the attention's per-head step, a panel's ragged last 8 columns)."""
    return PaLMConfig(
        vocab_size=67, dim=40, depth=3, heads=4, dim_head=10, n_kv_heads=2, ff_mult=3,
        use_xpos=True, layernorm_style="gamma_plus_one", max_positions=512,
    )  # fmt: skip


def served_pair(config: str) -> tuple[DecoderModel, DecoderModel]:
    """(eager, fused): two copies of one random model ("mqa", "gqa_xpos": PaLMs; "llama"),
    as the server sets them up."""
    if config == "llama":
        # contexts to 512: the long sequence of STEPS
        eager, fused = (as_served(make_llama(max_positions=512)) for _ in range(2))
    else:
        palm_config = make_config() if config == "mqa" else gqa_xpos_config()
        eager, fused = (as_served(make_model(palm_config)) for _ in range(2))
    fused.load_state_dict(eager.state_dict())
    with torch.no_grad():  # norms away from 1, so that a wrong norm weight shows
        for a, b in zip(eager.parameters(), fused.parameters(), strict=True):
            if a.dim() == 1:
                a.uniform_(-0.5, 1.5)
                b.copy_(a)
    fused.forward = FusedForward(fused)  # type: ignore[method-assign]
    return eager, fused


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Max difference over the expected tensor's largest magnitude."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def run_both(
    eager: DecoderModel, fused: DecoderModel, cache_dtype: torch.dtype = torch.float32
) -> tuple[float, float]:
    """Every step batch through both, from NaN-poisoned pools (a slot never written must
    never be read): the worst relative error of the hidden states and logits, and of the
    cache entries written."""
    caches = [KVCache.allocate(eager.config, 120, BLOCK_SIZE, cache_dtype) for _ in range(2)]
    for cache in caches:
        for t in (*cache.k, *cache.v):
            t.fill_(float("nan"))
    worst = 0.0
    with torch.inference_mode():
        for ids, positions, meta in step_batches(eager.config.vocab_size, STEPS, 120):
            expected = eager(ids, positions, caches[0], meta)
            actual = fused(ids, positions, caches[1], meta)
            assert actual.shape == expected.shape
            rows = meta.last_token_indices()
            logits = fused.compute_logits(actual[rows]), eager.compute_logits(expected[rows])
            worst = max(worst, relative_error(actual, expected), relative_error(*logits))
    written = ~caches[0].k[0].isnan()
    assert written.any() and bool((caches[1].k[0].isnan() == ~written).all())
    cache_worst = max(
        relative_error(ours[written].float(), theirs[written].float())
        for ours, theirs in zip(caches[1].k + caches[1].v, caches[0].k + caches[0].v, strict=True)
    )
    return worst, cache_worst


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("config", ["mqa", "gqa_xpos", "llama"])
def test_fused_forward_equals_eager_fp32(config: str, threads: int) -> None:
    torch.set_num_threads(threads)
    eager, fused = served_pair(config)
    worst, cache_worst = run_both(eager, fused)
    assert worst <= RELATIVE and cache_worst <= RELATIVE, (worst, cache_worst)


@pytest.mark.parametrize("config", ["gqa_xpos", "llama"])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
def test_fused_forward_over_a_16_bit_cache(cache_dtype: torch.dtype, config: str) -> None:
    """A 16-bit cache rounds K and V, so a difference in the last fp32 bit upstream may move
    a value by one 16-bit step: 1e-3 relative, far below what a wrong conversion gives."""
    torch.set_num_threads(2)
    eager, fused = served_pair(config)
    worst, cache_worst = run_both(eager, fused, cache_dtype)
    assert worst <= 1e-3 and cache_worst <= 1e-2, (worst, cache_worst)


@pytest.mark.parametrize("config", ["mqa", "llama"])
def test_engine_greedy_output_with_the_fused_model(config: str) -> None:
    """test_compiled's check_engine_greedy (chunked prefill, decodes, late arrivals, several
    passes a step) on the fused model at two threads."""
    torch.set_num_threads(2)
    _, fused = served_pair(config)
    check_engine_greedy(fused)


def test_compile_model_fuses_unless_told_not_to(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The served path: load_served_model(compile=True) gives a PaLM the fused forward, with
    one log line; fused_step=False (--no-fused-step) gets the torch.compile graph."""
    source = make_model(make_config())
    save_model_dir(tmp_path, source.config, source.state_dict())
    with caplog.at_level(logging.INFO, logger="palm_serve.model.compiled"):
        model = load_served_model(tmp_path, prepack_cpu_linears=True, compile=True)
    assert isinstance(model.forward, FusedForward)
    assert [r.getMessage() for r in caplog.records] == [
        "step fused: the forward runs as one C++ call (palm_cpu::decoder_forward)"
    ]
    graph = load_served_model(
        tmp_path, prepack_cpu_linears=True, compile=True, fused_step=False, block_size=BLOCK_SIZE
    )
    assert isinstance(graph.forward, CompiledForward)


def test_models_it_cannot_serve_are_named() -> None:
    plain = make_model(make_config())  # the torch twins, unpacked linears
    assert "compiled CPU kernels" in (unavailable_reason(plain) or "")
    rms = as_served(make_model(make_config(qk_rmsnorm=True)))
    assert unavailable_reason(rms) == "it has no qk RMSNorm"
    unpacked = make_model(make_config())
    unpacked.kernels = as_served(make_model(make_config())).kernels
    assert "panels" in (unavailable_reason(unpacked) or "")
    sharded = as_served(make_model(make_config()))
    sharded.layers[1].reduce = lambda x: x
    assert "tensor-parallel" in (unavailable_reason(sharded) or "")
    assert "PaLM and Llama" in (unavailable_reason(torch.nn.Linear(2, 2)) or "")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="qk RMSNorm"):
        FusedForward(rms)


@pytest.mark.parametrize(
    ("field", "bad"),
    [("input id", "ids"), ("position", "positions"), ("slot", "slots"), ("block id", "tables")],
)
def test_bad_batches_are_refused_naming_the_field(field: str, bad: str) -> None:
    """Out-of-range ids, positions, slots or block ids: a RuntimeError naming the field,
    before anything is read or written through them (the pool stays zero)."""
    _, fused = served_pair("mqa")
    cache = KVCache.allocate(fused.config, 4, BLOCK_SIZE)
    ids, positions = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    tables = [[1]]
    if bad == "ids":
        ids = torch.tensor([1, fused.config.vocab_size, 3])
    elif bad == "positions":
        positions = torch.tensor([0, 1, fused.config.max_positions])
    elif bad == "tables":
        tables = [[4]]
    meta = AttentionMetadata.build(tables, [3], [3], BLOCK_SIZE)
    if bad == "slots":
        meta.slot_mapping = torch.tensor([8, 9, 4 * BLOCK_SIZE])
    elif bad == "tables":  # slots inside the pool, the table's block outside it
        meta.slot_mapping = torch.tensor([8, 9, 10])
    with torch.inference_mode(), pytest.raises(RuntimeError, match=field):
        fused(ids, positions, cache, meta)
    assert all(t.eq(0).all() for t in (*cache.k, *cache.v))


@pytest.mark.skipif(
    not torch.backends.cpu.get_cpu_capability().startswith("AVX512"),
    reason="this CPU has no AVX-512, so the tests above already ran the AVX2 paths",
)
def test_avx2_paths_equal_eager_where_the_cpu_has_avx512() -> None:
    """PALM_CPU_AVX512=0 keeps the linears and the attention to their AVX2 paths: in a
    process of its own, the fp32 cases above pass on them too."""
    run_on_the_avx2_paths(__file__, "equals_eager_fp32", 6)
