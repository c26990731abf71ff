"""The fp32 panel linear (kernels/cpu/panel_linear.cpp) equals x @ w.T computed in fp64, to
fp32 rounding: on rows around its 6-row tiles and its 96-row blocks (48 on AVX2), channels
around its 16-channel panels and 4-panel groups or chunks (a last panel that is partly
padding), odd K, strided rows of x, one thread and two; NaN and infinity reach exactly the
outputs they touch; bad inputs are refused with a message naming what is wrong.
PrepackedLinear and prepack_linears use it where it runs (the model's kernels are the
compiled ones and the CPU has AVX2 or AVX-512). Where the CPU has AVX-512 the same tests run
again on the AVX2 tile, in a process with PALM_CPU_AVX512=0.

The extension must build here (a failed build fails these tests). On a CPU with neither
AVX2 nor AVX-512 the kernel's tests skip, saying so, and the model keeps oneDNN's linear
(test_cpu_linear.py covers that path on every machine)."""

from __future__ import annotations

import pytest
import torch
from avx2_paths import run_on_the_avx2_paths
from torch import nn
from torch_threads import torch_threads

from palm_serve.model.cpu_linear import PrepackedLinear, panels_available

pytestmark = [
    pytest.mark.usefixtures("cpu_kernels_built"),
    pytest.mark.skipif(
        torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
        reason="the panel linear needs AVX2 or AVX-512 (torch reports "
        f"{torch.backends.cpu.get_cpu_capability()} here); oneDNN's linear serves instead",
    ),
]

ROWS = [1, 2, 5, 6, 7, 12, 13, 37]
CHANNELS = [1, 15, 16, 17, 63, 64, 65, 200]


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    packed = torch.ops.palm_cpu.pack_panels(w)
    return torch.ops.palm_cpu.panel_linear(x, packed, w.shape[0])


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    got = _linear(x, w)
    expected = (x.double() @ w.double().T).float()
    assert got.shape == expected.shape and got.dtype == torch.float32
    # fp32 sums of K products, in another order than fp64's: relative to the row's scale.
    scale = (x.double().abs() @ w.double().abs().T).float().clamp_min(1e-30)
    err = ((got - expected).abs() / scale).max().item()
    assert err < 1e-6, err


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows", ROWS)
def test_equals_the_product_in_fp64(rows: int, threads: int) -> None:
    with torch_threads(threads):
        g = torch.Generator().manual_seed(rows)
        for n in CHANNELS:
            for k in (1, 3, 64, 131):
                _check(torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g))


@pytest.mark.parametrize("rows", [95, 96, 97, 191, 289])
def test_rows_across_the_blocks_of_rows(rows: int) -> None:
    g = torch.Generator().manual_seed(100 + rows)
    for n in (17, 130):
        _check(torch.randn(rows, 45, generator=g), torch.randn(n, 45, generator=g))


def test_model_shapes_and_a_vocabulary_head() -> None:
    g = torch.Generator().manual_seed(7)
    for n, k in ((768, 512), (2816, 512), (512, 1408), (32000, 512)):
        _check(torch.randn(16, k, generator=g), torch.randn(n, k, generator=g) * 0.02)


def test_strided_rows_are_read_where_they_lie() -> None:
    g = torch.Generator().manual_seed(3)
    fused = torch.randn(9, 96, generator=g)
    w = torch.randn(40, 32, generator=g)
    _check(fused[:, 32:64], w)  # a slice of a fused projection: row stride 96
    _check(fused.T.contiguous().T[:, :32], w)  # column-major rows: copied first
    assert _linear(torch.empty(0, 32), w).shape == (0, 40)


def test_nan_and_infinity_reach_only_the_outputs_they_touch() -> None:
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(8, 20, generator=g), torch.randn(70, 20, generator=g)
    x[3, 4] = float("nan")
    w[66, 0] = float("inf")
    got = _linear(x, w)
    expected = x @ w.T
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf())
    assert got[3].isnan().all() and got[:, 66].isinf().sum() + got[:, 66].isnan().sum() == 8


def test_bad_inputs_are_refused_with_a_reason() -> None:
    w = torch.randn(20, 8)
    packed = torch.ops.palm_cpu.pack_panels(w)
    with pytest.raises(RuntimeError, match="K = 9"):
        torch.ops.palm_cpu.panel_linear(torch.randn(2, 9), packed, 20)
    with pytest.raises(RuntimeError, match="out_features 33"):
        torch.ops.palm_cpu.panel_linear(torch.randn(2, 8), packed, 33)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.palm_cpu.panel_linear(torch.randn(2, 8).double(), packed, 20)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.palm_cpu.pack_panels(w.half())


def test_prepacked_linear_uses_the_panels_where_they_run() -> None:
    assert panels_available()
    g = torch.Generator().manual_seed(11)
    w, x = torch.randn(50, 24, generator=g), torch.randn(3, 5, 24, generator=g)
    panels, onednn = PrepackedLinear(w, panels=True), PrepackedLinear(w)
    assert panels.packed.shape == (4, 24, 16) and panels.panels and not onednn.panels
    expected = nn.functional.linear(x, w)
    torch.testing.assert_close(panels(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(onednn(x), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_prepack_linears_chooses_the_panels_for_the_compiled_kernels_only() -> None:
    from palm_serve.kernels import select_backend
    from palm_serve.model import AttentionMetadata, KVCache
    from palm_serve.model.cpu_linear import prepack_linears

    from conftest import make_config, make_model

    config = make_config(n_kv_heads=2)
    plain = make_model(config)
    tokens = torch.randint(0, config.vocab_size, (37,)).tolist()

    def logits(model: nn.Module) -> torch.Tensor:
        cache = KVCache.allocate(model.config, 8, 16)
        meta = AttentionMetadata.build([[3, 1, 6, 0]], [len(tokens)], [len(tokens)], 16)
        hidden = model(torch.tensor(tokens), torch.arange(len(tokens)), cache, meta)
        return model.compute_logits(hidden)

    expected = logits(plain)
    for backend, panels in (("cpu", True), ("torch", False)):
        model = make_model(config)
        model.kernels = select_backend(backend, torch.device("cpu"))
        assert prepack_linears(model) == 3 * config.depth + 1
        packed = [m for m in model.modules() if isinstance(m, PrepackedLinear)]
        assert len(packed) == 3 * config.depth + 1 and all(m.panels is panels for m in packed)
        got = logits(model)
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), backend


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512",
    reason="this CPU has no AVX-512, so the tests above already ran the AVX2 tile",
)
def test_the_avx2_tile_passes_the_same_tests_where_the_cpu_has_avx512() -> None:
    ran = 2 * len(ROWS) + 5 + 6  # the product in fp64, the row blocks, the other six
    run_on_the_avx2_paths(__file__, "not avx2_tile", ran)
