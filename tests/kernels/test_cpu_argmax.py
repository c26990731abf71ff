"""The compiled row argmax (kernels/cpu/argmax.cpp) equals torch.argmax, its twin: the
first index of each row's maximum, on widths around the 8-lane vectors, ties, infinities,
rows that are all -inf (a grammar that masked everything), NaN anywhere (torch ranks NaN
above every number: the first NaN wins), strided rows; one thread and two. The extension
must build here: a failed build fails these tests, it never skips them."""

from __future__ import annotations

import pytest
import torch
from torch_threads import torch_threads

from palm_serve.kernels import select_backend
from palm_serve.kernels.cpu import argmax_rows

pytestmark = pytest.mark.usefixtures("cpu_kernels_built")

WIDTHS = [1, 7, 8, 9, 15, 16, 17, 33, 1000, 32000]
INF = float("inf")
NAN = float("nan")


def _check(x: torch.Tensor) -> None:
    expected = x.argmax(dim=-1)
    got = argmax_rows(x)
    assert got.dtype == torch.int64 and torch.equal(got, expected), (x, got, expected)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("width", WIDTHS)
def test_random_rows(width: int, threads: int) -> None:
    with torch_threads(threads):
        g = torch.Generator().manual_seed(width)
        for rows in (1, 3, 17):
            _check(torch.randn(rows, width, generator=g))


@pytest.mark.parametrize("width", WIDTHS)
def test_ties_infinities_and_nans_at_every_position_of_the_vectors(width: int) -> None:
    g = torch.Generator().manual_seed(1000 + width)
    positions = sorted({0, width // 2, width - 1, min(8, width - 1), max(0, width - 9)})
    for special in (INF, -INF, NAN, 5.0):
        for first in positions:
            x = torch.randn(4, width, generator=g)
            x[0, first] = special  # once
            x[1, first:] = special  # from first to the end: ties after it
            x[2, :] = -INF
            x[2, first] = special
            x[3, first] = NAN if special != NAN else INF
            x[3, width - 1] = special
            _check(x)
    _check(torch.full((2, width), -INF))
    _check(torch.zeros(3, width))  # every element ties: index 0
    _check(torch.full((1, width), 1e-45))  # denormals


def test_strided_and_sliced_rows() -> None:
    x = torch.randn(6, 2 * 333 + 1)
    _check(x[:, ::2])  # a stride in the last dimension: made contiguous first
    _check(x[1:5, 3:300])  # rows one stride apart, not their width
    _check(x.t().contiguous().t()[:, :5])


def test_other_dtypes_and_empty_batches_go_to_torch() -> None:
    _check(torch.randn(3, 50, dtype=torch.float64))
    _check(torch.randn(3, 50).to(torch.bfloat16))
    _check(torch.randn(0, 50))


def test_an_empty_row_is_refused_as_torch_refuses_it() -> None:
    with pytest.raises(RuntimeError):
        torch.ops.palm_cpu.argmax_rows(torch.randn(2, 0))
    with pytest.raises((RuntimeError, IndexError)):
        torch.randn(2, 0).argmax(dim=-1)


def test_the_cpu_backend_hands_the_sampler_this_kernel() -> None:
    assert select_backend("cpu", torch.device("cpu")).argmax_rows is argmax_rows
    assert select_backend("torch", torch.device("cpu")).argmax_rows is not argmax_rows
