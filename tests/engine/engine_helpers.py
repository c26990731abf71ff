"""Shared helpers of the engine tests: a toy tokenizer, request factory, engine builders,
and the oracle (greedy tokens checked against the no-cache dense forward)."""

from __future__ import annotations

import pytest
import torch

from palm_serve.engine.block_manager import BlockManager
from palm_serve.engine.config import EngineConfig
from palm_serve.engine.factory import build_llm_engine
from palm_serve.engine.llm_engine import LLMEngine
from palm_serve.engine.outputs import RequestOutput
from palm_serve.engine.sampling_params import SamplingParams


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only contend (10-30x
    slower under load). Assign it in a test module (`one_torch_thread =
    engine_helpers.one_torch_thread`) to apply it there; restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A served token may differ from the dense argmax only when its dense logit is this close
# to the max (float rounding between batched and single computation; DESIGN.md).
TIE_TOLERANCE = 1e-4


class PieceTokenizer:
    """Token i decodes to a short piece ("a".."z", then "a1".."z1", ...): multi-token stop
    strings and holding back are easy to reason about; no EOS of its own."""

    eos_token_id = None
    bos_token_id = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        letters = "abcdefghijklmnopqrstuvwxyz"
        self.pieces = [
            letters[i % 26] + (str(i // 26) if i >= 26 else "") for i in range(vocab_size)
        ]

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError("tests pass token ids")

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def make_context_model(seed: int = 0, **config_overrides):
    """conftest's make_model: greedy choices depend on the context (see its docstring)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent))
    from conftest import make_config, make_model

    return make_model(make_config(**config_overrides), emb_std=1.0, seed=seed)


def make_engine(model, num_blocks: int | None = 512, seed: int = 0, **overrides) -> LLMEngine:
    config = EngineConfig(num_blocks=num_blocks, **overrides)
    return build_llm_engine(model, PieceTokenizer(model.config.vocab_size), config, seed=seed)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


def run(
    engine: LLMEngine,
    arrivals: dict[int, list[tuple[str, list[int], SamplingParams]]],
    max_steps: int = 100_000,
    on_step=None,
) -> dict[str, list[RequestOutput]]:
    """Step until idle; arrivals[k] are added before step k. Returns outputs per request."""
    outputs: dict[str, list[RequestOutput]] = {}
    step = 0
    while step < max_steps and (engine.has_unfinished() or any(k >= step for k in arrivals)):
        for request_id, prompt, params in arrivals.get(step, []):
            engine.add_request(request_id, prompt, params)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        if on_step is not None:
            on_step(step)
        step += 1
    assert not engine.has_unfinished(), "the engine did not drain"
    return outputs


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def text_of(outs: list[RequestOutput]) -> str:
    return "".join(o.new_text for o in outs)


def check_greedy(model, prompt: list[int], generated: list[int]) -> int:
    """Every generated token is the dense forward's argmax given the tokens before it
    (teacher forcing over prompt + output = greedy decoding), or a near-tie. Returns the
    number of near-ties accepted."""
    tokens = torch.tensor([prompt + generated[:-1]])
    with torch.inference_mode():
        logits = model.forward_dense(tokens)[0, len(prompt) - 1 :].float()  # (G, V)
    served = torch.tensor(generated)
    best = logits.max(dim=-1)
    chosen = logits.gather(1, served.unsqueeze(1)).squeeze(1)
    mismatch = served != best.indices
    assert bool((best.values[mismatch] - chosen[mismatch] <= TIE_TOLERANCE).all()), (
        f"served {generated} but the dense argmax is {best.indices.tolist()}"
    )
    return int(mismatch.sum())


def check_same_logprobs(
    outs: list[RequestOutput], reference: list[RequestOutput], tokens: list[int], tol: float
) -> None:
    """outs' logprob entries are for `tokens` and equal the reference's: the chosen token's
    logprob within tol, the same top tokens in the same order."""
    have = [lp for o in outs for lp in o.logprobs]
    want = [lp for o in reference for lp in o.logprobs]
    assert [e.token_id for e in have] == tokens
    for a, b in zip(have, want, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=tol)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def assert_pool_whole(engine: LLMEngine) -> None:
    bm: BlockManager = engine.block_manager
    assert not engine.has_unfinished() and not engine.core.seqs
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert bm.usage == 0.0


def make_request(
    request_id: str, prompt: list[int], params: SamplingParams | None = None, vocab_size: int = 97
):
    """A Sequence as the engine builds one (for scheduler tests without a model)."""
    from palm_serve.engine.sequence import Sequence

    return Sequence(
        request_id=request_id,
        prompt_token_ids=list(prompt),
        params=params or greedy(4),
        generator=torch.Generator().manual_seed(0),
    )


def make_scheduler(num_blocks: int, block_size: int = 4, max_model_len: int = 10_000, **kw):
    from palm_serve.engine.scheduler import Scheduler

    config = EngineConfig(num_blocks=num_blocks, block_size=block_size, **kw)
    bm = BlockManager(num_blocks, block_size, config.enable_prefix_caching)
    return Scheduler(config, bm, max_model_len, eos_token_id=None)
