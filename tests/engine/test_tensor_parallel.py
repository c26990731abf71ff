"""Tensor parallelism on the CPU (gloo, two processes): this test process is rank 0, as the
engine core is, and starts a real worker process (`python -m palm_serve.engine.tp_worker`)
through start_tensor_parallel. Oracle: the unsharded model's logits over the same paged
schedule (prefill chunks, then decodes beside a later prompt), to 1e-5 relative."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers

from palm_serve.engine.config import EngineConfig
from palm_serve.engine.tp_launch import RankSpec, rendezvous_address, start_tensor_parallel
from palm_serve.model import AttentionMetadata, KVCache, load_model, save_model_dir
from palm_serve.model.convert import convert_module
from palm_serve.model.sharding import plan_shard, split_range

from conftest import make_config
from reference import palm_pytorch_class, palm_rlhf_class

RELATIVE_TOLERANCE = 1e-5
BLOCK_SIZE = 4
BLOCKS_PER_SEQ = 8


def _palm_pytorch_dir(path: Path) -> Path:
    """A reference config whose 3 query heads split unevenly (2 + 1), odd vocabulary."""
    torch.manual_seed(1)
    ref = palm_pytorch_class()(num_tokens=101, dim=48, depth=2, heads=3, dim_head=16, ff_mult=4)
    for p in ref.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    config, state = convert_module(ref.eval(), "palm-pytorch", max_positions=128)
    save_model_dir(path, config, state)
    return path


def _palm_rlhf_dir(path: Path) -> Path:
    """palm-rlhf-pytorch's variant: xPos, gamma + 1 LayerNorm, qk-RMSNorm."""
    torch.manual_seed(2)
    ref = palm_rlhf_class()(
        num_tokens=83,
        dim=48,
        depth=2,
        heads=4,
        dim_head=16,
        qk_rmsnorm=True,
        rotary_xpos_scale_base=32,
    )
    for p in ref.parameters():
        p.data.add_(torch.randn_like(p) * 0.05)
    config, state = convert_module(
        ref.eval(), "palm-rlhf-pytorch", max_positions=128, xpos_scale_base=32
    )
    save_model_dir(path, config, state)
    return path


def _llama_dir(path: Path) -> Path:
    """Grouped-query attention: 2 K/V heads over 2 ranks, one each; an untied head."""
    hf_config = transformers.LlamaConfig(
        vocab_size=101,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(hf_config).float().eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(std=1.0)
    model.save_pretrained(path, safe_serialization=True)
    return path


MODELS = {"palm-pytorch": _palm_pytorch_dir, "palm-rlhf": _palm_rlhf_dir, "llama": _llama_dir}


@contextmanager
def tensor_parallel(model_dir: Path, timeout: float = 30.0) -> Iterator[torch.nn.Module]:
    threads = torch.get_num_threads()
    spec = RankSpec(
        rank=0,
        world=2,
        address=rendezvous_address(),
        model_dir=str(model_dir),
        dtype="float32",
        device="cpu",
        kernel_backend="torch",
        prepack_cpu_linears=True,  # the shards' linears prepacked, as served
        timeout=timeout,
        start_timeout=120.0,
        cpus=None,
        # the pool run_schedule allocates on rank 0
        engine_config=EngineConfig(block_size=BLOCK_SIZE, num_blocks=BLOCKS_PER_SEQ * 3),
    )
    model = start_tensor_parallel(spec)
    try:
        yield model
        model.close()
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)


# (new tokens, tokens cached before) per sequence and step: prefill chunks, decodes beside
# a prompt that arrives later, and a decode batch.
SCHEDULE = [
    [(7, 0), (5, 0)],
    [(6, 7), (1, 5), (9, 0)],
    [(1, 13), (1, 6), (1, 9)],
    [(1, 14), (1, 7), (1, 10)],
]


@torch.inference_mode()
def run_schedule(model: torch.nn.Module, config, tokens: list[list[int]]) -> list[torch.Tensor]:
    """Logits of every row of every step of SCHEDULE, over a fresh paged cache."""
    cache = KVCache.allocate(config, BLOCKS_PER_SEQ * 3, BLOCK_SIZE)
    tables = [list(range(s * BLOCKS_PER_SEQ, (s + 1) * BLOCKS_PER_SEQ)) for s in range(3)]
    out = []
    for step in SCHEDULE:
        seqs = range(len(step))
        q_lens = [n for n, _ in step]
        ctx = [n + done for n, done in step]
        meta = AttentionMetadata.build([tables[s] for s in seqs], q_lens, ctx, BLOCK_SIZE)
        ids = [t for s in seqs for t in tokens[s][step[s][1] : ctx[s]]]
        positions = [p for s in seqs for p in range(step[s][1], ctx[s])]
        hidden = model(torch.tensor(ids), torch.tensor(positions), cache, meta)
        out.append(model.compute_logits(hidden))
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_tensor_parallel_logits_equal_one_rank(name: str, tmp_path: Path) -> None:
    model_dir = MODELS[name](tmp_path / name)
    full = load_model(model_dir)
    vocab = full.config.vocab_size
    tokens = torch.randint(0, vocab, (3, 20), generator=torch.Generator().manual_seed(4))
    expected = run_schedule(full, full.config, tokens.tolist())
    with tensor_parallel(model_dir) as model:
        got = run_schedule(model, model.config, tokens.tolist())
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.shape == b.shape
        error = ((a - b).abs().max() / b.abs().max()).item()
        assert error < RELATIVE_TOLERANCE, f"step {step}: relative error {error:.2e}"


def test_a_hung_worker_is_an_error_within_the_collective_timeout(tmp_path: Path) -> None:
    timeout = 3.0
    with tensor_parallel(_palm_pytorch_dir(tmp_path / "m"), timeout) as model:
        (worker,) = model.worker_pids
        os.kill(worker, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(RuntimeError):
                run_schedule(model, model.config, [[1] * 20] * 3)
            assert time.monotonic() - started < timeout + 5
        finally:
            os.kill(worker, signal.SIGKILL)
            os.waitpid(worker, 0)


def test_plan_splits_heads_and_columns() -> None:
    palm = make_config(vocab_size=97, heads=3, n_kv_heads=1, dim=32, ff_mult=4)
    plans = [plan_shard(palm, r, 2) for r in range(2)]
    assert [p.heads for p in plans] == [range(0, 2), range(2, 3)]
    assert [p.kv_heads for p in plans] == [range(0, 1), range(0, 1)]  # replicated
    assert [p.ff for p in plans] == [range(0, 64), range(64, 128)]
    assert [p.vocab for p in plans] == [range(0, 49), range(49, 97)]
    assert split_range(range(10, 17), 3, 2) == range(15, 17)


def test_plan_refuses_what_does_not_split() -> None:
    with pytest.raises(ValueError, match="1 query heads cannot be split over 2 ranks"):
        plan_shard(make_config(heads=1), 0, 2)
    with pytest.raises(ValueError, match=r"n_kv_heads \(3\) must be a multiple"):
        plan_shard(make_config(heads=6, n_kv_heads=3), 0, 2)
