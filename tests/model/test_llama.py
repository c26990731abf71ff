"""Llama against its oracle, transformers' LlamaForCausalLM (fp32, random tiny config):
dense logits, the paged forward (mixed prefill + decode batch), and loading an HF model
directory through load_model's dispatch."""

from __future__ import annotations

import asyncio

import pytest
import torch

# A declared dev dependency: a broken install must fail here, not skip the parity checks.
import transformers

from palm_serve.model import (  # noqa: E402
    AttentionMetadata,
    KVCache,
    Llama,
    LlamaConfig,
    load_config,
    load_model,
)
from palm_serve.model.llama_loader import convert_hf_state  # noqa: E402

TOLERANCE = 1e-4


def make_hf_llama(seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A random tiny HF Llama; a large embedding keeps greedy choices away from ties."""
    values = dict(
        vocab_size=101,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    values.update(overrides)
    hf_config = transformers.LlamaConfig(**values)
    hf_config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config).float().eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(std=1.0)
        for p in model.model.norm.parameters():  # non-trivial norm weights too
            p.uniform_(0.5, 1.5)
    return model


def to_ours(hf: transformers.LlamaForCausalLM) -> Llama:
    config = LlamaConfig.from_hf_dict(hf.config.to_dict())
    model = Llama(config)
    model.load_state_dict(convert_hf_state(hf.state_dict(), config, "hf"))
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("tied", [False, True])
@torch.no_grad()
def test_dense_logits_match_transformers(tied: bool) -> None:
    hf = make_hf_llama(tie_word_embeddings=tied)
    ours = to_ours(hf)
    assert ours.config.rope_theta == 500000.0 and ours.config.n_kv_heads == 2
    tokens = torch.randint(0, 101, (3, 37))
    expected = hf(tokens).logits
    assert (ours.forward_dense(tokens) - expected).abs().max() < TOLERANCE


@torch.no_grad()
def test_paged_mixed_batch_matches_transformers() -> None:
    """A prefix-cached chunk, a fresh prompt and a decode in one flattened step."""
    hf = make_hf_llama()
    ours = to_ours(hf)
    block_size, cache = 4, KVCache.allocate(ours.config, 32, 4)
    seqs = [torch.randint(0, 101, (n,)).tolist() for n in (21, 9, 14)]
    cached = [12, 0, 13]  # tokens already in the cache before the mixed step
    tables = [[5, 17, 2, 9, 30, 11], [0, 3, 4], [8, 7, 6, 1]]
    for s, n in enumerate(cached):
        if n:
            _run(ours, cache, [tables[s]], [seqs[s][:n]], [0], block_size)
    chunks = [q[c:] for q, c in zip(seqs, cached, strict=True)]
    logits = _run(ours, cache, tables, chunks, cached, block_size)
    row = 0
    for seq, c in zip(seqs, cached, strict=True):
        expected = hf(torch.tensor([seq])).logits[0, c:]
        assert (logits[row : row + len(seq) - c] - expected).abs().max() < TOLERANCE
        row += len(seq) - c


def _run(model, cache, tables, chunks, done, block_size) -> torch.Tensor:
    ids = [t for chunk in chunks for t in chunk]
    positions = [done[s] + i for s, chunk in enumerate(chunks) for i in range(len(chunk))]
    ctx = [d + len(c) for d, c in zip(done, chunks, strict=True)]
    meta = AttentionMetadata.build(tables, [len(c) for c in chunks], ctx, block_size)
    return model.compute_logits(model(torch.tensor(ids), torch.tensor(positions), cache, meta))


@torch.no_grad()
def test_load_model_dispatches_on_hf_llama_dir(tmp_path) -> None:
    hf = make_hf_llama()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    config = load_config(tmp_path)
    assert isinstance(config, LlamaConfig)
    assert (config.depth, config.n_kv_heads, config.dim_head) == (2, 2, 16)
    assert (config.bos_token_id, config.eos_token_id, config.max_positions) == (1, 2, 256)
    model = load_model(tmp_path)
    assert isinstance(model, Llama)
    tokens = torch.randint(0, 101, (2, 11))
    assert (model.forward_dense(tokens) - hf(tokens).logits).abs().max() < TOLERANCE


def test_unsupported_hf_features_are_refused() -> None:
    base = make_hf_llama().config.to_dict()
    with pytest.raises(ValueError, match="attention_bias"):
        LlamaConfig.from_hf_dict({**base, "attention_bias": True})
    scaled = {**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}
    with pytest.raises(ValueError, match="linear"):
        LlamaConfig.from_hf_dict(scaled)


class _Pieces:
    """Token i decodes to "<i>"; prompts are token ids, so encode is never needed."""

    eos_token_id = None
    bos_token_id = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError("token-id prompts only")

    def decode(self, ids: list[int]) -> str:
        return "".join(f"<{i}>" for i in ids)


async def test_engine_greedy_tokens_equal_transformers_generate() -> None:
    """Concurrent requests (mixed prefill + decode batches, partial blocks) through the
    engine give transformers' greedy generate() tokens exactly."""
    from palm_serve.engine.config import EngineConfig
    from palm_serve.engine.factory import build_async_engine
    from palm_serve.engine.sampling_params import SamplingParams

    hf = make_hf_llama(seed=1, eos_token_id=None)
    with torch.no_grad():  # larger projections: context and position sway the choices
        for name, p in hf.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(std=0.2)
    ours = to_ours(hf)
    config = EngineConfig(block_size=4, num_blocks=64, max_num_batched_tokens=16)
    engine = build_async_engine(ours, _Pieces(101), config)
    prompts = [torch.randint(0, 101, (n,)).tolist() for n in (3, 11, 6, 23)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def collect(prompt: list[int]) -> list[int]:
        request = engine.make_request(prompt, params)
        return [t async for out in engine.generate(request) for t in out.new_token_ids]

    await engine.start()
    try:
        served = await asyncio.gather(*(collect(p) for p in prompts))
    finally:
        await engine.shutdown()
    for prompt, tokens in zip(prompts, served, strict=True):
        with torch.no_grad():
            expected = hf.generate(
                torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None
            )[0, len(prompt) :]
        assert tokens == expected.tolist()
