"""The whole PaLM forward with the Triton kernels (interpreted, in the worker process)
equals the forward with the torch twins: same weights, a fresh KVCache each, through a
chunked prefill, a mixed prefill + decode step, and a decode step."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import make_config, make_model
from interpreter_worker import worker
from triton_cases import Step, assert_matches, run_model_steps

CONFIGS = {
    "mqa": make_config(),
    "gqa-xpos": make_config(n_kv_heads=2, use_xpos=True, xpos_scale_base=16),
}
BLOCK_SIZE, NUM_BLOCKS = 4, 24


def _steps(vocab_size: int) -> list[Step]:
    rng = random.Random(0)
    pool = list(range(NUM_BLOCKS))
    rng.shuffle(pool)  # non-contiguous, out-of-order tables
    tables = [pool[0:6], pool[6:9], pool[9:12]]
    seqs = [[rng.randrange(vocab_size) for _ in range(22)] for _ in range(3)]
    return [
        # seq 0 prefills its first 11 tokens, seq 1 its whole 6-token prompt
        (tables[:2], [seqs[0][:11], seqs[1][:6]], [0, 0]),
        # seq 0's second chunk over its cached prefix, seq 1 decodes, seq 2 arrives
        (tables, [seqs[0][11:20], seqs[1][6:7], seqs[2][:5]], [11, 6, 0]),
        # everyone decodes (seq 0 crosses into a new block)
        (tables, [seqs[0][20:21], seqs[1][7:8], seqs[2][5:6]], [20, 7, 5]),
    ]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_forward_equals_torch_forward(name: str) -> None:
    config = CONFIGS[name]
    model = make_model(config)
    steps = _steps(config.vocab_size)
    expected = run_model_steps(model, steps, NUM_BLOCKS, BLOCK_SIZE)
    actual, _ = worker().call("triton_cases", "run_triton_model_steps", config,
                                 model.state_dict(), steps, NUM_BLOCKS, BLOCK_SIZE)  # fmt: skip
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        diff = assert_matches(got, want)
        print(f"{name} step {step}: max abs diff {diff:.3g}")
        greedy = model.compute_logits(got).argmax(-1)
        assert torch.equal(greedy, model.compute_logits(want).argmax(-1))


def test_triton_int8_forward_equals_torch_int8_forward() -> None:
    """--quantization int8 on the Triton backend: the blocks' linears through the Triton
    int8 linear equal the twin's (dequantize, then matmul), through the same steps."""
    from palm_serve.model.quantization import quantize_linears

    config = CONFIGS["mqa"]
    model = make_model(config)
    state = model.state_dict()
    steps = _steps(config.vocab_size)
    quantize_linears(model, model.kernels.int8_matmul)  # the torch backend: the twin
    expected = run_model_steps(model, steps, NUM_BLOCKS, BLOCK_SIZE)
    actual, _ = worker().call("triton_cases", "run_triton_model_steps", config, state, steps,
                                 NUM_BLOCKS, BLOCK_SIZE, quantization="int8")  # fmt: skip
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        print(f"int8 step {step}: max abs diff {assert_matches(got, want):.3g}")
