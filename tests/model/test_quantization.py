"""Weight-only int8 (model/quantization.py): the quantizer's rounding bound, the quantized
PaLM and Llama against two oracles (the same model with each weight replaced by its
dequantized value: equal up to fp32 rounding; and the fp32 model: within the stated
bound), on the torch twin and on the compiled CPU kernel, and the bytes it saves."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from palm_serve.kernels import cpu_backend, torch_backend
from palm_serve.model import Llama, LlamaConfig
from palm_serve.model.decoder import DecoderModel
from palm_serve.model.quantization import (
    Int8Linear,
    linear_weight_bytes,
    quantize_int8,
    quantize_linears,
    weight_bytes,
)

from conftest import make_config, make_model

# The quantized model against the fp32 one, on random weights (tests' tiny models; the
# trained models' figures are in docs/BENCHMARKS.md): mean KL(fp32 || int8) of the next-
# token distributions per position, and the largest logit difference relative to the
# largest logit. Measured: PaLM (projections scaled up, sharp distributions) 1.3e-3 and
# 3.2e-2, Llama (its untied head quantized too) 2.8e-6 and 5.0e-3; the bounds leave
# ~1.6-3x margin. 6-bit weights (scale max / 31) break both models' KL bounds (2.1e-2 and
# 4.6e-5).
# model: (max mean KL, max relative logit difference)
BOUNDS = {"palm": (4e-3, 8e-2), "llama": (7e-6, 8e-3)}
# The dequantized-weight oracle: the same products in another order (the kernels scale the
# dot product, the oracle scales each weight first).
ORACLE_RTOL = 1e-5


def make_llama(seed: int = 0, **overrides: int) -> Llama:
    values = dict(vocab_size=101, dim=64, depth=2, heads=4, n_kv_heads=2, dim_head=16,
                  ff_inner=96, max_positions=256)  # fmt: skip
    values.update(overrides)
    torch.manual_seed(seed)
    model = Llama(LlamaConfig(**values))
    nn.init.normal_(model.embed_tokens.weight, std=1.0)  # well separated logits
    return model.eval().requires_grad_(False)


MODELS = {"palm": lambda: make_model(make_config(depth=2)), "llama": make_llama}
BACKENDS = {"torch": torch_backend, "cpu": cpu_backend}


# Fails, never skips, where the C++ kernels did not build (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("cpu_kernels_built")


def dequantized_copy(model: DecoderModel) -> DecoderModel:
    """The fp32 model whose blocks' linear weights are q * scale: what int8 computes."""
    oracle = copy.deepcopy(model)
    for module in [*oracle.layers.modules(), oracle.logits_head]:
        if type(module) is nn.Linear:
            q, scales = quantize_int8(module.weight)
            module.weight.copy_(q.float() * scales[:, None])
    return oracle


def quantized(model: DecoderModel, backend: str) -> DecoderModel:
    model = copy.deepcopy(model)
    model.kernels = BACKENDS[backend]()
    quantize_linears(model, model.kernels.int8_matmul)
    return model


