from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
# The repository root (for training/) goes last: its top-level folders are the served
# layers, and kernels/ is named like the hub package transformers imports when installed.
# `python -m pytest` puts the working directory first; move it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT] + [str(ROOT)]

from palm_serve.model import PaLM, PaLMConfig  # noqa: E402

pytest_plugins = ["mutation_order"]


@pytest.fixture(scope="session")
def cpu_kernels_built() -> None:
    """For the tests of the C++ CPU kernels: a build that failed fails them, never skips
    them (the set-up installs the compiler they need)."""
    from palm_serve.kernels.cpu import build_error

    error = build_error()
    if error is not None:
        pytest.fail(f"the CPU kernels did not build: {error}")


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def make_config(**overrides) -> PaLMConfig:
    values = dict(vocab_size=97, dim=32, depth=2, heads=4, dim_head=16, max_positions=512)
    values.update(overrides)
    return PaLMConfig(**values)


def make_model(config: PaLMConfig | None = None, emb_std: float = 1.0, seed: int = 0) -> PaLM:
    """A random tiny model whose greedy choices depend on the context and whose top logits
    are well separated. With the default init (embedding std 0.02) logits nearly tie, and
    with only the embedding scaled up the model is nearly a bigram model: replacing the
    whole context never changes its argmax, so a greedy oracle could not catch attention,
    position or KV-cache errors. Scaling the projections up makes attention matter
    (tests/engine/test_oracle_model.py checks both properties)."""
    torch.manual_seed(seed)
    model = PaLM(config or make_config())
    torch.nn.init.normal_(model.token_emb.weight, std=emb_std)
    with torch.no_grad():
        for layer in model.layers:
            layer.fused_proj.weight.mul_(3.0)
            layer.attn_out.weight.mul_(4.0)
    return model.eval().requires_grad_(False)


@pytest.fixture
def tiny_config() -> PaLMConfig:
    return make_config()


@pytest.fixture
def tiny_model(tiny_config: PaLMConfig) -> PaLM:
    return make_model(tiny_config)
