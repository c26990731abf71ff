"""Prepacked (oneDNN) linears give the plain model's outputs, on both model families."""

from __future__ import annotations

import pytest
import torch

from palm_serve.model import AttentionMetadata, KVCache
from palm_serve.model.cpu_linear import PrepackedLinear, prepack_linears, prepacking_available

from conftest import make_config, make_model

pytestmark = pytest.mark.skipif(
    not prepacking_available(), reason="this torch build has no oneDNN linear prepacking"
)


def _paged_logits(model, tokens: list[int]) -> torch.Tensor:
    cache = KVCache.allocate(model.config, 8, 16)
    meta = AttentionMetadata.build([[3, 1, 6, 0]], [len(tokens)], [len(tokens)], 16)
    hidden = model(torch.tensor(tokens), torch.arange(len(tokens)), cache, meta)
    return model.compute_logits(hidden)


@torch.no_grad()
def test_prepacked_palm_matches_plain() -> None:
    plain = make_model(make_config(n_kv_heads=2))
    packed = make_model(make_config(n_kv_heads=2))
    count = prepack_linears(packed)
    assert count == 3 * packed.config.depth + 1  # fused, attn_out, ff_out per layer + logits
    assert isinstance(packed.layers[0].fused_proj, PrepackedLinear)
    tokens = torch.randint(0, plain.config.vocab_size, (37,)).tolist()
    expected = _paged_logits(plain, tokens)
    got = _paged_logits(packed, tokens)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    dense = torch.tensor([tokens])
    assert torch.allclose(packed.forward_dense(dense), plain.forward_dense(dense), atol=1e-3)


@torch.no_grad()
def test_prepacked_llama_untied_head() -> None:
    from palm_serve.model import Llama, LlamaConfig

    config = LlamaConfig.from_hf_dict(
        dict(
            model_type="llama",
            vocab_size=101,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    )
    torch.manual_seed(0)
    plain = Llama(config).eval()
    packed = Llama(config).eval()
    packed.load_state_dict(plain.state_dict())
    prepack_linears(packed)
    assert isinstance(packed.logits_head, PrepackedLinear)  # the untied head, prepacked
    tokens = torch.randint(0, 101, (29,)).tolist()
    expected = _paged_logits(plain, tokens)
    assert (_paged_logits(packed, tokens) - expected).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.usefixtures("cpu_kernels_built")
@pytest.mark.parametrize("rows, in_features, out_features", [(1, 64, 5), (7, 13, 33), (33, 96, 48)])
def test_the_compiled_steps_op_equals_onednns_own(rows, in_features, out_features) -> None:
    """torch.ops.palm_cpu.prepacked_linear (the compiled step's call) is oneDNN's linear,
    bit for bit, and refuses a weight that does not give out_features outputs."""
    torch.manual_seed(rows)
    linear = PrepackedLinear(torch.randn(out_features, in_features))
    x = torch.randn(rows, in_features)
    got = torch.ops.palm_cpu.prepacked_linear(x, linear.packed, out_features)
    assert torch.equal(got, linear(x))
    with pytest.raises(RuntimeError, match="outputs per row"):
        torch.ops.palm_cpu.prepacked_linear(x, linear.packed, out_features + 1)