def test_quantize_int8_rounds_to_nearest_per_channel() -> None:
    torch.manual_seed(0)
    weight = torch.randn(33, 70) * torch.logspace(-3, 1, 33)[:, None]
    weight[5] = 0.0  # an all-zero channel
    q, scales = quantize_int8(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (33,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    error = (q.float() * scales[:, None] - weight).abs()
    assert (error <= scales[:, None] / 2 * (1 + 1e-6)).all()
    nonzero = torch.arange(33) != 5
    assert (q[nonzero].abs().amax(dim=1) == 127).all()  # each channel uses the whole range
    assert scales[5] == 1.0 and not q[5].any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_quantized_model_equals_its_dequantized_oracle(name: str, backend: str) -> None:
    model = MODELS[name]()
    tokens = torch.randint(
        0, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1)
    )
    int8 = quantized(model, backend)
    # PaLM: 3 per block, its head tied to the embedding; Llama: 4 per block and its head
    linears = 3 * model.config.depth if name == "palm" else 4 * model.config.depth + 1
    assert sum(isinstance(m, Int8Linear) for m in int8.modules()) == linears
    assert not any(type(m) is nn.Linear for m in int8.layers.modules())
    expected = dequantized_copy(model).forward_dense(tokens)
    actual = int8.forward_dense(tokens)
    diff = (actual - expected).abs().max().item()
    assert diff <= ORACLE_RTOL * expected.abs().max().item(), diff


@pytest.mark.parametrize("name", MODELS)
def test_quantized_logits_within_the_bound_of_fp32(name: str) -> None:
    model = MODELS[name]()
    tokens = torch.randint(
        0, model.config.vocab_size, (4, 31), generator=torch.Generator().manual_seed(2)
    )
    reference = model.forward_dense(tokens).double()
    actual = quantized(model, "cpu").forward_dense(tokens).double()
    kl = reference.log_softmax(-1).exp() * (reference.log_softmax(-1) - actual.log_softmax(-1))
    mean_kl = kl.sum(-1).mean().item()
    relative = ((actual - reference).abs().max() / reference.abs().max()).item()
    print(f"{name}: mean KL {mean_kl:.2e}, max logit diff {relative:.2e} of max |logit|")
    max_kl, max_relative = BOUNDS[name]
    assert mean_kl <= max_kl
    assert relative <= max_relative


def test_tiny_llama_linears_shrink_at_least_3_5x() -> None:
    """The benchmark's tiny Llama (bench/make_tiny_llama.py), one of its 8 layers (each
    layer is alike) and a small vocabulary: its linears' bytes, and the whole model's."""
    model = make_llama(vocab_size=1000, dim=512, depth=1, heads=8, n_kv_heads=2, dim_head=64,
                       ff_inner=1408)  # fmt: skip
    linears, total = linear_weight_bytes(model), weight_bytes(model)
    quantize_linears(model, cpu_backend().int8_matmul)
    assert linears / linear_weight_bytes(model) >= 3.5
    assert total - weight_bytes(model) == linears - linear_weight_bytes(model)


def test_convert_writes_an_int8_checkpoint_that_loads_without_fp32(tmp_path: Path) -> None:
    """`palm-serve convert --quantization int8`: the file holds the blocks' linears as int8
    + scales, loads into Int8Linears without the fp32 checkpoint, and computes exactly what
    quantizing the fp32 model at load computes."""
    from palm_serve.model.checkpoint import WEIGHTS_FILE
    from palm_serve.model.weights import load_model
    from palm_serve.server.cli import main as cli_main

    from reference import palm_pytorch_class

    torch.manual_seed(3)
    ref = palm_pytorch_class()(num_tokens=61, dim=64, depth=2, heads=2, dim_head=16).eval()
    torch.save(ref.state_dict(), tmp_path / "ref.pt")
    for q in ("none", "int8"):
        args = ["convert", str(tmp_path / "ref.pt"), str(tmp_path / q), "--from",
                "palm-pytorch", "--quantization", q]  # fmt: skip
        assert cli_main(args) == 0
    fp32_bytes = (tmp_path / "none" / WEIGHTS_FILE).stat().st_size
    int8_bytes = (tmp_path / "int8" / WEIGHTS_FILE).stat().st_size
    assert int8_bytes < 0.6 * fp32_bytes  # linears 4x smaller; the embedding stays fp32
    backend = cpu_backend()
    loaded = load_model(tmp_path / "int8", kernels=backend)
    assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == 3 * 2
    expected = load_model(tmp_path / "none", kernels=backend)
    quantize_linears(expected, backend.int8_matmul)
    tokens = torch.randint(0, 61, (2, 17))
    assert torch.equal(loaded.forward_dense(tokens), expected.forward_dense(tokens))
    # The CPU kernel takes fp32 activations: a half-precision CPU load says so up front.
    with pytest.raises(ValueError, match="int8 weights: on the CPU they serve with dtype float32"):
        load_model(tmp_path / "int8", kernels=backend, dtype=torch.bfloat16)


def test_int8_checkpoint_errors_name_the_tensor(tmp_path: Path) -> None:
    from palm_serve.model import CheckpointError, save_model_dir
    from palm_serve.model.quantization import quantize_state

    model = make_model(make_config())
    state = quantize_state(model.state_dict())
    state["layers.0.attn_out.scales"] = torch.ones(3)
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn_out\.scales"):
        save_model_dir(tmp_path, model.config, state)
    state = model.state_dict() | {"layers.1.ff_out.scales": torch.ones(32)}
    with pytest.raises(CheckpointError, match=r"layers\.1\.ff_out\.scales: scales of no int8"):
        save_model_dir(tmp_path, model.config, state)
